"""Lymphocyte centres from a probability map: disk smoothing, then greedy peak picking.

The paper's procedure (method doc, "Peak detection"), in the frame the map is
stored in (the model frame, 0.125 µm/px, for maps written by
:mod:`wsi_lymph.detection.inference`): convolve P with a normalised disk of radius 6 px
(symmetric padding at the map border), then repeatedly take the highest
remaining pixel above the threshold as a centre and clear every pixel within
28 px of it.  Radii are in pixels of the map's frame; for a map stored at
another resolution scale them by ``0.125 / map_mpp``.

:func:`detect_centers` is the global reference.  The rest of this module are the
pieces of the blockwise procedure that gives exactly its result on a map of any
size; :mod:`wsi_lymph.engine.centres` runs them as Dask tasks on a stored map.
Hand-written where exact agreement with the MATLAB original needs it: the
``fspecial('disk')`` kernel and the greedy loop.  The smoothing is computed in
exact integer arithmetic (below), so blocks, windows and the global pass agree
to the last bit without sharing a summation order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from dask.array.core import slices_from_chunks
from scipy import ndimage
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from wsi_lymph.constants import CLEAR_RADIUS_PX, PAPER_THRESHOLD, SMOOTH_RADIUS_PX
from wsi_lymph.slides.resample import symmetric_index

#: Default edge of one blockwise peak task, in model-frame pixels (rounded to whole map chunks).
PEAK_BLOCK_PX = 2048
#: Settling rounds of the greedy in every block and window (:func:`_settle`): each widens the halo by twice
#: the clearing radius and leaves fewer candidates to link.  On a lymphocyte-dense map one round leaves
#: about a quarter of the candidates undecided and linked across up to ~2,500 px, two rounds ~7% across
#: ~450 px (``bench/peak_settling.py``).
SETTLING_ROUNDS = 2


def _disk_area_in_pixel(x0: float, x1: float, y0: float, y1: float, radius: float, samples: int = 64) -> float:
    """Area of the square [x0, x1] x [y0, y1] inside the disk of ``radius`` at the origin."""
    # Midpoint rule along x of the clipped vertical extent; exact enough (< 1e-5 per pixel).
    xs = x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples
    half = np.sqrt(np.clip(radius * radius - xs * xs, 0, None))
    extent = np.clip(np.minimum(half, y1) - np.maximum(-half, y0), 0, None)
    return float(extent.mean() * (x1 - x0))


@functools.lru_cache(maxsize=8)
def disk_kernel(radius: float) -> np.ndarray:
    """Normalised disk like MATLAB ``fspecial('disk', radius)``.

    Each weight is the area of its pixel lying inside the circle (edge pixels
    carry their fractional area), divided by the total.

    Returns
    -------
    np.ndarray
        (2 * ceil(radius) + 1,) * 2 float64 kernel summing to 1 (read-only).
    """
    half = int(np.ceil(radius - 0.5)) if radius % 1 else int(radius)
    coords = np.arange(-half, half + 1)
    kernel = np.array(
        [[_disk_area_in_pixel(x - 0.5, x + 0.5, y - 0.5, y + 0.5, radius) for x in coords] for y in coords]
    )
    kernel = 0.5 * (kernel + kernel.T)  # the x-integration is not exactly symmetric in y
    kernel = kernel / kernel.sum()
    kernel.flags.writeable = False  # cached: every peak block uses it
    return kernel


# Smoothing in exact integer arithmetic.  P is put on a grid of 2^-24 (every float16 value in [0, 1] lies on
# it; float32 and uint8 maps move by < 3e-8) and the kernel's weights on a grid of 2^-35 (they are themselves
# accurate to ~1e-5, :func:`_disk_area_in_pixel`).  Sums of integers do not depend on their order, so the kernel
# can be taken apart freely: each of its rows is a few runs of equal weight (interior pixels all weigh the same),
# and a run is the difference of two row-wise prefix sums.  About 20 runs replace the 137 products of a direct
# convolution (about 3x faster on a whole block; ``bench/peak_smoothing.py`` times the stage), and every path
# that smooths a pixel (a block, a border window, the global pass, a chosen set of pixels) gets the same value
# to the last bit whatever the window it reads.  The largest sum, 2^24 x 2^35 per unit of P, leaves int64 room
# for |P| up to 8.
_VALUE_BITS = 24
_WEIGHT_BITS = 35
_VALUE_LIMIT = 8.0
#: How far the smoothed value can exceed the largest P under the kernel (quantisation: < 3e-8), with room to spare.
_MEAN_MARGIN = 1e-6
#: Rows smoothed at a time: their working arrays stay in the core's cache (measured: 32 and 64 alike, 16 slower).
_STRIP_ROWS = 32
#: Chosen pixels of a strip this many columns apart or more are smoothed as separate pieces.
_STRIP_GAP_PX = 128


@functools.lru_cache(maxsize=8)
def _kernel_runs(radius_px: float) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The quantised kernel as runs: for each row offset ``i`` >= 0, ``(a, weight)`` pairs such that the kernel's
    row ``±i`` equals the sum over pairs of ``weight`` on every column offset ``|j| <= a`` (integer weights,
    units of 2^-35)."""
    kernel = disk_kernel(radius_px)
    half = kernel.shape[0] // 2
    quadrant = np.rint(np.ldexp(kernel[half:, half:], _WEIGHT_BITS)).astype(np.int64)  # (|dy|, |dx|)
    steps = quadrant - np.pad(quadrant[:, 1:], ((0, 0), (0, 1)))  # telescoping: weight(a) - weight(a + 1)
    return tuple(tuple((int(a), int(steps[i, a])) for a in np.flatnonzero(steps[i])) for i in range(half + 1))


def _fixed_point(values: np.ndarray) -> np.ndarray:
    """P as int64 multiples of 2^-24 (round to nearest)."""
    values = np.asarray(values, dtype=np.float64)
    if not (values.min() >= -_VALUE_LIMIT and values.max() <= _VALUE_LIMIT):  # False for NaN too
        raise ValueError(f"probabilities must be finite and within ±{_VALUE_LIMIT:g} to be smoothed")
    return np.rint(np.ldexp(values, _VALUE_BITS)).astype(np.int64)


def _smooth_inside(prob: np.ndarray, top: int, bottom: int, left: int, right: int, radius_px: float) -> np.ndarray:
    """Smoothed P of ``prob[top:bottom, left:right]``, whose kernels lie wholly inside ``prob``: float64."""
    runs = _kernel_runs(radius_px)
    half = len(runs) - 1
    width = right - left
    out = np.empty((bottom - top, width), dtype=np.float64)
    for start in range(top, bottom, _STRIP_ROWS):
        stop = min(start + _STRIP_ROWS, bottom)
        q = _fixed_point(prob[start - half : stop + half, left - half : right + half])
        rows = stop - start
        total = np.zeros((rows, width), dtype=np.int64)
        pair = np.empty((rows, width + 2 * half), dtype=np.int64)
        prefix = np.zeros((rows, width + 2 * half + 1), dtype=np.int64)
        run = np.empty((rows, width), dtype=np.int64)
        for i, row_runs in enumerate(runs):
            if i == 0:
                pair[:] = q[half : half + rows]
            else:  # the kernel's rows +i and -i are equal
                np.add(q[half + i : half + i + rows], q[half - i : half - i + rows], out=pair)
            np.cumsum(pair, axis=1, out=prefix[:, 1:])
            for a, weight in row_runs:  # columns c - a .. c + a of `pair`, as a difference of prefix sums
                np.subtract(prefix[:, half + a + 1 : half + a + 1 + width], prefix[:, half - a : half - a + width],
                            out=run)
                run *= weight
                total += run
        out[start - top : stop - top] = np.ldexp(total.astype(np.float64), -(_VALUE_BITS + _WEIGHT_BITS))
    return out


def smooth_probability(prob: np.ndarray, radius_px: float = SMOOTH_RADIUS_PX) -> np.ndarray:
    """Convolve P with :func:`disk_kernel`; the border is padded symmetrically (edge repeated).

    Parameters
    ----------
    prob : np.ndarray
        (rows, cols) P, any float dtype, within [0, 1] (a ValueError beyond ±8, or for NaN).
    radius_px : float
        Disk radius in pixels of the map.

    Returns
    -------
    np.ndarray
        (rows, cols) float64.  Computed in exact integer arithmetic (P to 2^-24, the weights to 2^-35; within
        3e-8 of a float64 convolution with :func:`disk_kernel`), so a pixel's value does not depend on the
        window it was computed in.
    """
    prob = np.asarray(prob)
    if prob.size == 0:
        return np.zeros(prob.shape, dtype=np.float64)
    half = len(_kernel_runs(radius_px)) - 1
    padded = np.pad(prob, half, mode="symmetric")
    return _smooth_inside(padded, half, half + prob.shape[0], half, half + prob.shape[1], radius_px)


def smooth_probability_at(prob: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                          radius_px: float = SMOOTH_RADIUS_PX) -> np.ndarray:
    """:func:`smooth_probability` at chosen pixels only, bit for bit.

    Parameters
    ----------
    prob : np.ndarray
        (rows, cols) P, any float dtype.
    rows, cols : np.ndarray
        (n,) pixel coordinates whose whole kernel (``ceil(radius_px)`` px on every side) lies
        inside ``prob``: no border padding is involved.
    radius_px : float
        Disk radius in pixels of the map.

    Returns
    -------
    np.ndarray
        (n,) float64, equal to ``smooth_probability(prob)[rows, cols]``.  Smoothed strip by strip of rows, each
        over the columns its chosen pixels span; strips without chosen pixels are skipped, so the cost follows
        the chosen pixels' rows, not the array's.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    values = np.empty(rows.shape, dtype=np.float64)
    if rows.size == 0:
        return values
    strip = rows // _STRIP_ROWS
    order = np.argsort(strip, kind="stable")  # linear for pixels from np.nonzero, already in row order
    bounds = np.searchsorted(strip[order], np.arange(strip.min(), strip.max() + 2))
    for first, last in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if first == last:
            continue
        members = order[first:last]
        strip_rows, strip_cols = rows[members], cols[members]
        top, bottom = int(strip_rows.min()), int(strip_rows.max()) + 1
        left, right = int(strip_cols.min()), int(strip_cols.max()) + 1
        # Columns far apart (separate lymphocytes) are smoothed as separate pieces of the strip.
        used = np.zeros(right - left, dtype=bool)
        used[strip_cols - left] = True
        used_at = np.flatnonzero(used)
        cuts = np.flatnonzero(np.diff(used_at) > _STRIP_GAP_PX)
        pieces = zip(used_at[np.r_[0, cuts + 1]].tolist(), (used_at[np.r_[cuts, -1]] + 1).tolist(), strict=True)
        smoothed = np.empty((bottom - top, right - left), dtype=np.float64)  # filled where pixels were chosen
        for piece_left, piece_right in pieces:
            smoothed[:, piece_left:piece_right] = _smooth_inside(prob, top, bottom, left + piece_left,
                                                                 left + piece_right, radius_px)
        values[members] = smoothed[strip_rows - top, strip_cols - left]
    return values


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
    height, width = smoothed.shape
    rows, cols = np.nonzero(smoothed > threshold)
    values = smoothed[rows, cols]
    order = np.argsort(-values, kind="stable")  # highest first; ties row-major, as np.nonzero gives them
    cleared = np.zeros(height * width, dtype=bool)
    # The loop visits every candidate, most of them already cleared: Python ints and a memoryview make that
    # test cheaper than indexing NumPy with NumPy scalars.
    is_cleared = memoryview(cleared)
    cleared_rc = cleared.reshape(height, width)
    reach = int(np.floor(clear_radius_px))
    offsets = np.arange(-reach, reach + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= clear_radius_px**2
    centres = []
    for index in (rows * width + cols)[order].tolist():
        if is_cleared[index]:
            continue
        r, c = divmod(index, width)
        centres.append((r, c))
        r0, c0 = max(r - reach, 0), max(c - reach, 0)
        r1, c1 = min(r + reach + 1, height), min(c + reach + 1, width)
        cleared_rc[r0:r1, c0:c1] |= disk[r0 - r + reach : r1 - r + reach, c0 - c + reach : c1 - c + reach]
    return np.array(centres, dtype=np.int64).reshape(-1, 2)


def detect_centers(
    prob: np.ndarray,
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
) -> np.ndarray:
    """The paper's peak procedure on a whole (in-memory) map: (n, 2) (row, col) centres."""
    return greedy_peaks(smooth_probability(prob, smooth_radius_px), threshold, clear_radius_px)


# ------------------------------------------------------------------ blockwise
# Why blocks give exactly the global answer: the greedy takes candidates (pixels
# above the threshold) in decreasing order and drops those within the clearing
# radius R of an accepted one.  A candidate's fate depends only on candidates
# within R, whose fate depends on theirs: such chains can cross any number of
# blocks, so no fixed halo is exact.  But candidates not linked by a chain of
# gaps <= R never interact.  The map is therefore cut into *components* of linked
# candidates; the sequential greedy solves each component exactly on its own, and
# their union is the global answer.
#
# Most candidates are decided before any linking, by the greedy's *settling
# rounds* (:func:`_settle`): a candidate that comes first in its clearing disk
# (higher than every other candidate there, or equal and earlier in row-major
# order) is a centre whatever happens elsewhere, and the candidates in its disk
# are cleared by it; the greedy on the undecided rest gives the rest of the
# answer, so the rule can be applied again to them.  Round j needs the candidates
# (2 j) R around a pixel, so SETTLING_ROUNDS rounds widen the halo by 2 x
# SETTLING_ROUNDS x R.  On packed lymphocytes (a lymph node) the candidates link
# across the whole tissue; after two rounds about 7% are left undecided, in
# components a few hundred pixels across.
#
# Components of the undecided candidates are found blockwise
# (:func:`summarise_peak_block`): each block reads its core plus a halo of the
# smoothing radius, the settling reach and ``ceil(R / 2) + 1``
# (:func:`peak_halo_px`), smooths it, settles, dilates the undecided candidates
# by a disk of radius ``ceil(R / 2) + 1`` (two candidates closer than R then
# always overlap; joining a few more than necessary is harmless) and labels the
# dilated mask of its core; labels touching across block borders (8-connectivity)
# are joined as a graph (:func:`border_components`), which gives the connected
# components of the whole dilated mask for any block size.  A centre belongs to
# the block whose core holds it.  Ties are broken in row-major order of global
# coordinates, as in the global pass.
#
# A block keeps its settled centres and solves the components wholly inside its
# core itself.  For those that reach its border it sends only their bounding box
# and one candidate (a seed): on a lymphocyte-dense slide their candidates number
# millions of pixels, too many to gather on the driver.  The driver joins the labels into components
# (:func:`border_components`) and each joined component is solved on a worker
# from a window around its bounding box read again from the map
# (:func:`solve_border_components`; overlapping windows merged by
# :func:`merge_windows`): the window reads the same halo and settles as the
# blocks do, its own labelling holds the whole component, so its label at the
# seed is exactly that component.


@dataclass(frozen=True)
class PeakGraph:
    """The peak blocks of one map that must be computed.

    Attributes
    ----------
    blocks : list of (int, int)
        Block (row, col) index of each block to compute.
    boxes : list of (r0, r1, c0, c1)
        Its core in map pixels.
    chunks : tuple of tuple of int
        Block sizes along rows and columns (every block, computed or not).
    halo_px : int
        Halo each block reads around its core (:func:`peak_halo_px`).
    """

    blocks: list[tuple[int, int]]
    boxes: list[tuple[int, int, int, int]]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    halo_px: int


def linking_reach_px(clear_radius_px: float) -> int:
    """Dilation radius that makes candidates closer than the clearing radius touch."""
    return int(np.ceil(clear_radius_px / 2)) + 1


def peak_blocks(
    chunks: tuple[tuple[int, ...], tuple[int, ...]],
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
    *,
    nonzero_boxes: list[tuple[int, int, int, int]] | None = None,
) -> PeakGraph:
    """Which peak blocks to compute, with their cores and halo.

    Parameters
    ----------
    chunks : (tuple of int, tuple of int)
        Block heights and widths in map pixels (Dask's ``chunks``).
    threshold, smooth_radius_px, clear_radius_px : float
        The paper's threshold on smoothed P and its radii, in pixels of the map.
    nonzero_boxes : list of (r0, r1, c0, c1), optional
        Pixel boxes of the map outside which P is 0 (e.g. the blocks that were classified).

    Notes
    -----
    With ``nonzero_boxes`` a candidate can only lie within the smoothing radius
    of a box, since the smoothed value is a weighted mean of P.  The dilated
    mask reaches :func:`linking_reach_px` beyond a candidate, so a block that is
    neither near a box nor within that reach of a block near one has no
    candidates and an empty mask: leaving it out changes nothing.  This keeps
    the cost of glass-dominated slides proportional to their tissue.
    """
    smooth_half = int(np.ceil(smooth_radius_px))
    reach = linking_reach_px(clear_radius_px)
    grid = (len(chunks[0]), len(chunks[1]))
    boxes = _chunk_boxes(chunks)
    if nonzero_boxes is None or threshold < 0:
        computed = np.ones(grid, dtype=bool)
    else:
        candidates = _blocks_near_boxes(chunks, nonzero_boxes, smooth_half)
        # Dilated masks reach `reach` px beyond a candidate: into blocks that are `reach` px away.
        near_candidates = [box for box, flag in zip(boxes, candidates.ravel(), strict=True) if flag]
        computed = candidates | _blocks_near_boxes(chunks, near_candidates, reach)
    flat = np.flatnonzero(computed)
    blocks = [(int(i), int(j)) for i, j in zip(*np.unravel_index(flat, grid), strict=True)]
    return PeakGraph(blocks, [boxes[k] for k in flat], (tuple(chunks[0]), tuple(chunks[1])),
                     peak_halo_px(smooth_radius_px, clear_radius_px))


def read_with_halo(array, box: tuple[int, int, int, int], halo_px: int) -> np.ndarray:
    """``array[r0-h : r1+h, c0-h : c1+h]`` with the map border mirrored symmetrically (edge pixel repeated).

    Works on anything sliceable (NumPy, Zarr): one rectangular read of the
    pixels needed, then the mirrored rows and columns are gathered from it.
    """
    (rows, cols), take = _halo_read(array.shape, box, halo_px)
    return _mirror(np.asarray(array[rows, cols]), take)


def _halo_read(shape, box, halo_px: int) -> tuple[tuple[slice, slice], tuple[np.ndarray | None, np.ndarray | None]]:
    """The rectangle to read for ``box`` plus halo, and the rows/columns to take from it (None: all)."""
    r0, r1, c0, c1 = box
    reads, takes = [], []
    for start, stop, length in ((r0, r1, shape[0]), (c0, c1, shape[1])):
        index = symmetric_index(np.arange(start - halo_px, stop + halo_px), length)
        reads.append(slice(int(index.min()), int(index.max()) + 1))
        # Away from the border the read is the answer; at the border, gather the mirrored lines.
        takes.append(None if (np.diff(index) == 1).all() else index - index.min())
    return tuple(reads), tuple(takes)


def _mirror(window: np.ndarray, take) -> np.ndarray:
    rows, cols = take
    if rows is not None:
        window = window[rows]
    if cols is not None:
        window = window[:, cols]
    return window


def dilate_by_disk(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """``mask`` dilated by the digital disk ``{(dr, dc): dr² + dc² <= radius_px²}``.

    The same set as ``ndimage.binary_dilation(mask, structure=disk)``, computed the cheaper of two
    exact ways (``bench/peak_dilation.py``): a sparse mask (a peak block holds a few thousand candidate
    pixels among millions) by stamping the disk's offsets around each edge pixel of the mask, in
    proportion to edge pixels x disk area; a dense one row by row (:func:`_dilate_by_disk_rows`), linear in
    the pixels.
    """
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    # Disks around the mask's edge pixels (set, with a 4-neighbour unset) cover all the dilation outside the mask:
    # a lattice path from any set pixel to a pixel within the radius, one step at a time towards it, leaves the
    # mask through an edge pixel that is no farther away.  Interior pixels need no stamp.
    framed = np.pad(mask, 1)
    interior = (framed[:-2, 1:-1] & framed[2:, 1:-1] & framed[1:-1, :-2] & framed[1:-1, 2:]) & mask
    rows, cols = np.nonzero(mask & ~interior)
    offsets = np.arange(-radius_px, radius_px + 1)
    disk_r, disk_c = np.nonzero(offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px**2)
    if rows.size * disk_r.size > 4 * mask.size:  # measured: stamping costs more beyond this
        return _dilate_by_disk_rows(mask, radius_px)
    # Stamp into a canvas padded by the radius, so that no offset needs clipping.
    height, width = mask.shape[0] + 2 * radius_px, mask.shape[1] + 2 * radius_px
    canvas = np.zeros(height * width, dtype=bool)
    stamp = (disk_r - radius_px) * width + (disk_c - radius_px)
    centres = (rows + radius_px) * width + (cols + radius_px)
    for start in range(0, centres.size, 4096):  # bounds the index array to 4,096 x disk area
        canvas[(centres[start:start + 4096, None] + stamp[None, :]).ravel()] = True
    return canvas.reshape(height, width)[radius_px:-radius_px, radius_px:-radius_px] | mask


def _dilate_by_disk_rows(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """:func:`dilate_by_disk` as a union of rows: the disk's row ``dy`` is a run of half-width
    ``isqrt(radius² - dy²)``, and a run's dilation along the rows is a difference of prefix counts.
    A quarter of the time of the Euclidean distance transform on dense 2,048² masks, and less memory."""
    height, width = mask.shape
    half_width = {dy: math.isqrt(radius_px * radius_px - dy * dy) for dy in range(-radius_px, radius_px + 1)}
    counts = np.zeros((height, width + 2 * radius_px + 1), dtype=np.int32)  # row-wise prefix counts, zero-padded
    np.cumsum(np.pad(mask, ((0, 0), (radius_px, radius_px))), axis=1, dtype=np.int32, out=counts[:, 1:])
    dilated = np.zeros_like(mask, dtype=bool)
    for run in sorted(set(half_width.values())):
        along_rows = (counts[:, radius_px + run + 1 : radius_px + run + 1 + width]
                      > counts[:, radius_px - run : radius_px - run + width])
        for dy in (dy for dy, h in half_width.items() if h == run):  # rows r take row r + dy of the run's dilation
            if dy >= 0:
                dilated[: height - dy] |= along_rows[dy:]
            else:
                dilated[-dy:] |= along_rows[: height + dy]
    return dilated


def settling_reach_px(clear_radius_px: float, rounds: int = SETTLING_ROUNDS) -> int:
    """How far beyond a candidate ``rounds`` settling rounds look to decide it: twice the disk's extent each.

    A candidate is cleared by a centre settled within the clearing radius of it, and whether that centre is
    settled depends on the candidates within the radius of the centre and on what earlier rounds decided
    about them (:func:`_settle`).
    """
    return 2 * rounds * int(np.floor(clear_radius_px))


def peak_halo_px(smooth_radius_px: float = SMOOTH_RADIUS_PX, clear_radius_px: float = CLEAR_RADIUS_PX) -> int:
    """Halo a peak block or border window reads around its core: smoothing, settling rounds, then linking."""
    return (int(np.ceil(smooth_radius_px)) + settling_reach_px(clear_radius_px)
            + linking_reach_px(clear_radius_px))


@functools.lru_cache(maxsize=8)
def _clearing_offsets(clear_radius_px: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(dr, dc) of the pixels :func:`greedy_peaks` clears around a centre, the centre itself left out: those
    before it in row-major order, then those after it (an equal value before a pixel is taken first)."""
    reach = int(np.floor(clear_radius_px))
    offsets = np.arange(-reach, reach + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= clear_radius_px**2
    dr, dc = np.nonzero(disk)
    dr, dc = dr - reach, dc - reach
    before = (dr < 0) | ((dr == 0) & (dc < 0))
    after = (dr > 0) | ((dr == 0) & (dc > 0))
    return (dr[before], dc[before]), (dr[after], dc[after])


def _max_of_3x3(values: np.ndarray) -> np.ndarray:
    """The largest of each pixel's 3 x 3 neighbourhood, for the pixels one inside the edge (shifted by one).

    Two passes of three shifted views: several times faster than ``ndimage.maximum_filter`` on float64.
    """
    rows = np.maximum(np.maximum(values[:-2], values[1:-1]), values[2:])
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _settle(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape_rc: tuple[int, int],
            in_map: tuple[int, int, int, int], clear_radius_px: float,
            rounds: int = SETTLING_ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """The greedy's decisions that need no more than the window: the settling rounds.

    A candidate that comes before every other candidate within the clearing radius in the greedy's order
    (higher, or equal and earlier in row-major order) is taken by the greedy whatever happens elsewhere:
    nothing that could clear it comes before it.  The candidates within the radius of it are cleared by it.
    The greedy on the candidates left undecided gives the rest of its answer (a centre taken among them is
    never within the radius of a settled one), so the same rule applies again to them: one more round.

    Round ``j`` judges candidates at least ``(2 j - 1) R`` inside the window, where every candidate within
    ``R`` of them is known and was decided exactly by the rounds before (``R``: the disk's extent); after
    ``rounds`` rounds the decisions are exact ``2 rounds R`` inside it (:func:`settling_reach_px`).

    Parameters
    ----------
    rows, cols, values : np.ndarray
        Every candidate of a window of ``shape_rc`` pixels (coordinates within it) and its smoothed P.
    in_map : (r0, r1, c0, c1)
        The window's pixels that lie in the map (end exclusive): only those may be settled (the halo
        beyond the map is mirrored; its candidates stay undecided, which only leaves more to the greedy).
    clear_radius_px : float
        The greedy's clearing radius, in map pixels.

    Returns
    -------
    settled : np.ndarray
        (n,) bool: the candidate is a centre of the global greedy.
    decided : np.ndarray
        (n,) bool: settled, or within the clearing radius of a settled candidate.
    """
    count = rows.size
    settled = np.zeros(count, dtype=bool)
    decided = np.zeros(count, dtype=bool)
    if count == 0:
        return settled, decided
    reach = int(np.floor(clear_radius_px))
    # On the candidates' bounding box padded by the disk's extent (sparse blocks hold a few lymphocytes).
    pad = max(reach, 1)
    top, left = int(rows.min()) - pad, int(cols.min()) - pad
    box_shape = (int(rows.max()) - top + pad + 1, int(cols.max()) - left + pad + 1)
    r, c = rows - top, cols - left
    (before_r, before_c), (after_r, after_c) = _clearing_offsets(clear_radius_px)
    disk_r, disk_c = np.r_[before_r, 0, after_r], np.r_[before_c, 0, after_c]
    dense = np.full(box_shape, -np.inf)  # the undecided candidates' values; -inf elsewhere
    dense[r, c] = values
    # For a cheap first filter: a candidate that comes first in its disk is at least its 8 neighbours, also in
    # float32 (rounding keeps order: v >= w gives float32(v) >= float32(w), so the filter drops no candidate).
    dense32 = dense.astype(np.float32)
    clear = np.zeros(box_shape, dtype=bool)
    for round_number in range(1, rounds + 1):
        inset = (2 * round_number - 1) * reach
        judged = np.flatnonzero(
            ~decided & (rows >= max(inset, in_map[0])) & (rows < min(shape_rc[0] - inset, in_map[1]))
            & (cols >= max(inset, in_map[2])) & (cols < min(shape_rc[1] - inset, in_map[3])))
        if judged.size == 0:
            break
        neighbours = _max_of_3x3(dense32)[r[judged] - 1, c[judged] - 1]
        judged = judged[values[judged].astype(np.float32) >= neighbours]
        chosen = [judged[:0]]
        for start in range(0, judged.size, 1024):  # bounds each gather to 1,024 x disk area
            part = judged[start:start + 1024]
            row, col = r[part, None], c[part, None]
            first = ((values[part] > dense[row + before_r, col + before_c].max(axis=1))
                     & (values[part] >= dense[row + after_r, col + after_c].max(axis=1)))
            chosen.append(part[first])
        chosen = np.concatenate(chosen)
        settled[chosen] = True
        for start in range(0, chosen.size, 1024):
            part = chosen[start:start + 1024]
            clear[r[part, None] + disk_r, c[part, None] + disk_c] = True
        newly = np.flatnonzero(~decided & clear[r, c])
        decided[newly] = True
        dense[r[newly], c[newly]] = dense32[r[newly], c[newly]] = -np.inf
    return settled, decided


@dataclass(frozen=True)
class CoreCandidates:
    """A core's candidates after the settling rounds (map pixels; see :func:`_linked_candidates`).

    Attributes
    ----------
    settled_rc, settled_values : np.ndarray
        (k, 2) int64 (row, col) and (k,) smoothed P of the core's settled centres.
    rows, cols, values : np.ndarray
        (n,) the core's undecided candidates (map pixels, row-major order) and their smoothed P.
    labels : np.ndarray
        (core rows, core cols) label of the undecided candidates' dilated mask (8-connected); 0 outside it.
    count : int
        Number of labels.
    """

    settled_rc: np.ndarray
    settled_values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    count: int


def _linked_candidates(padded: np.ndarray, box: tuple[int, int, int, int], map_shape_rc: tuple[int, int],
                       halo_px: int, threshold: float, smooth_radius_px: float,
                       clear_radius_px: float) -> CoreCandidates:
    """The candidates of ``box`` (smoothed P above the threshold): the settling rounds, then the rest linked.

    ``padded`` is P of the box plus ``halo_px`` (:func:`peak_halo_px`) on every side.  Candidates are found
    over the box plus the settling and linking reaches (their smoothed values are exact there), settled
    (:func:`_settle`, whose decisions are exact over the box plus the linking reach), and the undecided ones
    there are dilated by the linking reach and labelled over the box.
    """
    kernel = disk_kernel(smooth_radius_px)
    smooth_half = kernel.shape[0] // 2
    reach = linking_reach_px(clear_radius_px)
    settle = settling_reach_px(clear_radius_px)
    if halo_px != smooth_half + settle + reach:
        raise ValueError(f"a halo of {halo_px} px: the peak stage reads {smooth_half + settle + reach} px")
    r0, r1, c0, c1 = box
    height, width = r1 - r0, c1 - c0
    margin = settle + reach  # the box lies this far inside the pixels whose smoothed values are known
    # Smoothed P is needed only where it can pass the threshold: where the largest P under the kernel does
    # (a weighted mean never exceeds its largest term; the margin covers the quantisation of P and weights).
    # Usually a few per cent of a block.
    inner = (slice(smooth_half, -smooth_half),) * 2
    above = (padded > threshold - _MEAN_MARGIN).view(np.uint8)
    near_above = ndimage.maximum_filter(above, size=kernel.shape[0], mode="nearest")[inner]
    rows, cols = np.nonzero(near_above)
    values = smooth_probability_at(padded, rows + smooth_half, cols + smooth_half, smooth_radius_px)
    passing = values > threshold
    rows, cols, values = rows[passing], cols[passing], values[passing]
    in_map = (margin - r0, margin - r0 + map_shape_rc[0], margin - c0, margin - c0 + map_shape_rc[1])
    settled, decided = _settle(rows, cols, values, near_above.shape, in_map, clear_radius_px)
    in_core = (rows >= margin) & (rows < margin + height) & (cols >= margin) & (cols < margin + width)
    taken = np.flatnonzero(settled & in_core)
    settled_rc = np.stack([rows[taken] + (r0 - margin), cols[taken] + (c0 - margin)], axis=1).astype(np.int64)
    settled_values = values[taken]
    # The undecided rest: linked over the box plus the linking reach, where every settled centre near them was
    # judged, so their decisions are the greedy's there.
    rows, cols, values, in_core = rows[~decided], cols[~decided], values[~decided], in_core[~decided]
    linkable = ((rows >= settle) & (rows < margin + height + reach)
                & (cols >= settle) & (cols < margin + width + reach))
    candidates = np.zeros((height + 2 * reach, width + 2 * reach), dtype=bool)
    candidates[rows[linkable] - settle, cols[linkable] - settle] = True
    linked = dilate_by_disk(candidates, reach)[reach:-reach, reach:-reach]
    labels, count = ndimage.label(linked, structure=np.ones((3, 3), dtype=bool))
    return CoreCandidates(settled_rc, settled_values, (rows[in_core] + (r0 - margin)).astype(np.int64),
                          (cols[in_core] + (c0 - margin)).astype(np.int64), values[in_core], labels, count)


def summarise_peak_block(
    padded: np.ndarray,
    box: tuple[int, int, int, int],
    map_shape_rc: tuple[int, int],
    halo_px: int,
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
) -> dict:
    """One peak block: its centres that need nothing beyond its halo, and what the join needs of the others.

    Parameters
    ----------
    padded : np.ndarray
        P of the block's core plus ``halo_px`` on every side (mirrored at the map border),
        as :func:`read_with_halo` gives it.
    box : (r0, r1, c0, c1)
        The core in map pixels.
    map_shape_rc : (int, int)
        (rows, cols) of the whole map: beyond it the halo is mirrored, and no centre lies there.
    halo_px : int
        :func:`peak_halo_px` of the radii.

    Returns
    -------
    dict
        ``centres`` ((n, 2) map pixels (row, col)) and ``scores``: the core's centres settled by the first
        round and those of the components of undecided candidates that lie wholly inside the core, solved
        here; ``border``, one row per label of a component that reaches the core's border
        and has candidates in the core: (label, r0, r1, c0, c1, seed row, seed col), the bounding box of
        those candidates (map pixels, end exclusive) and the first of them in row-major order; ``count``
        labels; the labels along the core's ``top``, ``bottom``, ``left`` and ``right`` edges.
    """
    r0, r1, c0, c1 = box
    padded = np.asarray(padded)
    # The smoothed value is a weighted mean: nothing in core or reach can pass the threshold.  The margin covers
    # the quantisation of P and of the weights (< 3e-8), as in _linked_candidates.
    if padded.size == 0 or padded.max() <= threshold - _MEAN_MARGIN:
        return _empty_summary(r1 - r0, c1 - c0)
    found = _linked_candidates(padded, box, map_shape_rc, halo_px, threshold, smooth_radius_px, clear_radius_px)
    labels, count = found.labels, found.count
    owner = labels[found.rows - r0, found.cols - c0]
    # A component whose label is on none of the core's edges lies wholly inside it (a connected set that left the
    # core would cross an edge): it is a whole component of the map, solved here as the join would solve it.
    # Most are; the driver then only receives the bounding boxes of the components that reach the border.
    label_type = np.min_scalar_type(count)  # edges are most of a summary's bytes on the driver
    edges = {"top": labels[0].astype(label_type), "bottom": labels[-1].astype(label_type),
             "left": labels[:, 0].astype(label_type), "right": labels[:, -1].astype(label_type)}
    on_border = np.zeros(count + 1, dtype=bool)
    on_border[np.concatenate(list(edges.values()))] = True
    inside = ~on_border[owner]
    centres, scores = _greedy_per_component(found.rows[inside], found.cols[inside], found.values[inside],
                                            owner[inside], threshold, clear_radius_px)
    return {"centres": np.concatenate([found.settled_rc, centres]),
            "scores": np.concatenate([found.settled_values, scores]),
            "border": _label_boxes(owner[~inside], found.rows[~inside], found.cols[~inside]),
            "count": count, **edges}


def _label_boxes(owner: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(k, 7) int64 rows (label, r0, r1, c0, c1, seed row, seed col) of candidates given in row-major order."""
    if owner.size == 0:
        return np.zeros((0, 7), dtype=np.int64)
    order = np.argsort(owner, kind="stable")  # stable: each label's candidates stay row-major
    owner, rows, cols = owner[order], rows[order], cols[order]
    starts = np.flatnonzero(np.r_[True, np.diff(owner) != 0])
    return np.stack([owner[starts], np.minimum.reduceat(rows, starts), np.maximum.reduceat(rows, starts) + 1,
                     np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts) + 1,
                     rows[starts], cols[starts]], axis=1).astype(np.int64)


def border_components(graph: PeakGraph, summaries: dict[tuple[int, int], dict]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The components that cross block borders, joined over the block summaries.

    Parameters
    ----------
    graph : PeakGraph
        The plan the summaries were computed for.
    summaries : dict
        :func:`summarise_peak_block` of every block in ``graph.blocks``, by block index
        (blocks left out of the plan count as empty).

    Returns
    -------
    boxes : np.ndarray
        (m, 4) int64 (r0, r1, c0, c1) bounding box of each component's candidates, in map pixels.
    seeds : np.ndarray
        (m, 2) int64 (row, col) of one candidate of each component.
    """
    heights, widths = graph.chunks
    grid = (len(heights), len(widths))
    ordered = [summaries.get((i, j)) or _empty_summary(heights[i], widths[j]) for i, j in np.ndindex(grid)]
    component = _join_components(ordered, grid)
    records = np.concatenate([b["border"] for b in ordered])
    if records.size == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    owner = np.concatenate([component[i][b["border"][:, 0]] for i, b in enumerate(ordered)])
    order = np.argsort(owner, kind="stable")
    owner, records = owner[order], records[order]
    starts = np.flatnonzero(np.r_[True, np.diff(owner) != 0])
    boxes = np.stack([np.minimum.reduceat(records[:, 1], starts), np.maximum.reduceat(records[:, 2], starts),
                      np.minimum.reduceat(records[:, 3], starts), np.maximum.reduceat(records[:, 4], starts)],
                     axis=1)
    return boxes, records[starts, 5:7]


def border_windows(boxes: np.ndarray, shape_rc: tuple[int, int],
                   clear_radius_px: float = CLEAR_RADIUS_PX) -> np.ndarray:
    """The core to label around each component's bounding box: grown by the linking reach and one pixel.

    The component's linked mask reaches the reach beyond its candidates, so with one pixel more it
    touches no edge of the window and the window's labelling holds it whole.  Clipped to the map:
    the linked mask is labelled only on the map, as the blocks label it.
    """
    margin = linking_reach_px(clear_radius_px) + 1
    grown = boxes + np.array([-margin, margin, -margin, margin])
    return np.clip(grown, 0, np.repeat(np.asarray(shape_rc), 2)).astype(np.int64)


def merge_windows(cores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge overlapping cores whose joint bounding box is no larger than their areas together.

    Dense tissue links lymphocytes into large components whose cores overlap; labelling their joint box once
    costs less than labelling each.  Any box holding whole cores is exact (see :func:`solve_border_components`).

    Returns
    -------
    windows : np.ndarray
        (w, 4) int64 (r0, r1, c0, c1) boxes, in map pixels.
    window_of : np.ndarray
        (m,) index into ``windows`` of each core.
    """
    boxes = np.array(cores, dtype=np.int64).reshape(-1, 4)
    window_of = np.arange(len(boxes))
    alive = np.ones(len(boxes), dtype=bool)
    merged = True
    while merged:
        merged = False
        for i in np.argsort(-(boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]), kind="stable"):
            if not alive[i]:
                continue
            r0, r1, c0, c1 = boxes[i]
            overlap = alive & (boxes[:, 0] < r1) & (boxes[:, 1] > r0) & (boxes[:, 2] < c1) & (boxes[:, 3] > c0)
            overlap[i] = False
            for j in np.flatnonzero(overlap):
                joint = (min(r0, boxes[j, 0]), max(r1, boxes[j, 1]), min(c0, boxes[j, 2]), max(c1, boxes[j, 3]))
                if ((joint[1] - joint[0]) * (joint[3] - joint[2])
                        <= (r1 - r0) * (c1 - c0) + (boxes[j, 1] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 2])):
                    r0, r1, c0, c1 = joint
                    alive[j], merged = False, True
                    window_of[window_of == j] = i
            boxes[i] = r0, r1, c0, c1
    kept = np.flatnonzero(alive)
    return boxes[kept], np.searchsorted(kept, window_of)


def solve_border_components(
    padded: np.ndarray,
    window: tuple[int, int, int, int],
    map_shape_rc: tuple[int, int],
    halo_px: int,
    seeds: np.ndarray,
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of components that cross block borders, each solved alone as the global pass would.

    The components are of the candidates the settling rounds left undecided, as in the blocks (the window
    reads the same halo, so it decides each candidate as they do).  The window is labelled once.  Each
    component lies inside its core (:func:`border_windows`), inside the window, so the window's labels hold
    each whole, and distinct components keep distinct labels.

    Parameters
    ----------
    padded : np.ndarray
        P of ``window`` plus ``halo_px`` on every side, as :func:`read_with_halo` gives it.
    window : (r0, r1, c0, c1)
        Map pixels that hold the cores of the components (:func:`merge_windows`).
    map_shape_rc, halo_px
        As for :func:`summarise_peak_block`.
    seeds : np.ndarray
        (m, 2) (row, col) of one candidate of each component (:func:`border_components`), in map pixels.

    Returns
    -------
    centres : np.ndarray
        (n, 2) int64 (row, col) map pixels.
    scores : np.ndarray
        (n,) float64 smoothed P at the centres.
    """
    r0, r1, c0, c1 = window
    seeds = np.asarray(seeds).reshape(-1, 2)
    found = _linked_candidates(padded, window, map_shape_rc, halo_px, threshold, smooth_radius_px, clear_radius_px)
    owner = found.labels[found.rows - r0, found.cols - c0]
    members = np.isin(owner, found.labels[seeds[:, 0] - r0, seeds[:, 1] - c0])
    return _greedy_per_component(found.rows[members], found.cols[members], found.values[members], owner[members],
                                 threshold, clear_radius_px)


def group_border_windows(windows: np.ndarray, chunks) -> list[np.ndarray]:
    """Indices of ``windows`` (ascending) grouped by the peak block that holds each one's top-left pixel."""
    if len(windows) == 0:
        return []
    row_edges, col_edges = (np.cumsum((0,) + tuple(axis)) for axis in chunks)
    block = (np.searchsorted(row_edges, windows[:, 0], side="right") * len(col_edges)
             + np.searchsorted(col_edges, windows[:, 2], side="right"))
    order = np.argsort(block, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(block[order])) + 1)


def merge_centres(summaries: dict[tuple[int, int], dict], solved: list[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The centres the blocks solved and those solved across borders, in row-major order.

    Returns
    -------
    centres : np.ndarray
        (n, 2) int64 (row, col) map pixels, in row-major order.
    scores : np.ndarray
        (n,) float64 smoothed P at the centres.
    """
    parts = [(b["centres"], b["scores"]) for b in summaries.values()] + list(solved)
    centres = np.concatenate([np.zeros((0, 2), dtype=np.int64), *(c for c, _ in parts)])
    scores = np.concatenate([np.zeros(0), *(s for _, s in parts)])
    order = np.lexsort((centres[:, 1], centres[:, 0]))
    return centres[order], scores[order]


def _greedy_per_component(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, owner: np.ndarray,
                          threshold: float, clear_radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`greedy_peaks` on each component's candidates alone; returns (n, 2) centres and (n,) values.

    Most components are one lymphocyte: candidates all within the clearing radius of each other (their bounding
    box's diagonal is at most the radius), of which the greedy takes the highest (ties row-major) and clears the
    rest.  Those are answered at once for all such components; the others run the greedy.
    """
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    # Sorted by component, then as the greedy takes them: highest value first, ties row-major.
    order = np.lexsort((cols, rows, -values, owner))
    starts = np.flatnonzero(np.r_[True, np.diff(owner[order]) != 0])
    sorted_rows, sorted_cols = rows[order], cols[order]
    height = np.maximum.reduceat(sorted_rows, starts) - np.minimum.reduceat(sorted_rows, starts)
    width = np.maximum.reduceat(sorted_cols, starts) - np.minimum.reduceat(sorted_cols, starts)
    single = height.astype(np.float64) ** 2 + width.astype(np.float64) ** 2 <= clear_radius_px**2
    first = order[starts[single]]
    centres = [np.stack([rows[first], cols[first]], axis=-1).astype(np.int64)]
    scores = [values[first]]
    ends = np.r_[starts[1:], order.size]
    for start, end in zip(starts[~single], ends[~single], strict=True):
        members = order[start:end]
        found, found_scores = greedy_component(rows[members], cols[members], values[members], threshold,
                                               clear_radius_px)
        centres.append(found)
        scores.append(found_scores)
    return np.concatenate(centres), np.concatenate(scores)


def greedy_component(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, threshold: float,
                     clear_radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`greedy_peaks` on one component's candidates alone: (n, 2) (row, col) centres and (n,) values."""
    top, left = rows.min(), cols.min()
    # The component alone on its bounding box; everything else stays below the threshold.
    local = np.full((rows.max() - top + 1, cols.max() - left + 1), -np.inf)
    local[rows - top, cols - left] = values
    found = greedy_peaks(local, threshold, clear_radius_px)
    return found + [top, left], local[found[:, 0], found[:, 1]]


def _chunk_boxes(chunks) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of every block of ``chunks``, row-major."""
    return [(rows.start, rows.stop, cols.start, cols.stop) for rows, cols in slices_from_chunks(chunks)]


def _blocks_near_boxes(chunks, boxes: list[tuple[int, int, int, int]], margin_px: int) -> np.ndarray:
    """Bool grid over the blocks of ``chunks``: True where a block lies within ``margin_px`` of a box."""
    row_edges, col_edges = (np.cumsum((0,) + tuple(axis)) for axis in chunks)
    near = np.zeros((len(chunks[0]), len(chunks[1])), dtype=bool)
    for r0, r1, c0, c1 in boxes:
        # Blocks whose pixel range [start, stop) meets the box grown by margin_px.
        top = max(np.searchsorted(row_edges, r0 - margin_px, side="right") - 1, 0)
        bottom = np.searchsorted(row_edges, r1 + margin_px, side="left")
        left = max(np.searchsorted(col_edges, c0 - margin_px, side="right") - 1, 0)
        right = np.searchsorted(col_edges, c1 + margin_px, side="left")
        near[top:bottom, left:right] = True
    return near


def _empty_summary(height: int, width: int) -> dict:
    """Summary of a block without candidates or dilated mask."""
    return {
        "centres": np.zeros((0, 2), dtype=np.int64), "scores": np.zeros(0),
        "border": np.zeros((0, 7), dtype=np.int64), "count": 0,
        "top": np.zeros(width, np.uint8), "bottom": np.zeros(width, np.uint8),
        "left": np.zeros(height, np.uint8), "right": np.zeros(height, np.uint8),
    }


def _border_contacts(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """(k, 2) pairs of labels facing each other across a border, 8-connected (same and diagonal positions)."""
    pairs = []
    for shift in (-1, 0, 1):
        a = labels_a[max(0, shift) : len(labels_a) + min(0, shift)]
        b = labels_b[max(0, -shift) : len(labels_b) + min(0, -shift)]
        touching = (a > 0) & (b > 0)
        pairs.append(np.stack([a[touching], b[touching]], axis=1))
    return np.concatenate(pairs)


def _join_components(summaries: list[dict], grid: tuple[int, int]) -> list[np.ndarray]:
    """Connected components over (block, local label): labels touching across a block border are one.

    The labels are the nodes of a graph whose edges are the contacts across
    borders; :func:`scipy.sparse.csgraph.connected_components` joins them (as
    dask-image's ``label`` does).  Returns, per block (row-major), an array
    mapping local label -> global component id (label 0, the background, is a
    node of its own and never used).
    """
    starts = np.cumsum([0] + [b["count"] + 1 for b in summaries])
    n_rows, n_cols = grid
    edges = []

    def join(a: int, side_a: str, b: int, side_b: str, part_a=slice(None), part_b=slice(None)) -> None:
        pairs = _border_contacts(summaries[a][side_a][part_a], summaries[b][side_b][part_b])
        edges.append(pairs + [starts[a], starts[b]])

    for i, j in np.ndindex(grid):
        here = i * n_cols + j
        if j + 1 < n_cols:
            join(here, "right", here + 1, "left")
        if i + 1 < n_rows:
            below = here + n_cols
            join(here, "bottom", below, "top")
            # Corner contacts with the diagonal blocks.
            if j + 1 < n_cols:
                join(here, "bottom", below + 1, "top", slice(-1, None), slice(None, 1))
            if j > 0:
                join(here, "bottom", below - 1, "top", slice(None, 1), slice(-1, None))
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    nodes = int(starts[-1])
    graph = coo_array((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    return [component[starts[k] : starts[k + 1]] for k in range(len(summaries))]
