"""Distil the paper's ensemble into the fast sub-pixel student (``wsi-lymph distill``).

The recipe, each step resumable (a finished step's files are reused):

1. **prepare**: every image of the plan (a slide region or a whole image, with its
   µm/px) is read at the level the engine would read, stain-normalised to the
   reference domain (Reinhard, :mod:`wsi_lymph.detection.stain`, statistics of the
   whole image's tissue) and written as a small TIFF with its resolution
   (``OUT/images/<name>.tif``), with ``stain_copies`` stain-jittered copies of each
   training image (``OUT/images/<name>-stain<k>.tif``, :func:`stain_copy`) and
   ``turned_copies`` turned or flipped ones (``OUT/images/<name>-turn<k>.tif``, :func:`turned_copy`);
2. **teacher**: the teacher's maps of those files, computed by the engine itself
   (``OUT/teacher/<name>/prob.zarr``: the ensemble, stride 4 with its cubic filling);
3. **train**: each student (``members`` of them, one task each, seeds ``seed``, ``seed + 1``, ...)
   learns the teacher's map from the same normalised pixels, read through the same code the
   engine runs (:func:`student_inputs`), with scale jitter (and flips and 90° rotations of the
   crops where the recipe asks for them); checkpoints let a stopped run resume;
4. **evaluate**: the students' averaged map: threshold chosen leave-one-crop-out on the
   annotated crops, concordance with the teacher on held-out images, then ``model.pt`` (every
   student in one file) and ``model-card.json``.

Images are split by image: the plan names each ``train`` or ``heldout``, and the
annotated crops are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pooch
import tifffile
import torch
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from torch import nn
from torch.nn import functional as F

from wsi_lymph import __version__
from wsi_lymph.constants import (
    CLEAR_RADIUS_PX,
    DEFAULT_TOLERANCE_UM,
    FRAME_SCALE,
    MODEL_FRAME_MPP,
    SMOOTH_RADIUS_PX,
    SOURCE_SCAN_MPP,
)
from wsi_lymph.detection.evaluate import DetectionScore, match_points, pooled
from wsi_lymph.detection.hematoxylin import TISSUE_OD, tissue_pixels
from wsi_lymph.detection.inference import slide_window_reader, window_probabilities
from wsi_lymph.detection.peaks import greedy_peaks, smooth_probability
from wsi_lymph.detection.stain import (
    LabStatistics,
    ReinhardTransform,
    lab_statistics,
    pooled_statistics,
    slide_lab_statistics,
)
from wsi_lymph.engine.batch import run_probmaps
from wsi_lymph.engine.monitor import QuietTaskErrors
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.outputs import write_atomic
from wsi_lymph.io.probmap_store import open_probmap
from wsi_lymph.models.architectures import STUDENT_ARCH
from wsi_lymph.models.checkpoints import MEAN_SHAPE, ensemble_checkpoint, save_checkpoint_atomic
from wsi_lymph.models.device import select_device
from wsi_lymph.models.networks import STUDENT_UPSCALE, SubpixelStudentNet
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.frame import choose_frame, coarser_frame, read_frame_window
from wsi_lymph.slides.reader import SlideError, open_slide, read_region
from wsi_lymph.training.cv import choose_threshold, detect_in_image
from wsi_lymph.training.dataset import AnnotatedImage, read_dataset
from wsi_lymph.training.settings import RECIPE_FIELDS_ADDED, StudentRecipe

#: Name of the distilled student in checkpoints and model cards.
STUDENT_NAME = "wsi-lymph-student"
#: µm/px of the annotated crops (20x, as in the paper's data set).
CROPS_MPP = 0.5
#: Stride of the teacher's maps of held-out images (model-frame px): the engine's default, as ``detect`` runs.
HELDOUT_STRIDE_PX = 2
#: Key prefixes of this module's own tasks (the teacher's maps are the batch's ``infer`` and others).
DISTILL_STAGES = ("prepare", "stain-copy", "turned-copy", "distill-train")
#: Ending of the names of an image's stain and turned copies (a plan image may not end so).
COPY_SUFFIX = r"-(stain|turn)\d+$"
#: The 8 flips/rotations as (quarter turns, as numpy.rot90, then a left-right flip); the first is the identity.
DIHEDRAL_VIEWS = tuple((turns, flip) for turns in range(4) for flip in (False, True))
#: Level pixels kept around a plan's region, so the teacher's patches at its border see real tissue.
PREPARE_MARGIN_PX = 24


@dataclass(frozen=True)
class PlanImage:
    """One image of a distillation plan.

    Attributes
    ----------
    name : str
        Unique name; files are ``images/<name>.tif`` and ``teacher/<name>/``.
    path : str
        Slide or image file.
    mpp : float or None
        Level-0 µm/px (None: the file's own).
    region_level0 : (x, y, width, height) or None
        Level-0 rectangle (pixels); None = the whole image.
    role : str
        ``"train"`` or ``"heldout"`` (concordance only).
    """

    name: str
    path: str
    mpp: float | None = None
    region_level0: tuple[int, int, int, int] | None = None
    role: str = "train"


def read_plan(path: str | os.PathLike) -> list[PlanImage]:
    """Images of a plan file: JSON ``{"images": [{"name", "path", "mpp", "region", "role"}, ...]}``.

    Relative paths are taken relative to the plan file's folder.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["images"]
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a distillation plan ({error})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a distillation plan (no \"images\" list)") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: not a distillation plan (\"images\" is not a list)")
    images = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "path"} <= set(entry):
            raise ValueError(f"{path}: image {index + 1} of the plan needs a 'name' and a 'path'")
        if entry.get("role", "train") not in ("train", "heldout"):
            raise ValueError(f"{path}: image {entry['name']!r} has role {entry['role']!r}; 'train' or 'heldout'")
        file = Path(entry["path"])
        region = entry.get("region")
        images.append(PlanImage(
            name=entry["name"], path=str(file if file.is_absolute() else path.parent / file), mpp=entry.get("mpp"),
            region_level0=tuple(region) if region else None, role=entry.get("role", "train"),
        ))
    names = [image.name for image in images]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: image names must be unique, got {names}")
    for name in names:
        if re.search(COPY_SUFFIX, name) or not name or "/" in name:
            raise ValueError(f"{path}: image name {name!r}: a name names files and folders, so it may not be empty, "
                             "hold a '/' or end like a copy's (-stainN, -turnN)")
    if not any(image.role == "train" for image in images):
        raise ValueError(f"{path}: the plan has no image with role 'train'")
    return images


def check_plan_images(plan: list[PlanImage]) -> None:
    """Open every image of a plan and check its region, so that a wrong entry is reported before any work starts.

    Raises
    ------
    ValueError
        Naming the file and the problem: not found or not readable (:class:`~wsi_lymph.slides.reader.SlideError`),
        or a region that is not a positive rectangle inside the image's level 0.
    """
    for image in plan:
        info = open_slide(image.path, mpp=image.mpp)
        if image.region_level0 is None:
            continue
        width, height = info.level_sizes_xy[0]
        region = image.region_level0
        whole = len(region) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in region)
        if not (whole and region[2] > 0 and region[3] > 0 and region[0] >= 0 and region[1] >= 0
                and region[0] + region[2] <= width and region[1] + region[3] <= height):
            raise ValueError(f"{image.path}: region {list(region)} of plan image {image.name!r} is not a rectangle "
                             f"[x, y, width, height] of whole pixels inside level 0 ({width} x {height} px)")


def reference_statistics(crop_paths: list[str | os.PathLike]) -> LabStatistics:
    """The reference stain domain: L*a*b* statistics pooled over the tissue of the given images (the paper's crops)."""
    stats, counts = [], []
    for crop in crop_paths:
        rgb = np.asarray(tifffile.imread(crop))[..., :3]
        mask = tissue_pixels(rgb, TISSUE_OD)
        stats.append(lab_statistics(rgb, mask))
        counts.append(float(mask.sum()))
    return pooled_statistics(stats, counts)


def prepare_image(image: PlanImage, reference: LabStatistics, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/<name>.tif``: the image's region at the engine's level, stain-normalised, with its µm/px.

    Returns the file (reused if it exists: writes are atomic, so an existing file is complete).
    """
    out = Path(out_dir) / f"{image.name}.tif"
    if out.is_file():
        return out
    info = open_slide(image.path, mpp=image.mpp)
    level = choose_frame(info).level
    down = info.level_downsamples[level]
    width, height = info.level_sizes_xy[level]
    x, y, w, h = image.region_level0 or (0, 0, info.level_sizes_xy[0][0], info.level_sizes_xy[0][1])
    x0 = max(0, int(x / down) - PREPARE_MARGIN_PX)
    y0 = max(0, int(y / down) - PREPARE_MARGIN_PX)
    x1 = min(width, int(np.ceil((x + w) / down)) + PREPARE_MARGIN_PX)
    y1 = min(height, int(np.ceil((y + h) / down)) + PREPARE_MARGIN_PX)
    try:
        rgb = read_region(info, level, x0, y0, x1 - x0, y1 - y0)
    except Exception as error:  # noqa: BLE001 - a decoder's error (imagecodecs, OpenSlide…) does not name the file
        raise SlideError(f"{image.path}: cannot read the pixels of plan image {image.name!r} "
                         f"({type(error).__name__}: {error})") from error
    normalised = ReinhardTransform(slide_lab_statistics(info), reference)(rgb)
    mpp = info.level_mpp(level)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tifffile.imwrite(
        tmp, normalised, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    ))
    return out


def stain_copy(image_path: str | os.PathLike, copy: int, amount: float, seed: int) -> Path:
    """Write ``<image>-stain<copy>.tif`` beside a prepared image: its stain perturbed once, as a whole.

    The HED perturbation of :func:`sample_batch` (half-width ``amount``), drawn from ``seed``, the copy
    number and the image's name, so a rerun writes the same copy; same µm/px as the image.  The teacher
    maps the copy like any training image, so its target is the teacher's answer to those colours.
    Returns the file (reused if it exists: writes are atomic).
    """
    image_path = Path(image_path)
    rng = np.random.default_rng([seed, copy, *image_path.stem.encode()])

    def perturbed(rgb: np.ndarray) -> np.ndarray:
        jittered = _jitter_stain(rgb[..., ::-1].astype(np.float32), rng, amount)[..., ::-1]
        return np.clip(np.rint(jittered), 0, 255).astype(np.uint8)

    return _derived_copy(image_path, f"stain{copy}", perturbed, swaps_axes=False)


def copy_view(name: str, copy: int, seed: int) -> tuple[int, bool]:
    """The flip/rotation (quarter turns, flip) of turned copy ``copy`` (1 to 7) of the image ``name``.

    The 7 non-identity views in an order drawn from ``seed`` and the name: an image's copies are
    distinct, and with one copy each the images do not all turn the same way.
    """
    if not 1 <= copy <= len(DIHEDRAL_VIEWS) - 1:
        raise ValueError(f"turned copy {copy}: an image has 7 (1 to 7)")
    order = np.random.default_rng([seed, *name.encode()]).permutation(len(DIHEDRAL_VIEWS) - 1) + 1
    return DIHEDRAL_VIEWS[order[copy - 1]]


def turned_copy(image_path: str | os.PathLike, copy: int, seed: int) -> Path:
    """Write ``<image>-turn<copy>.tif`` beside a prepared image: turned and/or flipped as a whole (:func:`copy_view`).

    The teacher maps the copy like any training image, so its target is the teacher's own answer to that
    orientation; a turned crop with a turned target (the recipe's ``flip_rotate``) assumes an equivariance
    the teacher does not have.  Same µm/px as the image.  Returns the file (reused if it exists).
    """
    image_path = Path(image_path)
    turns, flip = copy_view(image_path.stem, copy, seed)
    return _derived_copy(image_path, f"turn{copy}", lambda rgb: np.ascontiguousarray(dihedral(rgb, turns, flip)),
                         swaps_axes=turns % 2 == 1)


def dihedral(image: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """``image`` (rows, cols, ...) turned ``turns`` quarter turns (as :func:`numpy.rot90`), then mirrored left-right."""
    image = np.rot90(image, turns)
    return image[:, ::-1] if flip else image


def _derived_copy(image_path: Path, suffix: str, make, *, swaps_axes: bool) -> Path:
    """``<image>-<suffix>.tif`` beside a prepared image: ``make(rgb)``, with the image's resolution (``swaps_axes``:
    x and y trade places).  An existing file is reused: writes are atomic, so it is complete."""
    out = image_path.with_name(f"{image_path.stem}-{suffix}.tif")
    if out.is_file():
        return out
    with tifffile.TiffFile(image_path) as tif:
        page = tif.pages[0]
        rgb = page.asarray()
        x_resolution, y_resolution = (page.tags[tag].value for tag in ("XResolution", "YResolution"))
        unit = page.tags["ResolutionUnit"].value
    if swaps_axes:
        x_resolution, y_resolution = y_resolution, x_resolution
    pixels = make(rgb)
    write_atomic(out, lambda tmp: tifffile.imwrite(
        tmp, pixels, photometric="rgb", resolution=(x_resolution[0] / x_resolution[1], y_resolution[0] /
                                                    y_resolution[1]), resolutionunit=unit,
    ))
    return out


# ---------------------------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class DistillPair:
    """One training image: the student's input pixels and the teacher's map over them.

    Attributes
    ----------
    inputs_bgr : np.ndarray
        (rows, cols, 3) float32 BGR 0-255 pixels at the student's input resolution
        (the model frame coarsened :data:`~wsi_lymph.models.networks.STUDENT_UPSCALE` times).
    target : np.ndarray
        (4 rows, 4 cols) float32 teacher P; model-frame pixel (r, c) lies in input pixel (r // 4, c // 4).
    """

    name: str
    inputs_bgr: np.ndarray
    target: np.ndarray


def student_inputs(image_path: str | os.PathLike) -> np.ndarray:
    """All input pixels of an image as the engine reads them for the student: BGR float32 (rows, cols, 3)."""
    info = open_slide(image_path)
    frame = coarser_frame(choose_frame(info), STUDENT_UPSCALE)
    rows, cols = frame.shape_rc
    return read_frame_window(info, frame, np.arange(rows), np.arange(cols))


def load_pair(name: str, image_path: str | os.PathLike, teacher_map: str | os.PathLike) -> DistillPair:
    """The input pixels of a prepared image and its teacher map, cut to the part both cover."""
    inputs = student_inputs(image_path)
    prob, attrs = open_probmap(teacher_map)
    if list(attrs["origin_rc"]) != [0, 0]:
        raise ValueError(f"{teacher_map}: a teacher map must cover its whole image (origin {attrs['origin_rc']})")
    up = STUDENT_UPSCALE
    rows = min(inputs.shape[0], prob.shape[0] // up)
    cols = min(inputs.shape[1], prob.shape[1] // up)
    # Synchronous: this runs inside a cluster task, which must not wait on the cluster itself.
    target = prob[: rows * up, : cols * up].compute(scheduler="synchronous").astype(np.float32)
    return DistillPair(name, np.ascontiguousarray(inputs[:rows, :cols]), target)


# ---------------------------------------------------------------------------------------------- training


def input_normalisation(pairs: list[DistillPair]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (B, G, R) mean and standard deviation of all training input pixels, 0-255 scale."""
    pixels = np.concatenate([p.inputs_bgr.reshape(-1, 3) for p in pairs]).astype(np.float64)
    return pixels.mean(axis=0), pixels.std(axis=0)


def _jitter_stain(bgr: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Perturb each stain's optical density (colour deconvolution, scikit-image's HED vectors)."""
    if amount <= 0:
        return bgr
    hed = rgb2hed(np.clip(bgr[..., ::-1] / 255.0, 0.0, 1.0))
    scale = 1.0 + rng.uniform(-amount, amount, 3)
    shift = rng.uniform(-amount, amount, 3) / 10.0
    rgb = hed2rgb(hed * scale + shift)
    return (np.clip(rgb, 0.0, 1.0)[..., ::-1] * 255.0).astype(np.float32)


def sample_batch(pairs: list[DistillPair], recipe: StudentRecipe, halo_px: int, step: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Crops of step ``step``: inputs (N, 3, S + 2 halo, S + 2 halo) BGR and targets (N, 1, 4 S, 4 S).

    Images are drawn in proportion to their area; each crop gets one of the 8 flips/rotations
    (exact symmetries of the 4 x 4 sub-pixel grid) unless the recipe's ``flip_rotate`` is off, a stain
    perturbation (unless the recipe's ``stain_copies`` carry it) and, when the recipe asks for it, a
    magnification in ``1 ± scale_jitter``.
    """
    rng = np.random.default_rng([recipe.seed, step])
    size = recipe.crop_px
    on_the_fly = recipe.stain_jitter if recipe.stain_copies == 0 else 0.0  # else the copies carry it
    areas = np.array([p.inputs_bgr.shape[0] * p.inputs_bgr.shape[1] for p in pairs], dtype=float)
    inputs, targets = [], []
    for index in rng.choice(len(pairs), size=recipe.batch_size, p=areas / areas.sum()):
        pair = pairs[index]
        if recipe.scale_jitter > 0:
            magnification = 1.0 + float(rng.uniform(-recipe.scale_jitter, recipe.scale_jitter))
            span = (size + 2 * halo_px) / magnification  # source input pixels the crop covers
            rows, cols = pair.inputs_bgr.shape[:2]
            top, left = rng.uniform(0.0, rows - span - 1.0), rng.uniform(0.0, cols - span - 1.0)
            x, y = scaled_crop(pair, float(top), float(left), size, halo_px, magnification)
        else:
            x, y = _crop(pair, rng, size, halo_px)
        if recipe.flip_rotate:  # off: no draws for them, so later crops of the step lie elsewhere than with them
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            x, y = np.rot90(x, turns), np.rot90(y, turns)
            if flip:
                x, y = x[:, ::-1], y[:, ::-1]
        inputs.append(_jitter_stain(np.ascontiguousarray(x), rng, on_the_fly).transpose(2, 0, 1))
        targets.append(np.ascontiguousarray(y)[None])
    return np.stack(inputs).astype(np.float32), np.stack(targets).astype(np.float32)


def _crop(pair: DistillPair, rng: np.random.Generator, size: int, halo_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A random input window (size + 2 halo)² and the teacher's (4 size)² map of its centre, as stored."""
    up = STUDENT_UPSCALE
    rows, cols = pair.inputs_bgr.shape[:2]
    i0 = int(rng.integers(0, rows - size - 2 * halo_px + 1))
    j0 = int(rng.integers(0, cols - size - 2 * halo_px + 1))
    x = pair.inputs_bgr[i0 : i0 + size + 2 * halo_px, j0 : j0 + size + 2 * halo_px]
    ti, tj = (i0 + halo_px) * up, (j0 + halo_px) * up
    return x, pair.target[ti : ti + size * up, tj : tj + size * up]


def scaled_crop(pair: DistillPair, top: float, left: float, size: int, halo_px: int, magnification: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """An input window and its target like :func:`_crop`'s, the image magnified ``magnification`` times.

    Parameters
    ----------
    pair : DistillPair
    top, left : float
        Source input-pixel coordinates (pixel edges at integers) of the window's top-left corner.
    size, halo_px : int
        The crop's input pixels per side, and the halo around them (crop pixels).
    magnification : float
        One crop pixel spans ``1 / magnification`` source pixels.

    Returns
    -------
    (np.ndarray, np.ndarray)
        (size + 2 halo)² x 3 input pixels and the (4 size)² target, sampled bilinearly on the same
        continuous grid, so a teacher's peak stays on its nucleus.
    """
    up = STUDENT_UPSCALE
    # Source pixel centres (index coordinates) of the crop's input pixels and of its target's model-frame pixels.
    in_r = top + (np.arange(size + 2 * halo_px) + 0.5) / magnification - 0.5
    in_c = left + (np.arange(size + 2 * halo_px) + 0.5) / magnification - 0.5
    t_r = up * top + (up * halo_px + np.arange(size * up) + 0.5) / magnification - 0.5
    t_c = up * left + (up * halo_px + np.arange(size * up) + 0.5) / magnification - 0.5
    x = np.stack([_bilinear(pair.inputs_bgr[..., k], in_r, in_c) for k in range(3)], axis=-1)
    return x, _bilinear(pair.target, t_r, t_c)


def _bilinear(image: np.ndarray, row_px: np.ndarray, col_px: np.ndarray) -> np.ndarray:
    """``image`` sampled bilinearly at the grid ``row_px x col_px`` (index coordinates; edge pixels extend outwards)."""
    grid = np.meshgrid(row_px, col_px, indexing="ij")
    return ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)


def _learning_rate(recipe: StudentRecipe, step: int) -> float:
    warmup = max(1, recipe.iterations // 20)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.iterations - warmup)
    return recipe.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _state_paths(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out_dir.glob("student-state-*.pt"):
        try:
            found.append((int(path.stem.rsplit("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(found)


def train_student(
    pairs: list[DistillPair],
    out_dir: str | os.PathLike,
    recipe: StudentRecipe | None = None,
    *,
    device: str | None = None,
    log=print,
    net: SubpixelStudentNet | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor, StudentRecipe], torch.Tensor] | None = None,
    sample: Callable[[list[DistillPair], StudentRecipe, int, int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[SubpixelStudentNet, torch.Tensor, int]:
    """Train the student on teacher maps; resumes from the newest ``student-state-*.pt`` in ``out_dir``.

    ``net`` is the network to train (default: a fresh width-32 one, initialised from ``recipe.seed``);
    ``bench/student_fidelity.py`` passes a wider one, or the shipped student to train it further.  ``loss``
    (default :func:`teacher_loss`) is called as ``loss(logits, target, recipe)``, and ``sample`` (default
    :func:`sample_batch`) as ``sample(pairs, recipe, halo_px, step)``; the bench tries others.

    Returns
    -------
    (SubpixelStudentNet, torch.Tensor, int)
        The trained network (eval mode, CPU), its (3, 32, 32) mean image (constant per channel), and
        the step this call started from (0, or where an earlier, interrupted call stopped).
    """
    recipe = recipe or StudentRecipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    mean, std = input_normalisation(pairs)
    torch.manual_seed(recipe.seed)  # before the network exists: its initial weights follow the seed
    net = (SubpixelStudentNet(tuple(std)) if net is None else net).to(device)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    start = 0
    for unfinished in out_dir.glob(".student-state-*.tmp"):  # a save cut short by a kill (one task per folder)
        unfinished.unlink(missing_ok=True)
    states = _state_paths(out_dir)
    if states:
        state = torch.load(states[-1][1], map_location=device, weights_only=True)
        if {**RECIPE_FIELDS_ADDED, **state["recipe"]} != asdict(recipe):
            raise ValueError(f"{states[-1][1]}: saved with another recipe ({state['recipe']}); use a new --out")
        net.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
        start = int(state["iteration"])
        log(f"resuming the student's training at step {start} of {recipe.iterations}")
    net.train()
    for step in range(start, recipe.iterations):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        x, y = (torch.from_numpy(a).to(device) for a in (sample or sample_batch)(pairs, recipe, net.halo_px, step))
        logits = net((x - mean_t).contiguous(memory_format=torch.channels_last))
        value = (loss or teacher_loss)(logits, y, recipe)
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        done = step + 1
        if done % 100 == 0 or done == recipe.iterations:
            log(f"step {done}/{recipe.iterations}: loss {value.item():.4f}")
        if done % recipe.checkpoint_every == 0 or done == recipe.iterations:
            _save_state(out_dir, net, optimiser, done, recipe)
    net.eval().cpu()
    mean_image = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1).expand(MEAN_SHAPE).contiguous()
    return net, mean_image, start


def teacher_loss(logits: torch.Tensor, target: torch.Tensor, recipe: StudentRecipe) -> torch.Tensor:
    """The distillation loss: cross-entropy against the teacher's P as a soft target, per model-frame pixel,
    weighted ``1 + recipe.peak_weight * P`` (the map's peaks decide the centres)."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=1.0 + recipe.peak_weight * target)


def _save_state(out_dir: Path, net: nn.Module, optimiser, iteration: int, recipe: StudentRecipe) -> None:
    state = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "optimiser": optimiser.state_dict(), "iteration": iteration, "recipe": asdict(recipe)}
    save_checkpoint_atomic(state, out_dir / f"student-state-{iteration}.pt")
    for _, old in _state_paths(out_dir)[:-2]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- evaluation

#: Thresholds swept on the annotated crops (the student's maps are smooth, so a fine step pays).
CROP_SWEEP = np.round(np.arange(0.30, 0.995, 0.005), 3)
#: Sizes of the synthetic stain shifts of the robustness curve (HED scale ``1 ± s``, shift ``± s / 10``).
STAIN_SHIFTS = (0.0, 0.1, 0.2, 0.3, 0.4)


def crop_detections(members: list, crops: list[AnnotatedImage], reference: LabStatistics | None, *,
                    device: str = "cpu", threshold: float = 0.3,
                    stride_px: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centres (x, y) and scores on each crop, normalised to ``reference`` first (None: as they are).

    ``stride_px`` is the model-frame stride of patch models (the student ignores it: it maps every pixel)."""
    detections = []
    for crop in crops:
        rgb = crop.rgb if reference is None else ReinhardTransform(lab_statistics(crop.rgb), reference)(crop.rgb)
        detections.append(detect_in_image(members, rgb, scale=FRAME_SCALE, threshold=threshold, device=device,
                                          stride_px=stride_px))
    return detections


def leave_one_crop_out(names: list[str], detections: list, truths: list[np.ndarray], tolerance_px: float) -> dict:
    """Thresholds chosen on all crops but one and scored on that one, for each crop; and the one chosen on all."""
    per_crop, held_scores = [], []
    for k, name in enumerate(names):
        rest = [i for i in range(len(names)) if i != k]
        threshold, _ = choose_threshold([detections[i] for i in rest], [truths[i] for i in rest], tolerance_px,
                                        CROP_SWEEP)
        score = match_points(detections[k][0][detections[k][1] > threshold], truths[k], tolerance_px)
        held_scores.append(score)
        per_crop.append({"image": name, "threshold": threshold, **score.as_dict()})
    shipped, on_all = choose_threshold(detections, truths, tolerance_px, CROP_SWEEP)
    return {"per_crop": per_crop, "pooled": pooled(held_scores).as_dict(), "threshold_all_crops": shipped,
            "score_all_crops_at_it": on_all.as_dict(), "tolerance_px": tolerance_px}


def stain_shift_curve(members: list, crops: list[AnnotatedImage], reference: LabStatistics, threshold: float,
                      tolerance_px: float, *, draws: int = 4, device: str = "cpu", stride_px: int = 1,
                      shifts: tuple[float, ...] = STAIN_SHIFTS) -> list[dict]:
    """Pooled F on the crops under HED stain shifts of increasing size, with and without normalisation."""
    rows = []
    for shift in shifts:
        for normalise in (True, False):
            scores = []
            for draw in range(draws if shift else 1):  # no shift: every draw is the same image
                rng = np.random.default_rng([draw, int(shift * 1000)])
                shifted = [_shifted_crop(c, rng, shift) for c in crops]
                dets = crop_detections(members, shifted, reference if normalise else None, device=device,
                                       threshold=threshold, stride_px=stride_px)
                scores += [match_points(xy, c.centers_rc[:, ::-1], tolerance_px) for (xy, _), c in zip(dets, crops,
                                                                                             strict=True)]
            rows.append({"shift": shift, "normalised": normalise, **pooled(scores).as_dict()})
    return rows


def _shifted_crop(crop: AnnotatedImage, rng: np.random.Generator, amount: float) -> AnnotatedImage:
    bgr = crop.rgb[..., ::-1].astype(np.float32)
    rgb = np.rint(_jitter_stain(bgr, rng, amount)[..., ::-1]).astype(np.uint8)
    return replace(crop, rgb=rgb)


def image_map(members: list, image_path: str | os.PathLike, *, device: str = "cpu") -> np.ndarray:
    """The whole model-frame map of an image, through the engine's kernel (as a single block)."""
    info = open_slide(image_path)
    frame = choose_frame(info)
    box = (0, frame.shape_rc[0], 0, frame.shape_rc[1])
    prob, _ = window_probabilities(slide_window_reader(info, frame), box, members, device=device)
    return prob


def concordance(student_map: np.ndarray, teacher_map: np.ndarray, mpp: float, student_threshold: float,
                teacher_threshold: float, tolerance_um: float = DEFAULT_TOLERANCE_UM) -> dict:
    """Student centres against the teacher's on the same image, matched one-to-one within ``tolerance_um``."""
    rows = min(student_map.shape[0], teacher_map.shape[0])
    cols = min(student_map.shape[1], teacher_map.shape[1])
    student, teacher = student_map[:rows, :cols], teacher_map[:rows, :cols]
    found = [greedy_peaks(smooth_probability(m, SMOOTH_RADIUS_PX), t, CLEAR_RADIUS_PX)
             for m, t in ((student, student_threshold), (teacher, teacher_threshold))]
    score = match_points(found[0][:, ::-1].astype(float), found[1][:, ::-1].astype(float), tolerance_um / mpp)
    return {"student_centres": len(found[0]), "teacher_centres": len(found[1]), **score.as_dict(),
            "map_correlation": float(np.corrcoef(student.ravel(), teacher.ravel())[0, 1])}


# ---------------------------------------------------------------------------------------------- the command


def _train_task(pairs_spec: list[tuple[str, str, str]], out_dir: str, recipe: StudentRecipe, device: str | None
                ) -> tuple[dict, torch.Tensor, int]:
    """One ``distill-train`` task: load the pairs on the worker, train (resuming); weights, mean image, start step."""
    pairs = [load_pair(*spec) for spec in pairs_spec]
    net, mean_image, start = train_student(pairs, out_dir, recipe, device=device)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, mean_image, start


def run_distill(
    client,
    plan: list[PlanImage],
    crops_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: StudentRecipe | None = None,
    *,
    members: int = 1,
    teacher: str = "janowczyk2016",
    teacher_stride_px: int = 4,
    heldout_stride_px: int = HELDOUT_STRIDE_PX,
    model_source: str | None = None,
    resources: dict | None = None,
    device: str | None = None,
    log=print,
) -> Path:
    """The whole recipe of this module on ``client``; returns ``OUT/model.pt`` (``OUT/model-card.json`` beside it).

    Parameters
    ----------
    client : distributed.Client
        Cluster the teacher's ``infer`` tasks and the ``distill-train`` task run on.
    plan : list of PlanImage
        Training and held-out images (:func:`read_plan`).
    crops_dir : path-like
        Annotated crops (any layout of :func:`wsi_lymph.training.dataset.read_dataset`): the stain
        reference and the threshold; never trained on.
    out_dir : path-like
        Work and output folder; a rerun reuses every finished step.
    recipe : StudentRecipe
    members : int
        Students trained with the recipe, member ``k`` (from 0) with seed ``recipe.seed + k``, each as
        its own task; the model averages their maps as the teacher averages its folds (cost: ``members``
        times one network's).
    teacher : str
        The teacher model (default the paper's 5-fold ensemble).
    teacher_stride_px, heldout_stride_px : int
        Stride of the teacher's maps on training and held-out images.
    resources : dict, optional
        Dask resources of the training task (``{"GPU": 1}`` on GPU clusters).
    device : str, optional
        Torch device of the training task (default: CUDA when the worker has it).
    """
    recipe = recipe or StudentRecipe()
    out = Path(out_dir)
    crops = read_dataset(crops_dir)
    reference = reference_statistics([c.image_path for c in crops])
    claim_out_dir(out, run_settings(plan, reference, recipe, teacher, teacher_stride_px))
    # A failed task is reported by the caller in one line, not by the worker's "Compute Failed" dump.
    client.register_plugin(QuietTaskErrors(DISTILL_STAGES))
    prepared = _prepare_all(client, plan, reference, out / "images")
    teacher_model = load_model(teacher, source=model_source)
    train = [im for im in plan if im.role == "train"]
    heldout = [im for im in plan if im.role == "heldout"]
    copies = _stain_copies(client, [prepared[im.name] for im in train], recipe)
    turned = _turned_copies(client, [prepared[im.name] for im in train], recipe)
    log(f"teacher maps ({teacher}, stride {teacher_stride_px}) of {len(train)} training images"
        + (f", {len(copies)} stain-jittered copies of them" if copies else "")
        + (f", {len(turned)} turned copies of them" if turned else ""))
    copies += turned
    # One batch for originals and copies, so their tasks share the cluster.
    _teacher_maps(client, [prepared[im.name] for im in train] + copies, out / "teacher", teacher, teacher_stride_px,
                  model_source)
    specs = [(im.name, str(prepared[im.name]), str(out / "teacher" / im.name / "prob.zarr")) for im in train]
    specs += [(path.stem, str(path), str(out / "teacher" / path.stem / "prob.zarr")) for path in copies]
    log(f"training the student ({recipe.iterations} steps) as one task" if members == 1 else
        f"training {members} students (seeds {recipe.seed}-{recipe.seed + members - 1}, {recipe.iterations} steps "
        "each), one task each")
    futures = [client.submit(_train_task, specs, str(training_dir(out, k)), member_recipe(recipe, k), device,
                             key="distill-train-" + _token(specs, member_recipe(recipe, k)), resources=resources,
                             retries=2, pure=False) for k in range(members)]
    # The held-out images' teacher maps are only needed to evaluate: they run beside the training task.
    log(f"teacher maps (stride {heldout_stride_px}) of {len(heldout)} held-out images")
    _teacher_maps(client, [prepared[im.name] for im in heldout], out / f"teacher-stride{heldout_stride_px}", teacher,
                  heldout_stride_px, model_source)
    trained, started_at = [], []
    for state_dict, mean_image, started in client.gather(futures):
        net = SubpixelStudentNet()
        net.load_state_dict(state_dict)
        trained.append((net.eval(), mean_image))
        started_at.append(started)
    evaluation = _evaluate(trained, crops, reference, heldout, prepared, out / f"teacher-stride{heldout_stride_px}",
                           teacher_model.threshold, log)
    evaluation["training_resumed_from_step"] = started_at[0] if members == 1 else started_at
    return _write_model(out, trained, reference, evaluation, recipe, plan, prepared, teacher_model.meta,
                        teacher_stride_px, heldout_stride_px, copies)


def member_recipe(recipe: StudentRecipe, member: int) -> StudentRecipe:
    """The recipe of student ``member`` (from 0) of an ensemble: the same, with seed ``recipe.seed + member``."""
    return replace(recipe, seed=recipe.seed + member)


def training_dir(out: Path, member: int) -> Path:
    """Where student ``member`` (from 0) keeps its training states (the first where a single student does)."""
    return out / "training" if member == 0 else out / f"training-member{member + 1}"


#: File in a distill OUT folder recording the settings its images, copies and teacher maps were made with.
RUN_SETTINGS_FILE = "distill-run.json"


def run_settings(plan: list[PlanImage], reference: LabStatistics, recipe: StudentRecipe, teacher: str,
                 teacher_stride_px: int) -> dict:
    """The settings that decide the files a distill run keeps in OUT before training.

    Prepared images depend on the plan and the crops' stain reference, stain copies on the jitter and the
    seed, teacher maps on the teacher and its stride (held-out maps sit in a folder named by theirs).  The
    training's own settings are checked by its checkpoints (:func:`train_student`).
    """
    # Resolved paths: the same plan run from another working folder names the same files.
    images = [asdict(replace(im, path=os.path.realpath(im.path))) for im in plan]
    return {"plan": images, "stain_reference": reference.as_dict(), "teacher": teacher,
            "teacher_stride": teacher_stride_px, "stain_jitter": recipe.stain_jitter, "seed": recipe.seed}


def check_out_dir(out_dir: str | os.PathLike, settings: dict) -> None:
    """Refuse an OUT folder whose files were made with other :func:`run_settings` (a rerun would reuse them).

    Raises
    ------
    ValueError
        Naming ``OUT/distill-run.json`` and each setting that differs, old and new.
    """
    path = Path(out_dir) / RUN_SETTINGS_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error}); use a new --out") from None
    # Through JSON, so tuples and lists compare equal.
    current = json.loads(json.dumps(settings))
    changed = [key for key in current if recorded.get(key) != current[key]]
    if changed:
        shown = [key if key in ("plan", "stain_reference") else f"{key} {recorded.get(key)} (now {current[key]})"
                 for key in changed]
        raise ValueError(f"{path}: this folder was made with another {', '.join(shown)}; its images and teacher "
                         "maps would be reused; use a new --out")


def claim_out_dir(out_dir: str | os.PathLike, settings: dict) -> None:
    """:func:`check_out_dir`, then record ``settings`` in OUT (a folder from before the record is adopted)."""
    check_out_dir(out_dir, settings)
    path = Path(out_dir) / RUN_SETTINGS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(settings, indent=1) + "\n").encode())


def _token(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _prepare_all(client, plan: list[PlanImage], reference: LabStatistics, folder: Path) -> dict[str, Path]:
    """Prepared images by name, one ``prepare`` task per image (files already written are reused)."""
    futures = {im.name: client.submit(prepare_image, im, reference, str(folder), key=f"prepare-{_token(im)}",
                                      pure=False) for im in plan}
    return {name: Path(future.result()) for name, future in futures.items()}


def _stain_copies(client, files: list[Path], recipe: StudentRecipe) -> list[Path]:
    """The recipe's stain-jittered copies of the prepared training images, one ``stain-copy`` task each."""
    futures = [client.submit(stain_copy, path, copy, recipe.stain_jitter, recipe.seed,
                             key=f"stain-copy-{_token(str(path), copy, recipe.stain_jitter, recipe.seed)}", pure=False)
               for path in files for copy in range(1, recipe.stain_copies + 1)]
    return [Path(future.result()) for future in futures]


def _turned_copies(client, files: list[Path], recipe: StudentRecipe) -> list[Path]:
    """The recipe's turned copies of the prepared training images, one ``turned-copy`` task each."""
    futures = [client.submit(turned_copy, path, copy, recipe.seed,
                             key=f"turned-copy-{_token(str(path), copy, recipe.seed)}", pure=False)
               for path in files for copy in range(1, recipe.turned_copies + 1)]
    return [Path(future.result()) for future in futures]


def _teacher_maps(client, files: list[Path], out_dir: Path, teacher: str, stride_px: int,
                  model_source: str | None) -> None:
    """The teacher's float32 maps of whole prepared images, through the engine (finished maps are reused)."""
    if not files:
        return
    results = run_probmaps(client, files, out_dir, model=teacher, params=ProbmapParams(stride_px=stride_px,
                           dtype="float32"), model_source=model_source, progress=False, log=lambda _: None)
    failed = [f"{r.path}: {r.reason}" for r in results if r.status != "done"]
    if failed:
        raise RuntimeError("teacher maps failed: " + "; ".join(failed))


def _evaluate(members: list, crops: list[AnnotatedImage], reference: LabStatistics, heldout: list[PlanImage],
              prepared: dict[str, Path], teacher_dir: Path, teacher_threshold: float, log) -> dict:
    """Leave-one-crop-out threshold and accuracy, stain-shift curve, and concordance on held-out images."""
    names = [c.image_id for c in crops]
    truths = [c.centers_rc[:, ::-1].astype(float) for c in crops]
    tolerance_px = DEFAULT_TOLERANCE_UM / CROPS_MPP
    loco = leave_one_crop_out(names, crop_detections(members, crops, reference), truths, tolerance_px)
    threshold = loco["threshold_all_crops"]
    log(f"crops, leave one crop out: pooled F {loco['pooled']['f_score']:.3f}; threshold on all three {threshold}")
    concordances = {}
    for im in heldout:
        teacher_map = open_probmap(teacher_dir / im.name / "prob.zarr")[0].compute(scheduler="synchronous")
        frame = choose_frame(open_slide(prepared[im.name]))
        concordances[im.name] = concordance(image_map(members, prepared[im.name]), teacher_map, frame.mpp,
                                            threshold, teacher_threshold)
        log(f"{im.name}: concordance F {concordances[im.name]['f_score']:.3f}, map correlation "
            f"{concordances[im.name]['map_correlation']:.3f}")
    pooled_concordance = pooled([DetectionScore.from_dict(c) for c in concordances.values()]).as_dict()
    shifts = stain_shift_curve(members, crops, reference, threshold, tolerance_px)
    return {"crops_leave_one_out": loco, "concordance": {"per_image": concordances, "pooled": pooled_concordance},
            "stain_shift_f": shifts, "threshold": threshold}


def _write_model(out: Path, trained: list[tuple[SubpixelStudentNet, torch.Tensor]], reference: LabStatistics,
                 evaluation: dict, recipe: StudentRecipe, plan: list[PlanImage], prepared: dict[str, Path],
                 teacher_meta: dict, teacher_stride_px: int, heldout_stride_px: int, copies: list[Path]) -> Path:
    """``model.pt`` (the checkpoint format, with threshold and stain reference; several students in one file
    when there are several) and ``model-card.json``."""
    meta = {
        "arch": STUDENT_ARCH, "name": STUDENT_NAME, "fold": None,
        "channel_order": "BGR", "input_range": 255.0, "model_mpp": MODEL_FRAME_MPP, "source_scan_mpp": SOURCE_SCAN_MPP,
        "frame_scale": FRAME_SCALE, "input_mpp": SOURCE_SCAN_MPP, "threshold": float(evaluation["threshold"]),
        "class_index": 1, "stain_norm": "reinhard", "stain_reference": reference.as_dict(),
        "created_by": f"wsi-lymph {__version__} distill",
    }
    model_path = out / "model.pt"
    save_checkpoint_atomic(ensemble_checkpoint(trained, meta), model_path)
    card = {
        "model": STUDENT_NAME, "arch": STUDENT_ARCH, "sha256": pooch.file_hash(str(model_path)),
        # Every member runs on every pixel: the model's cost is the sum of theirs.
        "flops_per_20x_px": sum(net.flops_per_input_px() for net, _ in trained),
        "parameters": sum(p.numel() for net, _ in trained for p in net.parameters()),
        "members": [{"seed": member_recipe(recipe, k).seed, "training": training_dir(out, k).name}
                    for k in range(len(trained))],
        "threshold": meta["threshold"], "threshold_chosen_on": "the three annotated crops (F-optimal)",
        "stain_norm": {"method": "reinhard", "reference": reference.as_dict(),
                       "reference_from": "tissue of the three annotated crops (the paper's domain)"},
        "teacher": {"name": teacher_meta.get("name"), "model_id": teacher_meta.get("model_id"),
                    "member_sha256": teacher_meta.get("member_sha256"), "stride_px": teacher_stride_px,
                    "heldout_stride_px": heldout_stride_px},
        "images": [{"name": im.name, "role": im.role, "source": Path(im.path).name, "mpp": im.mpp,
                    "region_level0": im.region_level0, "source_sha256": pooch.file_hash(im.path),
                    "prepared_sha256": pooch.file_hash(str(prepared[im.name])),
                    **_copies_record(im.name, copies, recipe.seed)} for im in plan],
        "recipe": asdict(recipe), "seed": recipe.seed, "evaluation": evaluation,
        "versions": {"wsi_lymph": __version__, "torch": torch.__version__},
    }
    write_atomic(out / "model-card.json", json.dumps(card, indent=2).encode())
    return model_path


def _copies_record(name: str, copies: list[Path], seed: int) -> dict:
    """The model card's record of an image's stain and turned copies (names, sha256, the turned ones' view)."""
    def of(kind: str) -> list[tuple[Path, int]]:
        return [(c, int(c.stem.rsplit(f"-{kind}", 1)[1])) for c in copies if c.stem.rsplit(f"-{kind}", 1)[0] == name]

    return {"stain_copies": [{"name": c.stem, "sha256": pooch.file_hash(str(c))} for c, _ in of("stain")],
            "turned_copies": [{"name": c.stem, "sha256": pooch.file_hash(str(c)),
                               "quarter_turns_and_flip": copy_view(name, k, seed)} for c, k in of("turn")]}
