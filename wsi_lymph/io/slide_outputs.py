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
    write_json,
    write_tutorial_pngs,
)
from wsi_lymph.io.pictures import DensityPicture, write_density_png, write_overlay_png
from wsi_lymph.slides.reader import open_slide, read_region


def analysed_area_mm2(attrs: dict, shape_rc: tuple[int, int]) -> float:
    """Area covered by a map, in mm² (model-frame pixels times their area)."""
    mpp = attrs["frame"]["mpp"]
    return float(shape_rc[0] * shape_rc[1] * (mpp / 1000.0) ** 2)


def write_slide_outputs(slide_dir: Path, name: str, slide_path: str, attrs: dict, shape_rc: tuple[int, int],
                        table: dict, result: dict, params: dict, *, hotspot: dict | None = None,
                        density_bin_um: float | None = None) -> tuple[int, float]:
    """Every output of one slide: centres (CSV, Parquet, GeoJSON), pictures, then ``summary.json`` last.

    ``attrs`` and ``shape_rc`` are the map's (its ``wsi_lymph`` attributes plus ``threshold_used``, and its
    (rows, cols) in model-frame px); the map itself is not read, so outputs can be written again after it was
    deleted.  ``summary.json`` is written last, so its presence means the slide is finished.  ``hotspot`` is the densest
    field (:meth:`wsi_lymph.detection.hotspot.Hotspot.as_dict`), recorded and outlined on the pictures;
    ``density_bin_um`` the bin of ``density.png`` (default: :func:`wsi_lymph.io.pictures.density_bin_um`).

    Returns
    -------
    (int, float)
        Number of centres and the analysed tissue area in mm².
    """
    write_centres_csv(slide_dir / "centers.csv", table)
    write_centres_parquet(slide_dir / "centers.parquet", table)
    write_centres_geojson(slide_dir / "centers.geojson", table)
    shape = tuple(shape_rc)
    area = analysed_area_mm2(attrs, shape)
    tissue, hematoxylin = result["tissue_mm2"], result["hematoxylin_mm2"]
    count = len(table["x"])
    pictures, density = write_pictures(slide_dir, name, Path(slide_path), attrs, shape, table, hotspot=hotspot,
                                       density_bin_um=density_bin_um)
    write_json(slide_dir / "summary.json", {
        "slide": slide_path,
        "slide_fingerprint": attrs.get("slide_fingerprint"),  # which content of that file (reader.file_fingerprint)
        "count": count,
        "analysed_area_mm2": round(area, 6),
        "tissue_area_mm2": round(tissue, 6),
        "hematoxylin_area_mm2": round(hematoxylin, 6),
        "density_per_mm2_tissue": round(count / tissue, 3) if tissue else None,
        "density_per_mm2_analysed": round(count / area, 3) if area else None,
        "density_per_mm2_hematoxylin": round(count / hematoxylin, 3) if hematoxylin else None,
        "hotspot": None if hotspot is None else _hotspot_entry(hotspot, attrs, analysed_extent_um(attrs, shape)),
        "density_png_bin_um": density.bin_um,
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
        "flags": result.get("flags", []),  # why the input or these centres look doubtful (engine/batch.py)
        "timings_s": result["seconds"],
        # The working map is deleted after this unless --keep-map; the pyramid is written before (engine/batch.py).
        "outputs": [*(["prob.zarr"] if params.get("keep_map", True) and (slide_dir / "prob.zarr").is_dir() else []),
                    *(["prob.ome.zarr"] if (slide_dir / "prob.ome.zarr").is_dir() else []),
                    "centers.csv", "centers.geojson", "summary.json", "centers.parquet", *pictures],
        "versions": _versions(),
    })
    return count, tissue


THUMBNAIL_MAX_PX = 2048


TUTORIAL_PNG_MAX_PX = 4096


def analysed_extent_um(attrs: dict, shape_rc: tuple[int, int]) -> tuple[float, float, float, float]:
    """The analysed region (x0, x1, y0, y1) in µm from the slide's level-0 top-left corner."""
    per, mpp = attrs["frame"]["level0_per_frame_px"], attrs["mpp"]
    x0, y0 = attrs["origin_rc"][1] * per, attrs["origin_rc"][0] * per
    return x0 * mpp, (x0 + shape_rc[1] * per) * mpp, y0 * mpp, (y0 + shape_rc[0] * per) * mpp


def _hotspot_entry(hotspot: dict, attrs: dict, extent_um: tuple[float, float, float, float]) -> dict:
    """The hotspot as ``summary.json`` records it: the field in µm, its centre in level-0 px too, and how much of
    it lies in the analysed region (a field larger than a small ``--region`` reaches beyond what was analysed)."""
    mpp = attrs["mpp"]
    entry = dict(hotspot)
    found = hotspot.get("x_um") is not None
    entry["x"] = round(hotspot["x_um"] / mpp, 4) if found else None
    entry["y"] = round(hotspot["y_um"] / mpp, 4) if found else None
    entry["inside_analysed_fraction"] = (
        round(_circle_fraction_inside(hotspot["x_um"], hotspot["y_um"], hotspot["radius_um"], extent_um), 3)
        if found else None)
    entry["definition"] = ("the circular field of area_mm2 holding the most centres (exact, from the centres); a "
                           "centre on its edge counts (distance <= radius_um); x_um, y_um: its centre in µm from the "
                           "slide's level-0 top-left corner (x, y as in centers.csv), x, y the same in level-0 px; "
                           "density_per_mm2 = count / area_mm2")
    return entry


def _circle_fraction_inside(x: float, y: float, radius: float, extent: tuple[float, float, float, float],
                            samples: int = 512) -> float:
    """Fraction of a disc's area inside a rectangle (x0, x1, y0, y1), on a ``samples``² grid (±0.5%)."""
    offsets = (np.arange(samples) + 0.5) / samples * 2 - 1
    u, v = np.meshgrid(offsets, offsets)
    inside_disc = u * u + v * v <= 1
    px, py = x + radius * u[inside_disc], y + radius * v[inside_disc]
    x0, x1, y0, y1 = extent
    return float(np.mean((px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)))


def write_pictures(folder: Path, name: str, slide_path: Path, attrs: dict, shape: tuple, table: dict, *,
                   hotspot: dict | None = None,
                   density_bin_um: float | None = None) -> tuple[list[str], DensityPicture]:
    """``overlay.png``, ``density.png`` (over the thumbnail, hotspot outlined on both) and, for dataset-sized maps,
    the tutorial's ``_prob``/``_class`` PNGs; returns the names written and what ``density.png`` shows."""
    per = attrs["frame"]["level0_per_frame_px"]
    x0, y0 = attrs["origin_rc"][1] * per, attrs["origin_rc"][0] * per
    width, height = shape[1] * per, shape[0] * per
    mpp = attrs["mpp"]
    info = open_slide(slide_path, mpp=mpp)
    # The coarsest level that still gives the thumbnail its full size.
    fits = [lv for lv in range(info.level_count) if max(width, height) / info.level_downsamples[lv] >= THUMBNAIL_MAX_PX]
    level = max(fits) if fits else 0
    down = info.level_downsamples[level]
    level_w, level_h = info.level_sizes_xy[level]
    lx, ly = int(x0 / down), int(y0 / down)
    lw, lh = min(level_w - lx, max(1, round(width / down))), min(level_h - ly, max(1, round(height / down)))
    written = []
    thumbnail = None
    found = hotspot is not None and hotspot.get("x_um") is not None
    if max(lw, lh) <= 4 * THUMBNAIL_MAX_PX:
        region = Image.fromarray(read_region(info, level, lx, ly, lw, lh))
        region.thumbnail((THUMBNAIL_MAX_PX, THUMBNAIL_MAX_PX), Image.Resampling.LANCZOS)
        thumbnail = np.asarray(region)
        scale = region.width / width  # thumbnail px per level-0 px
        centres = np.stack([(table["x"] - x0) * scale, (table["y"] - y0) * scale], axis=-1)
        field = ((hotspot["x_um"] / mpp - x0) * scale, (hotspot["y_um"] / mpp - y0) * scale,
                 hotspot["radius_um"] / mpp * scale) if found else None
        write_overlay_png(folder / "overlay.png", thumbnail, centres, scale, field)
        written.append("overlay.png")
    centres_um = np.stack([table["x_um"], table["y_um"]], axis=-1)
    density = write_density_png(folder / "density.png", centres_um, analysed_extent_um(attrs, shape),
                                thumbnail_rgb=thumbnail, bin_um=density_bin_um, hotspot=hotspot)
    written.append("density.png")
    if max(shape) <= TUTORIAL_PNG_MAX_PX:
        if (folder / "prob.zarr").is_dir():
            prob = zarr.open_array(str(folder / "prob.zarr"), mode="r")[:].astype(np.float32) * attrs["value_scale"]
            write_tutorial_pngs(folder, name, prob)
        # else outputs written again after the map was deleted: its PNGs (of the map alone) are still those
        written += [png for png in (f"{name}_prob.png", f"{name}_class.png") if (folder / png).is_file()]
    return written, density


def _versions() -> dict:

    return {
        "wsi_lymph": __version__, "python": platform.python_version(), "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__, "torch": torch.__version__,
        "numpy": np.__version__,
    }

