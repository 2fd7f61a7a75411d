"""Slides -> lymphocyte centres: probability maps, blockwise peaks, per-slide outputs and a batch report."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from distributed import Client

from . import __version__
from .frame import ModelFrame
from .outputs import (
    centres_table,
    write_centres_csv,
    write_centres_geojson,
    write_centres_parquet,
    write_density_png,
    write_json,
    write_overlay_png,
    write_tutorial_pngs,
)
from .peaks import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX, detect_centers_blockwise
from .probmap import ProbmapParams, SlideResult, run_probmaps

PEAK_BLOCK_PX = 2048


def detect_slide_centres(prob_store: Path, threshold: float | None = None) -> tuple[dict, dict]:
    """Centres of one stored map, found blockwise over its own chunks on the current Dask scheduler.

    Radii follow the map's frame: the paper's 6 px (smoothing) and 28 px (clearing) are model-frame
    pixels at 0.125 µm/px, and maps are stored in the model frame, so they apply unchanged.

    Returns
    -------
    table : dict of np.ndarray
        See :func:`wsi_lymph.outputs.centres_table`.
    attrs : dict
        The map's ``wsi_lymph`` attributes.
    """
    array = zarr.open_array(str(prob_store), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    # Peak blocks are whole groups of the map's chunks (read as they are, never rechunked), about
    # PEAK_BLOCK_PX on a side: few enough tasks for a whole slide, small enough for a worker.
    block = tuple(max(1, PEAK_BLOCK_PX // c) * c for c in array.chunks)
    prob = da.from_zarr(array, chunks=block).astype(np.float32) * np.float32(attrs["value_scale"])
    threshold = attrs["model"]["threshold"] if threshold is None else threshold
    centres, scores = detect_centers_blockwise(
        prob, threshold, SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX, return_scores=True
    )
    frame = ModelFrame(**{k: tuple(v) if isinstance(v, list) else v for k, v in attrs["frame"].items()})
    table = centres_table(centres, scores, frame, attrs["origin_rc"], attrs["mpp"])
    attrs["threshold_used"] = threshold
    return table, attrs


def analysed_area_mm2(attrs: dict, shape_rc: tuple[int, int]) -> float:
    """Area covered by a map, in mm² (model-frame pixels times their area)."""
    mpp = attrs["frame"]["mpp"]
    return float(shape_rc[0] * shape_rc[1] * (mpp / 1000.0) ** 2)


def run_detect(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: str = "janowczyk2016",
    mpp: float | None = None,
    params: ProbmapParams | None = None,
    threshold: float | None = None,
    model_source: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[SlideResult]:
    """Probability maps, then centres and outputs, for every slide; writes ``OUT/batch.json``.

    Per slide in ``OUT/<slide-name>/``: ``prob.zarr``, ``centers.csv`` (+ ``centers.parquet``),
    ``centers.geojson``, ``summary.json``, ``overlay.png``, ``density.png``.  Failed slides keep
    their reason; the others finish.  Slides already finished are skipped unless ``force``; an
    interrupted one resumes (see :func:`wsi_lymph.probmap.run_probmaps`).
    """
    out_dir = Path(out_dir)
    params = params or ProbmapParams()
    started = time.perf_counter()
    results = run_probmaps(
        client, slide_paths, out_dir, model=model, mpp=mpp, params=params, model_source=model_source,
        force=force, progress=progress, log=log,
    )
    for result in results:
        if result.status != "done":
            continue
        slide_dir = Path(result.output).parent
        if result.reused and (slide_dir / "summary.json").is_file():
            continue  # finished by an earlier run
        t0 = time.perf_counter()
        try:
            table, attrs = detect_slide_centres(Path(result.output), threshold)
        except Exception as error:  # one slide's failure must not end the batch
            result.status, result.reason = "failed", f"{result.path}: peak detection failed: {error}"
            log(f"{result.name}: FAILED: {result.reason}")
            continue
        result.seconds["peaks"] = round(time.perf_counter() - t0, 3)
        write_centres_csv(slide_dir / "centers.csv", table)
        parquet = write_centres_parquet(slide_dir / "centers.parquet", table)
        write_centres_geojson(slide_dir / "centers.geojson", table)
        shape = zarr.open_array(result.output, mode="r").shape
        area = analysed_area_mm2(attrs, shape)
        count = len(table["x"])
        pictures = write_pictures(slide_dir, result.name, Path(result.path), attrs, shape, table)
        write_json(slide_dir / "summary.json", {
            "slide": result.path,
            "count": count,
            "analysed_area_mm2": round(area, 6),
            "hematoxylin_area_mm2": round(result.hematoxylin_mm2, 6),
            "density_per_mm2_analysed": round(count / area, 3) if area else None,
            "density_per_mm2_hematoxylin": round(count / result.hematoxylin_mm2, 3) if result.hematoxylin_mm2 else None,
            "model": attrs["model"],
            "threshold": attrs["threshold_used"],
            "smooth_radius_px": SMOOTH_RADIUS_PX,
            "clear_radius_px": CLEAR_RADIUS_PX,
            "radii_frame": "model frame, µm/px = frame.mpp",
            "mpp": attrs["mpp"],
            "mpp_source": attrs["mpp_source"],
            "frame": attrs["frame"],
            "params": asdict(params),
            "blocks_total": result.blocks_total,
            "blocks_skipped": result.blocks_skipped,
            "timings_s": result.seconds,
            "outputs": ["prob.zarr", "centers.csv", "centers.geojson", "summary.json"]
            + (["centers.parquet"] if parquet else []) + pictures,
            "versions": _versions(),
        })
        log(f"{result.name}: {count} lymphocytes, {count / area if area else 0:.0f} per mm² analysed")
    write_json(out_dir / "batch.json", {
        "slides": [
            {"path": r.path, "name": r.name, "status": r.status, "reason": r.reason, "timings_s": r.seconds}
            for r in results
        ],
        "done": sum(r.status == "done" for r in results),
        "failed": sum(r.status != "done" for r in results),
        "wall_s": round(time.perf_counter() - started, 3),
    })
    return results


THUMBNAIL_MAX_PX = 2048
TUTORIAL_PNG_MAX_PX = 4096


def write_pictures(folder: Path, name: str, slide_path: Path, attrs: dict, shape: tuple, table: dict) -> list[str]:
    """``overlay.png``, ``density.png`` and, for dataset-sized maps, the tutorial's ``_prob``/``_class`` PNGs."""
    from PIL import Image

    from .slide import open_slide, read_region

    per = attrs["frame"]["level0_per_frame_px"]
    x0, y0 = attrs["origin_rc"][1] * per, attrs["origin_rc"][0] * per
    width, height = shape[1] * per, shape[0] * per
    info = open_slide(slide_path, mpp=attrs["mpp"])
    # The coarsest level that still gives the thumbnail its full size.
    fits = [lv for lv in range(info.level_count) if max(width, height) / info.level_downsamples[lv] >= THUMBNAIL_MAX_PX]
    level = max(fits) if fits else 0
    down = info.level_downsamples[level]
    level_w, level_h = info.level_sizes_xy[level]
    lx, ly = int(x0 / down), int(y0 / down)
    lw, lh = min(level_w - lx, max(1, round(width / down))), min(level_h - ly, max(1, round(height / down)))
    written = []
    if max(lw, lh) <= 4 * THUMBNAIL_MAX_PX:
        region = Image.fromarray(read_region(info, level, lx, ly, lw, lh))
        region.thumbnail((THUMBNAIL_MAX_PX, THUMBNAIL_MAX_PX), Image.Resampling.LANCZOS)
        scale = region.width / width  # thumbnail px per level-0 px
        centres = np.stack([(table["x"] - x0) * scale, (table["y"] - y0) * scale], axis=-1)
        write_overlay_png(folder / "overlay.png", np.asarray(region), centres, scale)
        written.append("overlay.png")
    mpp = attrs["mpp"]
    centres_um = np.stack([table["x_um"], table["y_um"]], axis=-1)
    write_density_png(folder / "density.png", centres_um, (x0 * mpp, (x0 + width) * mpp, y0 * mpp, (y0 + height) * mpp))
    written.append("density.png")
    if max(shape) <= TUTORIAL_PNG_MAX_PX:
        prob = zarr.open_array(str(folder / "prob.zarr"), mode="r")[:].astype(np.float32) * attrs["value_scale"]
        write_tutorial_pngs(folder, name, prob)
        written += [f"{name}_prob.png", f"{name}_class.png"]
    return written


def _versions() -> dict:
    import dask
    import distributed
    import torch

    return {
        "wsi_lymph": __version__, "python": platform.python_version(), "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__, "torch": torch.__version__,
        "numpy": np.__version__,
    }
