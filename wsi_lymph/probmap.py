"""Slides -> chunked Zarr maps of P(lymphocyte center): the work of one block, and the map's store.

The probability of a lymphocyte centre at every model-frame pixel comes from
one ``infer`` task per block of the model frame: read the block plus the halo
its patches need, resample it to the model frame, classify the 32x32 patch
around every ``stride_px``-th pixel exactly as the paper did, interpolate the
pixels in between, and write the block's whole Zarr chunks.  Blocks are
aligned to chunks, so no two tasks ever write the same chunk.  The map is
written to a temporary store and renamed into place when every block has
finished, so a map on disk is always complete.  :mod:`wsi_lymph.batch` runs
these tasks for a batch of slides.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from distributed import Client

from . import __version__
from .frame import (
    ModelFrame,
    interpolate_grid,
    patch_rows,
    read_frame_window,
    stride_grid,
)
from .hematoxylin import (
    DEFAULT_MARGIN_UM,
    DEFAULT_MASK_MPP,
    DEFAULT_THRESHOLD_OD,
)
from .models import load_checkpoint, load_model, resolve_model
from .network import DensePatchNet, dense_probabilities, patch_grid_probabilities
from .resample import resize_window, resized_length, symmetric_index
from .slide import SlideInfo

STORE_DTYPES = {"float32": 1.0, "float16": 1.0, "uint8": 1.0 / 255.0}


@dataclass(frozen=True)
class ProbmapParams:
    """How a probability map is computed and stored.

    Attributes
    ----------
    stride_px : int
        Classify every ``stride_px``-th model-frame pixel along each axis and
        interpolate bilinearly in between (1 = every pixel, exact).
    mirror : bool
        Average each patch with its horizontal mirror (the original's oversampling).
    chunk_px : int
        Zarr chunk edge in model-frame pixels.
    block_px : int
        Edge of one inference task in model-frame pixels; a multiple of ``chunk_px``.
    dtype : str
        ``"float16"`` (default), ``"float32"`` or ``"uint8"`` (P x 255, rounded).
    batch_size : int
        Patches per forward pass.  Every pass has exactly this many patches
        (the last one is padded) so results never depend on the block layout.
    skip_hematoxylin : bool
        Leave blocks without hematoxylin at P = 0 without running the network.
    hematoxylin_threshold_od, mask_mpp, margin_um : float
        See :mod:`wsi_lymph.hematoxylin`.
    region_level0 : (x, y, width, height) or None
        Analyse only this level-0 rectangle (pixels); patches at its border
        still see the real neighbouring tissue.
    device : str or None
        Torch device for inference; None = CUDA when the worker has it, else CPU.
    torch_threads : int or None
        Intra-op threads per inference task (None = torch default).
    """

    stride_px: int = 1
    mirror: bool = False
    chunk_px: int = 512
    block_px: int = 512
    dtype: str = "float16"
    batch_size: int = 512
    skip_hematoxylin: bool = True
    hematoxylin_threshold_od: float = DEFAULT_THRESHOLD_OD
    mask_mpp: float = DEFAULT_MASK_MPP
    margin_um: float = DEFAULT_MARGIN_UM
    region_level0: tuple[int, int, int, int] | None = None
    device: str | None = None
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.stride_px < 1:
            raise ValueError(f"stride must be >= 1 model-frame pixel, got {self.stride_px}")
        if self.chunk_px < 1 or self.block_px % self.chunk_px:
            raise ValueError(f"block_px ({self.block_px}) must be a positive multiple of chunk_px ({self.chunk_px})")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {self.dtype!r}")


@dataclass
class SlideResult:
    """Outcome of one slide of a batch."""

    path: str
    name: str
    status: str = "pending"  # "done" or "failed"
    reason: str = ""
    output: str = ""
    blocks_total: int = 0
    blocks_skipped: int = 0
    patches: int = 0
    hematoxylin_mm2: float = 0.0  # analysed area with hematoxylin (cells above the threshold)
    tissue_mm2: float = 0.0  # analysed area that is tissue rather than glass
    seconds: dict = field(default_factory=dict)
    blocks_resumed: int = 0  # finished before an interruption, not recomputed
    reused: bool = False  # the map was already complete in the output folder

    @property
    def skipped_fraction(self) -> float:
        return self.blocks_skipped / self.blocks_total if self.blocks_total else 0.0


# ------------------------------------------------------------------ one block
@functools.lru_cache(maxsize=4)
def _members(checkpoints: tuple[str, ...], device: str):
    """Networks of a model, loaded once per worker process and device."""
    loaded = [load_checkpoint(path, device=device) for path in checkpoints]
    return [(net.to(memory_format=torch.channels_last), mean) for net, mean, _ in loaded]


def _auto_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def frame_region(frame: ModelFrame, region_level0: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """Model-frame box (r0, r1, c0, c1) covering a level-0 rectangle (all of the slide if None)."""
    rows, cols = frame.shape_rc
    if region_level0 is None:
        return (0, rows, 0, cols)
    x, y, width, height = region_level0
    per = frame.level0_per_frame_px
    box = (
        max(0, int(np.floor(y / per))),
        min(rows, int(np.ceil((y + height) / per))),
        max(0, int(np.floor(x / per))),
        min(cols, int(np.ceil((x + width) / per))),
    )
    if box[0] >= box[1] or box[2] >= box[3]:
        raise ValueError(f"region {region_level0} (level-0 x, y, width, height) lies outside the slide")
    return box


def window_probabilities(
    read_window: Callable[[np.ndarray, np.ndarray], np.ndarray],
    box: tuple[int, int, int, int],
    members: list,
    *,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 512,
    device: str = "cpu",
) -> tuple[np.ndarray, int]:
    """P(lymphocyte center) for one model-frame box, exactly as the patch classifier gives it.

    Parameters
    ----------
    read_window : callable
        ``read_window(rows, cols)`` -> (len(rows), len(cols), 3) float32 BGR 0-255
        model-frame pixels; indices outside the frame are mirrored.
    box : (r0, r1, c0, c1)
        Model-frame rows ``r0:r1`` and columns ``c0:c1`` (global coordinates).
    members : list of (network, mean image)
        The model's members (probabilities are averaged).  Dense-exact
        networks (:class:`~wsi_lymph.network.DensePatchNet`) are evaluated
        fully convolutionally at every pixel, so ``stride_px`` does not apply.
    stride_px, mirror, batch_size, device
        See :class:`ProbmapParams`.

    Returns
    -------
    prob : np.ndarray
        (r1 - r0, c1 - c0) float32.
    patches : int
        Patches classified (per member).
    """
    r0, r1, c0, c1 = box
    if device.startswith("cuda"):
        # TF32 convolutions (torch's default on CUDA) move P by up to ~5e-3 on an H200; full
        # float32 gives the CPU's map (measured: identical), which the method's threshold assumes.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if all(isinstance(net, DensePatchNet) for net, _ in members):
        window = read_window(patch_rows(np.arange(r0, r1)), patch_rows(np.arange(c0, c1)))
        prob = dense_probabilities(members, window, mirror=mirror, device=device)
        return prob, prob.size
    grid_r = stride_grid(r0, r1, stride_px)
    grid_c = stride_grid(c0, c1, stride_px)
    # The halo: 16 px before and 15 px after the first/last classified pixel.
    window = read_window(patch_rows(grid_r), patch_rows(grid_c))
    grid_prob = patch_grid_probabilities(
        members, window, stride_px=stride_px, mirror=mirror, batch_size=batch_size, device=device
    )
    if stride_px == 1:
        return grid_prob, grid_prob.size
    return interpolate_grid(grid_prob, (grid_r, grid_c), box), grid_prob.size


def block_probabilities(
    info: SlideInfo,
    frame: ModelFrame,
    box: tuple[int, int, int, int],
    checkpoints: Sequence[str],
    params: ProbmapParams,
) -> tuple[np.ndarray, int]:
    """:func:`window_probabilities` of one box of a slide's model frame, with a model given by its files."""
    device = _auto_device(params.device)
    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    return window_probabilities(
        functools.partial(read_frame_window, info, frame), box, _members(tuple(map(str, checkpoints)), device),
        stride_px=params.stride_px, mirror=params.mirror, batch_size=params.batch_size, device=device,
    )


def image_probabilities(
    rgb: np.ndarray,
    members: list,
    *,
    scale: float = 4.0,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """P(lymphocyte center) at every pixel of an in-memory image resized to the model frame.

    The same computation as a slide's map (:func:`window_probabilities`): MATLAB-style
    bicubic resize by ``scale`` (4 for a 20x image), symmetric mirroring at the border.

    Parameters
    ----------
    rgb : np.ndarray
        (rows, cols, 3) uint8 image at its scan resolution.
    members : list of (network, mean image)
        Networks in eval mode on ``device``.
    scale : float
        Model-frame pixels per image pixel.

    Returns
    -------
    np.ndarray
        (ceil(rows * scale), ceil(cols * scale)) float32 map; model-frame pixel (r, c)
        is image position ((r + 0.5) / scale - 0.5, (c + 0.5) / scale - 0.5).
    """
    shape = (resized_length(rgb.shape[0], scale), resized_length(rgb.shape[1], scale))

    def read_window(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = symmetric_index(rows, shape[0]), symmetric_index(cols, shape[1])
        window = resize_window(rgb, (0, 0), rgb.shape[:2], rows, cols, scale)
        return np.ascontiguousarray(window[..., ::-1])  # RGB -> BGR, as the network expects

    prob, _ = window_probabilities(read_window, (0, shape[0], 0, shape[1]), members, stride_px=stride_px,
                                   mirror=mirror, batch_size=batch_size, device=device)
    return prob


def encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] to the stored dtype (uint8 = round(255 P))."""
    if dtype == "uint8":
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return prob.astype(dtype)


def infer_block(
    info: SlideInfo,
    frame: ModelFrame,
    box: tuple[int, int, int, int],
    origin_rc: tuple[int, int],
    checkpoints: Sequence[str],
    params: ProbmapParams,
    store_path: str,
) -> dict:
    """Compute one block and write it into its (whole) chunks of the Zarr map; return stats."""
    start = time.perf_counter()
    prob, patches = block_probabilities(info, frame, box, checkpoints, params)
    r0, r1, c0, c1 = box
    array = zarr.open_array(store_path, mode="r+")
    array[r0 - origin_rc[0] : r1 - origin_rc[0], c0 - origin_rc[1] : c1 - origin_rc[1]] = encode(prob, params.dtype)
    return {"patches": patches, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ one slide
def output_name(path: str | os.PathLike) -> str:
    """A folder name for a slide that is safe on any file system (stem, unsafe characters -> '_')."""
    stem = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem).strip(".")
    return safe or "slide"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an older version is removed only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_description(model: str, source: str | None = None) -> dict:
    """Identity of a model for map attributes: name, member files, their sha256 and how to feed them.

    Loading through :func:`wsi_lymph.models.load_model` also checks that an
    ensemble's members agree on architecture, channel order and resolution.
    """
    checkpoints = resolve_model(model, source=source)
    loaded = load_model(model, source=source)
    return {
        "name": model,
        "model_id": loaded.meta["model_id"],
        "members": [str(path) for path in checkpoints],
        "sha256": loaded.meta["member_sha256"],
        "model_mpp": loaded.model_mpp,
        "source_scan_mpp": loaded.meta["source_scan_mpp"],
        "threshold": loaded.threshold,
    }


def map_attributes(info: SlideInfo, frame: ModelFrame, origin_rc, model: dict, params: ProbmapParams) -> dict:
    return {
        "wsi_lymph": {
            "version": __version__,
            "quantity": "P(lymphocyte center) per model-frame pixel",
            "value_scale": STORE_DTYPES[params.dtype],
            "slide": info.name,
            "slide_path": info.path,
            "mpp": info.mpp,
            "mpp_source": info.mpp_source,
            "level0_size_xy": list(info.level_sizes_xy[0]),
            "frame": frame.attrs(),
            "origin_rc": list(origin_rc),
            "coordinates": "array[i, j] is model-frame pixel (origin_rc[0] + i, origin_rc[1] + j); "
            "level-0 x = (col + 0.5) * level0_per_frame_px - 0.5, likewise y from row",
            "model": model,
            "params": asdict(params),
        }
    }


def create_partial_store(path: Path, boxes: list, origin_rc: tuple[int, int], params: ProbmapParams,
                         attributes: dict) -> None:
    """Create (overwrite) the empty map a slide's blocks are written into; P = 0 where nothing is written."""
    (r0, c0), last = origin_rc, boxes[-1]
    zarr.create_array(
        store=str(path),
        shape=(last[1] - r0, last[3] - c0),
        chunks=(params.chunk_px, params.chunk_px),
        dtype=params.dtype,
        fill_value=0,
        attributes=attributes,
        overwrite=True,
    )


def computed_blocks_attr(boxes: list, keep: np.ndarray, origin_rc: tuple[int, int], block_px: int) -> dict:
    """The blocks that were classified, as a compact map attribute (everywhere else P = 0).

    Stored as a bit mask over the block grid (row-major, ``np.packbits``,
    base64) so that it stays small for any slide size.
    """
    import base64

    rows = 1 + (boxes[-1][0] - origin_rc[0]) // block_px
    cols = 1 + (boxes[-1][2] - origin_rc[1]) // block_px
    mask = np.asarray(keep, dtype=bool).reshape(rows, cols)
    return {"block_px": block_px, "grid": [rows, cols], "bits": base64.b64encode(np.packbits(mask)).decode()}


def computed_boxes(attrs: dict) -> list[tuple[int, int, int, int]] | None:
    """Map-pixel boxes (r0, r1, c0, c1) outside which a stored map is 0; None if the map does not say."""
    import base64

    info = attrs.get("computed_blocks")
    if info is None:
        return None
    rows, cols = info["grid"]
    size = info["block_px"]
    mask = np.unpackbits(np.frombuffer(base64.b64decode(info["bits"]), np.uint8), count=rows * cols)
    return [(i * size, (i + 1) * size, j * size, (j + 1) * size)
            for i, j in np.argwhere(mask.reshape(rows, cols).astype(bool))]


def run_fingerprint(info: SlideInfo, frame: ModelFrame, box, model: dict, params: ProbmapParams) -> str:
    """Fingerprint of everything that determines a map's values (not where or how fast it runs)."""
    import hashlib
    import json

    settings = asdict(params) | {"device": None, "torch_threads": None}
    payload = [info.path, info.mpp, frame.attrs(), list(box), model["sha256"], settings]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_probmaps(client: Client, slide_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 **options) -> list[SlideResult]:
    """Compute ``OUT/<slide-name>/prob.zarr`` for every slide; see :func:`wsi_lymph.batch.run_batch`.

    A slide that cannot be opened or fails during computation is reported in
    its :class:`SlideResult` (``status="failed"``, ``reason``); the others go on.
    A slide whose map is complete is not recomputed (unless ``force``); an
    interrupted one resumes from the manifest of finished blocks kept beside
    its partial store, recomputing only the blocks missing from it.
    """
    from .batch import run_batch

    return run_batch(client, slide_paths, out_dir, peaks=None, **options)


def open_probmap(path: str | os.PathLike):
    """Open a stored map lazily: returns (dask array of P as float32, attributes dict)."""
    import dask.array as da

    array = zarr.open_array(str(path), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    prob = da.from_zarr(array).astype(np.float32) * np.float32(attrs["value_scale"])
    return prob, attrs
