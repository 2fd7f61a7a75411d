"""Time and memory of ``wsi-lymph detect`` with every default against slide size, on real H&E texture.

Each slide is a pyramidal, JPEG-compressed TIFF written tile by tile with tifffile (never whole in memory), at
0.5 µm/px in its resolution tags, like a 20x scan.  Its tissue is real: an ellipse filling ~50% of the slide is
paved with 2,048² px cells cut from ``shared/data/slides/cmu-1-small-region.svs`` (20x, 0.499 µm/px), each cell
in one of the 8 flips/rotations so that neighbours differ; outside the ellipse is white glass, as on a scanned
slide.  CMU-1's own glass and fat stay in the cells, so the analysed share is what a real slide gives.

``detect`` runs on each slide with its defaults (the student, 2 local workers) in a fresh process, cluster start
included; the peak resident memory of the whole process tree is sampled every 0.2 s, with the peaks of the driver
alone and of the largest other process (a worker or a nanny).

Usage::

    .venv/bin/python bench/student_size_curve.py --sizes 5000 10000 20000 --json size-curve.json
    .venv/bin/python bench/student_size_curve.py --sizes 10000 --write-slides DIR   # the slides only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import openslide
import tifffile
from process_tree import run_sampling_rss

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
TILE = 512
CELL = 2048  # texture cells (a multiple of TILE, so that every tile lies in one cell)
DOWNSAMPLES = (1, 4, 16)


def texture_cells(source: Path) -> list[np.ndarray]:
    """The 8 flips/rotations of a 2,048² px level-0 window of the source slide, as RGB uint8."""
    with openslide.OpenSlide(str(source)) as slide:
        width, height = slide.dimensions
        window = slide.read_region(((width - CELL) // 2, (height - CELL) // 2), 0, (CELL, CELL))
    rgb = np.asarray(window.convert("RGB"))
    turns = [np.rot90(rgb, k) for k in range(4)]
    return [np.ascontiguousarray(view) for t in turns for view in (t, t[:, ::-1])]


def cell_view(row: int, col: int) -> int:
    """Which of the 8 views pave cell (row, col): neighbours differ."""
    return (row * 3 + col * 5) % 8


def in_tissue(row: int, col: int, cells: int) -> bool:
    """Whether cell (row, col) lies in the tissue ellipse (half the slide's area)."""
    centre = (cells - 1) / 2
    radius = cells / 2 * np.sqrt(2 / np.pi) * 1.0  # area pi r^2 = cells^2 / 2
    return (row - centre) ** 2 + (col - centre) ** 2 <= radius**2


def write_slide(path: Path, size_px: int, views: list[np.ndarray]) -> float:
    """Write the slide; return its share of tissue cells."""
    cells = -(-size_px // CELL)
    pyramids = {down: [v[::down, ::down] for v in views] for down in DOWNSAMPLES}

    def tiles(down: int):
        level_px = -(-size_px // down)
        cell_px = CELL // down
        white = np.full((TILE, TILE, 3), 255, np.uint8)
        for y in range(0, level_px, TILE):
            for x in range(0, level_px, TILE):
                tile = white.copy()
                # A tile of a reduced level may span several cells: fill it cell by cell.
                for cy in range(y // cell_px, min((y + TILE - 1) // cell_px, cells - 1) + 1):
                    for cx in range(x // cell_px, min((x + TILE - 1) // cell_px, cells - 1) + 1):
                        if not in_tissue(cy, cx, cells):
                            continue
                        view = pyramids[down][cell_view(cy, cx)]
                        y0, x0 = max(y, cy * cell_px), max(x, cx * cell_px)
                        y1, x1 = min(y + TILE, (cy + 1) * cell_px), min(x + TILE, (cx + 1) * cell_px)
                        tile[y0 - y: y1 - y, x0 - x: x1 - x] = view[y0 - cy * cell_px: y1 - cy * cell_px,
                                                                    x0 - cx * cell_px: x1 - cx * cell_px]
                yield tile

    px_per_cm = 10_000 / 0.5
    options = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                   dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        # Reduced levels as further pages of the main chain: the layout OpenSlide reads as a pyramid.
        tif.write(tiles(1), shape=(size_px, size_px, 3),
                  resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", **options)
        for down in DOWNSAMPLES[1:]:
            tif.write(tiles(down), shape=(-(-size_px // down),) * 2 + (3,), subfiletype=1, **options)
    return float(np.mean([[in_tissue(r, c, cells) for c in range(cells)] for r in range(cells)]))


def run_detect(slide: Path, out: Path, workers: int | None) -> dict:
    command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(slide), "--out", str(out), "--dashboard", ":0"]
    if workers:
        command += ["--workers", str(workers)]
    single: dict = {}
    wall, peak, _ = run_sampling_rss(command, os.environ.copy(), per_process=single)
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "driver_peak_rss_gb": round(single["driver_peak_bytes"] / 1e9, 2),
            "largest_worker_peak_rss_gb": round(single["largest_child_peak_bytes"] / 1e9, 2), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000, 20_000])
    parser.add_argument("--workers", type=int, help="detect --workers (default: detect's own default)")
    parser.add_argument("--tmp", type=Path, help="folder for the slides and outputs (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--write-slides", type=Path, metavar="DIR",
                        help="only write the slides into DIR (cmu1-mosaic-<size>.tif), for other benches")
    args = parser.parse_args()
    views = texture_cells(SOURCE)
    if args.write_slides:
        args.write_slides.mkdir(parents=True, exist_ok=True)
        for size_px in args.sizes:
            write_slide(args.write_slides / f"cmu1-mosaic-{size_px}.tif", size_px, views)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size_px in args.sizes:
            slide = Path(tmp) / f"cmu1-mosaic-{size_px}.tif"
            tissue_cells = write_slide(slide, size_px, views)
            result = run_detect(slide, Path(tmp) / f"out-{size_px}", args.workers)
            summary = result.pop("summary")
            row = {"size_px": size_px, "slide_mp": size_px**2 / 1e6, "file_mb": round(slide.stat().st_size / 1e6, 1),
                   "tissue_cell_share": round(tissue_cells, 3), **result,
                   **{key: summary.get(key) for key in ("count", "blocks_total", "blocks_skipped",
                                                         "tissue_area_mm2", "analysed_area_mm2", "timings_s")}}
            row["s_per_slide_mp"] = round(row["wall_s"] / row["slide_mp"], 3)
            rows.append(row)
            slide.unlink()
            print(json.dumps(row), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; detect defaults")
    print("| slide | file | blocks (skipped) | lymphocytes | peak RSS, all (driver, largest other) | wall "
          "| s per slide MP |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size_px']:,}² px | {r['file_mb']:.0f} MB | {r['blocks_total']:,} ({r['blocks_skipped']:,}) | "
              f"{r['count']:,} | {r['peak_rss_gb']:.2f} GB ({r['driver_peak_rss_gb']:.2f}, "
              f"{r['largest_worker_peak_rss_gb']:.2f}) | {r['wall_s']:.0f} s | {r['s_per_slide_mp']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
