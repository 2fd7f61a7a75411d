"""Lymphocyte centres of a stored map, and everything written per slide (``wsi-lymph detect``).

:func:`peak_graph` and :func:`centres_of_graph` are the two halves of blockwise
peak detection on a finished ``prob.zarr`` (cluster tasks, then a cheap exact
join on the driver); :func:`write_slide_outputs` writes a slide's files and runs
as a ``write-*`` task.  :func:`run_detect` runs a whole batch through
:func:`wsi_lymph.batch.run_batch`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

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
from .peaks import (
    CLEAR_RADIUS_PX,
    SMOOTH_RADIUS_PX,
    PeakGraph,
    centres_from_summaries,
    peak_blocks,
    read_with_halo,
    summarise_peak_block,
)
from .probmap import SlideResult, computed_boxes

PEAK_BLOCK_PX = 2048


def peak_graph(prob_store: Path, threshold: float | None = None) -> tuple[PeakGraph, dict]:
    """The peak blocks to compute for one stored map.

    Radii follow the map's frame: the paper's 6 px (smoothing) and 28 px (clearing) are model-frame
    pixels at 0.125 µm/px, and maps are stored in the model frame, so they apply unchanged.  Peak
    blocks are whole groups of the map's chunks, about PEAK_BLOCK_PX on a side, and only those near
    classified blocks are computed (see :func:`wsi_lymph.peaks.peak_blocks`).

    Returns
    -------
    graph : PeakGraph
        Blocks to compute, each with :func:`peak_block_of_store`.
    attrs : dict
        The map's ``wsi_lymph`` attributes, plus ``threshold_used``.
    """
    array = zarr.open_array(str(prob_store), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    attrs["threshold_used"] = attrs["model"]["threshold"] if threshold is None else threshold
    chunks = tuple(
        _split(size, max(1, PEAK_BLOCK_PX // chunk) * chunk) for size, chunk in zip(array.shape, array.chunks,
                                                                                    strict=True)
    )
    graph = peak_blocks(chunks, attrs["threshold_used"], SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX,
                        nonzero_boxes=computed_boxes(attrs))
    return graph, attrs


def peak_block_of_store(prob_store: str, box: tuple[int, int, int, int], halo_px: int, threshold: float) -> dict:
    """One ``peaks`` task: read a block of a stored map with its halo and summarise it.

    See :func:`wsi_lymph.peaks.summarise_peak_block`; values are decoded exactly as
    :func:`wsi_lymph.probmap.open_probmap` does (float32 times the stored scale).
    """
    array = zarr.open_array(prob_store, mode="r")
    scale = np.float32(dict(array.attrs)["wsi_lymph"]["value_scale"])
    padded = read_with_halo(array, box, halo_px).astype(np.float32) * scale
    return summarise_peak_block(padded, box, halo_px, threshold, SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX)


def centres_of_graph(graph: PeakGraph, summaries: dict, attrs: dict) -> dict:
    """Centre table (see :func:`wsi_lymph.outputs.centres_table`) from the computed block summaries."""
    centres, scores = centres_from_summaries(graph, summaries, attrs["threshold_used"], CLEAR_RADIUS_PX)
    frame = ModelFrame(**{k: tuple(v) if isinstance(v, list) else v for k, v in attrs["frame"].items()})
    return centres_table(centres, scores, frame, attrs["origin_rc"], attrs["mpp"])


def _split(length: int, block: int) -> tuple[int, ...]:
    return (block,) * (length // block) + ((length % block,) if length % block else ())


def analysed_area_mm2(attrs: dict, shape_rc: tuple[int, int]) -> float:
    """Area covered by a map, in mm² (model-frame pixels times their area)."""
    mpp = attrs["frame"]["mpp"]
    return float(shape_rc[0] * shape_rc[1] * (mpp / 1000.0) ** 2)


def write_slide_outputs(slide_dir: Path, name: str, slide_path: str, attrs: dict, table: dict, result: dict,
                        params: dict) -> tuple[int, float]:
    """Every output of one slide: centres (CSV, Parquet, GeoJSON), pictures, then ``summary.json`` last.

    ``summary.json`` is written last, so its presence means the slide is finished.

    Returns
    -------
    (int, float)
        Number of centres and the analysed tissue area in mm².
    """
    write_centres_csv(slide_dir / "centers.csv", table)
    parquet = write_centres_parquet(slide_dir / "centers.parquet", table)
    write_centres_geojson(slide_dir / "centers.geojson", table)
    shape = tuple(zarr.open_array(str(slide_dir / "prob.zarr"), mode="r").shape)
    area = analysed_area_mm2(attrs, shape)
    tissue, hematoxylin = result["tissue_mm2"], result["hematoxylin_mm2"]
    count = len(table["x"])
    pictures = write_pictures(slide_dir, name, Path(slide_path), attrs, shape, table)
    write_json(slide_dir / "summary.json", {
        "slide": slide_path,
        "count": count,
        "analysed_area_mm2": round(area, 6),
        "tissue_area_mm2": round(tissue, 6),
        "hematoxylin_area_mm2": round(hematoxylin, 6),
        "density_per_mm2_tissue": round(count / tissue, 3) if tissue else None,
        "density_per_mm2_analysed": round(count / area, 3) if area else None,
        "density_per_mm2_hematoxylin": round(count / hematoxylin, 3) if hematoxylin else None,
        "areas": "analysed = the region classified (whole slide or --region); tissue = its non-glass part "
                 "(mean RGB optical density > 0.05); hematoxylin = its ~2 µm cells above the hematoxylin threshold",
        "model": attrs["model"],
        "threshold": attrs["threshold_used"],
        "smooth_radius_px": SMOOTH_RADIUS_PX,
        "clear_radius_px": CLEAR_RADIUS_PX,
        "radii_frame": "model frame, µm/px = frame.mpp",
        "mpp": attrs["mpp"],
        "mpp_source": attrs["mpp_source"],
        "frame": attrs["frame"],
        "params": params,
        "blocks_total": result["blocks_total"],
        "blocks_skipped": result["blocks_skipped"],
        "blocks_resumed": result["blocks_resumed"],
        "timings_s": result["seconds"],
        "outputs": ["prob.zarr", "centers.csv", "centers.geojson", "summary.json"]
        + (["centers.parquet"] if parquet else []) + pictures,
        "versions": _versions(),
    })
    return count, tissue


def run_detect(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    **options,
) -> list[SlideResult]:
    """Maps, centres and outputs for every slide in one stream of tasks; writes ``OUT/batch.json``.

    Per slide in ``OUT/<slide-name>/``: ``prob.zarr``, ``centers.csv`` (+ ``centers.parquet``),
    ``centers.geojson``, ``summary.json``, ``overlay.png``, ``density.png``.  Failed slides keep
    their reason; the others finish.  Slides already finished are skipped unless ``force``; an
    interrupted one resumes.  ``options`` are those of :func:`wsi_lymph.batch.run_batch`.
    """
    import time

    from .batch import PeakOptions, run_batch

    started = time.perf_counter()
    results = run_batch(client, slide_paths, out_dir, peaks=PeakOptions(threshold), **options)
    write_json(Path(out_dir) / "batch.json", {
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
