"""Peak memory and time of ``wsi-lymph detect`` on synthetic pyramidal slides of growing size.

Two slides are written with tifffile (tiled, zlib, a SubIFD pyramid, 0.5 µm/px
in the TIFF resolution tags): 10,000² and 20,000² px of white glass holding the
same amount of tissue (``--islands`` squares of H&E-like texture).  ``detect``
runs on each in a fresh process with its own LocalCluster; the peak resident
memory of the whole process tree (CLI, scheduler, workers) is sampled every
0.2 s.  The same tissue in a 4x larger slide should cost about the same
memory and time: the slide is never loaded whole and glass is skipped.

Usage::

    .venv/bin/python bench/detect_memory.py [--sizes 10000 20000] [--islands 2] [--island-px 256]
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
import tifffile
from process_tree import run_sampling_rss

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TILE = 512


def tissue_texture(size: int, seed: int) -> np.ndarray:
    """Pink stroma with purple nuclei and smaller, darker lymphocyte-like dots."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (228, 150, 196)
    rows, cols = np.mgrid[:size, :size]
    for radius, colour, count in ((7, (120, 70, 160), size // 12), (4, (60, 30, 110), size // 16)):
        for r, c in rng.integers(0, size, (count, 2)):
            disk = (rows[max(r - radius, 0): r + radius + 1, max(c - radius, 0): c + radius + 1] - r) ** 2 + (
                cols[max(r - radius, 0): r + radius + 1, max(c - radius, 0): c + radius + 1] - c) ** 2 <= radius**2
            image[max(r - radius, 0): r + radius + 1, max(c - radius, 0): c + radius + 1][disk] = colour
    return image


def write_slide(path: Path, size: int, islands: list[tuple[int, int]], island: np.ndarray) -> None:
    """A pyramidal TIFF whose tiles are generated on the fly (the slide is never in memory)."""
    def tiles(level_size: int, down: int):
        white = np.full((TILE, TILE, 3), 255, np.uint8)
        for y in range(0, level_size, TILE):
            for x in range(0, level_size, TILE):
                tile = white
                for iy, ix in islands:
                    # Islands are placed on tile boundaries of level 0, so each falls in whole tiles.
                    oy, ox = iy // down - y, ix // down - x
                    part = island[::down, ::down]
                    if -part.shape[0] < oy < TILE and -part.shape[1] < ox < TILE:
                        tile = tile.copy() if tile is white else tile
                        ys, xs = max(oy, 0), max(ox, 0)
                        patch = part[ys - oy: TILE - oy, xs - ox: TILE - ox]
                        tile[ys: oy + part.shape[0], xs: ox + part.shape[1]] = patch
                yield tile

    px_per_cm = 10_000 / 0.5
    options = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(size, 1), shape=(size, size, 3), subifds=2, resolution=(px_per_cm, px_per_cm),
                  resolutionunit="CENTIMETER", **options)
        for down in (4, 16):
            tif.write(tiles(-(-size // down), down), shape=(-(-size // down),) * 2 + (3,), subfiletype=1, **options)


def run_detect(slide: Path, out: Path, args) -> dict:
    env = os.environ.copy()
    env.setdefault("WSI_LYMPH_MODEL_SOURCE", str(SHARED / "models" / "janowczyk2016-lymphocyte"))
    command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(slide), "--out", str(out), "--model", args.model,
               "--stride", str(args.stride), "--workers", str(args.workers), "--dashboard", ":0"]
    wall, peak, _ = run_sampling_rss(command, env)
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    return {"peak_rss_gb": peak / 1e9, "wall_s": wall, "count": summary["count"],
            "blocks": summary["blocks_total"], "skipped": summary["blocks_skipped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--island-px", type=int, default=256)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="janowczyk2016/fold1")
    args = parser.parse_args()
    island = tissue_texture(args.island_px, seed=1)
    tissue_mp = args.islands * args.island_px**2 / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = Path(tmp) / f"synthetic-{size}.tif"
            spots = [(TILE * (2 + 4 * k), TILE * (3 + 5 * k)) for k in range(args.islands)]
            write_slide(slide, size, spots, island)
            result = run_detect(slide, Path(tmp) / "out", args)
            result |= {"size_px": size, "file_mb": slide.stat().st_size / 1e6,
                       "s_per_tissue_mp": result["wall_s"] / tissue_mp}
            rows.append(result)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.islands} tissue islands of "
          f"{args.island_px}² px ({tissue_mp:.3f} MP tissue), stride {args.stride}, {args.model}, "
          f"{args.workers} worker(s)")
    print(f"{'slide px':>10}{'file MB':>9}{'blocks':>8}{'skipped':>9}{'centres':>9}{'peak RSS GB':>13}{'wall s':>8}"
          f"{'s / tissue MP':>15}")
    for r in rows:
        print(f"{r['size_px']:>10}{r['file_mb']:>9.1f}{r['blocks']:>8}{r['skipped']:>9}{r['count']:>9}"
              f"{r['peak_rss_gb']:>13.2f}{r['wall_s']:>8.1f}{r['s_per_tissue_mp']:>15.1f}")
    if len(rows) >= 2:
        print(f"ratio largest/smallest: peak RSS {rows[-1]['peak_rss_gb'] / rows[0]['peak_rss_gb']:.2f}, "
              f"time per tissue MP {rows[-1]['s_per_tissue_mp'] / rows[0]['s_per_tissue_mp']:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
