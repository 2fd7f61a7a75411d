"""Peak detection: the disk kernel, the greedy procedure, and blockwise == global on hard synthetic maps."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from wsi_lymph.peaks import (
    CLEAR_RADIUS_PX,
    detect_centers,
    detect_centers_blockwise,
    disk_kernel,
    greedy_peaks,
    smooth_blockwise,
    smooth_probability,
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
    np.testing.assert_array_equal(smooth_blockwise(array).compute(), smooth_probability(prob))
    np.testing.assert_array_equal(detect_centers_blockwise(array), expected)


def test_blockwise_equals_global_with_long_chains_across_blocks():
    # A zig-zag chain of candidates spaced just under the clearing radius over many 32-px blocks.
    centres = [(40 + (i % 2) * 20, 20 + i * 26) for i in range(14)]
    prob = _blob_map(centres, (100, 400), np.linspace(1.0, 0.88, 14), radius=7.0)
    expected = _sorted(detect_centers(prob))
    for chunk in (32, 45, 64):
        np.testing.assert_array_equal(detect_centers_blockwise(da.from_array(prob, chunks=chunk)), expected)


def test_blockwise_rejects_chunks_smaller_than_the_halo():
    prob = da.zeros((100, 100), chunks=5)
    with pytest.raises(ValueError):
        detect_centers_blockwise(prob, clear_radius_px=CLEAR_RADIUS_PX)


def test_no_candidates_gives_an_empty_result():
    assert detect_centers_blockwise(da.zeros((64, 64), chunks=32)).shape == (0, 2)
