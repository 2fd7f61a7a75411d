"""Bicubic resampling: windows equal the whole-image resize; the kernel is Keys a=-0.5 like MATLAB/Pillow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_lymph.slides.frame import interpolate_grid, stride_grid
from wsi_lymph.slides.resample import cubic_taps, resize_window, symmetric_index


def test_symmetric_index_repeats_the_edge():
    np.testing.assert_array_equal(symmetric_index(np.arange(-3, 8), 5), [2, 1, 0, 0, 1, 2, 3, 4, 4, 3, 2])


def test_windows_equal_whole_resize_and_match_pillow_inside():
    rng = np.random.default_rng(1)
    image = rng.random((41, 29, 3)).astype(np.float32)
    whole = resize_window(image, (0, 0), (41, 29), np.arange(164), np.arange(116), 4.0)
    part = resize_window(image[8:22, 3:17], (8, 3), (41, 29), np.arange(40, 80), np.arange(20, 60), 4.0)
    np.testing.assert_array_equal(whole[40:80, 20:60], part)
    with pytest.raises(ValueError, match="does not hold every tap"):
        resize_window(image[9:22, 3:17], (9, 3), (41, 29), np.arange(40, 80), np.arange(20, 60), 4.0)
    pillow = np.stack(
        [np.asarray(Image.fromarray(image[..., c]).resize((116, 164), Image.BICUBIC)) for c in range(3)], axis=-1
    )
    # Same kernel; only the border differs (Pillow clamps, MATLAB reflects).
    assert np.abs(pillow - whole)[8:-8, 8:-8].max() < 1e-5
    index, weight = cubic_taps(np.arange(164), 4.0, 41)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0)
    assert index.min() >= 0 and index.max() < 41


def test_scale_one_copies_the_pixels_and_downsampling_drops_only_zero_taps():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    rows, cols = np.arange(-2, 32), np.arange(5, 22)
    copy = resize_window(image[0:30, 4:20], (0, 4), (30, 20), rows, cols, 1.0)
    np.testing.assert_array_equal(copy, image[symmetric_index(rows, 30)][:, symmetric_index(cols, 20)])
    assert copy.dtype == np.float32
    # Near scale 1 (a 0.499 µm/px scan read at 0.5) every tap, zero-weighted ones included, gives the same sums.
    scale = 0.998
    out = resize_window(image, (0, 0), (30, 20), np.arange(29), np.arange(19), scale)
    row_index, row_weight = cubic_taps(np.arange(29), scale, 30)
    col_index, col_weight = cubic_taps(np.arange(19), scale, 20)
    assert (row_weight == 0).all(axis=0).any()  # some taps never count
    data = image.astype(np.float64)
    dense = np.einsum("rk,rkwc->rwc", row_weight, data[row_index])
    dense = np.einsum("ck,rckd->rcd", col_weight, dense[:, col_index])
    np.testing.assert_allclose(out, dense, rtol=0, atol=1e-3)


def test_stride_interpolation_is_independent_of_the_block_layout():
    rng = np.random.default_rng(2)
    rows, cols, stride = 53, 47, 4
    grid_r, grid_c = stride_grid(0, rows, stride), stride_grid(0, cols, stride)
    assert grid_r[0] == -stride and grid_r[-1] >= rows - 1 + stride  # cubic needs a lattice point beyond each end
    values = rng.random((len(grid_r), len(grid_c))).astype(np.float32)
    whole = interpolate_grid(values, (grid_r, grid_c), (0, rows, 0, cols))
    on_lattice = values[1 : 1 + -(-rows // stride), 1 : 1 + -(-cols // stride)]
    np.testing.assert_array_equal(whole[::stride, ::stride], on_lattice)
    for r0, r1, c0, c1 in [(5, 22, 9, 30), (0, 4, 0, 47), (52, 53, 46, 47), (8, 9, 3, 17)]:
        sub_r, sub_c = stride_grid(r0, r1, stride), stride_grid(c0, c1, stride)
        sub = values[np.ix_((sub_r - grid_r[0]) // stride, (sub_c - grid_c[0]) // stride)]
        np.testing.assert_array_equal(interpolate_grid(sub, (sub_r, sub_c), (r0, r1, c0, c1)), whole[r0:r1, c0:c1])
