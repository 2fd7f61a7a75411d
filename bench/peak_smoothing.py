"""The peak stage of a stored map, block summaries and join: as it was before against as it is now.

Before, ``summarise_peak_block`` convolved every pixel of a block with the disk kernel (float64), linked the
candidates by a distance transform of the whole block and sent every candidate to the driver, which solved every
component with the greedy loop.  Now a block smooths only pixels within the kernel's reach of a pixel above the
threshold (bit-identical values, :func:`wsi_lymph.detection.peaks.smooth_probability_at`), stamps the linking disk
around sparse candidates, and solves the components that lie wholly inside its core itself; the driver joins only
the components that reach a block border, and answers one-lymphocyte components without the loop.  Since the
driver ran out of memory on dense slides, a block sends only the bounding box of each component that reaches its
border; the join's second round solves them from windows read again from the map (timed here in the join).

Since then smoothing runs in exact integer arithmetic, as runs of equal weight, and dense masks are dilated row
by row instead of by the distance transform.  The third way, ``float``, is the stage just before that change:
the current code with the float64 smoothing (summed in ``ndimage.convolve``'s order, every pixel of a block where
more than 1/8 could pass) and the distance transform swapped back in.

Since then blocks and windows also run the greedy's settling rounds before linking (``bench/peak_settling.py``
compares the stage with and without them); ``float`` and ``now`` both have them, ``previous`` does not.

This bench runs the three on every 2,048-px block of a stored map (the earlier ways are re-implemented here as
references), checks that the two float ways give identical centres, prints the centres in which the integer way
differs from them (it may break an exact tie differently: float summation order makes one of two equal values
larger; the values at shared centres differ by the quantisation, < 1e-7, asserted), and times blocks and join
alternately, ``--repeats`` times, on one core (the stage's CPU time; the engine spreads the blocks over its
workers).

Usage::

    .venv/bin/wsi-lymph probmap ../shared/data/slides/cmu-1-small-region.svs --out /tmp/pm
    .venv/bin/python bench/peak_smoothing.py --map /tmp/pm/cmu-1-small-region/prob.zarr
    # a lymphocyte-dense 10,000^2 px mosaic of CMU-1 tiles (bench/student_size_curve.py):
    .venv/bin/python bench/student_size_curve.py --sizes 10000 --write-slides /tmp/mosaic
    .venv/bin/wsi-lymph probmap /tmp/mosaic/cmu1-mosaic-10000.tif --out /tmp/pm
    .venv/bin/python bench/peak_smoothing.py --map /tmp/pm/cmu1-mosaic-10000/prob.zarr --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import zarr
from scipy import ndimage

from wsi_lymph.constants import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX
from wsi_lymph.detection import peaks
from wsi_lymph.detection.peaks import (
    PEAK_BLOCK_PX,
    _empty_summary,
    _join_components,
    border_components,
    border_windows,
    disk_kernel,
    greedy_component,
    linking_reach_px,
    merge_centres,
    merge_windows,
    read_with_halo,
    solve_border_components,
    summarise_peak_block,
)
from wsi_lymph.engine.centres import plan_peaks


def previous_summary(padded: np.ndarray, box: tuple[int, int, int, int], halo_px: int, threshold: float) -> dict:
    """The block summary as computed before: the whole block smoothed, the distance transform for linking.

    It read the smoothing radius plus the linking reach around the block (no settling rounds then): the
    outer part of today's halo is cut off.
    """
    kernel = disk_kernel(SMOOTH_RADIUS_PX)
    smooth_half = kernel.shape[0] // 2
    reach = linking_reach_px(CLEAR_RADIUS_PX)
    unused = halo_px - smooth_half - reach
    padded = padded[unused:-unused, unused:-unused] if unused else padded
    r0, r1, c0, c1 = box
    if padded.max() <= threshold:
        return previous_empty_summary(r1 - r0, c1 - c0)
    smoothed = ndimage.convolve(padded.astype(np.float64), kernel, mode="reflect")[
        smooth_half:-smooth_half, smooth_half:-smooth_half]
    candidates = smoothed > threshold
    linked = (ndimage.distance_transform_edt(~candidates) <= reach)[reach:-reach, reach:-reach]
    core = smoothed[reach:-reach, reach:-reach]
    labels, count = ndimage.label(linked, structure=np.ones((3, 3), dtype=bool))
    rows, cols = np.nonzero(core > threshold)
    return {"rows": rows + r0, "cols": cols + c0, "values": core[rows, cols], "labels": labels[rows, cols],
            "count": count, "top": labels[0].copy(), "bottom": labels[-1].copy(), "left": labels[:, 0].copy(),
            "right": labels[:, -1].copy()}


def previous_empty_summary(height: int, width: int) -> dict:
    none = np.zeros(0, dtype=np.int64)
    return {**_empty_summary(height, width), "rows": none, "cols": none, "values": np.zeros(0), "labels": none}


def previous_greedy_per_component(rows, cols, values, owner, threshold, clear_radius_px):
    """The driver's loop as it was: the greedy on every component."""
    centres, scores = [], []
    order = np.argsort(owner, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(owner[order])) + 1):
        if len(members) == 0:
            continue
        found, found_scores = greedy_component(rows[members], cols[members], values[members], threshold,
                                               clear_radius_px)
        centres.append(found)
        scores.append(found_scores)
    if not centres:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    return np.concatenate(centres), np.concatenate(scores)


def previous_join(graph, summaries: dict, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``centres_from_summaries`` as it was: every candidate joined and solved on the driver."""
    heights, widths = graph.chunks
    grid = (len(heights), len(widths))
    ordered = [summaries.get((i, j)) or previous_empty_summary(heights[i], widths[j]) for i, j in np.ndindex(grid)]
    component = _join_components(ordered, grid)
    rows = np.concatenate([b["rows"] for b in ordered])
    cols = np.concatenate([b["cols"] for b in ordered])
    values = np.concatenate([b["values"] for b in ordered])
    owner = np.concatenate([component[i][b["labels"]] for i, b in enumerate(ordered)])
    centres, scores = previous_greedy_per_component(rows, cols, values, owner, threshold, CLEAR_RADIUS_PX)
    order = np.lexsort((centres[:, 1], centres[:, 0]))
    return centres[order], scores[order]


def border_join(array, scale: np.float32, shape_rc: tuple[int, int]):
    """The join as it is now: components across borders joined on the driver, each solved from a window read
    again from the map (the ``peaks-border`` tasks, run here one after another)."""
    def join(graph, summaries: dict, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        boxes, seeds = border_components(graph, summaries)
        windows, window_of = merge_windows(border_windows(boxes, shape_rc))
        solved = []
        for k, window in enumerate(windows):
            padded = read_with_halo(array, window, graph.halo_px).astype(np.float32) * scale
            solved.append(solve_border_components(padded, window, shape_rc, graph.halo_px, seeds[window_of == k],
                                                  threshold))
        return merge_centres(summaries, solved)
    return join


def float_smoothing_at(prob: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: float = SMOOTH_RADIUS_PX
                       ) -> np.ndarray:
    """Smoothing as it was before the integer arithmetic: float64 products summed in ``ndimage.convolve``'s order
    (the flipped kernel's taps in C order), the whole block convolved where more than 1/8 of it could pass."""
    kernel = disk_kernel(radius_px)
    half = kernel.shape[0] // 2
    if rows.size > (prob.shape[0] - 2 * half) * (prob.shape[1] - 2 * half) // 8:
        return ndimage.convolve(prob.astype(np.float64), kernel, mode="reflect")[rows, cols]
    flipped = kernel[::-1, ::-1]
    flat = np.ascontiguousarray(prob).ravel()
    width = prob.shape[1]
    centre = rows.astype(np.int64) * width + cols
    total = np.zeros(centre.shape, dtype=np.float64)
    for (dr, dc), weight in np.ndenumerate(flipped):
        if abs(weight) > np.finfo(np.float64).eps:
            total += np.float64(weight) * flat[centre + ((dr - half) * width + (dc - half))]
    return total


def transform_dilation(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Dense masks dilated as before: the Euclidean distance transform."""
    return ndimage.distance_transform_edt(~mask) <= radius_px


@contextlib.contextmanager
def float_smoothing():
    """The current stage with the smoothing and dense dilation of the commit before the integer arithmetic."""
    saved = peaks.smooth_probability_at, peaks._dilate_by_disk_rows
    peaks.smooth_probability_at, peaks._dilate_by_disk_rows = float_smoothing_at, transform_dilation
    try:
        yield
    finally:
        peaks.smooth_probability_at, peaks._dilate_by_disk_rows = saved


def run_stage(stage, blocks: dict, summarise, join) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """(seconds of the block summaries, seconds of the join, centres and scores)."""
    start = time.perf_counter()
    summaries = {index: summarise(padded, box, stage.graph.halo_px, stage.threshold)
                 for index, (box, padded) in blocks.items()}
    middle = time.perf_counter()
    found = join(stage.graph, summaries, stage.threshold)
    return middle - start, time.perf_counter() - middle, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", required=True, help="a stored prob.zarr (wsi-lymph probmap --out DIR)")
    parser.add_argument("--threshold", type=float, help="threshold on smoothed P (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stage = plan_peaks(args.map, args.threshold)
    array = zarr.open_array(args.map, mode="r")
    scale = np.float32(dict(array.attrs)["wsi_lymph"]["value_scale"])
    blocks = {index: (box, read_with_halo(array, box, stage.graph.halo_px).astype(np.float32) * scale)
              for index, box in zip(stage.graph.blocks, stage.graph.boxes, strict=True)}
    def summarise_now(padded, box, halo_px, threshold):
        return summarise_peak_block(padded, box, stage.shape_rc, halo_px, threshold)

    now = (summarise_now, border_join(array, scale, stage.shape_rc))
    ways = {"previous": ((previous_summary, previous_join), contextlib.nullcontext),
            "float": (now, float_smoothing), "now": (now, contextlib.nullcontext)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    results = {}
    for _ in range(args.repeats):  # alternating, each way on the same blocks
        for name, ((summarise, join), context) in ways.items():
            with context():
                block_s, join_s, results[name] = run_stage(stage, blocks, summarise, join)
            times[name].append((block_s, join_s))
    for part in (0, 1):  # the two float ways: the same centres and values
        np.testing.assert_array_equal(results["previous"][part], results["float"][part])
    (float_centres, float_scores), (centres, scores) = results["float"], results["now"]
    before, after = ({tuple(rc): value for rc, value in zip(c.tolist(), v, strict=True)}
                     for c, v in ((float_centres, float_scores), (centres, scores)))
    shared = before.keys() & after.keys()
    assert max((abs(before[rc] - after[rc]) for rc in shared), default=0.0) < 1e-7
    print(f"map {array.shape} {array.dtype}; threshold {stage.threshold}; {len(blocks)} peak blocks of "
          f"{PEAK_BLOCK_PX} px + {stage.graph.halo_px} px halo; {len(centres)} centres now, {len(float_centres)} "
          f"before; {len(after.keys() - shared)} now and {len(before.keys() - shared)} before are not in the other: "
          f"{sorted(after.keys() - shared)[:4]} / {sorted(before.keys() - shared)[:4]}")
    for name, rows in times.items():
        totals = [b + j for b, j in rows]
        print(f"{name:>9}: blocks {statistics.median(b for b, _ in rows):7.2f} s, join "
              f"{statistics.median(j for _, j in rows):6.2f} s, total {statistics.median(totals):7.2f} s "
              f"({min(totals):.2f}-{max(totals):.2f})")
    for name in ("previous", "float"):
        ratios = [(pb + pj) / (nb + nj) for (pb, pj), (nb, nj) in zip(times[name], times["now"], strict=True)]
        print(f"speed-up of the stage against {name}: {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x over {args.repeats} repeats)")


if __name__ == "__main__":
    main()
