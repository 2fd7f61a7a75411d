"""Settings of cross-validation (:class:`CVSettings`) and distillation (:class:`StudentRecipe`), apart from the
heavy modules that use them.

The command line reads its defaults from here, so ``wsi-lymph --help`` needs neither torch nor a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsi_lymph.constants import DEFAULT_TOLERANCE_UM, MODEL_FRAME_MPP


@dataclass(frozen=True)
class CVSettings:
    """Everything a cross-validation run depends on.

    Attributes
    ----------
    n_folds : int
        Folds, split by image.
    iterations, batch_size, recipe, arch, seed
        Training (see :func:`wsi_lymph.training.train.train_model`); the paper ran 600,000 iterations.
    checkpoint_every, eval_every : int
        Iterations between checkpoints / metric rows (0 = about 10 per run).
    validation_fraction : float
        Share of each fold's training images held out for validation (at least one image).
    mpp : float
        µm per pixel of the data set's images (the paper's: 0.5, 20x).
    stride_px : int
        Detection stride in the model frame for the paper's network (dense networks are exact at every pixel).
    mirror : bool
        Average each patch with its mirror at detection time.
    tolerance_um : float
        Matching distance between detected and annotated centres.
    max_positive, max_negative : int
        Patch locations per image (the paper: 2,000 and 4,000).
    device : str or None
        Torch device of the fold tasks; None = CUDA where the worker has it.
    torch_threads : int or None
        CPU threads of torch in a fold task (None = torch's default); a local cluster
        divides the cores between its workers.
    """

    n_folds: int = 5
    iterations: int = 20000
    batch_size: int = 128
    recipe: str = "paper"
    arch: str = "paper"
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    validation_fraction: float = 0.2
    mpp: float = 0.5
    stride_px: int = 2
    mirror: bool = False
    tolerance_um: float = DEFAULT_TOLERANCE_UM
    max_positive: int = 2000
    max_negative: int = 4000
    device: str | None = None
    torch_threads: int | None = None

    @property
    def scale(self) -> float:
        """Model-frame pixels per image pixel (0.125 µm/px model frame)."""
        return self.mpp / MODEL_FRAME_MPP


@dataclass(frozen=True)
class StudentRecipe:
    """How the student is trained (stored in its checkpoints and model card).

    Attributes
    ----------
    iterations, batch_size : int
        Optimiser steps and crops per step.
    crop_px : int
        Input pixels per crop side (the loss covers ``4 crop_px`` model-frame pixels per side).
    lr, weight_decay : float
        AdamW with a linear warm-up over the first 5% of steps, then cosine decay.
    peak_weight : float
        Loss weight ``1 + peak_weight * P_teacher`` per pixel: the map's peaks decide the centres.
    stain_jitter : float
        Half-width of the uniform HED perturbation (scale ``1 ± s`` and shift ``± s / 10`` per stain).
    stain_copies : int
        Where the stain perturbation goes.  0: on every crop as it is drawn, its target staying the
        teacher's map of the unperturbed crop (robustness, at the price of fidelity to the teacher).
        N > 0: on N copies of each training image, each perturbed once as a whole and given the
        teacher's own map of it; crops are then not perturbed as they are drawn.
    scale_jitter : float
        Half-width of the uniform magnification jitter: each crop and its target are resampled
        (bilinear) by a factor in ``1 ± scale_jitter``, for scanners whose µm/px is only estimated.
        0 draws nothing (crops exactly as recipes without this field drew them).
    flip_rotate : bool
        Give each crop and its target one of the 8 flips/rotations.  The paper's networks are not
        equivariant to them, so a flipped crop's flipped target is not the teacher's map of the flipped
        crop; without them the student follows the teacher more closely (BENCHMARKS.md), so they are
        off by default (students shipped before 2026-12-04 were trained with them).
    turned_copies : int
        N > 0: N copies of each training image, each turned and/or flipped as a whole by another of
        the 7 non-identity flips/rotations and given the teacher's own map of it: other orientations
        with targets the teacher really gives (0 to 7).
    seed : int
        Crops and augmentations of step ``i`` come from a generator seeded with ``(seed, i)``,
        so a resumed run sees exactly the crops an uninterrupted one would.
    checkpoint_every : int
        Steps between checkpoints (the last 2 are kept).
    """

    iterations: int = 8000
    batch_size: int = 16
    crop_px: int = 40
    lr: float = 3e-3
    weight_decay: float = 1e-4
    peak_weight: float = 4.0
    stain_jitter: float = 0.08
    stain_copies: int = 1
    scale_jitter: float = 0.1
    flip_rotate: bool = False
    turned_copies: int = 0
    seed: int = 0
    checkpoint_every: int = 500


#: Students ``wsi-lymph distill`` trains by default (seeds ``seed``, ``seed + 1``, ...), their maps averaged: the
#: shipped student's number.
DISTILL_MEMBERS = 2

#: Recipe fields added after student checkpoints were first written, with the value the older checkpoints were
#: trained with: a checkpoint that lacks a field resumes only a recipe with that value (not today's default).
RECIPE_FIELDS_ADDED = {"scale_jitter": 0.0, "stain_copies": 0, "flip_rotate": True, "turned_copies": 0}
