"""Training of the patch classifiers in torch: the paper's Caffe recipe and a modern one.

Two recipes (``recipe=``):

``"paper"`` — the original solver as described in ``docs/method.md``:
    Adagrad, learning rate 1e-3 fixed, weight decay 4e-3 applied as L2 in the
    gradient (as Caffe does; torch's Adagrad ``weight_decay`` is the same),
    Caffe's Adagrad epsilon 1e-8, batch 128, random horizontal mirroring,
    Gaussian initialisation (conv1 std 1e-4, conv2/conv3 1e-2, ip1/ip2 0.1,
    biases 0), inputs BGR 0-255 minus the fold's mean image (``arch="paper"``)
    or normalised per channel (``arch="dense"``).  Patches are shuffled once
    and then read in that order epoch after epoch, like Caffe reading its LMDB.
    Not known from the paper and therefore not copied: Caffe prototxt
    per-parameter ``lr_mult`` (CIFAR-10 "quick" gives biases 2x); all
    parameters use the base rate here.

``"modern"`` — a documented, untuned alternative:
    AdamW (lr 2e-3, betas 0.9/0.999, decoupled weight decay 1e-2), linear
    warm-up over the first 5 % of iterations, then cosine decay to 1 % of the
    peak; Kaiming-normal initialisation; augmentation by the 8 symmetries of
    the square (random 90-degree rotation and horizontal flip) and mild colour
    jitter (contrast and brightness x U(0.9, 1.1), per-channel gain
    x U(0.95, 1.05)); patches reshuffled every epoch.

Two architectures (``arch=``): ``"paper"`` is :class:`~wsi_lymph.models.networks.PatchNet`
(mean *image* subtracted), ``"dense"`` is :class:`~wsi_lymph.models.networks.DensePatchNet`
(per-channel mean and standard deviation), whose every-pixel evaluation is
exactly fully convolutional.

Output folder (``out_dir``):

- ``checkpoint-<iteration>.pt``: everything needed to continue (weights,
  optimiser, scheduler, RNG states, sampler position, partial interval loss,
  elapsed time, settings); the last two are kept.  They also hold
  ``state_dict``/``mean_bgr``/``meta`` and load with
  :func:`wsi_lymph.models.registry.load_model`.
- ``metrics.csv`` / ``metrics.json``: one row every ``eval_every`` iterations
  (and at the end): iteration, train_loss (mean over the interval), val_loss,
  val_accuracy, val_auc, lr (of the interval's last step), seconds (training
  wall time since the start, resumed sessions included).
- ``model.pt``: the final model in the loadable checkpoint format.

Reproducibility: every random draw after initialisation comes from a
generator keyed by (seed, purpose, epoch or iteration), not from a stream, so
the data order and augmentation of iteration ``i`` do not depend on where a
run was interrupted.  On the CPU, with the same torch build and thread count,
two runs with the same seed give bit-identical weights, and a killed and
resumed run gives the same bits as an uninterrupted one (another thread
count changes the reduction order, ~1e-6).  On CUDA the loop runs with
``torch.backends.cudnn.deterministic`` (restored afterwards), which made
resumed runs bit-identical on an H200; other GPUs or library versions give
other bits.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from scipy.stats import mannwhitneyu
from torch import nn
from torch.nn import functional as F

from wsi_lymph.constants import FRAME_SCALE, MODEL_FRAME_MPP, PAPER_THRESHOLD, PATCH_PX
from wsi_lymph.io.outputs import write_atomic
from wsi_lymph.models.architectures import ARCH_OPTIONS, architecture
from wsi_lymph.models.checkpoints import CHECKPOINT_FORMAT, MEAN_SHAPE, save_checkpoint_atomic
from wsi_lymph.models.device import select_device
from wsi_lymph.training.patches import mean_image_bgr

RECIPES = ("paper", "modern")
#: Columns of ``metrics.csv`` / ``metrics.json``.
METRIC_COLUMNS = ("iteration", "train_loss", "val_loss", "val_accuracy", "val_auc", "lr", "seconds")
TRAINING_FORMAT = "wsi-lymph-training/1"
#: Training checkpoints kept in ``out_dir`` (older ones are deleted).
KEEP_CHECKPOINTS = 2
#: Gaussian initialisation std of the paper recipe, per layer (method.md; Caffe CIFAR-10 "quick").
PAPER_INIT_STD = {"conv1": 1e-4, "conv2": 1e-2, "conv3": 1e-2, "ip1": 0.1, "ip2": 0.1}
_EVAL_BATCH = 1024  # validation patches per forward pass
_READ_BATCH = 65536  # patches per Zarr read (~200 MB of uint8)
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)\.pt")
# Keys of the purposes random generators are derived for (with the seed).
_RNG_SHUFFLE, _RNG_AUGMENT = 1, 2


class TrainingError(ValueError):
    """Training cannot start or resume with the given inputs."""


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _PatchSet:
    """Patches held in memory: (n, 32, 32, 3) uint8 RGB and (n,) int64 labels."""

    patches: np.ndarray
    labels: np.ndarray


def _read_rows(array: Any, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` along axis 0, in the given order, reading sorted blocks of rows."""
    order = np.argsort(indices, kind="stable")
    out = np.empty((len(indices), *array.shape[1:]), dtype=array.dtype)
    for start in range(0, len(indices), _READ_BATCH):
        take = order[start : start + _READ_BATCH]
        out[take] = array.oindex[indices[take]]
    return out


def channel_std_bgr(patches_rgb: np.ndarray, mean_bgr: np.ndarray) -> np.ndarray:
    """Per-channel (B, G, R) standard deviation (0-255 scale) of all pixels of uint8 RGB patches.

    ``mean_bgr`` is the per-channel mean, shape (3,).
    """
    sq = np.zeros(3, dtype=np.float64)
    for start in range(0, len(patches_rgb), _READ_BATCH):
        block = patches_rgb[start : start + _READ_BATCH].reshape(-1, 3).astype(np.float64)
        sq += ((block[:, ::-1] - mean_bgr) ** 2).sum(axis=0)
    std = np.sqrt(sq / max(len(patches_rgb) * PATCH_PX * PATCH_PX, 1))
    # A constant channel (synthetic data) must not divide by zero.
    return np.maximum(std, 1.0).astype(np.float32)


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _open_patches(patches_zarr: Path) -> tuple[Any, np.ndarray, dict]:
    """The Zarr group, its labels and its attributes; raises TrainingError if it is not a patch set."""
    try:
        group = zarr.open_group(str(patches_zarr), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a missing/foreign store
        raise TrainingError(f"{patches_zarr}: not a readable patch Zarr group ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in ("patches", "label") if name not in group]
    if missing:
        raise TrainingError(f"{patches_zarr}: patch Zarr group lacks array(s) {missing}")
    patches = group["patches"]
    if patches.ndim != 4 or tuple(patches.shape[1:]) != (PATCH_PX, PATCH_PX, 3) or patches.dtype != np.uint8:
        raise TrainingError(
            f"{patches_zarr}: 'patches' is {patches.dtype} {patches.shape}, expected uint8 (N, {PATCH_PX}, "
            f"{PATCH_PX}, 3) RGB"
        )
    labels = np.asarray(group["label"][:]).astype(np.int64)
    if labels.shape != (patches.shape[0],):
        raise TrainingError(f"{patches_zarr}: 'label' has shape {labels.shape}, expected ({patches.shape[0]},)")
    if not np.isin(labels, (0, 1)).all():
        raise TrainingError(f"{patches_zarr}: labels must be 0 or 1")
    return group, labels, dict(group.attrs)


def _check_indices(name: str, indices: np.ndarray, n: int, *, allow_empty: bool) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise TrainingError(f"{name} must be a 1-d integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if not allow_empty and idx.size == 0:
        raise TrainingError(f"{name} is empty")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise TrainingError(f"{name} holds indices outside [0, {n})")
    if len(np.unique(idx)) != len(idx):
        raise TrainingError(f"{name} holds duplicate indices")
    return idx


# ---------------------------------------------------------------------------------------------- model


def initialise(net: nn.Module, recipe: str, seed: int) -> None:
    """Initialise weights in place from a generator seeded with ``seed`` (biases 0).

    ``paper``: Gaussian with :data:`PAPER_INIT_STD`; ``modern``: Kaiming
    normal (fan-in, ReLU gain for conv1-3, linear gain for ip1/ip2).
    """
    gen = torch.Generator().manual_seed(seed)
    for name in ("conv1", "conv2", "conv3", "ip1", "ip2"):
        layer = getattr(net, name)
        with torch.no_grad():
            if recipe == "paper":
                nn.init.normal_(layer.weight, 0.0, PAPER_INIT_STD[name], generator=gen)
            else:
                gain = "relu" if name.startswith("conv") else "linear"
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=gain, generator=gen)
            nn.init.zeros_(layer.bias)


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``iterations``.

    A class rather than a closure so that ``LambdaLR.state_dict`` records its parameters.
    """

    def __init__(self, iterations: int, warmup: int, floor: float = 0.01) -> None:
        self.iterations, self.warmup, self.floor = int(iterations), int(warmup), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.iterations - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimiser(
    net: nn.Module, recipe: str, iterations: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    if recipe == "paper":
        # Caffe AdaGrad: history += g^2; w -= lr * g / (sqrt(history) + 1e-8), with g including decay * w.
        return torch.optim.Adagrad(net.parameters(), lr=1e-3, weight_decay=4e-3, eps=1e-8), None
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-2)
    schedule = WarmupCosine(iterations, max(1, iterations // 20))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ---------------------------------------------------------------------------------------------- batches


class _Sampler:
    """Shuffled patch order; state (epoch, offset) into a per-epoch permutation keyed by the seed.

    ``reshuffle=False`` reuses epoch 0's permutation forever (Caffe reading a
    once-shuffled LMDB); otherwise every epoch has its own permutation.
    """

    def __init__(self, n: int, seed: int, reshuffle: bool, epoch: int = 0, offset: int = 0) -> None:
        self.n, self.seed, self.reshuffle = n, seed, reshuffle
        self.epoch, self.offset = epoch, offset
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        key = epoch if self.reshuffle else 0
        if self._cached is None or self._cached[0] != key:
            rng = np.random.default_rng([self.seed, _RNG_SHUFFLE, key])
            self._cached = (key, rng.permutation(self.n))
        return self._cached[1]

    def next(self, size: int) -> np.ndarray:
        parts = []
        while size:
            take = self._permutation(self.epoch)[self.offset : self.offset + size]
            parts.append(take)
            size -= len(take)
            self.offset += len(take)
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(parts)


def _to_bgr_tensor(patches_rgb: np.ndarray) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 RGB -> (B, 3, 32, 32) float32 BGR 0-255."""
    return torch.from_numpy(np.ascontiguousarray(patches_rgb[..., ::-1].transpose(0, 3, 1, 2))).float()


def _augment(x: torch.Tensor, mean: torch.Tensor, recipe: str, rng: np.random.Generator) -> torch.Tensor:
    """Training transform of a (B, 3, 32, 32) BGR 0-255 batch; returns the network input.

    The random numbers are drawn in a fixed order from ``rng``.
    """
    b = len(x)
    if recipe == "modern":
        contrast = torch.from_numpy(rng.uniform(0.9, 1.1, (b, 1, 1, 1))).float()
        brightness = torch.from_numpy(rng.uniform(0.9, 1.1, (b, 1, 1, 1))).float()
        gain = torch.from_numpy(rng.uniform(0.95, 1.05, (b, 3, 1, 1))).float()
        centre = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (((x - centre) * contrast + centre) * brightness * gain).clamp_(0.0, 255.0)
    # Caffe's DataTransformer subtracts the mean in source coordinates, then mirrors.
    x = x - mean
    flip = torch.from_numpy(rng.random(b) < 0.5)
    x = torch.where(flip[:, None, None, None], torch.flip(x, dims=[3]), x)
    if recipe == "modern":
        quarter_turns = rng.integers(0, 4, b)
        for k in (1, 2, 3):
            sel = torch.from_numpy(quarter_turns == k)
            if sel.any():
                x[sel] = torch.rot90(x[sel], k, dims=(2, 3))
    return x.contiguous()


# ---------------------------------------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic of the positives over ``n_pos * n_neg``.

    Ties count one half (average ranks).

    Parameters
    ----------
    scores : np.ndarray
        (n,) scores, higher = more likely positive.
    labels : np.ndarray
        (n,) 0/1 labels.

    Returns
    -------
    float
        AUC in [0, 1]; NaN when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Only the statistic is used: the asymptotic method spares the exact p-value's cost.
    u = mannwhitneyu(scores[positive], scores[~positive], method="asymptotic").statistic
    return float(u / (n_pos * n_neg))


def _evaluate(net: nn.Module, data: _PatchSet, mean: torch.Tensor, device: str) -> tuple[float, float, float]:
    """(mean cross-entropy, accuracy, AUC) on a patch set, without augmentation; ``mean`` on the CPU."""
    if len(data.labels) == 0:
        return float("nan"), float("nan"), float("nan")
    net.eval()
    loss_sum, probs = 0.0, []
    with torch.no_grad():
        for start in range(0, len(data.labels), _EVAL_BATCH):
            x = (_to_bgr_tensor(data.patches[start : start + _EVAL_BATCH]) - mean).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(data.labels[start : start + _EVAL_BATCH]).to(device)
            logits = net(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            probs.append(torch.softmax(logits, dim=1)[:, 1].double().cpu().numpy())
    net.train()
    prob = np.concatenate(probs)
    accuracy = float(((prob > 0.5) == (data.labels == 1)).mean())
    return loss_sum / len(data.labels), accuracy, roc_auc(prob, data.labels)


def _csv_line(row: dict[str, float]) -> str:
    # repr keeps every bit of a float, so resumed and uninterrupted logs compare exactly.
    return ",".join(str(row[c]) if c == "iteration" else repr(float(row[c])) for c in METRIC_COLUMNS) + "\n"


class _MetricsLog:
    """``metrics.csv`` (appended and fsynced per row) mirrored in ``metrics.json`` (rewritten atomically)."""

    def __init__(self, out_dir: Path, upto: int) -> None:
        """Open the log, keeping only rows up to iteration ``upto`` (the checkpoint resumed from)."""
        self.csv_path, self.json_path = out_dir / "metrics.csv", out_dir / "metrics.json"
        self.rows: list[dict[str, float]] = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as fh:
                for rec in csv.DictReader(fh):
                    try:
                        row = {c: int(rec[c]) if c == "iteration" else float(rec[c]) for c in METRIC_COLUMNS}
                    except (KeyError, TypeError, ValueError):
                        continue  # a line cut short by a kill
                    if row["iteration"] <= upto:
                        self.rows.append(row)
        # Rows past the checkpoint are recomputed by the resumed run (no duplicates, no gaps).
        text = ",".join(METRIC_COLUMNS) + "\n" + "".join(map(_csv_line, self.rows))
        write_atomic(self.csv_path, text.encode(), fsync=True)
        self._write_json()

    def _write_json(self) -> None:
        text = json.dumps({"columns": list(METRIC_COLUMNS), "rows": self.rows}, indent=1)
        write_atomic(self.json_path, text.encode(), fsync=True)

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as fh:
            fh.write(_csv_line(row))
            fh.flush()
            os.fsync(fh.fileno())
        self._write_json()


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Training checkpoints in ``out_dir`` as (iteration, path), oldest first."""
    found = []
    for path in out_dir.glob("checkpoint-*.pt"):
        m = _CHECKPOINT_RE.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _rng_states() -> dict[str, Any]:
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    # Training draws nothing from these global streams (see the module docstring); they are restored
    # so that code around a resumed run sees the same state as around an uninterrupted one.
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _model_meta(arch: str, recipe: str, settings: dict, attrs: dict, fold: int | None, name: str) -> dict[str, Any]:
    # The model's resolution is that of its training patches; without a record of it, the paper's
    # (20x images upscaled 4x).  It is not derived from frame_scale alone: 40x slides upscaled 2x
    # reach the same 0.125 um/px.
    model_mpp = float(attrs.get("model_mpp", MODEL_FRAME_MPP))
    frame_scale = float(attrs.get("frame_scale", FRAME_SCALE))
    source_mpp = float(attrs.get("source_scan_mpp", model_mpp * frame_scale))
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": architecture(arch).arch_id,
        "name": name,
        "fold": fold,
        "channel_order": "BGR",
        "input_range": 255.0,
        "model_mpp": model_mpp,
        "source_scan_mpp": source_mpp,
        "frame_scale": frame_scale,
        # The paper's threshold until one is chosen on validation data.
        "threshold": PAPER_THRESHOLD,
        "class_index": 1,
        "training": {**settings, "recipe": recipe},
        "created_by": "wsi-lymph train",
    }


def _settings_mismatch(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this call has {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------------------------- training


def train_model(
    patches_zarr: str | os.PathLike[str],
    train_indices: np.ndarray,
    val_indices: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    recipe: str = "paper",
    arch: str = "paper",
    iterations: int,
    batch_size: int = 128,
    checkpoint_every: int,
    eval_every: int,
    seed: int,
    device: str | None = None,
    fold: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a patch classifier, resuming from the last checkpoint in ``out_dir`` if there is one.

    Parameters
    ----------
    patches_zarr : path-like
        Zarr v3 group with ``patches`` (N, 32, 32, 3) uint8 RGB and ``label``
        (N,) uint8 (1 = lymphocyte centre); optional attrs ``model_mpp``
        (default 0.125 um/px, the paper's), ``frame_scale`` (default 4) and
        ``source_scan_mpp`` (default their product) are copied into the model.
    train_indices, val_indices : np.ndarray
        Indices into the patch arrays (disjoint; split by patient upstream).
        ``val_indices`` may be empty (validation columns are then NaN).  Both
        sets are read into memory (3 KiB per patch).
    out_dir : path-like
        Folder for checkpoints, metrics and ``model.pt`` (created).
    recipe : {"paper", "modern"}
        See the module docstring.
    arch : {"paper", "dense"}
        :class:`~wsi_lymph.models.networks.PatchNet` or :class:`~wsi_lymph.models.networks.DensePatchNet`.
    iterations : int
        Optimiser steps in total (the paper: 600,000).
    batch_size : int
        Patches per step.
    checkpoint_every, eval_every : int
        Iterations between checkpoints and between metric rows; both are
        also written at the last iteration.
    seed : int
        Seeds initialisation, shuffling and augmentation.
    device : str, optional
        Torch device; default CUDA when available, else CPU.
    fold : int, optional
        Cross-validation fold, recorded in the model's metadata.
    log : callable, optional
        Called with one line per event (start/resume, metric row, checkpoint).

    Returns
    -------
    Path
        ``out_dir / "model.pt"``, loadable with :func:`wsi_lymph.models.registry.load_model`.

    Raises
    ------
    TrainingError
        Bad inputs, or ``out_dir`` holds a checkpoint of a run with other
        settings (the message names each mismatch).
    """
    _check_arguments(recipe, arch, iterations=iterations, batch_size=batch_size,
                     checkpoint_every=checkpoint_every, eval_every=eval_every)
    say = log or (lambda _line: None)
    device = select_device(device)
    patches_zarr, out_dir = Path(patches_zarr), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group, labels, attrs = _open_patches(patches_zarr)
    train_idx = _check_indices("train_indices", train_indices, len(labels), allow_empty=False)
    val_idx = _check_indices("val_indices", val_indices, len(labels), allow_empty=True)
    if np.intersect1d(train_idx, val_idx).size:
        raise TrainingError("train_indices and val_indices overlap")
    settings = _run_settings(recipe, arch, iterations, batch_size, eval_every, seed, fold, labels, train_idx, val_idx)
    state = _last_checkpoint(out_dir, settings, say)
    final_path = out_dir / "model.pt"
    if state is not None and state["iteration"] == iterations:
        if not final_path.is_file():
            _save_model(final_path, state["state_dict"], state["mean_bgr"], state["meta"])
        say(f"{out_dir}: already trained to iteration {iterations}")
        return final_path

    train = _PatchSet(_read_rows(group["patches"], train_idx), labels[train_idx])
    val = _PatchSet(_read_rows(group["patches"], val_idx), labels[val_idx])
    run = _Run.start(settings, _model_meta(arch, recipe, settings, attrs, fold, out_dir.name), train.patches, state,
                     device)
    if state is not None:
        say(f"resuming {out_dir} at iteration {run.iteration}/{iterations}")
    else:
        say(f"training {arch}/{recipe} into {out_dir}: {len(train.labels)} train, {len(val.labels)} val patches, "
            f"{iterations} iterations on {device}")
    _train_loop(run, train, val, out_dir, checkpoint_every=checkpoint_every, device=device, say=say)
    _save_model(final_path, _cpu_state(run.net), run.mean_bgr, run.meta)
    say(f"model written to {final_path}")
    return final_path


def _check_arguments(recipe: str, arch: str, **counts: int) -> None:
    """Raise TrainingError for an unknown recipe or architecture, or a count that is not a positive integer."""
    if recipe not in RECIPES:
        raise TrainingError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if arch not in ARCH_OPTIONS:
        raise TrainingError(f"arch must be one of {ARCH_OPTIONS}, got {arch!r}")
    for label, value in counts.items():
        if int(value) != value or value < 1:
            raise TrainingError(f"{label} must be a positive integer, got {value!r}")


def _run_settings(recipe: str, arch: str, iterations: int, batch_size: int, eval_every: int, seed: int,
                  fold: int | None, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    """Everything that changes the result, as stored in each checkpoint and compared on resume.

    ``checkpoint_every`` and the device may differ on resume; the data enter as fingerprints.
    """
    return {
        "recipe": recipe,
        "arch": arch,
        "iterations": int(iterations),
        "batch_size": int(batch_size),
        "eval_every": int(eval_every),
        "seed": int(seed),
        "fold": fold,
        "patches": f"{len(labels)} patches, labels {_fingerprint(labels.astype(np.uint8))}",
        "train_indices": f"{len(train_idx)} indices {_fingerprint(train_idx)}",
        "val_indices": f"{len(val_idx)} indices {_fingerprint(val_idx)}",
    }


def _last_checkpoint(out_dir: Path, settings: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``out_dir`` (None: a fresh run); TrainingError if it is another run's."""
    state, resumed_from = None, None
    for _, path in reversed(_checkpoints(out_dir)):
        try:
            state, resumed_from = torch.load(path, map_location="cpu", weights_only=True), path
            break
        except Exception as exc:  # noqa: BLE001 - a damaged file: fall back to the one before
            say(f"cannot read {path.name} ({type(exc).__name__}: {exc}); trying an older checkpoint")
    if state is None:
        return None
    if state.get("training_format") != TRAINING_FORMAT:
        raise TrainingError(f"{resumed_from}: not a {TRAINING_FORMAT} checkpoint")
    mismatch = _settings_mismatch(state["settings"], settings)
    if mismatch:
        raise TrainingError(
            f"{out_dir} holds a run with other settings; use another folder or the same settings "
            f"({'; '.join(mismatch)})"
        )
    return state


def _new_network(arch: str, recipe: str, seed: int, patches_rgb: np.ndarray) -> tuple[nn.Module, torch.Tensor]:
    """A freshly initialised network and its input mean (the training patches' mean image, or per channel)."""
    mean_np = mean_image_bgr(patches_rgb)
    std_np = None
    if architecture(arch).per_channel_mean:
        per_channel = mean_np.reshape(3, -1).mean(axis=1, dtype=np.float64)
        std_np = channel_std_bgr(patches_rgb, per_channel)
        mean_np = np.broadcast_to(per_channel[:, None, None], MEAN_SHAPE).astype(np.float32)
    net = architecture(arch).build(std_np)
    initialise(net, recipe, seed)
    return net, torch.from_numpy(np.ascontiguousarray(mean_np))


@dataclass
class _Run:
    """A training run between two steps: everything a checkpoint holds.

    ``elapsed_s`` is the training time of earlier sessions, ``session_start`` when this one started
    (``time.perf_counter``); ``loss_sum`` / ``loss_count`` accumulate the train loss of the current metric interval.
    """

    net: nn.Module
    mean_bgr: torch.Tensor
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    sampler: _Sampler
    meta: dict[str, Any]
    settings: dict[str, Any]
    iteration: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    elapsed_s: float = 0.0
    session_start: float = 0.0

    @classmethod
    def start(cls, settings: dict[str, Any], meta: dict[str, Any], patches_rgb: np.ndarray,
              state: dict[str, Any] | None, device: str) -> _Run:
        """A new run on ``patches_rgb`` (the training patches), or the one ``state`` (a checkpoint) continues."""
        arch, recipe, seed = settings["arch"], settings["recipe"], settings["seed"]
        if state is None:
            net, mean_bgr = _new_network(arch, recipe, seed, patches_rgb)
        else:
            mean_bgr = state["mean_bgr"].float()
            net = architecture(arch).build()
            net.load_state_dict(state["state_dict"])
        # NHWC runs these small convolutions ~1.5-2x faster on CPU (bench/patch_throughput.py), backward too.
        net.to(device=device, memory_format=torch.channels_last).train()
        opt, sched = _optimiser(net, recipe, settings["iterations"])
        sampler = _Sampler(len(patches_rgb), seed, reshuffle=(recipe == "modern"))
        run = cls(net, mean_bgr, opt, sched, sampler, meta, settings)
        if state is not None:
            run.restore(state)
        return run

    def restore(self, state: dict[str, Any]) -> None:
        """Continue where the checkpoint ``state`` left off (optimiser, schedule, RNGs, sampler, interval)."""
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        _restore_rng_states(state["rng"])
        self.sampler.epoch, self.sampler.offset = state["sampler"]["epoch"], state["sampler"]["offset"]
        self.iteration = int(state["iteration"])
        self.loss_sum, self.loss_count = float(state["interval"]["loss_sum"]), int(state["interval"]["count"])
        self.elapsed_s = float(state["elapsed_s"])

    def seconds(self) -> float:
        """Training wall time since the start, earlier sessions included."""
        return self.elapsed_s + (time.perf_counter() - self.session_start)

    def save(self, out_dir: Path, say: Callable[[str], None]) -> None:
        """``checkpoint-<iteration>.pt``, then delete all but the last :data:`KEEP_CHECKPOINTS`."""
        ckpt = {
            "training_format": TRAINING_FORMAT,
            "state_dict": _cpu_state(self.net),
            "mean_bgr": self.mean_bgr.cpu(),
            "meta": self.meta,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "rng": _rng_states(),
            "iteration": self.iteration,
            "sampler": {"epoch": self.sampler.epoch, "offset": self.sampler.offset},
            "interval": {"loss_sum": self.loss_sum, "count": self.loss_count},
            "elapsed_s": self.seconds(),
            "settings": self.settings,
        }
        save_checkpoint_atomic(ckpt, out_dir / f"checkpoint-{self.iteration}.pt")
        for _, old in _checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        say(f"checkpoint-{self.iteration}.pt written")


def _train_loop(run: _Run, train: _PatchSet, val: _PatchSet, out_dir: Path, *, checkpoint_every: int, device: str,
                say: Callable[[str], None]) -> None:
    """Steps up to the run's last iteration, with metric rows and checkpoints at their intervals and at the end."""
    iterations, eval_every = run.settings["iterations"], run.settings["eval_every"]
    metrics = _MetricsLog(out_dir, run.iteration)
    run.session_start = time.perf_counter()
    with _training_numerics():
        while run.iteration < iterations:
            lr = _train_step(run, train, device)
            if run.iteration % eval_every == 0 or run.iteration == iterations:
                _metrics_row(run, val, metrics, lr, device, say)
            if run.iteration % checkpoint_every == 0 or run.iteration == iterations:
                run.save(out_dir, say)


def _train_step(run: _Run, train: _PatchSet, device: str) -> float:
    """One optimiser step on the next batch; returns the learning rate it used."""
    settings = run.settings
    idx = run.sampler.next(settings["batch_size"])
    rng = np.random.default_rng([settings["seed"], _RNG_AUGMENT, run.iteration])
    x = _augment(_to_bgr_tensor(train.patches[idx]), run.mean_bgr, settings["recipe"], rng)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(train.labels[idx]).to(device)
    lr = run.opt.param_groups[0]["lr"]
    loss = F.cross_entropy(run.net(x), y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if run.sched is not None:
        run.sched.step()
    run.iteration += 1
    run.loss_sum += float(loss.detach())
    run.loss_count += 1
    return lr


def _metrics_row(run: _Run, val: _PatchSet, metrics: _MetricsLog, lr: float, device: str,
                 say: Callable[[str], None]) -> None:
    """Evaluate on the validation patches, log the row and start a new loss interval."""
    val_loss, val_acc, val_auc = _evaluate(run.net, val, run.mean_bgr, device)
    row = {
        "iteration": run.iteration,
        "train_loss": run.loss_sum / run.loss_count,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "val_auc": val_auc,
        "lr": lr,
        "seconds": run.seconds(),
    }
    metrics.append(row)
    run.loss_sum, run.loss_count = 0.0, 0
    say(
        f"iteration {run.iteration}/{run.settings['iterations']}: train_loss {row['train_loss']:.4f} "
        f"val_loss {val_loss:.4f} val_accuracy {val_acc:.4f} val_auc {val_auc:.4f} lr {lr:.3g}"
    )


@contextlib.contextmanager
def _training_numerics() -> Iterator[None]:
    """Process-wide numeric settings for the training loop, restored afterwards.

    - Denormal floats are flushed to zero on the CPU: the paper's tiny initial
      weights (conv1 std 1e-4) produce denormals, which make x86 arithmetic
      ~6x slower; flushing them changes nothing that matters.  Restored to
      torch's default (off) — torch has no getter for the current state.
    - cuDNN picks deterministic algorithms and no benchmark autotuning, so that
      CUDA runs (and killed-and-resumed ones) are bit-reproducible on the same
      GPU and software; without it resumed H200 runs differed by ~4e-6.
    """
    flushing = torch.set_flush_denormal(True)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
        if flushing:
            torch.set_flush_denormal(False)


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the network's state dict (training runs it in channels_last)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def _save_model(path: Path, state_dict: dict, mean_bgr: torch.Tensor, meta: dict) -> None:
    """The final model in the checkpoint format of :func:`wsi_lymph.models.checkpoints.load_checkpoint`."""
    save_checkpoint_atomic(
        {"state_dict": state_dict, "mean_bgr": mean_bgr.detach().cpu().float().contiguous(), "meta": meta}, path
    )
