"""Synthetic H&E-like data set: deterministic, known centres, lymphocytes darker and richer in hematoxylin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed

from wsi_lymph.training.dataset import check_dataset, read_dataset
from wsi_lymph.training.synthetic import (
    LYMPHOCYTE_GAP_PX,
    LYMPHOCYTE_RADIUS_PX,
    LYMPHOCYTES_PER_100PX,
    make_synthetic_dataset,
    synthetic_image,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return folder, make_synthetic_dataset(folder, n_images=10, size_px=100, seed=7)


def test_synthetic_image_is_deterministic_for_a_seed():
    rgb, centers = synthetic_image(np.random.default_rng(5), 100)
    again_rgb, again_centers = synthetic_image(np.random.default_rng(5), 100)
    other_rgb, other_centers = synthetic_image(np.random.default_rng(6), 100)
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8
    assert centers.dtype == np.int64 and centers.shape[1] == 2
    np.testing.assert_array_equal(rgb, again_rgb)
    np.testing.assert_array_equal(centers, again_centers)
    assert not np.array_equal(rgb, other_rgb)
    assert centers.shape != other_centers.shape or not np.array_equal(centers, other_centers)


def test_dataset_is_deterministic_and_image_k_does_not_depend_on_n_images(tmp_path, dataset):
    _, images = dataset
    same = make_synthetic_dataset(tmp_path / "same", n_images=3, seed=7)
    other = make_synthetic_dataset(tmp_path / "other", n_images=3, seed=8)
    for a, b, c in zip(images[:3], same, other, strict=True):
        assert a.image_id == b.image_id == c.image_id
        np.testing.assert_array_equal(a.rgb, b.rgb)
        np.testing.assert_array_equal(a.centers_rc, b.centers_rc)
        assert not np.array_equal(a.rgb, c.rgb)


def test_centres_inside_spaced_apart_and_counted(dataset):
    _, images = dataset
    low, high = LYMPHOCYTES_PER_100PX
    for image in images:
        centers = image.centers_rc
        assert low <= len(centers) <= high
        assert (centers >= 0).all() and (centers < 100).all()
        assert np.array_equal(centers, centers[np.lexsort((centers[:, 1], centers[:, 0]))])  # row-major
        distance = np.hypot(*(centers[:, None, :] - centers[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(distance, np.inf)
        # Two lymphocytes never overlap: centres at least two (smallest) radii plus the gap apart.
        assert distance.min() >= 2 * LYMPHOCYTE_RADIUS_PX[0] + LYMPHOCYTE_GAP_PX


def test_lymphocytes_are_darker_and_richer_in_hematoxylin(dataset):
    _, images = dataset
    far_dark = 0
    for image in images:
        rgb, centers = image.rgb, image.centers_rc
        hema = rgb2hed(rgb)[..., 0]
        away = np.ones(rgb.shape[:2], bool)
        away[centers[:, 0], centers[:, 1]] = False
        distance = ndimage.distance_transform_edt(away)
        core = distance <= 2  # well inside every lymphocyte (radius >= 3.8 px)
        elsewhere = distance > 8  # background and the other nuclei
        brightness = rgb.astype(float).mean(axis=2)
        assert brightness[core].mean() < 0.6 * np.median(brightness[elsewhere])
        assert hema[core].mean() > 2.5 * np.median(hema[elsewhere])
        assert hema[core].min() > np.median(hema[elsewhere])
        # Hard negatives: pixels away from lymphocytes as hematoxylin-rich as a lymphocyte centre.
        far_dark += int((hema[distance > 6] >= np.percentile(hema[centers[:, 0], centers[:, 1]], 10)).sum())
    # More such pixels than lymphocytes: a per-pixel colour threshold cannot be the whole answer.
    assert far_dark > sum(len(image.centers_rc) for image in images)


def test_written_dataset_reads_back_equal(dataset):
    folder, images = dataset
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["dataset.json"] + [f"im{k}.tif" for k in range(1, 11)] + [f"{k}m.tif" for k in range(1, 11)])
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta == {"generator": "wsi-lymph synthetic", "seed": 7, "n_images": 10, "size_px": 100, "mpp": 0.5,
                    "centers": sum(len(image.centers_rc) for image in images)}
    again = read_dataset(folder)
    assert [image.image_id for image in again] == [image.image_id for image in images] == [str(k) for k in range(1, 11)]
    for written, read in zip(images, again, strict=True):
        assert (read.image_path, read.annotation_path, read.layout) == (written.image_path, written.annotation_path,
                                                                         "paper")
        np.testing.assert_array_equal(read.rgb, written.rgb)
        np.testing.assert_array_equal(read.centers_rc, written.centers_rc)
    assert check_dataset(folder).ok


def test_refuses_a_non_empty_folder_and_small_sizes(tmp_path):
    (tmp_path / "other.txt").write_text("someone else's file")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path, n_images=1)
    images = make_synthetic_dataset(tmp_path, n_images=1, size_px=64, exist_ok=True)
    assert images[0].rgb.shape == (64, 64, 3)
    with pytest.raises(ValueError):
        synthetic_image(np.random.default_rng(0), 8)
