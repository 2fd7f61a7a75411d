"""The model frame: the slide resampled to the resolution the network was trained at.

The released models saw 20x images (0.5 µm/px) upscaled 4x, i.e. 0.125 µm per
model-frame pixel.  A slide is brought to that frame by reading one pyramid
level and resizing it by ``frame_scale = level_mpp / model_mpp``.

Level choice: the coarsest level whose resolution is not coarser than the
model's source scans (``source_scan_mpp``, 0.5 µm/px, with 10% tolerance), so a
20x slide is read at level 0 and upscaled 4x, a 40x slide at level 0 and
upscaled 2x (or at a 20x level, if its pyramid has one, upscaled 4x).  Scales
within 2% of an integer are snapped to it (0.499 µm/px -> 4x), which keeps
frame coordinates integer multiples of level coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from dask.array.core import normalize_chunks, slices_from_chunks

from wsi_lymph.constants import MODEL_FRAME_MPP, PATCH_CENTER_PX, PATCH_PX, SOURCE_SCAN_MPP
from wsi_lymph.slides.reader import SlideError, SlideInfo, read_region
from wsi_lymph.slides.resample import keys_cubic, resize_window, resized_length, symmetric_index, tap_bounds

SNAP_TOLERANCE = 0.02


@dataclass(frozen=True)
class ModelFrame:
    """Geometry linking a slide to the model frame.

    Attributes
    ----------
    level : int
        Pyramid level that is read.
    frame_scale : float
        Model-frame pixels per pixel of ``level``.
    shape_rc : (int, int)
        (rows, cols) of the whole slide in the model frame.
    mpp : float
        µm per model-frame pixel.
    level0_per_frame_px : float
        Level-0 pixels per model-frame pixel (x = col * this, y = row * this).
    level_shape_rc : (int, int)
        (rows, cols) of ``level``.
    """

    level: int
    frame_scale: float
    shape_rc: tuple[int, int]
    mpp: float
    level0_per_frame_px: float
    level_shape_rc: tuple[int, int]

    def attrs(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def choose_frame(
    info: SlideInfo, model_mpp: float = MODEL_FRAME_MPP, source_scan_mpp: float = SOURCE_SCAN_MPP
) -> ModelFrame:
    """Pick the level and resize factor that bring ``info`` to the model's resolution.

    Parameters
    ----------
    info : SlideInfo
        Slide with a resolution (from the file or ``--mpp``).
    model_mpp : float
        µm per pixel of the model frame (0.125 for the paper's models).
    source_scan_mpp : float
        µm per pixel of the scans the model was trained on (0.5 = 20x).

    Raises
    ------
    SlideError
        No resolution, or every level is coarser than the model can use.
    """
    level_mpps = [info.level_mpp(level) for level in range(info.level_count)]
    usable = [level for level, mpp in enumerate(level_mpps) if mpp <= source_scan_mpp * 1.1]
    if not usable:
        raise SlideError(
            f"{info.path}: level 0 is {level_mpps[0]:.3g} µm/px, coarser than the {source_scan_mpp} µm/px "
            "the model was trained at; lymphocytes cannot be resolved (check --mpp)"
        )
    level = max(usable, key=lambda lv: level_mpps[lv])
    scale = level_mpps[level] / model_mpp
    if abs(scale - round(scale)) <= SNAP_TOLERANCE * scale:
        scale = float(round(scale))
    if scale < 1:
        # The slide is finer than the model frame; reading a coarser level would be needed.
        raise SlideError(f"{info.path}: {level_mpps[level]:.3g} µm/px is finer than the model frame ({model_mpp})")
    width, height = info.level_sizes_xy[level]
    shape_rc = (resized_length(height, scale), resized_length(width, scale))
    return ModelFrame(
        level=level,
        frame_scale=scale,
        shape_rc=shape_rc,
        mpp=level_mpps[level] / scale,
        level0_per_frame_px=info.level_downsamples[level] / scale,
        level_shape_rc=(height, width),
    )


def stride_grid(start: int, stop: int, stride_px: int) -> np.ndarray:
    """Model-frame positions classified to fill ``[start, stop)`` at ``stride_px``.

    The global lattice is ``0, s, 2s, ...``.  With ``s = 1`` that is every
    pixel of the range.  With ``s > 1`` the range is filled by cubic
    interpolation, which needs one lattice point before the last one at or
    before ``start`` and two after it, up to the first at or after ``stop - 1``.
    Points past the slide edge are classified from the mirror padding, like
    every edge pixel.
    """
    if stride_px == 1:
        return np.arange(start, stop)
    first = start // stride_px - 1
    last = (stop - 1) // stride_px + 2
    return np.arange(first, last + 1) * stride_px


def interpolate_grid(values: np.ndarray, grid_rc: tuple[np.ndarray, np.ndarray], box: tuple) -> np.ndarray:
    """Fill ``box = (r0, r1, c0, c1)`` from values on a regular lattice (Keys cubic, a = -0.5).

    Cubic rather than bilinear interpolation because bilinear flattens the
    peaks of P: on the three annotated crops, stride 4 keeps 99% of the exact
    (stride 1) centres with cubic and 94% with bilinear.  The result is clipped
    to [0, 1].  Each output pixel depends only on its global position (the
    lattice values at grid points are returned exactly), so any block layout
    gives bit-identical maps.
    """
    r0, r1, c0, c1 = box
    out = values.astype(np.float32)
    for axis, (grid, lo, hi) in enumerate(((grid_rc[0], r0, r1), (grid_rc[1], c0, c1))):
        step = int(grid[1] - grid[0])
        position = np.arange(lo, hi)
        base = position // step  # lattice index at or before the pixel
        weights = keys_cubic(position[:, None] / step - (base[:, None] + np.arange(-1, 3))).astype(np.float32)
        taps = base[:, None] + np.arange(-1, 3) - grid[0] // step
        shape = [1, 1]
        shape[axis] = len(position)
        total = None
        for k in range(4):  # a fixed summation order keeps results layout-independent
            term = weights[:, k].reshape(shape) * np.take(out, taps[:, k], axis=axis)
            total = term if total is None else total + term
        out = total
    return np.clip(out, 0.0, 1.0)


def read_frame_window(
    info: SlideInfo,
    frame: ModelFrame,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    pixel_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Model-frame pixels at ``rows x cols`` (indices may lie outside: mirrored).

    Parameters
    ----------
    info, frame
        Slide and its model frame.
    rows, cols : np.ndarray
        Consecutive model-frame row/column indices; values outside the frame are
        reflected symmetrically (the original's ``padarray(..., 'symmetric')``).
    pixel_transform : callable, optional
        Applied to the level's RGB uint8 pixels before resampling (e.g. stain
        normalisation); must act on each pixel alone.

    Returns
    -------
    np.ndarray
        (len(rows), len(cols), 3) float32 **BGR** on a 0-255 scale, as the
        network expects (not clipped: bicubic overshoot is kept, as in MATLAB).
    """
    rows_in = symmetric_index(rows, frame.shape_rc[0])
    cols_in = symmetric_index(cols, frame.shape_rc[1])
    level_rows, level_cols = frame.level_shape_rc
    y0, y1 = tap_bounds(rows_in, frame.frame_scale, level_rows)
    x0, x1 = tap_bounds(cols_in, frame.frame_scale, level_cols)
    rgb = read_region(info, frame.level, x0, y0, x1 - x0, y1 - y0)
    if pixel_transform is not None:
        rgb = pixel_transform(rgb)
    window = resize_window(rgb, (y0, x0), (level_rows, level_cols), rows_in, cols_in, frame.frame_scale)
    return np.ascontiguousarray(window[..., ::-1])


def patch_rows(grid: np.ndarray) -> np.ndarray:
    """Model-frame rows (or cols) covered by the patches centred on ``grid``."""
    return np.arange(grid[0] - PATCH_CENTER_PX, grid[-1] - PATCH_CENTER_PX + PATCH_PX)


def frame_to_level0(rc: np.ndarray, frame: ModelFrame) -> np.ndarray:
    """Convert model-frame (row, col) pixel centres to level-0 (x, y) pixel coordinates."""
    rc = np.asarray(rc, dtype=np.float64)
    # Pixel centres: frame index i covers [i, i+1) frame px, centre i + 0.5.
    return (rc[..., ::-1] + 0.5) * frame.level0_per_frame_px - 0.5


def block_boxes(shape_rc: tuple[int, int], block_px: int) -> list[tuple[int, int, int, int]]:
    """Tile ``shape_rc`` into (r0, r1, c0, c1) boxes of at most ``block_px`` per side, row-major."""
    chunks = normalize_chunks(block_px, shape=tuple(shape_rc))
    return [(rows.start, rows.stop, cols.start, cols.stop) for rows, cols in slices_from_chunks(chunks)]


def frame_region(frame: ModelFrame, region_level0: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """Model-frame box (r0, r1, c0, c1) covering a level-0 rectangle (all of the slide if None)."""
    rows, cols = frame.shape_rc
    if region_level0 is None:
        return (0, rows, 0, cols)
    x, y, width, height = region_level0
    per = frame.level0_per_frame_px
    box = (
        max(0, int(np.floor(y / per))),
        min(rows, int(np.ceil((y + height) / per))),
        max(0, int(np.floor(x / per))),
        min(cols, int(np.ceil((x + width) / per))),
    )
    if box[0] >= box[1] or box[2] >= box[3]:
        raise ValueError(f"region {region_level0} (level-0 x, y, width, height) lies outside the slide")
    return box


def coarser_frame(frame: ModelFrame, factor: int) -> ModelFrame:
    """The frame of the same level read ``factor`` times coarser (e.g. 4: the 0.5 µm/px input of the student).

    Pixel ``i`` of the coarser frame covers pixels ``factor i ... factor i + factor - 1``
    of ``frame``: both map pixel centres to the level by ``u = (x + 0.5) / scale - 0.5``.
    """
    scale = frame.frame_scale / factor
    rows, cols = frame.level_shape_rc
    return replace(frame, frame_scale=scale, shape_rc=(resized_length(rows, scale), resized_length(cols, scale)),
                   mpp=frame.mpp * factor, level0_per_frame_px=frame.level0_per_frame_px * factor)
