"""Lymphocyte centres from a probability map: disk smoothing, then greedy peak picking.

The paper's procedure (method doc, "Peak detection"), in the frame the map is
stored in (the model frame, 0.125 µm/px, for maps written by
:mod:`wsi_lymph.probmap`): convolve P with a normalised disk of radius 6 px
(symmetric padding at the map border), then repeatedly take the highest
remaining pixel above the threshold as a centre and clear every pixel within
28 px of it.  Radii are in pixels of the map's frame; for a map stored at
another resolution scale them by ``0.125 / map_mpp``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SMOOTH_RADIUS_PX = 6
CLEAR_RADIUS_PX = 28
PAPER_THRESHOLD = 0.7706


def _disk_area_in_pixel(x0: float, x1: float, y0: float, y1: float, radius: float, samples: int = 64) -> float:
    """Area of the square [x0, x1] x [y0, y1] inside the disk of ``radius`` at the origin."""
    # Midpoint rule along x of the clipped vertical extent; exact enough (< 1e-5 per pixel).
    xs = x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples
    half = np.sqrt(np.clip(radius * radius - xs * xs, 0, None))
    extent = np.clip(np.minimum(half, y1) - np.maximum(-half, y0), 0, None)
    return float(extent.mean() * (x1 - x0))


def disk_kernel(radius: float) -> np.ndarray:
    """Normalised disk like MATLAB ``fspecial('disk', radius)``.

    Each weight is the area of its pixel lying inside the circle (edge pixels
    carry their fractional area), divided by the total.

    Returns
    -------
    np.ndarray
        (2 * ceil(radius) + 1,) * 2 float64 kernel summing to 1.
    """
    half = int(np.ceil(radius - 0.5)) if radius % 1 else int(radius)
    coords = np.arange(-half, half + 1)
    kernel = np.array(
        [[_disk_area_in_pixel(x - 0.5, x + 0.5, y - 0.5, y + 0.5, radius) for x in coords] for y in coords]
    )
    kernel = 0.5 * (kernel + kernel.T)  # the x-integration is not exactly symmetric in y
    return kernel / kernel.sum()


def smooth_probability(prob: np.ndarray, radius_px: float = SMOOTH_RADIUS_PX) -> np.ndarray:
    """Convolve P with :func:`disk_kernel`; the border is padded symmetrically (edge repeated)."""
    return ndimage.convolve(prob.astype(np.float64), disk_kernel(radius_px), mode="reflect")


def greedy_peaks(
    smoothed: np.ndarray,
    threshold: float = PAPER_THRESHOLD,
    clear_radius_px: float = CLEAR_RADIUS_PX,
) -> np.ndarray:
    """Greedy peak picking: take the highest pixel, clear a disk around it, repeat.

    Parameters
    ----------
    smoothed : np.ndarray
        (rows, cols) smoothed probabilities.
    threshold : float
        Stop when the highest remaining value is ``<= threshold``.
    clear_radius_px : float
        Pixels within this distance (inclusive) of a centre are cleared.

    Returns
    -------
    np.ndarray
        (n, 2) int64 (row, col) of the centres, in the order they were taken.
        Ties are taken in row-major order.
    """
    rows, cols = np.nonzero(smoothed > threshold)
    values = smoothed[rows, cols]
    order = np.lexsort((cols, rows, -values))  # highest first; ties row-major
    cleared = np.zeros(smoothed.shape, dtype=bool)
    reach = int(np.floor(clear_radius_px))
    offsets = np.arange(-reach, reach + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= clear_radius_px**2
    centres = []
    for r, c in zip(rows[order], cols[order], strict=True):
        if cleared[r, c]:
            continue
        centres.append((r, c))
        r0, c0 = max(r - reach, 0), max(c - reach, 0)
        r1, c1 = min(r + reach + 1, smoothed.shape[0]), min(c + reach + 1, smoothed.shape[1])
        cleared[r0:r1, c0:c1] |= disk[r0 - r + reach : r1 - r + reach, c0 - c + reach : c1 - c + reach]
    return np.array(centres, dtype=np.int64).reshape(-1, 2)


def detect_centers(
    prob: np.ndarray,
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
) -> np.ndarray:
    """The paper's peak procedure on a whole (in-memory) map: (n, 2) (row, col) centres."""
    return greedy_peaks(smooth_probability(prob, smooth_radius_px), threshold, clear_radius_px)
