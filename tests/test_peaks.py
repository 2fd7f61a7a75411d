"""Peak detection: the disk kernel, the greedy procedure, and blockwise == global on hard synthetic maps."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from wsi_lymph.peaks import (
    detect_centers,
    detect_centers_blockwise,
    disk_kernel,
    greedy_peaks,
    peak_blocks,
    read_with_halo,
    smooth_probability,
    summarise_peak_block,
)


def _sorted(rc: np.ndarray) -> np.ndarray:
    return rc[np.lexsort((rc[:, 1], rc[:, 0]))]


def test_disk_kernel_is_fspecial_like():
    kernel = disk_kernel(6)
    assert kernel.shape == (13, 13) and kernel.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-15)
    inside = kernel[6, 6]
    assert inside == pytest.approx(1 / (np.pi * 36), rel=0.01)  # full pixels weigh 1/area
    assert 0 < kernel[0, 6] < inside  # edge pixels carry their fractional area
    assert kernel[0, 0] == 0


def test_greedy_clears_a_disk_and_breaks_ties_row_major():
    smoothed = np.zeros((60, 60))
    smoothed[10, 10] = smoothed[10, 40] = 0.9  # a tie 30 px apart: both kept
    smoothed[10, 30] = 0.8  # within 28 of the first tie-winner: cleared
    smoothed[50, 50] = 0.7  # below the paper's threshold
    np.testing.assert_array_equal(greedy_peaks(smoothed), [[10, 10], [10, 40]])
    plateau = np.zeros((20, 20))
    plateau[5:8, 5:8] = 0.95
    np.testing.assert_array_equal(greedy_peaks(plateau), [[5, 5]])


def _blob_map(centres, shape, value=0.98, radius=9.0):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    prob = np.zeros(shape)
    for (r, c), v in zip(centres, np.broadcast_to(value, len(centres)), strict=True):
        prob = np.maximum(prob, v * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * radius**2)))
    return prob


def _hard_map(seed: int, shape=(300, 260)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = [
        (64, 64), (128, 128), (0, 0), (299, 259), (64, 200),  # block edges and corners (64-px chunks)
        (200, 10), (200, 10 + 27), (200, 10 + 54), (200, 10 + 81), (200, 10 + 108), (200, 10 + 135),  # chain < R
        (250, 120), (250, 147),  # pair closer than the clearing radius
    ]
    values = rng.uniform(0.85, 1.0, len(centres))
    values[5:11] = np.linspace(1.0, 0.9, 6)  # the chain decreases, so suppression alternates along it
    prob = _blob_map(centres, shape, values)
    prob[20:30, 150:170] = 0.93  # a plateau: ties everywhere
    prob += rng.uniform(0, 0.02, shape)  # noise makes many nearby candidates
    return np.clip(prob, 0, 1)


@pytest.mark.parametrize("chunk", [64, 100, 37, 29])
@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_equals_global_on_hard_maps(seed, chunk):
    prob = _hard_map(seed)
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 8
    array = da.from_array(prob, chunks=chunk)
    centres, scores = detect_centers_blockwise(array, return_scores=True)
    np.testing.assert_array_equal(centres, expected)
    # Each block smooths its core from its halo exactly as the global pass does (bit for bit).
    np.testing.assert_array_equal(scores, smooth_probability(prob)[centres[:, 0], centres[:, 1]])
    graph = peak_blocks(array.chunks)
    for box in graph.boxes[:4]:
        summary = summarise_peak_block(read_with_halo(prob, box, graph.halo_px), box, graph.halo_px)
        np.testing.assert_array_equal(summary["values"], smooth_probability(prob)[summary["rows"], summary["cols"]])


def test_blockwise_equals_global_with_long_chains_across_blocks():
    # A zig-zag chain of candidates spaced just under the clearing radius over many 32-px blocks.
    centres = [(40 + (i % 2) * 20, 20 + i * 26) for i in range(14)]
    prob = _blob_map(centres, (100, 400), np.linspace(1.0, 0.88, 14), radius=7.0)
    expected = _sorted(detect_centers(prob))
    for chunk in (32, 45, 64):
        np.testing.assert_array_equal(detect_centers_blockwise(da.from_array(prob, chunks=chunk)), expected)


def test_blocks_thinner_than_the_halo_are_still_exact():
    # Each block reads its own halo (mirrored at the border), so no block size is too small.
    prob = _hard_map(0)
    expected = _sorted(detect_centers(prob))
    for chunk in ((15, 20),):  # thinner than the 21-px halo
        np.testing.assert_array_equal(detect_centers_blockwise(da.from_array(prob, chunks=chunk)), expected)


def test_no_candidates_gives_an_empty_result():
    assert detect_centers_blockwise(da.zeros((64, 64), chunks=32)).shape == (0, 2)


def test_only_blocks_near_nonzero_boxes_are_computed_and_the_result_is_unchanged():
    # P is non-zero only inside a few "classified" 48-px boxes, some on block edges and corners of a
    # 32-px grid, with candidates up to their borders (smoothing spills 6 px into zero blocks).
    rng = np.random.default_rng(3)
    shape = (320, 384)
    boxes = [(0, 48, 0, 48), (96, 144, 112, 160), (144, 192, 160, 208), (272, 320, 336, 384)]
    prob = np.zeros(shape)
    for r0, r1, c0, c1 in boxes:
        prob[r0:r1, c0:c1] = rng.uniform(0.6, 1.0, (r1 - r0, c1 - c0))
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 6
    array = da.from_array(prob, chunks=32)
    graph = peak_blocks(array.chunks, nonzero_boxes=boxes)
    assert len(graph.blocks) < array.numblocks[0] * array.numblocks[1] // 2  # glass costs nothing
    np.testing.assert_array_equal(detect_centers_blockwise(array, nonzero_boxes=boxes), expected)
    # The restriction is not vacuous: promising zeros where P is not loses centres.
    assert len(detect_centers_blockwise(array, nonzero_boxes=boxes[:1])) < len(expected)
