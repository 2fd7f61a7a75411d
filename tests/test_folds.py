"""Cross-validation by image: fold assignment, the paper's list files and per-fold mean images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_crops_in_paper_layout

from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.folds import Fold, make_folds, read_folds, write_folds
from wsi_lymph.training.patches import extract_patches, open_patches, patch_names


@pytest.fixture(scope="module")
def patches_zarr(tmp_path_factory):
    """Patches of the three real crops (paper layout, ids 1-3), few per image to stay fast."""
    folder = write_crops_in_paper_layout(tmp_path_factory.mktemp("paper"))
    return extract_patches(None, read_dataset(folder), folder / "patches.zarr", seed=11,
                           max_positive=30, max_negative=25, chunk=100)


def test_make_folds_splits_by_image_balanced_and_deterministic():
    ids = [f"im{i}" for i in range(23)]
    folds = make_folds(ids, n_folds=5, seed=4)
    assert [f.fold for f in folds] == [1, 2, 3, 4, 5]
    tests = [image for f in folds for image in f.test_images]
    assert sorted(tests) == sorted(ids)  # every image in exactly one test set
    assert sorted(len(f.test_images) for f in folds) == [4, 4, 5, 5, 5]
    for f in folds:
        assert not set(f.train_images) & set(f.test_images)
        assert sorted(f.train_images + f.test_images) == sorted(ids)
        assert f.train_images == [i for i in ids if i in f.train_images]  # input order kept
    assert make_folds(ids, 5, seed=4) == folds
    assert make_folds(ids, 5, seed=5) != folds
    assert [len(f.test_images) for f in make_folds(ids[:5], 5)] == [1] * 5
    with pytest.raises(ValueError, match="cannot fill"):
        make_folds(ids[:4], 5)
    with pytest.raises(ValueError, match="unique"):
        make_folds(["a", "a", "b"], 2)


@pytest.mark.shared_data
def test_write_folds_lists_and_mean_images_match_the_zarr(patches_zarr, tmp_path):
    folds = make_folds(["1", "2", "3"], n_folds=3, seed=2)
    path = write_folds(folds, patches_zarr, tmp_path / "folds", seed=2)
    out = tmp_path / "folds"
    assert path == out / "folds.json"
    group, attrs = open_patches(patches_zarr)
    names = np.asarray(patch_names(group, attrs))
    labels = np.asarray(group["label"][:])
    image_index = np.asarray(group["image_index"][:])
    patches = np.asarray(group["patches"][:]).astype(np.float64)
    payload = json.loads(path.read_text())
    assert payload["n_folds"] == 3 and payload["seed"] == 2
    seen_test: list[str] = []
    for fold, entry in zip(folds, payload["folds"], strict=True):
        k = fold.fold
        assert entry["fold"] == k and entry["test_images"] == fold.test_images
        assert not set(entry["train_images"]) & set(entry["test_images"])
        seen_test += entry["test_images"]
        assert (out / f"train_w32_parent_{k}.txt").read_text().split() == [f"im{i}.tif" for i in fold.train_images]
        assert (out / f"test_w32_parent_{k}.txt").read_text().split() == [f"im{i}.tif" for i in fold.test_images]
        for side, images in (("train", fold.train_images), ("test", fold.test_images)):
            lines = (out / f"{side}_w32_{k}.txt").read_text().splitlines()
            rows = np.flatnonzero(np.isin(image_index, [int(i) - 1 for i in images]))
            assert entry[f"n_{side}_patches"] == len(lines) == len(rows)
            listed = [line.split(" ") for line in lines]
            assert sorted(name for name, _ in listed) == sorted(names[rows].tolist())
            label_of = dict(zip(names.tolist(), labels.tolist(), strict=True))
            assert all(int(label) == label_of[name] for name, label in listed)
            assert all(name.startswith(tuple(f"im{i}_" for i in images)) for name, _ in listed)
            if side == "train":
                assert [name for name, _ in listed] != names[rows].tolist()  # shuffled
                mean = np.load(out / f"fold{k}_mean_bgr.npy")
                assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
                expected = patches[rows].mean(axis=0)[..., ::-1].transpose(2, 0, 1)
                np.testing.assert_allclose(mean, expected, atol=1e-3)
            else:
                assert [name for name, _ in listed] == names[rows].tolist()
    assert sorted(seen_test) == ["1", "2", "3"]
    assert read_folds(path) == folds and read_folds(out) == folds
    # Same seed, same files.
    again = write_folds(folds, patches_zarr, tmp_path / "again", seed=2)
    assert (again.parent / "train_w32_1.txt").read_text() == (out / "train_w32_1.txt").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.shared_data
def test_write_folds_refuses_leaks_and_unknown_images(patches_zarr, tmp_path):
    with pytest.raises(ValueError, match="both sides"):
        write_folds([Fold(1, ["1", "2"], ["2", "3"])], patches_zarr, tmp_path)
    with pytest.raises(ValueError, match="without patches"):
        write_folds([Fold(1, ["1", "2"], ["9"])], patches_zarr, tmp_path)
