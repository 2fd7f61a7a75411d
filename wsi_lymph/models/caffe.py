"""Import the authors' released Caffe models without installing Caffe.

A ``.caffemodel`` is a serialised Caffe ``NetParameter`` and a ``.binaryproto``
mean file a serialised ``BlobProto``.  Both are plain protobuf, so a handful of
field declarations built at run time is enough to read them: the schema below
declares only the fields this project needs (protobuf keeps everything else as
unknown fields and ignores it).  Field numbers follow Caffe's wire format.

The converted checkpoint is a ``torch.save`` of plain tensors and JSON-like
metadata, so it loads with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pooch
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from wsi_lymph import __version__
from wsi_lymph.constants import FRAME_SCALE, PAPER_THRESHOLD, SOURCE_SCAN_MPP
from wsi_lymph.models.architectures import PAPER_ARCH, architecture
from wsi_lymph.models.checkpoints import CHECKPOINT_FORMAT, MEAN_SHAPE, save_checkpoint_atomic


class CaffeImportError(ValueError):
    """A Caffe file cannot be read or does not hold the expected network."""


# --------------------------------------------------------------------------- schema

_F = descriptor_pb2.FieldDescriptorProto


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str | None = None,
    packed: bool = False,
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype)
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name is not None:
        f.type_name = type_name
    if packed:
        # Only affects how *we* serialise (tests); proto2 parsers accept both encodings.
        f.options.packed = True


def _build_messages() -> dict[str, type]:
    """Build the minimal Caffe schema in a private descriptor pool."""
    pkg = "wsi_lymph_caffe_min"
    fdp = descriptor_pb2.FileDescriptorProto(name="wsi_lymph_caffe_min.proto", package=pkg, syntax="proto2")

    shape = fdp.message_type.add(name="BlobShape")
    _field(shape, "dim", 1, _F.TYPE_INT64, repeated=True, packed=True)

    blob = fdp.message_type.add(name="BlobProto")
    _field(blob, "num", 1, _F.TYPE_INT32)
    _field(blob, "channels", 2, _F.TYPE_INT32)
    _field(blob, "height", 3, _F.TYPE_INT32)
    _field(blob, "width", 4, _F.TYPE_INT32)
    _field(blob, "data", 5, _F.TYPE_FLOAT, repeated=True, packed=True)
    _field(blob, "shape", 7, _F.TYPE_MESSAGE, type_name=f".{pkg}.BlobShape")
    _field(blob, "double_data", 8, _F.TYPE_DOUBLE, repeated=True, packed=True)

    layer = fdp.message_type.add(name="LayerParameter")
    _field(layer, "name", 1, _F.TYPE_STRING)
    _field(layer, "type", 2, _F.TYPE_STRING)
    _field(layer, "blobs", 7, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.BlobProto")

    # Pre-2015 ("V1") layer format: different field numbers, enum type we do not need.
    v1 = fdp.message_type.add(name="V1LayerParameter")
    _field(v1, "name", 4, _F.TYPE_STRING)
    _field(v1, "blobs", 6, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.BlobProto")

    net = fdp.message_type.add(name="NetParameter")
    _field(net, "name", 1, _F.TYPE_STRING)
    _field(net, "layers", 2, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.V1LayerParameter")
    _field(net, "layer", 100, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.LayerParameter")

    # A private pool, so nothing clashes with a real caffe_pb2 imported in the same process.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    names = ("BlobShape", "BlobProto", "LayerParameter", "V1LayerParameter", "NetParameter")
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.{n}")) for n in names}


#: Message classes of the minimal schema, by name (BlobShape, BlobProto, LayerParameter, ...).
MESSAGES = _build_messages()


# --------------------------------------------------------------------------- readers


def _parse(path: Path, message_name: str) -> Any:
    data = Path(path).read_bytes()
    msg = MESSAGES[message_name]()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise CaffeImportError(
            f"{path}: not a valid Caffe {message_name} protobuf (truncated or corrupt file?): {exc}"
        ) from exc
    return msg


def _strip_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without leading singleton axes (at least one axis is kept)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _blob_array(blob: Any, where: str, *, strip_legacy_ones: bool = True) -> np.ndarray:
    """Turn a BlobProto into a float32 array of its declared shape."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        # Legacy 4-D (num, channels, height, width); Caffe padded lower-rank blobs with leading
        # 1s (an InnerProduct weight is (1, 1, out, in)), so drop those to recover the real rank.
        shape = (blob.num, blob.channels, blob.height, blob.width)
        if strip_legacy_ones:
            shape = _strip_leading_ones(shape)
    if any(d < 0 for d in shape):
        raise CaffeImportError(f"{where} has a negative dimension in its shape {shape}")
    values = blob.data if len(blob.data) else blob.double_data
    n_expected = math.prod(shape)
    if len(values) != n_expected:
        raise CaffeImportError(
            f"{where} declares shape {shape} ({n_expected} values) but holds {len(values)} values"
        )
    return np.asarray(values, dtype=np.float32).reshape(shape)


def read_caffemodel(path: str | os.PathLike[str]) -> dict[str, list[np.ndarray]]:
    """Read the weight blobs of a Caffe ``.caffemodel`` file.

    Parameters
    ----------
    path : path-like
        A serialised Caffe ``NetParameter`` (current ``layer`` or legacy
        ``layers`` format).

    Returns
    -------
    dict of str to list of np.ndarray
        Layer name -> its blobs as float32 arrays in Caffe's layout (for a
        convolution: weight (out, in, kh, kw) then bias (out,); for an inner
        product: weight (out, in) then bias (out,)).  Values are in whatever
        units the network was trained with (here: inputs on a 0-255 scale).
        Layers without blobs (pooling, ReLU, ...) are omitted.

    Raises
    ------
    CaffeImportError
        The file is not a parseable ``NetParameter``, a blob's data does not
        match its shape, two layers with weights share a name, or no layer
        holds weights.
    """
    path = Path(path)
    net = _parse(path, "NetParameter")
    out: dict[str, list[np.ndarray]] = {}
    for layer in [*net.layer, *net.layers]:
        if not len(layer.blobs):
            continue
        if layer.name in out:
            raise CaffeImportError(f"{path}: more than one layer with weights is named {layer.name!r}")
        out[layer.name] = [
            _blob_array(b, f"{path}: layer {layer.name!r} blob {i}") for i, b in enumerate(layer.blobs)
        ]
    if not out:
        raise CaffeImportError(f"{path}: no layer with weights found; is this a Caffe .caffemodel file?")
    return out


def read_binaryproto(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Caffe ``.binaryproto`` mean image.

    Parameters
    ----------
    path : path-like
        A serialised Caffe ``BlobProto`` of shape (1, C, H, W) or (C, H, W).

    Returns
    -------
    np.ndarray
        (C, H, W) float32, in the channel order and value scale the network
        was trained with (for the released models: BGR, 0-255).

    Raises
    ------
    CaffeImportError
        The file is not a parseable ``BlobProto`` or does not hold one image.
    """
    path = Path(path)
    blob = _parse(path, "BlobProto")
    arr = _blob_array(blob, f"{path}: mean blob", strip_legacy_ones=False)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.size == 0:
        raise CaffeImportError(
            f"{path}: expected one (C, H, W) mean image, found a blob of shape {arr.shape}"
        )
    return arr


# --------------------------------------------------------------------------- conversion


def caffe_to_state_dict(blobs: dict[str, list[np.ndarray]], source: str) -> dict[str, torch.Tensor]:
    """Map Caffe blobs onto :class:`~wsi_lymph.models.networks.PatchNet` parameters.

    Caffe's convolution weight layout (out, in, kh, kw) equals torch's, and an
    InnerProduct weight (out, in) flattens its input in (C, H, W) order exactly
    like ``torch.flatten``, so no transposition is needed.

    Parameters
    ----------
    blobs : dict of str to list of np.ndarray
        Output of :func:`read_caffemodel`.
    source : str
        Name of the file the blobs came from, used in error messages.

    Returns
    -------
    dict of str to torch.Tensor
        A complete float32 state dict for ``PatchNet``.

    Raises
    ------
    CaffeImportError
        A layer or blob is missing, a layer has extra blobs, a layer with
        weights is not part of the network, a blob's shape differs from the
        network's, or a value is not finite.
    """
    layers = architecture(PAPER_ARCH).caffe_layers
    expected = {k: tuple(v.shape) for k, v in architecture(PAPER_ARCH).build().state_dict().items()}
    unexpected = sorted(set(blobs) - set(layers))
    if unexpected:
        raise CaffeImportError(
            f"{source}: layers {unexpected} carry weights but are not part of the {PAPER_ARCH} network "
            f"(expected layers {list(layers)})"
        )
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer not in blobs:
            raise CaffeImportError(f"{source}: layer {layer!r} is missing (found layers {sorted(blobs)})")
        layer_blobs = blobs[layer]
        if len(layer_blobs) != 2:
            raise CaffeImportError(
                f"{source}: layer {layer!r} has {len(layer_blobs)} blobs but the network expects 2 "
                "(weight and bias)"
            )
        for index, param in enumerate(("weight", "bias")):
            key = f"{layer}.{param}"
            arr = layer_blobs[index]
            want = expected[key]
            got = tuple(arr.shape)
            # Legacy blobs lose their rank (always 4-D), so leading singleton axes are not a mismatch.
            if got != want and _strip_leading_ones(got) != _strip_leading_ones(want):
                raise CaffeImportError(
                    f"{source}: layer {layer!r} blob {index} has shape {got} but the network expects {want}"
                )
            if not np.all(np.isfinite(arr)):
                raise CaffeImportError(f"{source}: layer {layer!r} blob {index} holds non-finite values")
            state[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(want).copy())
    return state


def _check_import_numbers(threshold: float, source_scan_mpp: float, frame_scale: float) -> None:
    """Raise ValueError for a threshold outside [0, 1] or a non-positive resolution or scale."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not (source_scan_mpp > 0 and math.isfinite(source_scan_mpp)):
        raise ValueError(f"source_scan_mpp must be a positive number of um/px, got {source_scan_mpp}")
    if not (frame_scale > 0 and math.isfinite(frame_scale)):
        raise ValueError(f"frame_scale must be a positive factor, got {frame_scale}")


def _network_mean(mean_binaryproto: Path) -> np.ndarray:
    """The (3, 32, 32) BGR 0-255 mean image of a ``.binaryproto``, checked to fit the network."""
    mean = read_binaryproto(mean_binaryproto)
    if mean.shape != MEAN_SHAPE:
        raise CaffeImportError(
            f"{mean_binaryproto}: mean image has shape {mean.shape} but the network expects {MEAN_SHAPE}"
        )
    if not np.all(np.isfinite(mean)):
        raise CaffeImportError(f"{mean_binaryproto}: mean image holds non-finite values")
    return mean


def import_caffe(
    caffemodel: str | os.PathLike[str],
    mean_binaryproto: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    name: str,
    fold: int | None,
    threshold: float = PAPER_THRESHOLD,
    source_scan_mpp: float = SOURCE_SCAN_MPP,
    frame_scale: float = FRAME_SCALE,
) -> Path:
    """Convert one released Caffe model and its mean image into a checkpoint.

    Parameters
    ----------
    caffemodel : path-like
        The ``.caffemodel`` weights.
    mean_binaryproto : path-like
        The fold's ``.binaryproto`` mean image (3 x 32 x 32, BGR, 0-255).
    out_path : path-like
        Checkpoint to write (conventionally ``.pt``); parent folders are created
        and the file is replaced atomically.
    name : str
        Model name stored in the metadata, e.g. ``"janowczyk2016/fold1"``.
    fold : int or None
        Cross-validation fold the model was trained on, if any.
    threshold : float
        Peak-detection threshold on the smoothed probability map, in [0, 1].
    source_scan_mpp : float
        Resolution of the training images, in micrometres per pixel (the
        paper's images are 20x, about 0.5 um/px).
    frame_scale : float
        Upscaling applied to the training images before patch extraction (4x
        in the paper); the model's own frame is ``source_scan_mpp /
        frame_scale`` um/px.

    Returns
    -------
    Path
        ``out_path``.  The file holds ``{"state_dict", "mean_bgr", "meta"}``
        and loads with ``torch.load(out_path, weights_only=True)``.

    Raises
    ------
    CaffeImportError
        Either input is unreadable or does not match the network.
    ValueError
        A numeric argument is out of range.
    """
    caffemodel, mean_binaryproto = Path(caffemodel), Path(mean_binaryproto)
    _check_import_numbers(threshold, source_scan_mpp, frame_scale)
    state = caffe_to_state_dict(read_caffemodel(caffemodel), str(caffemodel))
    mean = _network_mean(mean_binaryproto)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "arch": PAPER_ARCH,
        "name": name,
        "fold": fold,
        "channel_order": "BGR",
        "input_range": 255.0,
        "model_mpp": float(source_scan_mpp) / float(frame_scale),
        "source_scan_mpp": float(source_scan_mpp),
        "frame_scale": float(frame_scale),
        "threshold": float(threshold),
        "class_index": 1,
        "source_files": {p.name: pooch.file_hash(str(p)) for p in (caffemodel, mean_binaryproto)},
        "created_by": f"wsi-lymph {__version__}",
    }
    checkpoint = {"state_dict": state, "mean_bgr": torch.from_numpy(mean.copy()), "meta": meta}
    return save_checkpoint_atomic(checkpoint, out_path)
