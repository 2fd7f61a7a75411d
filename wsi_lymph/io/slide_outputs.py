"""Everything written per slide by ``wsi-lymph detect``; :func:`write_slide_outputs` runs as a ``write`` task."""

from __future__ import annotations

import platform
from pathlib import Path

import dask
import distributed
import numpy as np
import torch
import zarr
from PIL import Image

from wsi_lymph import __version__
from wsi_lymph.constants import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX
from wsi_lymph.io.outputs import (
    write_centres_csv,
    write_centres_geojson,
    write_centres_parquet,
    write_density_png,
    write_json,
    write_overlay_png,
    write_tutorial_pngs,
)
from wsi_lymph.slides.reader import open_slide, read_region


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
    write_centres_parquet(slide_dir / "centers.parquet", table)
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
        "outputs": ["prob.zarr", "centers.csv", "centers.geojson", "summary.json", "centers.parquet", *pictures],
        "versions": _versions(),
    })
    return count, tissue


THUMBNAIL_MAX_PX = 2048


TUTORIAL_PNG_MAX_PX = 4096


def write_pictures(folder: Path, name: str, slide_path: Path, attrs: dict, shape: tuple, table: dict) -> list[str]:
    """``overlay.png``, ``density.png`` and, for dataset-sized maps, the tutorial's ``_prob``/``_class`` PNGs."""
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

    return {
        "wsi_lymph": __version__, "python": platform.python_version(), "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__, "torch": torch.__version__,
        "numpy": np.__version__,
    }

