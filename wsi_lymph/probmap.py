"""Slides -> chunked Zarr maps of P(lymphocyte center), computed on a Dask cluster.

For each slide the work is a graph of three stages, named as the dashboard shows them:

``read-*`` / ``hematoxylin-*``
    a low-resolution hematoxylin map (:mod:`wsi_lymph.hematoxylin`) decides
    which blocks can hold lymphocytes;
``infer``
    one task per block of the model frame: read the block plus the halo its
    patches need, resample it to the model frame, classify the 32x32 patch
    around every ``stride_px``-th pixel exactly as the paper did, interpolate
    the pixels in between, and write the block's whole Zarr chunks.

Blocks are aligned to chunks, so no two tasks ever write the same chunk.  The
map is written to a temporary store and renamed into place when every block
has finished, so a map on disk is always complete.
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
from distributed import Client, as_completed

from . import __version__
from .frame import (
    ModelFrame,
    block_boxes,
    choose_frame,
    interpolate_grid,
    patch_rows,
    read_frame_window,
    stride_grid,
)
from .hematoxylin import (
    DEFAULT_MARGIN_UM,
    DEFAULT_MASK_MPP,
    DEFAULT_THRESHOLD_OD,
    blocks_with_hematoxylin,
    cells_of_box,
    hematoxylin_area_mm2,
    hematoxylin_map,
)
from .models import load_checkpoint, load_model, resolve_model
from .network import patch_grid_probabilities
from .outputs import write_json
from .slide import SlideError, SlideInfo, open_slide

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
    hematoxylin_mm2: float = 0.0
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


def block_probabilities(
    info: SlideInfo,
    frame: ModelFrame,
    box: tuple[int, int, int, int],
    checkpoints: Sequence[str],
    params: ProbmapParams,
) -> tuple[np.ndarray, int]:
    """P(lymphocyte center) for one model-frame box, exactly as the patch classifier gives it.

    Parameters
    ----------
    info, frame
        Slide and its model frame.
    box : (r0, r1, c0, c1)
        Model-frame rows ``r0:r1`` and columns ``c0:c1`` (global coordinates).
    checkpoints : sequence of str
        Checkpoint files of the model's members (their probabilities are averaged).
    params : ProbmapParams

    Returns
    -------
    prob : np.ndarray
        (r1 - r0, c1 - c0) float32.
    patches : int
        Patches classified (per member).
    """
    r0, r1, c0, c1 = box
    device = _auto_device(params.device)
    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    grid_r = stride_grid(r0, r1, params.stride_px)
    grid_c = stride_grid(c0, c1, params.stride_px)
    # The halo: 16 px before and 15 px after the first/last classified pixel.
    window = read_frame_window(info, frame, patch_rows(grid_r), patch_rows(grid_c))
    grid_prob = patch_grid_probabilities(
        _members(tuple(map(str, checkpoints)), device),
        window,
        stride_px=params.stride_px,
        mirror=params.mirror,
        batch_size=params.batch_size,
        device=device,
    )
    if params.stride_px == 1:
        return grid_prob, grid_prob.size
    return interpolate_grid(grid_prob, (grid_r, grid_c), box), grid_prob.size


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


def _map_attributes(info: SlideInfo, frame: ModelFrame, origin_rc, model: dict, params: ProbmapParams) -> dict:
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


@dataclass
class _SlideJob:
    result: SlideResult
    info: SlideInfo
    frame: ModelFrame
    origin_rc: tuple[int, int]
    boxes: list
    tmp_store: Path
    final_store: Path
    run_id: str
    started: float
    pending: int = 0
    failed: bool = False
    infer_seconds: float = 0.0
    mask_window: tuple = ((0, 0), (0, 0))  # (origin cell, whole-slide cell grid shape)
    manifest: object = None  # open append-only file of finished blocks

    @property
    def manifest_path(self) -> Path:
        return self.tmp_store.with_name(self.tmp_store.name + ".blocks")

    def finished_blocks(self) -> set[tuple[int, int]]:
        """Blocks recorded as written by an earlier, interrupted run with the same settings."""
        try:
            array = zarr.open_array(str(self.tmp_store), mode="r")
            same_run = dict(array.attrs)["wsi_lymph"].get("run_id") == self.run_id
            lines = self.manifest_path.read_text().splitlines() if same_run else []
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
            return set()
        # A line is only complete once its newline is written; a torn last line is ignored.
        return {tuple(map(int, line.split())) for line in lines if len(line.split()) == 2}

    def record(self, box: tuple[int, int, int, int]) -> None:
        self.manifest.write(f"{box[0]} {box[2]}\n")
        self.manifest.flush()
        os.fsync(self.manifest.fileno())


def run_probmaps(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: str = "janowczyk2016",
    mpp: float | None = None,
    params: ProbmapParams = ProbmapParams(),
    model_source: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[SlideResult]:
    """Compute ``OUT/<slide-name>/prob.zarr`` for every slide, all slides in one Dask graph.

    A slide that cannot be opened or fails during computation is reported in
    its :class:`SlideResult` (``status="failed"``, ``reason``); the others go on.

    Resuming: a slide whose map is complete is not recomputed (unless
    ``force``).  While a map is computed, every block that has been written is
    appended to a manifest beside the partial store; a run interrupted at any
    point (even by SIGKILL) and started again with the same settings
    recomputes only the blocks missing from the manifest.

    Parameters
    ----------
    client : distributed.Client
        Cluster to run on.
    slide_paths : sequence of path-like
        Slide files (expand folders with :func:`wsi_lymph.slide.find_slides`).
    out_dir : path-like
        Output folder; one sub-folder per slide.
    model : str
        Model name (``janowczyk2016``, ``janowczyk2016/fold3``) or checkpoint path.
    mpp : float, optional
        Level-0 µm/px for every slide, overriding the files.
    params : ProbmapParams
    model_source : str, optional
        Where to fetch the paper's models from if they are not cached.
    force : bool
        Recompute maps that are already complete, and ignore partial ones.
    progress : bool
        Show a progress bar (stderr).
    log : callable
        Receives one line per finished or failed slide.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_info = model_description(model, model_source)
    checkpoint_names = tuple(model_info["members"])
    resources = {"GPU": 1} if _cluster_has_gpus(client) else None

    results: list[SlideResult] = []
    jobs: dict[str, _SlideJob] = {}
    mask_futures = {}
    names_taken: set[str] = set()
    for path in slide_paths:
        name = _unique(output_name(path), names_taken)
        result = SlideResult(path=str(path), name=name)
        results.append(result)
        try:
            info = open_slide(path, mpp=mpp)
            frame = choose_frame(info, model_info["model_mpp"], model_info["source_scan_mpp"])
            r0, r1, c0, c1 = frame_region(frame, params.region_level0)
        except (SlideError, ValueError) as error:
            _fail(result, str(error), log)
            continue
        boxes = [(a + r0, b + r0, c + c0, d + c0) for a, b, c, d in block_boxes((r1 - r0, c1 - c0), params.block_px)]
        slide_dir = out_dir / name
        if not force and _reuse_finished(result, slide_dir, log):
            continue
        slide_dir.mkdir(parents=True, exist_ok=True)
        job = _SlideJob(
            result, info, frame, (r0, c0), boxes,
            tmp_store=slide_dir / ".prob.zarr.partial",
            final_store=slide_dir / "prob.zarr",
            run_id=_run_id(info, frame, (r0, r1, c0, c1), model_info, params),
            started=time.perf_counter(),
        )
        result.blocks_total = len(boxes)
        jobs[name] = job
        try:
            hmap, cell_mpp = hematoxylin_map(info, params.mask_mpp)
        except SlideError as error:
            _fail(result, str(error), log)
            del jobs[name]
            continue
        # Only the cells around the analysed region are read and deconvolved.
        top, bottom, left, right = cells_of_box((r0, r1, c0, c1), frame, cell_mpp, hmap.shape, params.margin_um)
        job.mask_window = ((top, left), hmap.shape)
        mask_futures[client.compute(hmap[top:bottom, left:right])] = (name, cell_mpp)

    bar = tqdm(total=0, unit="block", desc="probmap", disable=not progress, dynamic_ncols=True)
    block_futures = as_completed()
    for future in as_completed(list(mask_futures)):
        name, cell_mpp = mask_futures[future]
        job = jobs[name]
        try:
            hmap = future.result()
        except Exception as error:  # a worker-side read error of this slide only
            _fail(job.result, f"{job.info.path}: reading for the hematoxylin mask failed: {error}", log)
            continue
        job.result.hematoxylin_mm2 = hematoxylin_area_mm2(hmap, cell_mpp, params.hematoxylin_threshold_od)
        if params.skip_hematoxylin:
            origin_cells, slide_cells = job.mask_window
            keep = blocks_with_hematoxylin(
                hmap, cell_mpp, job.frame, job.boxes, params.hematoxylin_threshold_od, params.margin_um,
                origin_cells=origin_cells, slide_cells=slide_cells,
            )
        else:
            keep = np.ones(len(job.boxes), dtype=bool)
        job.result.blocks_skipped = int((~keep).sum())
        job.result.seconds["hematoxylin"] = round(time.perf_counter() - job.started, 3)
        (r0, c0), frame = job.origin_rc, job.frame
        finished = set() if force else job.finished_blocks()
        if not finished:
            job.manifest_path.unlink(missing_ok=True)
            attributes = _map_attributes(job.info, frame, job.origin_rc, model_info, params)
            attributes["wsi_lymph"]["run_id"] = job.run_id
            zarr.create_array(
                store=str(job.tmp_store),
                shape=(job.boxes[-1][1] - r0, job.boxes[-1][3] - c0),
                chunks=(params.chunk_px, params.chunk_px),
                dtype=params.dtype,
                fill_value=0,
                attributes=attributes,
                overwrite=True,
            )
        job.manifest = open(job.manifest_path, "a")  # noqa: SIM115 (closed when the slide ends)
        kept = [box for box, flag in zip(job.boxes, keep, strict=True) if flag and (box[0], box[2]) not in finished]
        job.result.blocks_resumed = int(keep.sum()) - len(kept)
        job.pending = len(kept)
        bar.total += len(kept)
        bar.refresh()
        for box in kept:
            key = (f"infer-{name}", box[0], box[2])
            block_futures.add(
                client.submit(
                    infer_block, job.info, frame, box, job.origin_rc, checkpoint_names, params,
                    str(job.tmp_store), key=key, resources=resources, pure=False,
                )
            )
        if not kept:
            _finish(job, log)

    for future in block_futures:
        name = future.key[0].removeprefix("infer-")
        job = jobs[name]
        bar.update(1)
        if job.failed:
            continue
        try:
            stats = future.result()
        except Exception as error:
            job.failed = True
            _fail(job.result, f"{job.info.path}: block {future.key[1:]} failed: {type(error).__name__}: {error}", log)
            job.manifest.close()  # the partial map and its manifest stay for a later resume
            continue
        job.record((future.key[1], 0, future.key[2], 0))
        job.result.patches += stats["patches"]
        job.infer_seconds += stats["seconds"]
        job.pending -= 1
        if job.pending == 0:
            _finish(job, log)
    bar.close()
    return results


def _finish(job: _SlideJob, log: Callable[[str], None]) -> None:
    result = job.result
    result.seconds["infer_task_sum"] = round(job.infer_seconds, 3)
    result.seconds["wall"] = round(time.perf_counter() - job.started, 3)
    if job.manifest is not None:
        job.manifest.close()
    replace_dir(job.tmp_store, job.final_store)
    job.manifest_path.unlink(missing_ok=True)
    result.status, result.output = "done", str(job.final_store)
    summary = asdict(result) | {"skipped_fraction": result.skipped_fraction}
    write_json(job.final_store.parent / "probmap.json", summary)
    log(
        f"{result.name}: done, {result.blocks_total} blocks, {result.skipped_fraction:.1%} skipped "
        f"(no hematoxylin), {result.patches} patches, {result.seconds['wall']:.1f} s -> {result.output}"
    )


def _reuse_finished(result: SlideResult, slide_dir: Path, log: Callable[[str], None]) -> bool:
    """Fill ``result`` from a complete earlier map in ``slide_dir``; False if there is none."""
    import json

    report = slide_dir / "probmap.json"
    if not (slide_dir / "prob.zarr").is_dir() or not report.is_file():
        return False
    earlier = json.loads(report.read_text())
    for key in ("blocks_total", "blocks_skipped", "patches", "hematoxylin_mm2", "seconds"):
        setattr(result, key, earlier.get(key, getattr(result, key)))
    result.status, result.output, result.reused = "done", str(slide_dir / "prob.zarr"), True
    log(f"{result.name}: already done in {slide_dir}, skipped (--force recomputes)")
    return True


def _run_id(info: SlideInfo, frame: ModelFrame, box, model: dict, params: ProbmapParams) -> str:
    """Fingerprint of everything that determines the map's values (not where or how fast it runs)."""
    import hashlib
    import json

    settings = asdict(params) | {"device": None, "torch_threads": None}
    payload = [info.path, info.mpp, frame.attrs(), list(box), model["sha256"], settings]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fail(result: SlideResult, reason: str, log: Callable[[str], None]) -> None:
    result.status, result.reason = "failed", reason
    log(f"{result.name}: FAILED: {reason}")


def _unique(name: str, taken: set[str]) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    taken.add(candidate)
    return candidate


def _cluster_has_gpus(client: Client) -> bool:
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    return any(worker.get("resources", {}).get("GPU", 0) > 0 for worker in workers)


def open_probmap(path: str | os.PathLike):
    """Open a stored map lazily: returns (dask array of P as float32, attributes dict)."""
    import dask.array as da

    array = zarr.open_array(str(path), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    prob = da.from_zarr(array).astype(np.float32) * np.float32(attrs["value_scale"])
    return prob, attrs
