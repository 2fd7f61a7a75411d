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


# ------------------------------------------------------------------ blockwise
def _disk_footprint(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius


def smooth_blockwise(prob, radius_px: float = SMOOTH_RADIUS_PX, *, skip_at_most: float | None = None):
    """:func:`smooth_probability` on a Dask array, block by block with a halo of the kernel radius.

    The halo holds real neighbouring pixels; only at the map border is it the
    symmetric mirror (Dask's ``reflect`` repeats the edge pixel, like scipy's
    ``reflect``), so every output pixel is computed from the same inputs, in
    the same order, as in one global pass.  Chunks are kept, except that a last
    chunk thinner than the halo is merged into its neighbour.

    ``skip_at_most``: blocks whose input (with halo) never exceeds this value
    are returned as zeros without convolving.  The smoothed value is a
    weighted mean, so it cannot exceed that maximum either: peak detection
    with a threshold >= ``skip_at_most`` is unaffected, and the empty glass
    and skipped blocks of a slide cost almost nothing.
    """
    kernel = disk_kernel(radius_px)
    half = kernel.shape[0] // 2
    prob = prob.rechunk(tuple(_merge_thin_last_chunk(axis, half) for axis in prob.chunks))

    def smooth(block: np.ndarray) -> np.ndarray:
        if skip_at_most is not None and block.max(initial=0) <= skip_at_most:
            return np.zeros(block.shape, np.float64)
        return ndimage.convolve(block.astype(np.float64), kernel, mode="reflect")

    return prob.map_overlap(
        smooth, depth=half, boundary="reflect", allow_rechunk=False, dtype=np.float64, name="peaks-smooth",
    )


def detect_centers_blockwise(
    prob,
    threshold: float = PAPER_THRESHOLD,
    smooth_radius_px: float = SMOOTH_RADIUS_PX,
    clear_radius_px: float = CLEAR_RADIUS_PX,
    *,
    return_scores: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The paper's peak procedure on a chunked map, with exactly the result of :func:`detect_centers`.

    Why this equals one global pass: the greedy takes candidates (pixels above
    ``threshold``) in decreasing order and drops those within
    ``clear_radius_px`` (R) of an accepted one.  A candidate's fate depends only
    on candidates within R, whose fate depends on theirs: such chains can cross
    any number of blocks, so no fixed halo is exact.  But candidates that are
    not linked by a chain of gaps <= R never interact.  The map is therefore cut
    into *components* of linked candidates; the sequential greedy solves each
    component exactly on its own, and their union is the global answer.

    Components are found blockwise: candidates are dilated by a disk of radius
    ``ceil(R / 2) + 1`` (two candidates closer than R then always overlap;
    joining a few more than necessary is harmless), each block labels its
    dilated mask, and labels touching across block borders (8-connectivity)
    are joined by union-find.  Ties are broken in row-major order of global
    coordinates, as in the global pass.

    Parameters
    ----------
    prob : dask.array.Array
        (rows, cols) map of P; chunks must be at least ``ceil(R / 2) + 1`` px
        wide (a thinner last chunk is merged into its neighbour).

    return_scores : bool
        Also return the smoothed P at each centre.

    Returns
    -------
    centres : np.ndarray
        (n, 2) int64 (row, col) centres sorted in row-major order.
    scores : np.ndarray
        (n,) float64 smoothed P at the centres (only with ``return_scores``).
    """
    import dask

    reach = int(np.ceil(clear_radius_px / 2)) + 1
    # A map's last chunk can be thinner than the halo; it is merged into its neighbour,
    # explicitly (every other chunk is kept; map_overlap itself may never rechunk).
    prob = prob.rechunk(tuple(_merge_thin_last_chunk(axis, reach) for axis in prob.chunks))
    smoothed = smooth_blockwise(prob, smooth_radius_px, skip_at_most=threshold)
    footprint = _disk_footprint(reach)
    linked = (smoothed > threshold).map_overlap(
        lambda block: ndimage.binary_dilation(block, structure=footprint) if block.any() else block,
        depth=reach, boundary="none", allow_rechunk=False, dtype=bool, name="peaks-link",
    )
    grid = smoothed.numblocks
    offsets = _block_offsets(smoothed.chunks)
    summaries = dask.compute(*[
        dask.delayed(_summarise_block)(s, lnk, offset, threshold)
        for s, lnk, offset in zip(smoothed.to_delayed().ravel(), linked.to_delayed().ravel(), offsets, strict=True)
    ])
    component = _join_components(summaries, grid)
    rows = np.concatenate([b["rows"] for b in summaries])
    cols = np.concatenate([b["cols"] for b in summaries])
    values = np.concatenate([b["values"] for b in summaries])
    owner = np.concatenate([component[i][b["labels"]] for i, b in enumerate(summaries)])
    centres, scores = [], []
    order = np.argsort(owner, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(owner[order])) + 1):
        if len(members) == 0:
            continue
        r, c = rows[members], cols[members]
        top, left = r.min(), c.min()
        # The component alone on its bounding box; everything else stays below the threshold.
        local = np.full((r.max() - top + 1, c.max() - left + 1), -np.inf)
        local[r - top, c - left] = values[members]
        found = greedy_peaks(local, threshold, clear_radius_px)
        centres.append(found + [top, left])
        scores.append(local[found[:, 0], found[:, 1]])
    result = np.concatenate(centres) if centres else np.zeros((0, 2), dtype=np.int64)
    result_scores = np.concatenate(scores) if scores else np.zeros(0)
    order = np.lexsort((result[:, 1], result[:, 0]))
    return (result[order], result_scores[order]) if return_scores else result[order]


def _merge_thin_last_chunk(sizes: tuple[int, ...], depth: int) -> tuple[int, ...]:
    if len(sizes) > 1 and sizes[-1] < depth:
        return (*sizes[:-2], sizes[-2] + sizes[-1])
    return sizes


def _block_offsets(chunks) -> list[tuple[int, int]]:
    row_starts = np.cumsum((0,) + chunks[0][:-1])
    col_starts = np.cumsum((0,) + chunks[1][:-1])
    return [(int(r), int(c)) for r in row_starts for c in col_starts]


def _summarise_block(smoothed: np.ndarray, linked: np.ndarray, offset: tuple[int, int], threshold: float) -> dict:
    """Candidates of one block with their local component labels, and the labels on the block's border."""
    labels, count = ndimage.label(linked, structure=np.ones((3, 3), dtype=bool))
    rows, cols = np.nonzero(smoothed > threshold)
    return {
        "rows": rows + offset[0], "cols": cols + offset[1], "values": smoothed[rows, cols],
        "labels": labels[rows, cols], "count": count,
        "top": labels[0].copy(), "bottom": labels[-1].copy(),
        "left": labels[:, 0].copy(), "right": labels[:, -1].copy(),
    }


def _join_components(summaries: list[dict], grid: tuple[int, int]) -> list[np.ndarray]:
    """Union-find over (block, local label): labels touching across a block border are one component.

    Returns, per block, an array mapping local label -> global component id (index 0 unused).
    """
    starts = np.cumsum([0] + [b["count"] + 1 for b in summaries])
    parent = np.arange(starts[-1])

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def join(block_a: int, labels_a: np.ndarray, block_b: int, labels_b: np.ndarray) -> None:
        # 8-connectivity across the border: same position and the two diagonal neighbours.
        for shift in (-1, 0, 1):
            a = labels_a[max(0, shift) : len(labels_a) + min(0, shift)]
            b = labels_b[max(0, -shift) : len(labels_b) + min(0, -shift)]
            touching = (a > 0) & (b > 0)
            for la, lb in set(zip(a[touching].tolist(), b[touching].tolist(), strict=True)):
                root_a, root_b = find(starts[block_a] + la), find(starts[block_b] + lb)
                if root_a != root_b:
                    parent[max(root_a, root_b)] = min(root_a, root_b)

    n_rows, n_cols = grid
    for i in range(n_rows):
        for j in range(n_cols):
            here = i * n_cols + j
            if j + 1 < n_cols:
                join(here, summaries[here]["right"], here + 1, summaries[here + 1]["left"])
            if i + 1 < n_rows:
                below = here + n_cols
                join(here, summaries[here]["bottom"], below, summaries[below]["top"])
                # Corner contacts with the diagonal blocks.
                if j + 1 < n_cols:
                    join(here, summaries[here]["bottom"][-1:], below + 1, summaries[below + 1]["top"][:1])
                if j > 0:
                    join(here, summaries[here]["bottom"][:1], below - 1, summaries[below - 1]["top"][-1:])
    return [np.array([find(starts[k] + label) for label in range(b["count"] + 1)]) for k, b in enumerate(summaries)]
