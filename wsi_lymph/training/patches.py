"""Training patches of the paper's lymphocyte detector (Janowczyk & Madabhushi 2016, use case 4).

One annotated image gives up to ``max_positive`` positive and ``max_negative``
negative patch *locations*; every positive location is saved at rotations
0/90/180/270 and every negative one at 0/90, as in the authors'
``step1_make_patches.m``:

1. The image (RGB) and its centre mask (1.0 at each centre pixel) are upscaled
   ``upscale`` x (4x: 20x scans -> "80x") with the same MATLAB-exact Keys
   bicubic resize the inference engine uses (:func:`wsi_lymph.slides.resample.resize_window`),
   so training patches live in exactly the frame the network is applied to.
   Each centre pixel becomes a 16 x 16 px weighted blob (the kernel's support,
   +-2 input px) whose main lobe is the central 8 x 8 px around
   ``4 * centre + 1.5``; the outer ring carries the kernel's negative lobes.
   As the original (``io_mask = abs(io_mask)``) the *absolute value* of the
   upscaled mask is the weight, and "positive pixel" means weight > 0 (the
   whole 16 x 16 blob).
2. Positives: ``max_positive`` draws of a pixel with probability
   proportional to the weight, *with replacement* as the original (MATLAB
   ``datasample``'s default), so a pixel may be drawn more than once and its
   patches then repeat; this keeps the original's emphasis on the blob's
   centre (about 86% of draws fall in the 8 x 8 px main lobe).  With
   ``positive_replacement=False`` the draws are distinct pixels (successive
   weighted sampling, ``min(max_positive, positive pixels)`` of them), which
   the original's comments seem to intend but which, once the main lobes are
   used up (64 px per centre), fills the quota from the outer ring.
3. Hard negatives: a Gaussian naive Bayes classifier (RGB of the upscaled
   image on MATLAB's 0-1 scale, label = positive pixel) is fitted on
   ``nb_pixels`` random pixels; its posterior P(positive) is computed for every
   pixel and set to 0 on positive pixels; the candidates are the pixels with
   posterior > 0.5; each gets its distance to the nearest positive pixel
   (KD-tree).  The candidate farthest from every positive pixel is taken, a
   disk of radius ``clearing_radius_px`` around it is removed from the
   candidates, and so on until ``max_negative`` locations are taken or none
   remain.  In the original such negatives may lie right next to a positive
   blob (on the lymphocyte, off its centre).  By default wsi-lymph drops the
   candidates within ``min_positive_distance_px`` = 5 px (upscaled frame, the
   clearing radius) of a positive pixel, so that no "not a centre" patch is a
   one-pixel shift of a "centre" patch; 0 reproduces the original exactly.  Ties in distance are broken as
   MATLAB's ``max`` over ``val(:)`` does: the first pixel in column-major
   order.  When naive Bayes yields few
   candidates, fewer negatives are taken (as in the original); an image whose
   ``nb_pixels`` sample holds no positive pixel (e.g. an image without
   lymphocytes) yields no negatives.  The counts are recorded per image.
4. Patches are 32 x 32 RGB uint8 cut from the upscaled image (rounded half up
   and clipped to 0-255, as MATLAB's ``imwrite`` of a double image), mirror
   padded ("symmetric") by ``pad_px`` = 32; the chosen pixel sits at 0-based
   index (16, 16), the convention of the inference engine
   (:data:`wsi_lymph.constants.PATCH_CENTER_PX`).  Rotated copies are
   ``np.rot90(patch, k)`` with k = rotation / 90, i.e. counter-clockwise as
   MATLAB ``imrotate`` with a positive angle; being a rotation about the patch
   centre (15.5, 15.5), it moves the chosen pixel to (15, 16), (15, 15) and
   (16, 15) for 90, 180 and 270 degrees.

Readings of the description (``docs/method.md``) where it is ambiguous:

- "up to 2 x 2,000 negatives per image" is 4,000 *locations*
  (``nback_ground = round(2000 * ratio_background)`` in the original), each at
  rotations 0/90, i.e. up to 8,000 negative patches against up to 8,000
  positive ones (2,000 locations x 4 rotations): the caps balance the
  classes.  ``max_negative`` therefore counts locations, like
  ``max_positive``.  On 100 x 100 px images at 20x the naive Bayes candidates
  run out first (700-900 negative locations on each of the shared crops), so
  positives outnumber negatives about 5 to 1, as they did in the original.
- Locations are restricted to the image itself (the upscaled, unpadded
  frame): the original sampled from the padded mask but then dropped every
  location whose 64 x 64 neighbourhood left the padded image, which removes
  exactly the 32-px pad.  Naive Bayes is fitted on, and candidates are taken
  from, the image itself likewise (the original used the padded image, whose
  pad only repeats image pixels).
- The original cut rows ``r-17 ... r+14`` for rotation 0 (index 17) from a
  rotated 64 x 64 window; here index 16 is used, so that training and
  inference agree on where the classified pixel is.
- The original's ``classify`` call defaults to linear discriminant analysis
  although its comment and the paper say naive Bayes; naive Bayes is used
  (per-class means and variances with ``ddof=0``, empirical priors, variances
  smoothed by 1e-9 x the largest feature variance as scikit-learn does, so
  that a class with one sample still gives a finite model).

Every random choice of an image comes from a ``numpy`` generator seeded with
``(seed, sha256(image_id))``, so the result depends only on the seed and the
image, never on the order or place (worker) it is computed in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from PIL import Image
from scipy.spatial import cKDTree

from wsi_lymph import __version__
from wsi_lymph.constants import PATCH_CENTER_PX, PATCH_PX
from wsi_lymph.engine.monitor import QuietTaskErrors
from wsi_lymph.io.probmap_store import replace_dir
from wsi_lymph.slides.resample import resize_window, resized_length
from wsi_lymph.training.dataset import AnnotatedImage, center_mask, read_dataset

#: Rotations (degrees, counter-clockwise) saved for each positive / negative location.
POSITIVE_ROTATIONS = (0, 90, 180, 270)
NEGATIVE_ROTATIONS = (0, 90)
#: Mirror padding of the upscaled image (px), as in the original.
PAD_PX = 32
#: Patches per Zarr chunk along N (12 MiB of uint8 patches).
CHUNK_PATCHES = 4096
#: The Zarr group written by :func:`extract_patches` when ``out`` is a folder.
ZARR_NAME = "patches.zarr"
#: ``attrs["format"]`` of a patch group: a format name (kept from the first groups written), not a module path.
PATCH_FORMAT = "wsi_lymph.patches"
#: scikit-learn's GaussianNB default: variances get 1e-9 x the largest feature variance added.
NB_VAR_SMOOTHING = 1e-9
#: The arrays of a patch group: shape after N, dtype.
COLUMNS = {
    "patches": ((PATCH_PX, PATCH_PX, 3), "uint8"),
    "label": ((), "uint8"),
    "kind": ((), "uint8"),
    "rotation_deg": ((), "uint16"),
    "center_rc": ((2,), "int32"),
    "image_index": ((), "int32"),
    "location_index": ((), "uint32"),
}


@dataclass(frozen=True, eq=False)
class PatchSet:
    """The patches of one image.

    Positives come first (location by location, rotations 0/90/180/270), then
    negatives (location by location, rotations 0/90).

    Attributes
    ----------
    patches : np.ndarray
        (N, 32, 32, 3) uint8 RGB, rows first; rotated copies included.
    label : np.ndarray
        (N,) uint8, 1 = lymphocyte centre, 0 = not.
    kind : np.ndarray
        (N,) uint8, 1 = positive location ("p"), 0 = hard negative ("n");
        equal to ``label`` in this use case, kept because the file names carry both.
    rotation_deg : np.ndarray
        (N,) uint16 counter-clockwise rotation of the patch (``np.rot90`` k = rotation / 90).
    center_rc : np.ndarray
        (N, 2) int32 (row, col) of the patch's pixel in the upscaled, unpadded image (px of the model frame).
    location_index : np.ndarray
        (N,) uint32 1-based number of the location within its image and class (the ``<index>`` of the
        paper's file names); the rotated copies of a location share it.
    image_id : str
        The image the patches come from.
    stats : dict
        Counts (locations and patches per class, naive Bayes sample and candidates) for the attributes.
    """

    patches: np.ndarray
    label: np.ndarray
    kind: np.ndarray
    rotation_deg: np.ndarray
    center_rc: np.ndarray
    location_index: np.ndarray
    image_id: str
    stats: dict

    def __len__(self) -> int:
        return int(self.patches.shape[0])


# --- mean image --------------------------------------------------------------------------------------------------


def mean_image_bgr(patches_rgb_uint8, chunk: int = 8192, *, where: np.ndarray | None = None) -> np.ndarray:
    """Mean image of patches in Caffe's convention (BGR, 0-255), computed chunk by chunk.

    Parameters
    ----------
    patches_rgb_uint8 : array-like
        (N, H, W, 3) uint8 RGB patches: a numpy array or anything sliceable along
        N with a ``shape`` and ``dtype`` (e.g. a Zarr array, read ``chunk`` patches at a time).
    chunk : int
        Patches read and summed at a time.
    where : np.ndarray, optional
        (N,) bool: only these patches count (e.g. a fold's training patches); chunks without one are not read.

    Returns
    -------
    np.ndarray
        (3, H, W) float32, channels B, G, R, values 0-255 -- the layout of
        Caffe's ``compute_image_mean`` output and of :func:`wsi_lymph.models.networks.patch_probabilities`'s mean.

    Raises
    ------
    ValueError
        No patch selected, or not (N, H, W, 3).
    """
    shape = tuple(patches_rgb_uint8.shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB patches, got shape {shape}")
    # name=False: a random graph name, so that a numpy input is not hashed whole.
    patches = da.from_array(patches_rgb_uint8, chunks=(chunk, *shape[1:]), name=False, lock=False)
    if where is not None:
        where = np.asarray(where, dtype=bool)
        if where.shape != (shape[0],):
            raise ValueError(f"where must be ({shape[0]},) bool, got shape {where.shape}")
        patches = patches[np.flatnonzero(where)]
    if patches.shape[0] == 0:
        raise ValueError("mean image of no patches")
    # float64 sums, exact for uint8: Caffe's float32 accumulator loses integer precision beyond 2**24 / 255
    # patches.  Synchronous: this runs inside a worker task (or the driver) and reads the chunks in turn.
    mean = patches.mean(axis=0, dtype=np.float64).compute(scheduler="synchronous")
    return np.ascontiguousarray(mean[..., ::-1].transpose(2, 0, 1), dtype=np.float32)


# --- one image ---------------------------------------------------------------------------------------------------


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The random generator of one image: seeded by ``seed`` and a SHA-256 of the id (stable across runs)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, *words])


def upscale_image(rgb: np.ndarray, upscale: int) -> np.ndarray:
    """MATLAB-exact bicubic upscale (Keys, a = -0.5) of a whole image.

    Parameters
    ----------
    rgb : np.ndarray
        (H, W, C) image (any real dtype; values are taken as they are).
    upscale : int
        Output px per input px.

    Returns
    -------
    np.ndarray
        (ceil(H * upscale), ceil(W * upscale), C) float32, not clipped.
    """
    height, width = rgb.shape[:2]
    rows = np.arange(resized_length(height, upscale))
    cols = np.arange(resized_length(width, upscale))
    return resize_window(rgb, (0, 0), (height, width), rows, cols, float(upscale))


def positive_weight(shape_hw: tuple[int, int], centers_rc: np.ndarray, upscale: int) -> np.ndarray:
    """Sampling weight of positive pixels: ``|bicubic upscale of the centre mask|``.

    Returns
    -------
    np.ndarray
        (rows, cols) float32 in the upscaled frame; > 0 on the 16 x 16 px (for 4x) blob of each centre.
    """
    mask = center_mask(shape_hw, centers_rc).astype(np.float32)[..., None]
    # abs: the original's ``io_mask = abs(io_mask)`` (the kernel's negative lobes count as weight).
    return np.abs(upscale_image(mask, upscale)[..., 0])


def weighted_sample(weight: np.ndarray, count: int, rng: np.random.Generator, *, replace: bool = True) -> np.ndarray:
    """``count`` indices drawn with probability proportional to ``weight``.

    Parameters
    ----------
    weight : np.ndarray
        (n,) non-negative weights.
    count : int
        Draws.
    rng : np.random.Generator
        Source of the uniform numbers.
    replace : bool
        True: independent draws (MATLAB ``datasample(..., 'Weights', w)``, the
        original): exactly ``count`` indices when any weight is > 0, repeats
        possible.  False: successive sampling without replacement
        (Efraimidis-Spirakis keys ``log(u) / w``): ``min(count, nnz(weight))``
        distinct indices.

    Returns
    -------
    np.ndarray
        int64 indices into ``weight`` (only where ``weight > 0``), in draw order.
    """
    candidates = np.flatnonzero(weight > 0)
    if candidates.size == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    w = weight[candidates].astype(np.float64)
    if replace:
        # Inverse-CDF draws written out (not Generator.choice) so the stream only depends on rng.random.
        cdf = np.cumsum(w)
        picks = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
        return candidates[np.minimum(picks, candidates.size - 1)]
    keys = np.log(rng.random(candidates.size)) / w
    return candidates[np.argsort(-keys, kind="stable")[:count]]


def gaussian_nb_posterior(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """P(class 1 | x) of a Gaussian naive Bayes classifier.

    Parameters
    ----------
    train_x : np.ndarray
        (n, d) float training features.
    train_y : np.ndarray
        (n,) bool labels.
    x : np.ndarray
        (m, d) float features to classify.

    Returns
    -------
    np.ndarray
        (m,) float64 posteriors; all 0 when no training sample is positive and
        all 1 when none is negative (one-class data).
    """
    train_x = np.asarray(train_x, dtype=np.float64)
    train_y = np.asarray(train_y, dtype=bool)
    if not train_y.any():
        return np.zeros(len(x))
    if train_y.all():
        return np.ones(len(x))
    epsilon = NB_VAR_SMOOTHING * train_x.var(axis=0).max()
    log_joint = []
    for members in (~train_y, train_y):
        samples = train_x[members]
        mean, var = samples.mean(axis=0), samples.var(axis=0) + epsilon
        if not np.all(var > 0):
            var = np.maximum(var, np.finfo(np.float64).tiny)  # constant training features
        log_prior = np.log(members.mean())
        log_like = -0.5 * (np.log(2 * np.pi * var).sum() + (((x - mean) ** 2) / var).sum(axis=1))
        log_joint.append(log_prior + log_like)
    # P(1|x) = 1 / (1 + exp(l0 - l1)), written to stay finite for large differences.
    return 1.0 / (1.0 + np.exp(np.clip(log_joint[0] - log_joint[1], -700, 700)))


def hard_negatives(
    upscaled_rgb01: np.ndarray,
    positive: np.ndarray,
    rng: np.random.Generator,
    *,
    max_negative: int,
    clearing_radius_px: int,
    nb_pixels: int,
    min_positive_distance_px: float = 5.0,
) -> tuple[np.ndarray, dict]:
    """Hard-negative locations: naive Bayes false positives farthest from every positive pixel first.

    Parameters
    ----------
    upscaled_rgb01 : np.ndarray
        (rows, cols, 3) upscaled image, RGB on a 0-1 scale (MATLAB ``im2double``), not clipped.
    positive : np.ndarray
        (rows, cols) bool, the positive pixels (upscaled mask weight > 0).
    rng : np.random.Generator
        Draws the ``nb_pixels`` training pixels.
    max_negative : int
        Locations to take at most.
    clearing_radius_px : int
        Radius (px, upscaled frame) of the disk removed from the candidates around each location taken
        (pixels with ``dr**2 + dc**2 <= radius**2``, as the original).
    nb_pixels : int
        Random pixels the classifier is fitted on.
    min_positive_distance_px : float
        Candidates at most this far (px, upscaled frame) from a positive pixel are dropped (default 5);
        0 keeps all, as the original (every candidate is then at least 1 px away, since positive pixels
        are not candidates).

    Returns
    -------
    locations : np.ndarray
        (n, 2) int64 (row, col) in the upscaled frame, in the order taken (non-increasing distance).
    stats : dict
        ``nb_positive_samples``, ``nb_candidates`` (pixels with posterior > 0.5 outside the positives).
    """
    rows, cols = positive.shape
    features = upscaled_rgb01.reshape(-1, 3).astype(np.float64)
    sample = rng.permutation(rows * cols)[: min(nb_pixels, rows * cols)]  # MATLAB: randperm(...)(1:1000)
    labels = positive.reshape(-1)[sample]
    stats = {"nb_positive_samples": int(labels.sum()), "nb_candidates": 0}
    if not labels.any() or not positive.any():
        return np.zeros((0, 2), dtype=np.int64), stats
    posterior = gaussian_nb_posterior(features[sample], labels, features).reshape(rows, cols)
    posterior[positive] = 0.0
    cand_r, cand_c = np.nonzero(posterior > 0.5)
    stats["nb_candidates"] = int(cand_r.size)
    if cand_r.size == 0:
        return np.zeros((0, 2), dtype=np.int64), stats
    distance, _ = cKDTree(np.argwhere(positive)).query(np.column_stack([cand_r, cand_c]), k=1)
    if min_positive_distance_px > 0:
        far = distance > min_positive_distance_px
        cand_r, cand_c, distance = cand_r[far], cand_c[far], distance[far]
    taken = _farthest_first(cand_r, cand_c, distance, (rows, cols), max_negative, int(clearing_radius_px))
    return taken, stats


def _farthest_first(cand_r: np.ndarray, cand_c: np.ndarray, distance: np.ndarray, shape_rc: tuple[int, int],
                    count: int, radius: int) -> np.ndarray:
    """Up to ``count`` candidates, farthest first, each clearing a disk of ``radius`` px around it.

    Returns (n, 2) int64 (row, col) in the order taken.
    """
    # Taking the unclaimed candidate with the largest distance, again and again, is a walk down this order;
    # ties go to the first pixel in column-major order, as MATLAB's max(val(:)).
    order = np.lexsort((cand_r, cand_c, -distance))
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    rows, cols = shape_rc
    cleared = np.zeros((rows + 2 * radius, cols + 2 * radius), dtype=bool)  # padded so the disk never clips
    taken: list[tuple[int, int]] = []
    for r, c in zip(cand_r[order].tolist(), cand_c[order].tolist(), strict=True):
        if len(taken) >= count:
            break
        if cleared[r + radius, c + radius]:
            continue
        taken.append((r, c))
        cleared[r : r + 2 * radius + 1, c : c + 2 * radius + 1] |= disk
    return np.asarray(taken, dtype=np.int64).reshape(-1, 2)


def cut_patches(padded: np.ndarray, centers_rc: np.ndarray, pad_px: int) -> np.ndarray:
    """32 x 32 patches with pixel ``center_rc`` (unpadded frame) at index (16, 16).

    Returns
    -------
    np.ndarray
        (n, 32, 32, C) copies of ``padded[r + pad - 16 : r + pad + 16, c + pad - 16 : c + pad + 16]``.
    """
    offsets = np.arange(PATCH_PX) - PATCH_CENTER_PX + pad_px
    rows = centers_rc[:, 0, None] + offsets
    cols = centers_rc[:, 1, None] + offsets
    return padded[rows[:, :, None], cols[:, None, :]]


def _with_rotations(patches: np.ndarray, rotations: Sequence[int]) -> np.ndarray:
    """(n, 32, 32, 3) -> (n * len(rotations), 32, 32, 3), location-major, rotations in the given order."""
    stacked = np.stack([np.rot90(patches, k=deg // 90, axes=(1, 2)) for deg in rotations], axis=1)
    return stacked.reshape(-1, *patches.shape[1:])


def extract_image_patches(
    image: AnnotatedImage,
    *,
    seed: int,
    upscale: int = 4,
    max_positive: int = 2000,
    max_negative: int = 4000,
    clearing_radius_px: int = 5,
    nb_pixels: int = 1000,
    positive_replacement: bool = True,
    min_positive_distance_px: float = 5.0,
) -> PatchSet:
    """Positive and hard-negative training patches of one annotated image (the module docstring has the rules).

    Parameters
    ----------
    image : AnnotatedImage
        RGB image and its centres ((row, col) px of the image as read).
    seed : int
        Seed of the run; combined with ``image.image_id``.
    upscale : int
        Model-frame px per image px (4 for 20x images, the paper's "80x").
    max_positive : int
        Positive locations at most (each saved 4 times: 0/90/180/270).
    max_negative : int
        Negative locations at most (each saved twice: 0/90); the paper's "2 x 2,000".
    clearing_radius_px : int
        Radius (px, upscaled frame) cleared around each negative location taken.
    nb_pixels : int
        Random pixels the naive Bayes classifier is fitted on.
    positive_replacement : bool
        Draw positive locations with replacement (the original) or as distinct pixels.
    min_positive_distance_px : float
        Drop negative candidates within this distance (px, upscaled frame) of a positive pixel (0: the original).

    Returns
    -------
    PatchSet
        Up to ``4 * max_positive + 2 * max_negative`` patches.
    """
    if upscale < 1 or int(upscale) != upscale:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    if min(max_positive, max_negative, clearing_radius_px, nb_pixels) < 0:
        raise ValueError("max_positive, max_negative, clearing_radius_px and nb_pixels must not be negative")
    rng = image_rng(seed, image.image_id)
    rgb = np.asarray(image.rgb)
    up = upscale_image(rgb, upscale)  # float32, 0-255, with bicubic overshoot
    weight = positive_weight(rgb.shape[:2], image.centers_rc, upscale)
    positive = weight > 0

    pos_flat = weighted_sample(weight.reshape(-1), max_positive, rng, replace=positive_replacement)
    pos_rc = np.column_stack(np.unravel_index(pos_flat, weight.shape)).astype(np.int64).reshape(-1, 2)
    neg_rc, nb_stats = hard_negatives(
        up / np.float32(255), positive, rng,
        max_negative=max_negative, clearing_radius_px=clearing_radius_px, nb_pixels=nb_pixels,
        min_positive_distance_px=min_positive_distance_px,
    )
    patches, label, rotation, center, index = _patch_columns(up, pos_rc, neg_rc)
    stats = {
        "positive_pixels": int(positive.sum()),
        "positive_locations": len(pos_rc),
        "positive_distinct_locations": int(np.unique(pos_flat).size),
        "negative_locations": len(neg_rc),
        "positive_patches": len(pos_rc) * len(POSITIVE_ROTATIONS),
        "negative_patches": len(neg_rc) * len(NEGATIVE_ROTATIONS),
        **nb_stats,
    }
    return PatchSet(patches=np.ascontiguousarray(patches), label=label, kind=label.copy(), rotation_deg=rotation,
                    center_rc=center, location_index=index, image_id=image.image_id, stats=stats)


def _patch_columns(upscaled: np.ndarray, pos_rc: np.ndarray, neg_rc: np.ndarray) -> tuple[np.ndarray, ...]:
    """Patches, label, rotation_deg, center_rc and location_index of the positive, then the negative locations.

    ``upscaled`` is the float 0-255 upscaled image; locations are (n, 2) (row, col) in it.
    """
    # MATLAB's imwrite of a double image: clip to [0, 1], then round half up to 0-255.
    image_u8 = np.floor(np.clip(upscaled, 0.0, 255.0) + 0.5).astype(np.uint8)
    padded = np.pad(image_u8, ((PAD_PX, PAD_PX), (PAD_PX, PAD_PX), (0, 0)), mode="symmetric")
    parts = []
    for locations, rotations, label in ((pos_rc, POSITIVE_ROTATIONS, 1), (neg_rc, NEGATIVE_ROTATIONS, 0)):
        n, k = len(locations), len(rotations)
        parts.append((
            _with_rotations(cut_patches(padded, locations, PAD_PX), rotations),
            np.full(n * k, label, dtype=np.uint8),
            np.tile(np.asarray(rotations, dtype=np.uint16), n),
            np.repeat(locations, k, axis=0).astype(np.int32),
            np.repeat(np.arange(1, n + 1, dtype=np.uint32), k),
        ))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


# --- a data set ---------------------------------------------------------------------------------------------------


def _zarr_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out if out.suffix == ".zarr" else out / ZARR_NAME


def _name_prefixes(images: Sequence[AnnotatedImage]) -> list[str]:
    """``<image>`` of the paper's patch names: the image file's stem (``im12``), as the original.

    The image id is used instead when stems are missing or not unique (ids always are).
    """
    stems = [Path(image.image_path).stem if str(image.image_path) else "" for image in images]
    if all(stems) and len(set(stems)) == len(stems):
        return stems
    return [image.image_id for image in images]


def _results(client, images: Sequence[AnnotatedImage], kwargs: dict) -> Iterator[PatchSet]:
    """PatchSets in image order; with a client, a bounded number of images is in flight at a time."""
    if client is None:
        for image in images:
            yield extract_image_patches(image, **kwargs)
        return
    token = uuid.uuid4().hex[:8]
    client.register_plugin(QuietTaskErrors(("patches",)))  # a failed image is the driver's to report
    threads = sum(client.nthreads().values()) or 1
    window = max(4, 2 * threads)  # keeps workers busy without holding every image's patches in memory
    futures = {}
    submitted = 0
    for index in range(len(images)):
        while submitted < len(images) and submitted < index + window:
            image = images[submitted]
            futures[submitted] = client.submit(
                extract_image_patches, image, **kwargs,
                key=f"patches-{token}-{submitted}-{image.image_id}", pure=False,
            )
            submitted += 1
        future = futures.pop(index)
        result = future.result()
        future.release()
        yield result


def extract_patches(
    client,
    images: Sequence[AnnotatedImage] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int,
    upscale: int = 4,
    max_positive: int = 2000,
    max_negative: int = 4000,
    clearing_radius_px: int = 5,
    nb_pixels: int = 1000,
    positive_replacement: bool = True,
    min_positive_distance_px: float = 5.0,
    chunk: int = CHUNK_PATCHES,
) -> Path:
    """Extract the training patches of a data set into a Zarr v3 group, one Dask task per image.

    Parameters
    ----------
    client : distributed.Client or None
        Runs one task per image (keys ``patches-...``); None computes in this process.  The output does not
        depend on it.
    images : list of AnnotatedImage, or a data-set folder
        The images (a folder is read with :func:`wsi_lymph.training.dataset.read_dataset`); ids must be unique.
    out : str or os.PathLike
        The group to write if it ends in ``.zarr``, else a folder that receives ``patches.zarr``.  An existing
        group there is replaced only once the new one is complete (built in ``<group>.partial``).
    seed : int
        Seed of every random choice (per image combined with its id).
    upscale, max_positive, max_negative, clearing_radius_px, nb_pixels, positive_replacement, min_positive_distance_px
        See :func:`extract_image_patches`.
    chunk : int
        Patches per Zarr chunk.

    Returns
    -------
    Path
        The group, holding arrays ``patches`` (N, 32, 32, 3) uint8 RGB, ``label`` uint8 (1 = lymphocyte),
        ``kind`` uint8 (1 = "p", 0 = "n"), ``rotation_deg`` uint16, ``center_rc`` (N, 2) int32 (row, col) in
        the upscaled unpadded image, ``image_index`` int32 (into ``attrs["image_ids"]``) and ``location_index``
        uint32 (1-based per image and class), and attributes ``image_ids``, ``image_paths``, ``name_prefixes``
        (``<image>`` of the paper's file names), ``seed``, ``params``, ``frame_scale`` (= ``upscale``),
        ``counts`` (per image id: locations, patches, naive Bayes sample and candidates), ``n_patches``,
        ``conventions``, ``format`` (:data:`PATCH_FORMAT`) and ``version``.
    """
    images = _image_list(images)
    final = _zarr_path(out)
    if final.exists() and not (final / "zarr.json").is_file():
        raise FileExistsError(f"{final} exists and is not a Zarr group; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".partial")
    params = {
        "upscale": int(upscale), "max_positive": int(max_positive), "max_negative": int(max_negative),
        "clearing_radius_px": int(clearing_radius_px), "nb_pixels": int(nb_pixels),
        "positive_replacement": bool(positive_replacement),
        "min_positive_distance_px": float(min_positive_distance_px),
    }
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    writer = _ChunkedWriter(group, chunk)
    counts = {}
    try:
        for index, result in enumerate(_results(client, images, {"seed": int(seed), **params})):
            counts[result.image_id] = result.stats
            writer.append({
                "patches": result.patches, "label": result.label, "kind": result.kind,
                "rotation_deg": result.rotation_deg, "center_rc": result.center_rc,
                "image_index": np.full(len(result), index, dtype=np.int32), "location_index": result.location_index,
            })
        writer.flush(final_flush=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written group left behind
        raise
    group.attrs.update(_group_attrs(images, int(seed), params, counts, int(writer.arrays["label"].shape[0])))
    replace_dir(tmp, final)
    return final


def _image_list(images: Sequence[AnnotatedImage] | str | os.PathLike) -> list[AnnotatedImage]:
    """The images (a data-set folder is read); ValueError when two share an id."""
    if not isinstance(images, list | tuple):
        images = read_dataset(images)
    images = list(images)
    ids = [image.image_id for image in images]
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique (they seed the sampling and name the patches)")
    return images


class _ChunkedWriter:
    """Appends rows to the arrays of :data:`COLUMNS` in a group, whole chunks at a time.

    A partial tail chunk would be rewritten by the next append, so rows wait in a buffer until they fill a chunk
    (or the final flush).
    """

    def __init__(self, group, chunk: int) -> None:
        self.chunk = chunk
        self.arrays = {
            name: group.create_array(name, shape=(0, *tail), chunks=(chunk, *tail), dtype=dtype, fill_value=0)
            for name, (tail, dtype) in COLUMNS.items()
        }
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        self.buffered = 0

    def append(self, values: dict[str, np.ndarray]) -> None:
        """Rows of every column (equal lengths); written once they fill whole chunks."""
        for name, value in values.items():
            self.buffer[name].append(value)
        self.buffered += len(values["label"])
        self.flush(final_flush=False)

    def flush(self, final_flush: bool) -> None:
        """Write the whole chunks buffered (``final_flush``: everything buffered)."""
        keep = self.buffered if final_flush else self.buffered - self.buffered % self.chunk
        if keep == 0:
            return
        for name, parts in self.buffer.items():
            data = np.concatenate(parts)
            self.arrays[name].append(data[:keep])
            self.buffer[name] = [data[keep:]]
        self.buffered -= keep


def _group_attrs(images: list[AnnotatedImage], seed: int, params: dict, counts: dict, n_patches: int) -> dict:
    """The attributes of a patch group (flat, so that readers find e.g. ``attrs["image_ids"]`` directly)."""
    return {
        "format": PATCH_FORMAT,
        "version": __version__,
        "image_ids": [image.image_id for image in images],
        "image_paths": [str(image.image_path) for image in images],
        "name_prefixes": _name_prefixes(images),
        "seed": seed,
        "params": {**params, "pad_px": PAD_PX, "patch_px": PATCH_PX, "patch_center_px": PATCH_CENTER_PX,
                   "positive_rotations": list(POSITIVE_ROTATIONS), "negative_rotations": list(NEGATIVE_ROTATIONS)},
        "frame_scale": float(params["upscale"]),
        "counts": counts,
        "n_patches": n_patches,
        "conventions": {
            "patches": "RGB uint8, rows first; the location's pixel at 0-based (16, 16) before rotation",
            "rotation_deg": "counter-clockwise, np.rot90(patch, rotation // 90)",
            "center_rc": "(row, col) px of the upscaled, unpadded image",
            "label": "1 = lymphocyte centre, 0 = not",
            "kind": "1 = positive location 'p', 0 = hard negative 'n'",
            "image_index": "index into image_ids",
            "location_index": "1-based location number within image and class (<index> of the PNG names)",
        },
    }


def open_patches(path: str | os.PathLike) -> tuple[zarr.Group, dict]:
    """Open a group written by :func:`extract_patches` read-only.

    Returns
    -------
    (zarr.Group, dict)
        The group and its attributes.
    """
    group = zarr.open_group(str(_zarr_path(path)), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != PATCH_FORMAT:
        raise ValueError(f"{path}: not a patch group written by wsi_lymph.training.patches.extract_patches")
    return group, attrs


def patch_names(group, attrs: dict) -> list[str]:
    """The paper's file name of every patch: ``<image>_<class>_<p|n>_<index>_<rotation>.png``.

    ``<image>`` is the image file's stem (``im12``), ``<class>`` 1/0, ``<index>`` the 1-based location number
    within image and class -- ``sprintf('%s_%d_%s_%d_%d.png', ...)`` of the original, e.g. ``im1_1_p_1_0.png``.
    """
    prefixes = attrs["name_prefixes"]
    columns = zip(
        np.asarray(group["image_index"][:]).tolist(), np.asarray(group["label"][:]).tolist(),
        np.asarray(group["kind"][:]).tolist(), np.asarray(group["location_index"][:]).tolist(),
        np.asarray(group["rotation_deg"][:]).tolist(), strict=True,
    )
    return [f"{prefixes[i]}_{label}_{'p' if kind else 'n'}_{loc}_{rot}.png" for i, label, kind, loc, rot in columns]


def export_png(patches_zarr: str | os.PathLike, directory: str | os.PathLike, chunk: int = CHUNK_PATCHES) -> int:
    """Write every patch as a PNG under the paper's name (see :func:`patch_names`), as Caffe's tools expect.

    Parameters
    ----------
    patches_zarr : str or os.PathLike
        Group written by :func:`extract_patches` (or the folder holding ``patches.zarr``).
    directory : str or os.PathLike
        Folder for the PNGs (created).  Each file appears under its name only when complete.
    chunk : int
        Patches read at a time.

    Returns
    -------
    int
        Number of PNGs written.
    """
    group, attrs = open_patches(patches_zarr)
    names = patch_names(group, attrs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = group["patches"]
    for start in range(0, len(names), chunk):
        block = np.asarray(data[start : start + chunk])
        for offset, patch in enumerate(block):
            path = directory / names[start + offset]
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(patch).save(tmp, format="PNG")
            os.replace(tmp, path)
    return len(names)

