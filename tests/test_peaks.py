"""Peak detection: the disk kernel, the greedy procedure, and the batch's blockwise peak stage == the global pass.

The blockwise cases run the batch's own peak stage (:func:`wsi_lymph.engine.centres.find_centres`:
plan, one ``peaks`` task per block on the real cluster, join) on hard maps stored as Zarr arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from wsi_lymph.constants import PAPER_THRESHOLD
from wsi_lymph.detection.peaks import (
    SETTLING_ROUNDS,
    _settle,
    detect_centers,
    dilate_by_disk,
    disk_kernel,
    greedy_peaks,
    linking_reach_px,
    merge_windows,
    smooth_probability,
)
from wsi_lymph.engine.centres import find_centres, peak_block_of_store, plan_border, plan_peaks
from wsi_lymph.io.probmap_store import computed_blocks_attr
from wsi_lymph.slides.frame import block_boxes


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
    return prob.astype(np.float32)


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
    # A vertical chain < R inside one column of blocks: it is linked across row borders only.
    prob = np.maximum(prob, _blob_map([(40 + 27 * i, 236) for i in range(8)], shape, np.linspace(0.99, 0.9, 8)))
    prob[20:30, 150:170] = 0.93  # a plateau: ties everywhere
    prob += rng.uniform(0, 0.02, shape)  # noise makes many nearby candidates
    return np.clip(prob, 0, 1).astype(np.float32)


def store_map(path, prob: np.ndarray, chunks, nonzero_boxes=None, box_px: int = 16) -> str:
    """``prob`` as a float32 Zarr map with the attributes the peak stage reads.

    ``nonzero_boxes`` (map-pixel boxes, multiples of ``box_px``) are recorded as the classified
    blocks, as the batch records them; outside them the map promises P = 0.
    """
    attrs = {"value_scale": 1.0, "model": {"threshold": PAPER_THRESHOLD}}
    if nonzero_boxes is not None:
        grid = block_boxes(prob.shape, box_px)
        keep = [any(r0 <= a and b <= r1 and c0 <= c and d <= c1 for r0, r1, c0, c1 in nonzero_boxes)
                for a, b, c, d in grid]
        attrs["computed_blocks"] = computed_blocks_attr(grid, np.array(keep), (0, 0), box_px)
    chunks = (chunks, chunks) if isinstance(chunks, int) else chunks
    array = zarr.create_array(store=str(path), shape=prob.shape, chunks=chunks, dtype="float32", fill_value=0,
                              attributes={"wsi_lymph": attrs})
    array[:] = prob
    return str(path)


def _planned_border_stage(store: str, peak_block_px: int):
    """The peak stage of ``store`` with every block summarised here and its border windows planned."""
    stage = plan_peaks(store, peak_block_px=peak_block_px)
    stage.summaries.update({index: peak_block_of_store(store, box, stage.graph.halo_px, PAPER_THRESHOLD)
                            for index, box in zip(stage.graph.blocks, stage.graph.boxes, strict=True)})
    plan_border(stage)
    return stage


@pytest.mark.shared_data
@pytest.mark.parametrize(("chunk", "peak_block_px"), [(64, 64), (100, 100), (37, 37), (29, 29), (29, 90)])
@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_equals_global_on_hard_maps(client, tmp_path, seed, chunk, peak_block_px):
    prob = _hard_map(seed)
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 8
    store = store_map(tmp_path / "prob.zarr", prob, chunk)
    centres, scores = find_centres(client, store, peak_block_px=peak_block_px)
    np.testing.assert_array_equal(centres, expected)
    # Each block smooths its core from its halo exactly as the global pass does (bit for bit).
    smoothed = smooth_probability(prob)
    np.testing.assert_array_equal(scores, smoothed[centres[:, 0], centres[:, 1]])
    graph = plan_peaks(store, peak_block_px=peak_block_px).graph
    assert graph.chunks[0][0] == (peak_block_px // chunk) * chunk and len(graph.blocks) >= 9
    for box in graph.boxes[:4]:
        summary = peak_block_of_store(store, box, graph.halo_px, PAPER_THRESHOLD)
        inner = summary["centres"]
        np.testing.assert_array_equal(summary["scores"], smoothed[inner[:, 0], inner[:, 1]])
        # What a block sends of a component crossing its border: the box of its candidates in the core, a seed.
        _, r0, r1, c0, c1, seed_r, seed_c = summary["border"].T
        assert (smoothed[seed_r, seed_c] > PAPER_THRESHOLD).all()
        assert ((box[0] <= r0) & (r0 <= seed_r) & (seed_r < r1) & (r1 <= box[1])).all()
        assert ((box[2] <= c0) & (c0 <= seed_c) & (seed_c < c1) & (c1 <= box[3])).all()


@pytest.mark.shared_data
def test_blockwise_equals_global_with_long_chains_across_blocks(client, tmp_path):
    # A chain of lymphocytes spaced under the clearing radius over many 32-px blocks, decreasing: the greedy's
    # choices alternate along it, each depending on the one before, so the settling rounds decide only its start.
    centres = [(50, 20 + 20 * i) for i in range(24)]
    prob = _blob_map(centres, (100, 520), np.linspace(1.0, 0.88, 24), radius=7.0)
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 7
    for chunk in (32, 45, 64):
        store = store_map(tmp_path / f"prob-{chunk}.zarr", prob, chunk)
        np.testing.assert_array_equal(find_centres(client, store, peak_block_px=chunk)[0], expected)
    # The chain is one component over many blocks, solved by one ``peaks-border`` task from one window.
    stage = _planned_border_stage(store, 32)
    widths = stage.border_windows[:, 3] - stage.border_windows[:, 2]
    assert widths.max() > 6 * 32  # over seven 32-px blocks


@pytest.mark.shared_data
def test_components_solved_in_one_merged_window_are_still_exact(client, tmp_path):
    # Two parallel zig-zag chains over many 32-px blocks, just too far apart to link, each too long for the
    # settling rounds: two components whose windows overlap so much that one window is labelled for both.
    rows = [30 + (i % 2) * 14 for i in range(20)]
    upper = _blob_map([(r, 20 + i * 20) for i, r in enumerate(rows)], (150, 440), np.linspace(1.0, 0.95, 20), 7.0)
    lower = _blob_map([(r + 48, 30 + i * 20) for i, r in enumerate(rows)], (150, 440), np.linspace(0.99, 0.94, 20),
                      7.0)
    prob = np.maximum(upper, lower)
    expected = _sorted(detect_centers(prob))
    store = store_map(tmp_path / "prob.zarr", prob, 32)
    np.testing.assert_array_equal(find_centres(client, store, peak_block_px=32)[0], expected)
    stage = _planned_border_stage(store, 32)
    assert len(stage.border_seeds) == 2 and len(stage.border_windows) == 1


def _lymphocyte_sheet(seed: int, shape=(640, 640), spacing: int = 36) -> np.ndarray:
    """A map packed with lymphocytes as a lymph node is: a jittered grid, some saturated (flat tops: ties)."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[spacing // 2 : shape[0] : spacing, spacing // 2 : shape[1] : spacing].reshape(2, -1).T
    centres = grid + rng.integers(-6, 7, grid.shape)
    values = rng.uniform(0.85, 1.15, len(centres))  # above 1: clipped to a plateau of 1
    prob = _blob_map([tuple(c) for c in centres], shape, values, radius=9.0)
    return np.clip(prob + rng.uniform(0, 0.02, shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_settled_candidates_are_the_greedys_own_decisions(seed):
    prob = _lymphocyte_sheet(seed, (400, 400))
    smoothed = smooth_probability(prob)
    rows, cols = np.nonzero(smoothed > PAPER_THRESHOLD)
    centres = greedy_peaks(smoothed)
    taken = np.zeros(prob.shape, dtype=bool)
    taken[centres[:, 0], centres[:, 1]] = True
    settled, decided = _settle(rows, cols, smoothed[rows, cols], prob.shape, (0, 400, 0, 400), 28.0)
    # Exact where the rounds saw every candidate that matters: 2 x rounds x 28 px inside the window.
    inset = 2 * SETTLING_ROUNDS * 28
    exact = (rows >= inset) & (rows < 400 - inset) & (cols >= inset) & (cols < 400 - inset)
    assert settled[exact].sum() >= 10 and (decided & ~settled)[exact].sum() > 1000
    assert taken[rows[settled], cols[settled]].all()  # a settled candidate is a centre (anywhere it was judged)
    assert not taken[rows[exact & decided & ~settled], cols[exact & decided & ~settled]].any()
    # Only pixels inside the map may be settled: none of a band said to lie beyond it.
    settled, _ = _settle(rows, cols, smoothed[rows, cols], prob.shape, (0, 400, 100, 400), 28.0)
    assert settled.any() and not settled[cols < 100].any()


@pytest.mark.shared_data
@pytest.mark.parametrize("seed", [0, 1])
def test_a_map_packed_with_lymphocytes_gives_small_border_windows_and_the_global_answer(client, tmp_path, seed):
    # Packed lymphocytes link into a component across most of the map: before the settling rounds, its window
    # was most of the map (a lymph node slide's would not fit in memory).
    prob = _lymphocyte_sheet(seed)
    candidates = smooth_probability(prob) > PAPER_THRESHOLD
    labels, _ = ndimage.label(dilate_by_disk(candidates, linking_reach_px(28)), structure=np.ones((3, 3), bool))
    largest = ndimage.find_objects(labels)[np.argmax(np.bincount(labels.ravel())[1:])]
    assert (largest[0].stop - largest[0].start) * (largest[1].stop - largest[1].start) > 0.8 * prob.size
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 250
    store = store_map(tmp_path / "prob.zarr", prob, 64)
    np.testing.assert_array_equal(find_centres(client, store, peak_block_px=64)[0], expected)
    stage = _planned_border_stage(store, 64)
    areas = (stage.border_windows[:, 1] - stage.border_windows[:, 0]) * (
        stage.border_windows[:, 3] - stage.border_windows[:, 2])
    assert areas.max(initial=0) < 0.05 * prob.size


def test_merge_windows_joins_only_boxes_that_cost_no_more_together():
    cores = np.array([[0, 10, 0, 10], [5, 15, 0, 10], [9, 30, 9, 30], [100, 110, 100, 110]])
    windows, window_of = merge_windows(cores)
    # The first two overlap by half (joint 150 px² <= 200): one window.  The third only touches a corner
    # (joint 900 > 150 + 441) and the fourth is far: their own windows.
    np.testing.assert_array_equal(windows[window_of], [[0, 15, 0, 10], [0, 15, 0, 10], [9, 30, 9, 30],
                                                       [100, 110, 100, 110]])
    assert len(windows) == 3


@pytest.mark.shared_data
def test_blocks_thinner_than_the_halo_are_still_exact(client, tmp_path):
    # Each block reads its own halo (mirrored at the border), so no block size is too small.
    prob = _hard_map(0)
    expected = _sorted(detect_centers(prob))
    store = store_map(tmp_path / "prob.zarr", prob, (15, 20))  # thinner than the halo
    graph = plan_peaks(store, peak_block_px=1).graph
    assert graph.chunks[0][0] == 15 and graph.chunks[1][0] == 20 < graph.halo_px
    np.testing.assert_array_equal(find_centres(client, store, peak_block_px=1)[0], expected)


@pytest.mark.shared_data
def test_no_candidates_gives_an_empty_result(client, tmp_path):
    store = store_map(tmp_path / "prob.zarr", np.zeros((64, 64), np.float32), 32)
    centres, scores = find_centres(client, store, peak_block_px=32)
    assert centres.shape == (0, 2) and scores.shape == (0,)


@pytest.mark.shared_data
def test_only_blocks_near_nonzero_boxes_are_computed_and_the_result_is_unchanged(client, tmp_path):
    # P is non-zero only inside a few "classified" 48-px boxes, some on block edges and corners of a
    # 32-px grid, with candidates up to their borders (smoothing spills 6 px into zero blocks).
    rng = np.random.default_rng(3)
    shape = (320, 384)
    boxes = [(0, 48, 0, 48), (96, 144, 112, 160), (144, 192, 160, 208), (272, 320, 336, 384)]
    prob = np.zeros(shape, np.float32)
    for r0, r1, c0, c1 in boxes:
        prob[r0:r1, c0:c1] = rng.uniform(0.6, 1.0, (r1 - r0, c1 - c0))
    expected = _sorted(detect_centers(prob))
    assert len(expected) >= 6
    store = store_map(tmp_path / "prob.zarr", prob, 32, nonzero_boxes=boxes)
    graph = plan_peaks(store, peak_block_px=32).graph
    assert len(graph.blocks) < (shape[0] // 32) * (shape[1] // 32) // 2  # glass costs nothing
    np.testing.assert_array_equal(find_centres(client, store, peak_block_px=32)[0], expected)
    # The restriction is not vacuous: promising zeros where P is not loses centres.
    wrong = store_map(tmp_path / "wrong.zarr", prob, 32, nonzero_boxes=boxes[:1])
    assert len(find_centres(client, wrong, peak_block_px=32)[0]) < len(expected)


@pytest.mark.parametrize("density", [0.002, 0.1])  # sparse: stamped disks; dense: row by row
@pytest.mark.parametrize("radius", [1, 5, 28, 29])
def test_disk_dilation_equals_the_structuring_element(radius, density):
    from scipy import ndimage

    from wsi_lymph.detection.peaks import dilate_by_disk

    rng = np.random.default_rng(radius)
    mask = rng.random((160, 170)) < density
    mask[0, 0] = mask[-1, 5] = True  # at the edges too
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius
    np.testing.assert_array_equal(dilate_by_disk(mask, radius), ndimage.binary_dilation(mask, structure=disk))
    assert not dilate_by_disk(np.zeros((5, 5), dtype=bool), radius).any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_smoothing_at_chosen_pixels_is_bit_identical_to_the_whole_convolution(dtype):
    # Peak blocks smooth only where P can pass the threshold; centres equal the global pass only if those
    # values are the convolution's to the last bit (ties and the threshold compare them exactly).
    from scipy import ndimage

    from wsi_lymph.detection.peaks import smooth_probability_at

    rng = np.random.default_rng(7)
    prob = ndimage.gaussian_filter(rng.random((90, 110)), 1.5).astype(dtype)
    prob[40:50, 40:50] = dtype(0.9)  # a flat plateau: equal terms, where summation order shows first
    whole = smooth_probability(prob)
    half = 6
    rows, cols = np.nonzero(np.ones((90 - 2 * half, 110 - 2 * half), dtype=bool))
    at = smooth_probability_at(prob, rows + half, cols + half)
    assert at.dtype == np.float64
    np.testing.assert_array_equal(at, whole[rows + half, cols + half])
    # Scattered pixels, smoothed in separate pieces of strips.
    chosen = rng.choice(rows.size, 150, replace=False)
    np.testing.assert_array_equal(smooth_probability_at(prob, rows[chosen] + half, cols[chosen] + half),
                                  whole[rows[chosen] + half, cols[chosen] + half])


@pytest.mark.parametrize("radius", [6, 4.5])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_smoothing_is_the_disk_convolution_in_exact_arithmetic(dtype, radius):
    # Runs of equal weight over prefix sums, in integers: the float64 convolution's values up to the
    # quantisation of P (2^-24) and of the weights (2^-35), and exactly symmetric where the map is.
    from scipy import ndimage

    rng = np.random.default_rng(3)
    prob = ndimage.gaussian_filter(rng.random((150, 170)), 2.0).astype(dtype)  # several strips of rows
    reference = ndimage.convolve(prob.astype(np.float64), disk_kernel(radius), mode="reflect")
    smoothed = smooth_probability(prob, radius)
    np.testing.assert_allclose(smoothed, reference, rtol=0, atol=3e-8)
    assert np.abs(smoothed - reference).max() > 0  # the reference is not what was computed
    # Exact ties stay ties (the greedy then takes them row-major); float summation order breaks such ties.
    mirrored = np.concatenate([prob, prob[:, ::-1]], axis=1)
    smoothed = smooth_probability(mirrored, radius)
    np.testing.assert_array_equal(smoothed, smoothed[:, ::-1])
    np.testing.assert_array_equal(smooth_probability(mirrored.T, radius), smoothed.T)


def test_smoothing_refuses_values_that_are_not_probabilities():
    prob = np.full((20, 20), 0.5)
    prob[3, 4] = np.nan
    with pytest.raises(ValueError, match="finite"):
        smooth_probability(prob)
    with pytest.raises(ValueError, match="finite"):
        smooth_probability(np.full((20, 20), 1e6))


@pytest.mark.parametrize("radius", [1, 5, 15])
def test_disk_dilation_of_solid_blobs_stamped_from_their_edges_equals_the_structuring_element(radius):
    # Candidates come in solid blobs (a lymphocyte's pixels above the threshold): only their edge pixels are
    # stamped, which must still give the whole dilation, holes and thin parts included.
    from scipy import ndimage

    from wsi_lymph.detection.peaks import dilate_by_disk

    rng = np.random.default_rng(radius)
    rows, cols = np.mgrid[:600, :620]
    mask = np.zeros((600, 620), dtype=bool)
    for r, c, size in zip(rng.integers(0, 600, 12), rng.integers(0, 620, 12), rng.integers(2, 14, 12), strict=True):
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= size**2
    mask[100:140, 50:90] = True
    mask[110:130, 60:80] = False  # a hole
    mask[200, 10:200] = True  # a one-pixel line
    mask[0, :5] = mask[-1, -3:] = True  # on the edges of the array
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius
    framed = np.pad(mask, 1)
    edge = mask & ~(framed[:-2, 1:-1] & framed[2:, 1:-1] & framed[1:-1, :-2] & framed[1:-1, 2:])
    assert edge.sum() * disk.sum() <= 4 * mask.size  # the stamping path, not the distance transform
    np.testing.assert_array_equal(dilate_by_disk(mask, radius), ndimage.binary_dilation(mask, structure=disk))
