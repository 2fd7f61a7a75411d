"""The pictures of a slide: ``overlay.png`` (every centre circled) and ``density.png`` (a heat map over the tissue),
both with the hotspot field outlined.

Positions are µm from the slide's level-0 top-left corner, ``(x, y)`` = (column, row) direction, as in the
``x_um``/``y_um`` columns of ``centers.csv``; the hotspot is the dict of
:meth:`wsi_lymph.detection.hotspot.Hotspot.as_dict` (``x_um``, ``y_um``, ``radius_um``, ``count``, ``area_mm2``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from skimage.draw import disk

from wsi_lymph.constants import DENSITY_BIN_UM
from wsi_lymph.io.outputs import LYMPHOCYTE_COLOUR_RGB, write_atomic

if TYPE_CHECKING:
    from matplotlib.colors import Normalize

#: The hotspot's outline on both pictures (an orange red that stands out on H&E and on the heat map's colours).
HOTSPOT_COLOUR_RGB = (255, 59, 31)
#: Colour map of the density: perceptually uniform, and its blues-greens-yellows are not H&E's pinks and purples.
DENSITY_CMAP = "viridis"
#: Opacity of the density over the tissue (bins without lymphocytes are left clear).
DENSITY_ALPHA = 0.55
#: Bins across the longer side of a region at least, when the bin is chosen automatically.
MIN_BINS_ACROSS = 20
#: The finest automatic bin, µm: one lymphocyte in it is 1,600 per mm², finer bins are mostly noise.
MIN_BIN_UM = 25.0

Extent = tuple[float, float, float, float]  # (x0, x1, y0, y1), µm


@dataclass(frozen=True)
class DensityPicture:
    """What ``density.png`` shows, for tests and reports (the figure itself is closed once written).

    Attributes
    ----------
    vmin, vmax : float
        The colour bar's range, lymphocytes per mm² (``vmin`` is always 0).
    bin_um : float
        Edge of a square bin, µm (bins at the right and bottom edge may be narrower: their own area is used).
    max_density_per_mm2 : float
        The densest bin.
    on_thumbnail : bool
        The heat map lies over the slide's thumbnail (False: over a plain background, the region being too large
        to read a thumbnail from).
    hotspot_outlined : bool
        The hotspot field is drawn.
    """

    vmin: float
    vmax: float
    bin_um: float
    max_density_per_mm2: float
    on_thumbnail: bool
    hotspot_outlined: bool


def density_bin_um(extent_um: Extent, bin_um: float | None = None) -> float:
    """The bin edge in µm: ``bin_um`` when given, else :data:`~wsi_lymph.constants.DENSITY_BIN_UM` (100 µm).

    The automatic bin is finer where the region is less than :data:`MIN_BINS_ACROSS` bins across (a crop, a small
    ``--region``): the coarsest of 50 and :data:`MIN_BIN_UM` (25 µm) that gives as many, else 25 µm.
    """
    if bin_um is not None:
        if not bin_um > 0:
            raise ValueError(f"the density bin must be > 0 µm, got {bin_um!r}")
        return float(bin_um)
    x0, x1, y0, y1 = extent_um
    longer = max(x1 - x0, y1 - y0)
    for candidate in (DENSITY_BIN_UM, DENSITY_BIN_UM / 2, MIN_BIN_UM):  # round numbers, to read off the title
        if longer / candidate >= MIN_BINS_ACROSS:
            return float(candidate)
    return float(MIN_BIN_UM)


def _edges(low: float, high: float, bin_um: float) -> np.ndarray:
    """Bin edges from ``low`` to ``high``; a last sliver under half a bin joins the bin before it."""
    count = max(1, math.floor((high - low) / bin_um))
    if (high - low) - count * bin_um >= bin_um / 2:
        count += 1
    edges = low + bin_um * np.arange(count + 1, dtype=np.float64)
    edges[-1] = high
    return edges


def density_grid(centres_um: np.ndarray, extent_um: Extent, bin_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lymphocytes per mm² in square bins over the region, each bin divided by its own area.

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        Density (rows = y, columns = x), x edges and y edges (µm).
    """
    x0, x1, y0, y1 = extent_um
    x_edges, y_edges = _edges(x0, x1, bin_um), _edges(y0, y1, bin_um)
    centres_um = np.asarray(centres_um, dtype=np.float64).reshape(-1, 2)
    counts, _, _ = np.histogram2d(centres_um[:, 1], centres_um[:, 0], bins=(y_edges, x_edges))
    area_mm2 = np.outer(np.diff(y_edges), np.diff(x_edges)) / 1e6
    return counts / area_mm2, x_edges, y_edges


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, never a window: no display on cluster nodes).

    Imported on first use: it takes about a second, which every driver and worker process would otherwise pay
    at start, though only the task that draws a slide's density picture needs it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def density_norm(density: np.ndarray) -> Normalize:
    """The colour scale: from 0 (whatever the smallest bin) to the densest bin (1 when there is none)."""
    from matplotlib.colors import Normalize

    top = float(np.max(density)) if density.size else 0.0
    return Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)


def write_density_png(path: Path, centres_um: np.ndarray, extent_um: Extent, *,
                      thumbnail_rgb: np.ndarray | None = None, bin_um: float | None = None,
                      hotspot: dict | None = None) -> DensityPicture:
    """Lymphocytes per mm² as a semi-transparent heat map over the slide's thumbnail, with a colour bar from 0.

    Parameters
    ----------
    path : Path
        The PNG to write (atomically).
    centres_um : np.ndarray
        (n, 2) centres ``(x, y)`` in µm.
    extent_um : (x0, x1, y0, y1)
        The analysed region in µm; ``thumbnail_rgb`` shows exactly this region.
    thumbnail_rgb : np.ndarray, optional
        (rows, cols, 3) uint8 picture of the region; None draws the heat map on a plain background.
    bin_um : float, optional
        Bin edge in µm (default: :func:`density_bin_um`); stated in the title.
    hotspot : dict, optional
        The densest field (``x_um``, ``y_um``, ``radius_um``, ``count``, ``area_mm2``), outlined when it has a centre.

    Returns
    -------
    DensityPicture
        The colour range and what was drawn.
    """
    x0, x1, y0, y1 = extent_um
    bin_um = density_bin_um(extent_um, bin_um)
    density, x_edges, y_edges = density_grid(centres_um, extent_um, bin_um)
    norm = density_norm(density)
    width_in = 8.0
    aspect = (y1 - y0) / max(x1 - x0, 1e-9)
    dpi = 150
    plt = _pyplot()
    from matplotlib import patheffects
    from matplotlib.patches import Circle

    figure, axes = plt.subplots(figsize=(width_in + 1.6, min(max(width_in * aspect, 2.0), 24.0) + 1.0), dpi=dpi)
    image_extent = (x0, x1, y1, y0)  # y grows downwards, as on the slide
    if thumbnail_rgb is not None:
        # Reduced to about the axes' size by Pillow first: matplotlib's own Lanczos resampling of the full
        # 2,048-px thumbnail took most of this picture's time (~1 s per slide), for the same look.
        shown_px = round(max(width_in, width_in * aspect) * dpi)
        background = Image.fromarray(thumbnail_rgb)
        background.thumbnail((shown_px, shown_px), Image.Resampling.LANCZOS)
        axes.imshow(np.asarray(background), extent=image_extent, interpolation="antialiased")
    else:
        axes.set_facecolor("0.85")
    shown = axes.imshow(np.ma.masked_equal(density, 0.0), extent=(x_edges[0], x_edges[-1], y_edges[-1], y_edges[0]),
                        cmap=DENSITY_CMAP, norm=norm, alpha=DENSITY_ALPHA if thumbnail_rgb is not None else 1.0,
                        interpolation="nearest")
    bar = figure.colorbar(shown, ax=axes, fraction=0.04, pad=0.02)
    bar.solids.set_alpha(1.0)  # the bar shows the colours themselves, not as blended over the tissue
    bar.set_label("lymphocytes / mm²")
    outlined = bool(hotspot and hotspot.get("x_um") is not None)
    title = f"Lymphocyte density in {bin_um:g} µm bins (bins without lymphocytes left clear)"
    if outlined:
        circle = Circle((hotspot["x_um"], hotspot["y_um"]), hotspot["radius_um"], fill=False, linewidth=2.0,
                        edgecolor=np.array(HOTSPOT_COLOUR_RGB) / 255,
                        label=f"hotspot: {hotspot['count']} in {hotspot['area_mm2']:g} mm² "
                        f"({hotspot['count'] / hotspot['area_mm2']:,.0f} / mm²)",
                        path_effects=[patheffects.withStroke(linewidth=4.0, foreground="white")])
        axes.add_patch(circle)
        axes.legend(handles=[circle], loc="upper right", fontsize=8, framealpha=0.8)
    axes.set_xlim(x0, x1)
    axes.set_ylim(y1, y0)
    axes.set_xlabel("x (µm from the slide's top-left corner)")
    axes.set_ylabel("y (µm)")
    axes.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
    return DensityPicture(vmin=float(norm.vmin), vmax=float(norm.vmax), bin_um=bin_um,
                          max_density_per_mm2=float(density.max()) if density.size else 0.0,
                          on_thumbnail=thumbnail_rgb is not None, hotspot_outlined=outlined)


def write_overlay_png(path: Path, thumbnail_rgb: np.ndarray, centres_xy: np.ndarray, scale: float,
                      hotspot_xy_r: tuple[float, float, float] | None = None) -> None:
    """A thumbnail with a circle around every centre and the hotspot field outlined.

    Parameters
    ----------
    thumbnail_rgb : np.ndarray
        (rows, cols, 3) uint8 image of the analysed area.
    centres_xy : np.ndarray
        (n, 2) centres in the thumbnail's own pixel coordinates (x, y).
    scale : float
        Thumbnail pixels per level-0 pixel (sets the circle radius to ~a lymphocyte, 3.5 µm at 0.5 µm/px).
    hotspot_xy_r : (float, float, float), optional
        The hotspot's centre (x, y) and radius in the thumbnail's pixels.
    """
    image = thumbnail_rgb.copy()
    shape = image.shape[:2]
    ring_rows, ring_cols = _ring(max(2, round(7 * scale)), 1)
    xy = np.round(np.asarray(centres_xy, dtype=np.float64)).astype(np.int64).reshape(-1, 2)
    rows, cols = (ring_rows[None, :] + xy[:, 1:2]).ravel(), (ring_cols[None, :] + xy[:, 0:1]).ravel()
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    image[rows[inside], cols[inside]] = LYMPHOCYTE_COLOUR_RGB
    if hotspot_xy_r is not None:
        x, y, r = hotspot_xy_r
        width = max(2, round(max(shape) / 400))  # visible on a 2048-px thumbnail, not heavy on a small one
        for colour, inner, outer in (((255, 255, 255), r - width - 1, r + width + 1), (HOTSPOT_COLOUR_RGB, r - width,
                                                                                       r + width)):
            band = _band(shape, x, y, inner, outer)
            image[band] = colour
    write_atomic(path, lambda target: Image.fromarray(image).save(target, format="PNG"))


def _ring(radius: int, thickness: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (rows, cols) of a ring ``radius`` to ``radius + thickness`` px from (0, 0)."""
    extent = radius + thickness + 1
    rows, cols = np.mgrid[-extent:extent + 1, -extent:extent + 1]
    distance = np.hypot(rows, cols)
    keep = (distance >= radius - 0.5) & (distance <= radius + thickness + 0.5)
    return rows[keep], cols[keep]


def _band(shape: tuple[int, int], x: float, y: float, inner: float, outer: float) -> np.ndarray:
    """Mask of the pixels between ``inner`` and ``outer`` from (x, y), clipped to the image."""
    mask = np.zeros(shape, dtype=bool)
    rows, cols = disk((y, x), outer, shape=shape)
    if not len(rows):
        return mask
    keep = np.hypot(rows - y, cols - x) >= max(inner, 0.0)
    mask[rows[keep], cols[keep]] = True
    return mask
