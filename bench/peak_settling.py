"""The peak stage with the greedy's settling rounds against the stage of another checkout (before them).

Blocks and border windows now settle the candidates that come first in their clearing disk before they link the
rest (:func:`wsi_lymph.detection.peaks._settle`), so the components that cross block borders, and the windows
read again to solve them, stay small on lymphocyte-dense maps.  This bench runs the whole peak stage of a stored
map (every ``peaks`` block, the join, every ``peaks-border`` task: the engine's own functions, one after another
in one process on one core) with this checkout and with ``--reference-tree`` (a checkout of an earlier commit,
e.g. ``git worktree add /tmp/before 1819e43``), alternately, each run in a fresh process.  Each process first
summarises one block untimed (imports, caches).  It prints, per run, the seconds of the block pass and of the
border pass, the border windows (count, total and largest area), the process's peak resident memory, and
checks that both trees give the same centres and scores, bit for bit.

``--survey R0 C0 SIZE`` instead tells what the rounds leave: on a SIZE² px part of the map (top-left R0, C0), for
0 to 3 rounds, the candidates left undecided, their linked components and the largest component's bounding box.

Usage::

    .venv/bin/python bench/student_size_curve.py --sizes 10000 --write-slides /tmp/mosaic
    .venv/bin/wsi-lymph probmap /tmp/mosaic/cmu1-mosaic-10000.tif --out /tmp/pm
    git worktree add /tmp/before 1819e43
    .venv/bin/python bench/peak_settling.py --map /tmp/pm/cmu1-mosaic-10000/prob.zarr --reference-tree /tmp/before
    .venv/bin/python bench/peak_settling.py --map /tmp/pm/cmu1-mosaic-10000/prob.zarr --survey 16000 16000 8192
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_stage(prob_store: str) -> dict:
    """The whole peak stage of ``prob_store`` in this process, timed (the tree is whatever ``wsi_lymph`` imports)."""
    from wsi_lymph.engine.centres import join_peaks, peak_block_of_store, peak_border_of_store, plan_border, plan_peaks

    stage = plan_peaks(prob_store)
    peak_block_of_store(stage.store, stage.graph.boxes[0], stage.graph.halo_px, stage.threshold)  # untimed
    start = time.perf_counter()
    for index, box in zip(stage.graph.blocks, stage.graph.boxes, strict=True):
        stage.summaries[index] = peak_block_of_store(stage.store, box, stage.graph.halo_px, stage.threshold)
    middle = time.perf_counter()
    plan_border(stage)
    for number, group in enumerate(stage.border_groups):
        in_group = np.isin(stage.border_window_of, group)
        stage.solved[number] = peak_border_of_store(
            stage.store, stage.border_windows[group], stage.border_seeds[in_group],
            np.searchsorted(group, stage.border_window_of[in_group]), stage.graph.halo_px, stage.threshold)
    end = time.perf_counter()
    centres, scores = join_peaks(stage)
    windows = stage.border_windows
    areas = (windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2]) if len(windows) else np.zeros(1)
    return {"blocks_s": middle - start, "border_s": end - middle, "halo_px": stage.graph.halo_px,
            "border_components": len(stage.border_seeds), "windows": len(windows),
            "window_mp": float(areas.sum() / 1e6), "largest_window_mp": float(areas.max() / 1e6),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "centres": len(centres),
            "sha256": hashlib.sha256(centres.tobytes() + scores.tobytes()).hexdigest()}


def survey(prob_store: str, top: int, left: int, size: int) -> None:
    """Print what 0 to 3 settling rounds leave undecided on a part of the map (the part alone, as one window)."""
    import zarr
    from scipy import ndimage

    from wsi_lymph.constants import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX
    from wsi_lymph.detection.peaks import _settle, dilate_by_disk, linking_reach_px, smooth_probability

    array = zarr.open_array(prob_store, mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    prob = np.asarray(array[top:top + size, left:left + size]).astype(np.float32) * np.float32(attrs["value_scale"])
    smoothed = smooth_probability(prob, SMOOTH_RADIUS_PX)
    rows, cols = np.nonzero(smoothed > attrs["model"]["threshold"])
    values = smoothed[rows, cols]
    print(f"{size}² px at ({top}, {left}): {rows.size:,} candidates")
    for rounds in range(4):
        _, decided = _settle(rows, cols, values, prob.shape, (0, size, 0, size), CLEAR_RADIUS_PX, rounds)
        mask = np.zeros(prob.shape, dtype=bool)
        mask[rows[~decided], cols[~decided]] = True
        labels, count = ndimage.label(dilate_by_disk(mask, linking_reach_px(CLEAR_RADIUS_PX)), np.ones((3, 3), bool))
        boxes = [(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(labels)]
        largest = max(boxes, key=lambda hw: hw[0] * hw[1], default=(0, 0))
        print(f"{rounds} rounds: {(~decided).sum():,} undecided ({(~decided).mean():.1%}), {count:,} components, "
              f"largest {largest[0]:,} x {largest[1]:,} px")


def run_in_fresh_process(tree: Path, prob_store: str) -> dict:
    """:func:`run_stage` in a fresh interpreter that imports ``wsi_lymph`` from ``tree``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # An editable install finds the package through a finder on sys.meta_path, ahead of sys.path: drop it.
    code = (f"import json, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            f"sys.path[:0] = [{str(tree)!r}, {str(REPO / 'bench')!r}]; import wsi_lymph, peak_settling; "
            f"assert wsi_lymph.__file__.startswith({str(tree)!r}), wsi_lymph.__file__; "
            f"print(json.dumps(peak_settling.run_stage({prob_store!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", required=True, help="a stored prob.zarr (wsi-lymph probmap --out DIR)")
    parser.add_argument("--reference-tree", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--survey", type=int, nargs=3, metavar=("R0", "C0", "SIZE"),
                        help="only print what the rounds leave undecided on this part of the map")
    args = parser.parse_args()
    if args.survey:
        survey(str(args.map), *args.survey)
        return
    if args.reference_tree is None:
        parser.error("--reference-tree is required (or --survey)")
    if not (args.reference_tree / "wsi_lymph" / "__init__.py").is_file():
        parser.error(f"--reference-tree {args.reference_tree}: no wsi_lymph package in it")
    trees = {"reference": args.reference_tree.resolve(), "now": REPO}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name in (list(trees) if repeat % 2 == 0 else list(trees)[::-1]):  # alternating order
            row = run_in_fresh_process(trees[name], str(Path(args.map).resolve()))
            runs[name].append(row)
            print(name, json.dumps(row), flush=True)
    if {row["sha256"] for rows in runs.values() for row in rows} != {runs["now"][0]["sha256"]}:
        sys.exit("the two trees found different centres")
    for name, rows in runs.items():
        totals = [r["blocks_s"] + r["border_s"] for r in rows]
        print(f"{name:>9}: halo {rows[0]['halo_px']} px; blocks {statistics.median(r['blocks_s'] for r in rows):.1f} s,"
              f" border {statistics.median(r['border_s'] for r in rows):.1f} s, total {statistics.median(totals):.1f} s"
              f" ({min(totals):.1f}-{max(totals):.1f}); {rows[0]['border_components']} border components in "
              f"{rows[0]['windows']} windows, {rows[0]['window_mp']:.1f} MP, largest {rows[0]['largest_window_mp']:.2f}"
              f" MP; peak RSS {max(r['peak_rss_gb'] for r in rows):.2f} GB; {rows[0]['centres']} centres")
    ratios = [(r["blocks_s"] + r["border_s"]) / (n["blocks_s"] + n["border_s"])
              for r, n in zip(runs["reference"], runs["now"], strict=True)]
    print(f"stage time, reference / now: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x over "
          f"{args.repeats} repeats); same centres and scores in every run")


if __name__ == "__main__":
    main()
