"""The checkpoint format: one ``torch.save`` of plain tensors and JSON-like metadata.

A checkpoint is ``{"state_dict", "mean_bgr", "meta"}`` (format ``wsi-lymph-checkpoint/1``: one network)
or ``{"members": [{"state_dict", "mean_bgr"}, ...], "meta"}`` (format ``wsi-lymph-checkpoint/2``: several
networks of one architecture whose probabilities are averaged, e.g. a student trained with several seeds).
It loads with ``torch.load(path, weights_only=True)``; ``meta["arch"]`` names its networks in
:data:`wsi_lymph.models.architectures.ARCHITECTURES`.  Written by the Caffe import and by training, read by
everything that runs a model.  Readers older than format 2 refuse such a file rather than run one member.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_lymph.models.architectures import ARCHITECTURES
from wsi_lymph.models.networks import SubpixelStudentNet, channel_mean

# torch.load warns about a pickle protocol its safe unpickler "might not support" (asking to file an issue) only for
# files torch.save did not write: foreign or corrupt ones, which load_checkpoint refuses in one line anyway.
warnings.filterwarnings("ignore", message=r"Detected pickle protocol \d+ in the checkpoint", category=UserWarning)

CHECKPOINT_FORMAT = "wsi-lymph-checkpoint/1"
#: Format of a checkpoint holding several networks (``members``) under one ``meta``.
ENSEMBLE_CHECKPOINT_FORMAT = "wsi-lymph-checkpoint/2"
#: Shape of a checkpoint's mean image (B, G, R planes of one 32x32 patch, 0-255 scale).
MEAN_SHAPE = (3, 32, 32)


class ModelError(ValueError):
    """A model name cannot be resolved, fetched or loaded."""


def save_checkpoint_atomic(checkpoint: dict[str, Any], out_path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``out_path``, then rename it into place.

    Readers (e.g. other worker processes) therefore never see a half-written file.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def ensemble_checkpoint(members: list[tuple[nn.Module, torch.Tensor]], meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of ``members`` (network, mean image) under one ``meta``: format 1 for one network,
    format 2 for several (``meta["format"]`` is set accordingly).  A network with a ``shape()`` (the student:
    width, dilations, residual) has it recorded beside its weights, so that it is rebuilt in that shape."""
    records = [{"state_dict": {k: v.contiguous() for k, v in net.state_dict().items()}, "mean_bgr": mean,
                **(net.shape() if hasattr(net, "shape") else {})}
               for net, mean in members]
    if len(records) == 1:
        return {**records[0], "meta": {**meta, "format": CHECKPOINT_FORMAT}}
    return {"members": records, "meta": {**meta, "format": ENSEMBLE_CHECKPOINT_FORMAT}}


def load_checkpoint(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[nn.Module, torch.Tensor, dict]:
    """Load a checkpoint of one network, written by :func:`wsi_lymph.models.caffe.import_caffe` (or training).

    Parameters
    ----------
    path : path-like
        Checkpoint file.
    device : str
        Torch device for the network, e.g. ``"cpu"`` or ``"cuda:0"``.

    Returns
    -------
    (torch.nn.Module, torch.Tensor, dict)
        Network in eval mode on ``device`` (the class named by
        ``meta["arch"]``, see :data:`wsi_lymph.models.architectures.ARCHITECTURES`), (3, 32, 32) float32 mean
        image (BGR, 0-255) on the CPU, and the metadata dict.

    Raises
    ------
    ModelError
        The file is missing, unreadable, not a checkpoint of this network, or holds several networks
        (:func:`load_checkpoint_members` loads those).
    """
    members, meta = load_checkpoint_members(path, device)
    if len(members) != 1:
        raise ModelError(f"{path}: holds {len(members)} networks (an ensemble); load it as a model (--model)")
    return (*members[0], meta)


def load_checkpoint_members(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[list[tuple[nn.Module, torch.Tensor]], dict]:
    """Load every network of a checkpoint (one, or the members of a format-2 file) and its metadata.

    Parameters
    ----------
    path : path-like
        Checkpoint file.
    device : str
        Torch device for the networks.

    Returns
    -------
    (list of (torch.nn.Module, torch.Tensor), dict)
        Per network: the network in eval mode on ``device`` and its (3, 32, 32) float32 BGR 0-255 mean
        image on the CPU; then the metadata shared by all.

    Raises
    ------
    ModelError
        The file is missing, unreadable, or not a checkpoint of these networks.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: checkpoint file not found") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"{path}: is a folder, not a checkpoint file") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign/corrupt files
        # torch's own text is advice for its developers (set weights_only=False, file an issue): the cause stays
        # chained for the log file, the user gets what is wrong with the file.
        raise ModelError(
            f"{path}: not a wsi-lymph/torch checkpoint or corrupt (torch.load: {type(exc).__name__})"
        ) from exc
    single = isinstance(ckpt, dict) and {"state_dict", "mean_bgr", "meta"} <= set(ckpt)
    several = isinstance(ckpt, dict) and {"members", "meta"} <= set(ckpt)
    if not (single or several):
        raise ModelError(f"{path}: not a wsi-lymph checkpoint (expected keys state_dict, mean_bgr, meta)")
    meta = ckpt["meta"]
    expected = CHECKPOINT_FORMAT if single else ENSEMBLE_CHECKPOINT_FORMAT
    if not isinstance(meta, dict) or meta.get("format") != expected:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelError(f"{path}: checkpoint format is {found!r}, expected {expected!r}")
    arch = meta.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        known = " or ".join(repr(a) for a in ARCHITECTURES)
        raise ModelError(f"{path}: network architecture is {arch!r}, expected {known}")
    records = [ckpt] if single else ckpt["members"]
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and {"state_dict", "mean_bgr"} <= set(r) for r in records):
        raise ModelError(f"{path}: members must be a non-empty list of (state_dict, mean_bgr) records")
    members = [_build(path, arch, record, device, index if several else None) for index, record in
               enumerate(records, start=1)]
    return members, meta


def _build(path: Path, arch: str, record: dict, device: str, member: int | None) -> tuple[nn.Module, torch.Tensor]:
    """One network of a checkpoint, its weights and mean image checked."""
    where = f"{path}" if member is None else f"{path} (member {member})"
    entry = ARCHITECTURES[arch]
    mean = record["mean_bgr"]
    if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != MEAN_SHAPE:
        shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise ModelError(f"{where}: mean image has shape {shape}, expected {MEAN_SHAPE}")
    # Students record their shape (checkpoints written before 2026-12-05 do not: they all have the default one).
    shape = {key: record[key] for key in SubpixelStudentNet.SHAPE_KEYS if key in record}
    try:
        net = entry.build(**shape)
    except TypeError as exc:
        raise ModelError(f"{where}: the {arch} network takes no {', '.join(shape)}: {exc}") from exc
    except ValueError as exc:  # the network's own check of its shape
        raise ModelError(f"{where}: {exc}") from exc
    if entry.per_channel_mean:
        try:
            channel_mean(mean)
        except ValueError as exc:
            raise ModelError(f"{where}: {exc}") from exc
    try:
        net.load_state_dict(record["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"{where}: weights do not fit the {arch} network: {exc}") from exc
    net.to(device).eval()
    return net, mean.to(device="cpu", dtype=torch.float32)
