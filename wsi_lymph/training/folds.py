"""Cross-validation folds by image (= patient), and the paper's per-fold list files.

The paper (use case 4) trains 5 models, one per fold, each on the patches of
4/5 of the images and tested on the remaining 1/5; a patch never crosses
sides because the split is by image (one image = one patient in its data set).
:func:`write_folds` writes, for fold ``K`` (1-based), the files of the
authors' ``step2_make_training_lists.m`` and Caffe's ImageData/convert_imageset
lists:

- ``train_w32_parent_K.txt`` / ``test_w32_parent_K.txt``: the image file names
  of the fold's training / test images, one per line (the original wrote the
  file name, e.g. ``im12.tif``);
- ``train_w32_K.txt`` / ``test_w32_K.txt``: ``<patch png name> <label>`` per
  line (a space between, as the original's ``fprintf('%s %d\\n')``); the
  training list is shuffled (seeded), since Caffe reads a database in its
  stored order and stochastic gradient descent needs mixed batches (the
  original left this to ``convert_imageset -shuffle``); the test list keeps
  the order of the Zarr group;
- ``fold<K>_mean_bgr.npy``: (3, 32, 32) float32 BGR 0-255 mean of the fold's
  *training* patches (all rotations), Caffe's ``compute_image_mean``;

and ``folds.json`` with every fold's images and patch counts.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_lymph.io.outputs import write_atomic
from wsi_lymph.training.patches import mean_image_bgr, open_patches, patch_names

FOLDS_JSON = "folds.json"


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold.

    Attributes
    ----------
    fold : int
        1-based fold number (``K`` of the file names).
    train_images, test_images : list of str
        Image ids on each side, in the order of the image list given to :func:`make_folds`.
    """

    fold: int
    train_images: list[str]
    test_images: list[str]


def make_folds(image_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[Fold]:
    """Split images (patients) into ``n_folds`` test sets of balanced size.

    The ids are shuffled with ``numpy.random.default_rng(seed)`` and dealt to
    the folds in turn (MATLAB ``crossvalind('Kfold', ...)`` does likewise), so
    test-set sizes differ by at most one and every image is in exactly one
    test set.

    Parameters
    ----------
    image_ids : list of str
        Unique image ids (one image = one patient).
    n_folds : int
        Number of folds (>= 2).
    seed : int
        Seed of the shuffle; the same ids and seed give the same folds.

    Returns
    -------
    list of Fold
        Folds 1 ... ``n_folds``.

    Raises
    ------
    ValueError
        Fewer images than folds, fewer than 2 folds, or repeated ids.
    """
    ids = [str(image_id) for image_id in image_ids]
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} image(s) cannot fill {n_folds} folds: every fold needs a test image")
    order = np.random.default_rng(seed).permutation(len(ids))
    fold_of = np.empty(len(ids), dtype=np.int64)
    fold_of[order] = np.arange(len(ids)) % n_folds
    return [
        Fold(
            fold=k + 1,
            train_images=[image_id for image_id, f in zip(ids, fold_of, strict=True) if f != k],
            test_images=[image_id for image_id, f in zip(ids, fold_of, strict=True) if f == k],
        )
        for k in range(n_folds)
    ]


def _check(folds: list[Fold], known: list[str]) -> None:
    known_set = set(known)
    for fold in folds:
        overlap = set(fold.train_images) & set(fold.test_images)
        if overlap:
            raise ValueError(f"fold {fold.fold}: images on both sides: {sorted(overlap)}")
        unknown = (set(fold.train_images) | set(fold.test_images)) - known_set
        if unknown:
            raise ValueError(f"fold {fold.fold}: images without patches: {sorted(unknown)}")


def write_folds(folds: list[Fold], patches_zarr_path: str | os.PathLike, out_dir: str | os.PathLike,
                *, seed: int = 0) -> Path:
    """Write each fold's list files, mean image and ``folds.json`` (see the module docstring).

    Parameters
    ----------
    folds : list of Fold
        From :func:`make_folds` (or :func:`read_folds`).
    patches_zarr_path : str or os.PathLike
        Group written by :func:`wsi_lymph.training.patches.extract_patches` (or the folder holding ``patches.zarr``).
    out_dir : str or os.PathLike
        Folder for the files (created).  Every file is written under a temporary name and renamed into place.
    seed : int
        Recorded in ``folds.json`` (pass the seed given to :func:`make_folds`); the training list of fold ``K``
        is shuffled with ``numpy.random.default_rng([seed, K])``.

    Returns
    -------
    Path
        ``out_dir / "folds.json"``.

    Raises
    ------
    ValueError
        An image on both sides of a fold, or a fold image that has no patches in the group.
    """
    group, attrs = open_patches(patches_zarr_path)
    _check(folds, list(attrs["image_ids"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = _PatchIndex.read(group, attrs)
    payload = {
        "n_folds": len(folds),
        "seed": int(seed),
        "patches_zarr": str(patches_zarr_path),
        "folds": [_write_fold(out, fold, index, int(seed)) for fold in folds],
    }
    path = out / FOLDS_JSON
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


@dataclass(frozen=True)
class _PatchIndex:
    """What the fold files need of a patch group, read once: names, labels and image of every patch."""

    patches: Any  # the group's Zarr array, read only for the mean images
    names: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    file_name: dict[str, str]
    position: dict[str, int]

    @classmethod
    def read(cls, group, attrs: dict) -> _PatchIndex:
        image_ids = list(attrs["image_ids"])
        return cls(
            patches=group["patches"],
            names=np.asarray(patch_names(group, attrs), dtype=object),
            labels=np.asarray(group["label"][:]),
            image_index=np.asarray(group["image_index"][:]),
            file_name={image_id: Path(path).name for image_id, path in zip(image_ids, attrs["image_paths"],
                                                                          strict=True)},
            position={image_id: i for i, image_id in enumerate(image_ids)},
        )

    def rows(self, image_ids: list[str]) -> np.ndarray:
        """Indices of the patches of these images, in the order of the group."""
        return np.flatnonzero(np.isin(self.image_index, [self.position[i] for i in image_ids]))

    def image_list(self, image_ids: list[str]) -> bytes:
        return "".join(f"{self.file_name[i]}\n" for i in image_ids).encode()

    def patch_list(self, rows: np.ndarray) -> bytes:
        return "".join(f"{self.names[i]} {self.labels[i]}\n" for i in rows.tolist()).encode()


def _write_fold(out: Path, fold: Fold, index: _PatchIndex, seed: int) -> dict:
    """The list files and mean image of one fold; returns its entry of ``folds.json``."""
    k = fold.fold
    train_rows, test_rows = index.rows(fold.train_images), index.rows(fold.test_images)
    shuffled = train_rows[np.random.default_rng([seed, int(k)]).permutation(train_rows.size)]
    write_atomic(out / f"train_w32_parent_{k}.txt", index.image_list(fold.train_images))
    write_atomic(out / f"test_w32_parent_{k}.txt", index.image_list(fold.test_images))
    write_atomic(out / f"train_w32_{k}.txt", index.patch_list(shuffled))
    write_atomic(out / f"test_w32_{k}.txt", index.patch_list(test_rows))
    if train_rows.size:
        where = np.zeros(index.labels.size, dtype=bool)
        where[train_rows] = True
        buffer = io.BytesIO()
        np.save(buffer, mean_image_bgr(index.patches, where=where))
        write_atomic(out / f"fold{k}_mean_bgr.npy", buffer.getvalue())
    return {
        "fold": k,
        "train_images": list(fold.train_images),
        "test_images": list(fold.test_images),
        "n_train_patches": int(train_rows.size),
        "n_test_patches": int(test_rows.size),
    }


def read_folds(path: str | os.PathLike) -> list[Fold]:
    """Folds from a ``folds.json`` (or the folder holding it) written by :func:`write_folds`."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_JSON
    payload = json.loads(path.read_text(encoding="utf-8"))
    return [
        Fold(fold=int(entry["fold"]), train_images=list(entry["train_images"]), test_images=list(entry["test_images"]))
        for entry in payload["folds"]
    ]
