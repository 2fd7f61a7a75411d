"""Storage per mm² of tissue, working map against its OME-Zarr pyramid, and the time the pyramid and report add.

Runs ``wsi-lymph detect --keep-map`` (the default model, 1 worker) on the slides into ``--out`` (one batch; a slide
without a resolution in its file gets ``--mpp``), then per finished slide:

* bytes on disk of ``prob.zarr`` (the full-resolution working map, deleted after a run without ``--keep-map``)
  and of ``prob.ome.zarr`` (the pyramid that stays), each per mm² of tissue (``summary.json``);
* the pyramid stage's seconds (``timings_s.pyramid``), the time to delete the working map, and the time to
  write ``report.html`` (best of 5), as a fraction of the slide's wall time (``batch.csv``'s ``wall_s``).

Usage::

    .venv/bin/python bench/outputs_storage.py [--out /tmp/bench-outputs] [--mpp 0.5] [SLIDE ...]

Default slides: the two real slides in ``../shared/data/slides`` (the TCGA one records no µm/px: 0.5 assumed, as
elsewhere in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from wsi_lymph.io.ome_zarr import PYRAMID_NAME, remove_working_map
from wsi_lymph.io.report import read_batch_rows, write_report
from wsi_lymph.slides.reader import open_slide

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
SLIDES = [DATA / "cmu-1-small-region.svs", DATA / "tcga-cr-7395-01a-01-ts1.svs"]


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*", type=Path, default=SLIDES)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-outputs"))
    parser.add_argument("--mpp", type=float, default=0.5, help="for slides whose file records no µm/px")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    header = ("slide", "tissue mm²", "map MB", "map B/mm²", "pyramid MB", "pyramid B/mm²", "ratio", "levels",
              "pyramid s", "delete s", "report s", "wall s", "added %")
    lines = []
    for slide in args.slides:  # one batch per slide: --mpp only where the file has none
        out = args.out / slide.stem
        extra = [] if open_slide(slide).mpp else ["--mpp", str(args.mpp)]
        command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(slide), *extra, "--out", str(out),
                   "--keep-map", "--workers", "1", "--dashboard", "127.0.0.1:0"]
        print("$", " ".join(["wsi-lymph", *command[3:]]), flush=True)
        subprocess.run(command, check=True)
        report_s = []
        for _ in range(5):
            started = time.perf_counter()
            write_report(out)
            report_s.append(time.perf_counter() - started)
        [row] = read_batch_rows(out)
        folder = out / row["name"]
        summary = json.loads((folder / "summary.json").read_text())
        tissue = summary["tissue_area_mm2"]
        full, pyramid = _bytes(folder / "prob.zarr"), _bytes(folder / PYRAMID_NAME)
        levels = len(json.loads((folder / PYRAMID_NAME / ".zattrs").read_text())["multiscales"][0]["datasets"])
        started = time.perf_counter()
        remove_working_map(folder)
        delete_s = time.perf_counter() - started
        pyramid_s, wall_s, report_each_s = summary["timings_s"]["pyramid"], float(row["wall_s"]), min(report_s)
        added = (pyramid_s + delete_s + report_each_s) / wall_s
        lines.append(" | ".join([row["name"], f"{tissue:.3f}", f"{full / 1e6:.1f}", f"{full / tissue:.3g}",
                                 f"{pyramid / 1e6:.2f}", f"{pyramid / tissue:.3g}", f"{full / pyramid:.0f}x",
                                 str(levels), f"{pyramid_s:.2f}", f"{delete_s:.2f}", f"{report_each_s:.3f}",
                                 f"{wall_s:.1f}", f"{100 * added:.1f}"]))
    print(" | ".join(header))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
