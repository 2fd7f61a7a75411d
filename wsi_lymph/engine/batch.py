"""A batch of slides as one stream of Dask tasks: stain map -> probability map -> peaks -> outputs.

Every slide goes through the same stages, named as the dashboard shows them:

``read-*``, ``hematoxylin-*``
    low-resolution stain map of the analysed region (:mod:`wsi_lymph.detection.hematoxylin`);
    it decides which blocks can hold lymphocytes and gives the tissue area;
``infer-*``
    one task per kept block, writing whole chunks of the slide's Zarr map (:func:`infer_block`);
``peaks-*``
    blockwise smoothing, candidate linking and labelling of the finished map,
    only over the peak blocks that can hold centres (:mod:`wsi_lymph.engine.centres`);
``write-*``
    the slide's outputs (:func:`wsi_lymph.io.slide_outputs.write_slide_outputs`).

The driver reacts to finished tasks as they arrive, so one slide's peaks and
outputs run while the next slide's blocks are still being classified.  Memory
stays bounded whatever the batch or slide size: at most ``max_slides`` slides
are open at once, and block tasks are submitted from a queue that keeps at
most ``max_blocks`` of them on the cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import zarr
from distributed import Client, Future, as_completed
from tqdm import tqdm

from wsi_lymph import __version__
from wsi_lymph.constants import DEFAULT_MODEL, PAPER_STAIN_REFERENCE
from wsi_lymph.detection.hematoxylin import StainSummary, blocks_with_hematoxylin, stain_summary
from wsi_lymph.detection.inference import block_probabilities
from wsi_lymph.detection.peaks import PEAK_BLOCK_PX
from wsi_lymph.detection.stain import LabStatistics, ReinhardTransform, slide_lab_statistics
from wsi_lymph.engine.centres import PeakStage, centres_of_stage, new_task_token, plan_peaks, submit_peak_blocks
from wsi_lymph.engine.cluster import has_gpu_workers, worker_threads
from wsi_lymph.engine.params import PeakOptions, ProbmapParams, SlideResult
from wsi_lymph.io.outputs import write_json
from wsi_lymph.io.probmap_store import (
    STORE_DTYPES,
    computed_blocks_attr,
    create_partial_store,
    replace_dir,
    write_block,
)
from wsi_lymph.io.slide_outputs import write_slide_outputs
from wsi_lymph.models.architectures import architecture_of
from wsi_lymph.models.registry import load_model, resolve_model
from wsi_lymph.slides.frame import ModelFrame, block_boxes, choose_frame, frame_region
from wsi_lymph.slides.reader import SlideError, SlideInfo, open_slide

Logger = Callable[[str], None]
Box = tuple[int, int, int, int]  # model-frame (r0, r1, c0, c1)


@dataclass
class _Slide:
    """Driver-side state of one slide while it is in flight."""

    result: SlideResult
    info: SlideInfo
    frame: ModelFrame
    box: Box  # analysed model-frame region
    boxes: list[Box]  # its inference blocks, row-major
    slide_dir: Path
    run_id: str
    started: float
    keep: np.ndarray | None = None  # per block of `boxes`: classified (True) or left at P = 0
    queue: deque[Box] = field(default_factory=deque)  # kept blocks not yet submitted
    pending: int = 0  # kept blocks not yet finished
    failed: bool = False
    infer_seconds: float = 0.0
    manifest: TextIO | None = None  # open append-only file of finished blocks
    bar: tqdm | None = None
    peaks: PeakStage | None = None  # the peak stage, once planned
    peaks_started: float = 0.0
    write_started: float = 0.0
    # Stain normalisation of this slide's pixels, once its colour statistics are measured (None: none).
    pixel_transform: ReinhardTransform | None = None
    needs_statistics: bool = False  # blocks wait for the slide's colour statistics
    todo: list[Box] | None = None  # blocks to infer, once the stain map has chosen them
    # Task keys: unique per slide in flight.
    token: str = field(default_factory=new_task_token)

    @property
    def name(self) -> str:
        return self.result.name

    @property
    def tmp_store(self) -> Path:
        return self.slide_dir / ".prob.zarr.partial"

    @property
    def final_store(self) -> Path:
        return self.slide_dir / "prob.zarr"

    @property
    def manifest_path(self) -> Path:
        return self.slide_dir / ".prob.zarr.partial.blocks"

    @property
    def origin_rc(self) -> tuple[int, int]:
        return self.box[0], self.box[2]

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

    def record(self, r0: int, c0: int) -> None:
        self.manifest.write(f"{r0} {c0}\n")
        self.manifest.flush()
        os.fsync(self.manifest.fileno())


# ------------------------------------------------------------------ the steps of one slide
def _plan_slide(result: SlideResult, out_dir: Path, mpp: float | None, model_info: dict,
                params: ProbmapParams) -> _Slide:
    """Open a slide, bring it to the model frame and tile its analysed region into inference blocks."""
    info = open_slide(result.path, mpp=mpp)
    frame = choose_frame(info, model_info["model_mpp"], model_info["source_scan_mpp"])
    box = frame_region(frame, params.region_level0)
    r0, r1, c0, c1 = box
    boxes = [(a + r0, b + r0, c + c0, d + c0) for a, b, c, d in block_boxes((r1 - r0, c1 - c0), params.block_px)]
    slide = _Slide(result, info, frame, box, boxes, out_dir / result.name,
                   run_id=run_fingerprint(info, frame, box, model_info, params), started=time.perf_counter())
    result.blocks_total = len(boxes)
    return slide


def _load_earlier_map(slide: _Slide) -> bool:
    """Take over the report of a map completed by an earlier run; False where there is none."""
    result = slide.result
    report = slide.slide_dir / "probmap.json"
    if not slide.final_store.is_dir() or not report.is_file():
        return False
    earlier = json.loads(report.read_text())
    for key in ("blocks_total", "blocks_skipped", "patches", "hematoxylin_mm2", "tissue_mm2", "seconds"):
        setattr(result, key, earlier.get(key, getattr(result, key)))
    result.output, result.reused = str(slide.final_store), True
    return True


def _choose_blocks(slide: _Slide, summary: StainSummary, params: ProbmapParams) -> None:
    """Record the stain map's areas and which blocks are classified (all, unless blocks without hematoxylin skip)."""
    result = slide.result
    result.hematoxylin_mm2, result.tissue_mm2 = summary.hematoxylin_mm2, summary.tissue_mm2
    if params.skip_hematoxylin:
        slide.keep = blocks_with_hematoxylin(summary, slide.frame, slide.boxes, params.margin_um)
    else:
        slide.keep = np.ones(len(slide.boxes), dtype=bool)
    result.blocks_skipped = int((~slide.keep).sum())


def _open_partial_map(slide: _Slide, model_info: dict, params: ProbmapParams, force: bool) -> list[Box]:
    """Create the slide's partial map (or resume the one an interrupted run left); return the blocks to infer."""
    finished = set() if force else slide.finished_blocks()
    if not finished:
        slide.manifest_path.unlink(missing_ok=True)
        attributes = map_attributes(slide.info, slide.frame, slide.origin_rc, model_info, params)
        attributes["wsi_lymph"]["run_id"] = slide.run_id
        create_partial_store(slide.tmp_store, slide.boxes, slide.origin_rc, params.chunk_px, params.dtype, attributes)
    slide.manifest = open(slide.manifest_path, "a")  # noqa: SIM115 (closed when the slide ends)
    todo = [b for b, flag in zip(slide.boxes, slide.keep, strict=True) if flag and (b[0], b[2]) not in finished]
    slide.result.blocks_resumed = int(slide.keep.sum()) - len(todo)
    return todo


def _publish_map(slide: _Slide, params: ProbmapParams) -> None:
    """Record the classified blocks in the map, move it into place and write its report ``probmap.json``."""
    result = slide.result
    slide.manifest.close()
    array = zarr.open_array(str(slide.tmp_store), mode="r+")
    array.attrs["wsi_lymph"] = dict(array.attrs["wsi_lymph"]) | {
        "computed_blocks": computed_blocks_attr(slide.boxes, slide.keep, slide.origin_rc, params.block_px),
        "stain_normalisation": slide.pixel_transform.as_dict() if slide.pixel_transform else {"method": "none"},
    }
    replace_dir(slide.tmp_store, slide.final_store)
    slide.manifest_path.unlink(missing_ok=True)
    result.output = str(slide.final_store)
    # The map's own report: the map is done even if peaks and outputs are still to come.
    write_json(slide.slide_dir / "probmap.json",
               asdict(result) | {"status": "done", "skipped_fraction": result.skipped_fraction})


# ------------------------------------------------------------------ the driver's pieces
class _TaskStream:
    """Futures taken in the order they finish, each with the handler it was watched with."""

    def __init__(self) -> None:
        self.futures = as_completed()
        self.handlers: dict[int, tuple[Future, Callable[[Future], None]]] = {}

    def watch(self, future: Future, handler: Callable[[Future], None]) -> None:
        self.handlers[id(future)] = (future, handler)
        self.futures.add(future)

    def __iter__(self) -> Iterator[tuple[Callable[[Future], None], Future]]:
        for future in self.futures:
            _, handler = self.handlers.pop(id(future))
            yield handler, future


class _Bars:
    """Progress bars on stderr: the batch's at the top, one per open slide below it (none when disabled)."""

    def __init__(self, enabled: bool, max_slides: int) -> None:
        self.enabled = enabled
        self.positions = list(range(1, max_slides + 1))
        self.overall: tqdm | None = None

    def start(self, slides: int) -> None:
        self.overall = tqdm(total=slides, unit="slide", desc="batch", disable=not self.enabled, dynamic_ncols=True,
                            position=0)

    def slide_ended(self) -> None:
        self.overall.update(1)

    def open(self, slide: _Slide) -> None:
        if self.enabled:
            slide.bar = tqdm(total=0, unit="block", desc=slide.name[:24], leave=False, dynamic_ncols=True,
                             position=self.positions.pop(0))

    def stage(self, slide: _Slide, name: str, blocks: int | None = None) -> None:
        """Show the slide's stage; ``blocks`` restarts its bar at that many steps."""
        if slide.bar is not None:
            if blocks is not None:
                slide.bar.reset(total=blocks)
            slide.bar.set_postfix_str(name)

    def step(self, slide: _Slide) -> None:
        if slide.bar is not None:
            slide.bar.update(1)

    def close(self, slide: _Slide) -> None:
        if slide.bar is not None:
            self.positions.append(slide.bar.pos if slide.bar.pos is not None else 1)
            slide.bar.close()
            slide.bar = None

    def finish(self) -> None:
        self.overall.close()


class _Batch:
    """The driver's event loop: every finished future is handed to the handler registered with it."""

    def __init__(self, client: Client, out_dir: Path, model: str, mpp: float | None, params: ProbmapParams,
                 peaks: PeakOptions | None, model_source: str | None, force: bool, progress: bool, log: Logger,
                 max_slides: int, max_blocks: int | None) -> None:
        self.client, self.out_dir, self.mpp, self.params = client, out_dir, mpp, params
        self.peak_options, self.force, self.log = peaks, force, log
        self.model_info = model_description(model, model_source)
        self.checkpoints = tuple(self.model_info["members"])
        self.resources = {"GPU": 1} if has_gpu_workers(client) else None
        self.max_slides = max_slides
        self.max_blocks = max_blocks or max(32, 4 * worker_threads(client))
        self.tasks = _TaskStream()
        self.bars = _Bars(progress, max_slides)
        self.open: list[_Slide] = []
        self.in_flight_blocks = 0
        self.names_taken: set[str] = set()

    # -------------------------------------------------------------- plumbing
    def run(self, slide_paths: Sequence[str | os.PathLike]) -> list[SlideResult]:
        waiting = deque(slide_paths)
        results: list[SlideResult] = []
        self.bars.start(len(waiting))
        self._open_more(waiting, results)
        for handler, future in self.tasks:
            handler(future)
            self._submit_blocks()
            self._open_more(waiting, results)
        self.bars.finish()
        return results

    def _open_more(self, waiting: deque, results: list[SlideResult]) -> None:
        while waiting and len(self.open) < self.max_slides:
            path = waiting.popleft()
            result = SlideResult(path=str(path), name=_unique(output_name(path), self.names_taken))
            results.append(result)
            try:
                self._open_slide(result)
            except Exception as error:  # one slide's failure must not end the batch
                self._fail_result(result, _describe(error, result.path))
        # A batch whose every slide was skipped or failed leaves nothing to wait for.

    def _submit_blocks(self) -> None:
        for slide in self.open:
            while slide.queue and self.in_flight_blocks < self.max_blocks:
                box = slide.queue.popleft()
                future = self.client.submit(
                    infer_block, slide.info, slide.frame, box, slide.origin_rc, self.checkpoints, self.params,
                    str(slide.tmp_store), slide.pixel_transform, key=(f"infer-{slide.token}", box[0], box[2]),
                    resources=self.resources, pure=False,
                )
                self.in_flight_blocks += 1
                self.tasks.watch(future, lambda f, s=slide, b=box: self._on_block(s, b, f))

    # -------------------------------------------------------------- stage 0: open
    def _open_slide(self, result: SlideResult) -> None:
        slide = _plan_slide(result, self.out_dir, self.mpp, self.model_info, self.params)
        if not self.force and _load_earlier_map(slide):
            return self._reuse(slide)
        slide.slide_dir.mkdir(parents=True, exist_ok=True)
        self.open.append(slide)
        self.bars.open(slide)
        self.bars.stage(slide, "stain map")
        params = self.params
        parts, assemble = stain_summary(slide.info, slide.frame, slide.box, mask_mpp=params.mask_mpp,
                                        threshold_od=params.hematoxylin_threshold_od, margin_um=params.margin_um)
        # Unfused, so the dashboard shows the reads and the deconvolution as their own stages.
        futures = self.client.compute(parts, optimize_graph=False)
        future = self.client.submit(assemble, *futures, key=f"hematoxylin-summary-{slide.token}", pure=False)
        self.tasks.watch(future, lambda f: self._on_stain_map(slide, f))
        if params.stain_norm_for(self.model_info) == "reinhard":
            slide.needs_statistics = True
            future = self.client.submit(slide_lab_statistics, slide.info, key=f"stain-statistics-{slide.token}",
                                        pure=False)
            self.tasks.watch(future, lambda f: self._on_stain_statistics(slide, f))

    def _reuse(self, slide: _Slide) -> None:
        """Skip a slide finished by an earlier run, or go on to the centres of its complete map."""
        result = slide.result
        if self.peak_options is None or (slide.slide_dir / "summary.json").is_file():
            result.status = "done"
            self.log(f"{result.name}: already done in {slide.slide_dir}, skipped (--force recomputes)")
            self.bars.slide_ended()
            return
        self.log(f"{result.name}: map already complete in {slide.slide_dir}, finding centres")
        self.open.append(slide)
        self._start_peaks(slide)

    # -------------------------------------------------------------- stage 1: stain map
    def _on_stain_map(self, slide: _Slide, future: Future) -> None:
        if slide.failed:  # its colour statistics failed first
            return
        try:
            summary = future.result()
        except Exception as error:  # a worker-side read error of this slide only
            return self._fail(slide, f"{slide.info.path}: reading for the hematoxylin mask failed: {error}")
        _choose_blocks(slide, summary, self.params)
        slide.result.seconds["hematoxylin"] = round(time.perf_counter() - slide.started, 3)
        slide.todo = _open_partial_map(slide, self.model_info, self.params, self.force)
        self._queue_blocks(slide)

    def _on_stain_statistics(self, slide: _Slide, future: Future) -> None:
        if slide.failed:
            return
        try:
            statistics = future.result()
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: measuring its colours for stain normalisation failed: "
                                     f"{_describe(error)}")
        reference = LabStatistics.from_dict(self.model_info["stain_reference"])
        slide.pixel_transform = ReinhardTransform(statistics, reference)
        slide.needs_statistics = False
        self._queue_blocks(slide)

    def _queue_blocks(self, slide: _Slide) -> None:
        """Queue the chosen blocks once both the stain map and (if needed) the colour statistics are in."""
        if slide.todo is None or slide.needs_statistics:
            return
        slide.queue.extend(slide.todo)
        slide.pending = len(slide.todo)
        self.bars.stage(slide, "infer", blocks=len(slide.todo))
        if not slide.todo:
            self._finish_map(slide)

    # -------------------------------------------------------------- stage 2: infer
    def _on_block(self, slide: _Slide, box: Box, future: Future) -> None:
        self.in_flight_blocks -= 1
        if slide.failed:
            return
        try:
            stats = future.result()
        except Exception as error:
            slide.queue.clear()
            slide.manifest.close()  # the partial map and its manifest stay for a later resume
            return self._fail(slide, f"{slide.info.path}: block (row {box[0]}, col {box[2]}) failed: "
                                     f"{type(error).__name__}: {error}")
        slide.record(box[0], box[2])
        slide.result.patches += stats["patches"]
        slide.infer_seconds += stats["seconds"]
        slide.pending -= 1
        self.bars.step(slide)
        if slide.pending == 0:
            self._finish_map(slide)

    def _finish_map(self, slide: _Slide) -> None:
        result = slide.result
        result.seconds["infer_task_sum"] = round(slide.infer_seconds, 3)
        result.seconds["map_wall"] = round(time.perf_counter() - slide.started, 3)
        _publish_map(slide, self.params)
        self.log(
            f"{result.name}: map done, {result.blocks_total} blocks, {result.skipped_fraction:.1%} skipped "
            f"(no hematoxylin), {result.patches} patches, {result.seconds['map_wall']:.1f} s -> {result.output}"
        )
        if self.peak_options is None:
            self._done(slide)
        else:
            self._start_peaks(slide)

    # -------------------------------------------------------------- stage 3: peaks
    def _start_peaks(self, slide: _Slide) -> None:
        self.bars.stage(slide, "peaks")
        slide.peaks_started = time.perf_counter()
        options = self.peak_options
        try:
            slide.peaks = plan_peaks(slide.final_store, options.threshold, options.peak_block_px)
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        if slide.peaks.complete:  # no block can hold a centre
            return self._on_peaks_complete(slide)
        for index, future in submit_peak_blocks(self.client, slide.peaks, slide.token):
            self.tasks.watch(future, lambda f, s=slide, i=index: self._on_peak_block(s, i, f))

    def _on_peak_block(self, slide: _Slide, index: tuple[int, int], future: Future) -> None:
        if slide.failed:
            return
        try:
            slide.peaks.summaries[index] = future.result()
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        if slide.peaks.complete:
            self._on_peaks_complete(slide)

    def _on_peaks_complete(self, slide: _Slide) -> None:
        result = slide.result
        try:
            table = centres_of_stage(slide.peaks)
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        result.seconds["peaks"] = round(time.perf_counter() - slide.peaks_started, 3)
        self.bars.stage(slide, "write")
        slide.write_started = time.perf_counter()
        future = self.client.submit(
            write_slide_outputs, slide.slide_dir, result.name, result.path, slide.peaks.attrs, table,
            asdict(result), asdict(self.params), key=f"write-{slide.token}", pure=False,
        )
        self.tasks.watch(future, lambda f: self._on_written(slide, f))

    # -------------------------------------------------------------- stage 4: write
    def _on_written(self, slide: _Slide, future: Future) -> None:
        try:
            count, area_mm2 = future.result()
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: writing outputs failed: {_describe(error)}")
        slide.result.seconds["write"] = round(time.perf_counter() - slide.write_started, 3)
        density = f"{count / area_mm2:.0f} per mm² of tissue" if area_mm2 else "no tissue"
        self.log(f"{slide.name}: {count} lymphocytes, {density}")
        self._done(slide)

    # -------------------------------------------------------------- endings
    def _done(self, slide: _Slide) -> None:
        slide.result.status = "done"
        slide.result.seconds["wall"] = round(time.perf_counter() - slide.started, 3)
        self._close(slide)

    def _fail(self, slide: _Slide, reason: str) -> None:
        slide.failed = True
        slide.queue.clear()
        self._fail_result(slide.result, reason)
        self._close(slide)

    def _fail_result(self, result: SlideResult, reason: str) -> None:
        result.status, result.reason = "failed", reason
        self.log(f"{result.name}: FAILED: {reason}")
        if not any(s.result is result for s in self.open):
            self.bars.slide_ended()

    def _close(self, slide: _Slide) -> None:
        if slide in self.open:
            self.open.remove(slide)
            self.bars.slide_ended()
        if slide.manifest is not None and not slide.manifest.closed:
            slide.manifest.close()
        self.bars.close(slide)


def run_batch(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    mpp: float | None = None,
    params: ProbmapParams | None = None,
    peaks: PeakOptions | None = None,
    model_source: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Logger = print,
    max_slides: int = 4,
    max_blocks: int | None = None,
) -> list[SlideResult]:
    """Run every slide through the stages of this module on ``client``; see the module docstring.

    Parameters
    ----------
    client : distributed.Client
        Cluster to run on.
    slide_paths : sequence of path-like
        Slide files (expand folders with :func:`wsi_lymph.slides.reader.find_slides`).
    out_dir : path-like
        Output folder; one sub-folder per slide (``OUT/<slide-name>/``).
    model : str
        Model name (the default student, ``janowczyk2016``, ``janowczyk2016/fold3``) or checkpoint path.
    mpp : float, optional
        Level-0 µm/px for every slide, overriding the files.
    params : ProbmapParams
    peaks : PeakOptions, optional
        Find centres and write the outputs; None stops at the probability maps.
    model_source : str, optional
        Where to fetch the paper's models from if they are not cached.
    force : bool
        Recompute slides already finished, and ignore partial maps.
    progress : bool
        Progress bars on stderr: one for the batch, one per open slide.
    log : callable
        Receives one line per slide event (map done, centres found, failure).
    max_slides : int
        Slides open at once.
    max_blocks : int, optional
        Block tasks on the cluster at once (default: 4 per worker thread, at least 32).

    Returns
    -------
    list of SlideResult
        One per slide, in input order; failures carry ``status="failed"`` and the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = _Batch(client, out_dir, model, mpp, params or ProbmapParams(), peaks, model_source, force, progress, log,
                   max_slides, max_blocks)
    return batch.run(slide_paths)


def _describe(error: BaseException, path: str | None = None) -> str:
    text = str(error) if isinstance(error, SlideError | ValueError) else f"{type(error).__name__}: {error}"
    return text if path is None or path in text else f"{path}: {text}"


def _unique(name: str, taken: set[str]) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    taken.add(candidate)
    return candidate


# ------------------------------------------------------------------ identities and the infer task
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


def model_description(model: str, source: str | None = None) -> dict:
    """Identity of a model for map attributes: name, member files, their sha256 and how to feed them.

    Loading through :func:`wsi_lymph.models.registry.load_model` also checks that an
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
        "evaluation": architecture_of(loaded.members[0][0]).evaluation,
        "stain_norm": loaded.meta.get("stain_norm", "none"),
        "stain_reference": loaded.meta.get("stain_reference", PAPER_STAIN_REFERENCE),
    }


def map_attributes(info: SlideInfo, frame: ModelFrame, origin_rc, model: dict, params: ProbmapParams) -> dict:
    """The ``wsi_lymph`` attributes of a slide's map: what it holds, where it lies, how it was computed."""
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


def run_fingerprint(info: SlideInfo, frame: ModelFrame, box, model: dict, params: ProbmapParams) -> str:
    """Fingerprint of everything that determines a map's values (not where or how fast it runs)."""
    settings = asdict(params) | {"device": None, "torch_threads": None}
    payload = [info.path, info.mpp, frame.attrs(), list(box), model["sha256"], settings]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def infer_block(
    info: SlideInfo,
    frame: ModelFrame,
    box: tuple[int, int, int, int],
    origin_rc: tuple[int, int],
    checkpoints: Sequence[str],
    params: ProbmapParams,
    store_path: str,
    pixel_transform: ReinhardTransform | None = None,
) -> dict:
    """One ``infer`` task: compute a block and write it into its (whole) chunks of the Zarr map; return stats."""
    start = time.perf_counter()
    prob, patches = block_probabilities(
        info, frame, box, checkpoints, stride_px=params.stride_px, mirror=params.mirror,
        batch_size=params.batch_size, device=params.device, torch_threads=params.torch_threads,
        pixel_transform=pixel_transform,
    )
    write_block(store_path, box, origin_rc, prob, params.dtype)
    return {"patches": patches, "seconds": time.perf_counter() - start}


def run_probmaps(client: Client, slide_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 **options) -> list[SlideResult]:
    """Compute ``OUT/<slide-name>/prob.zarr`` for every slide; see :func:`run_batch`.

    A slide that cannot be opened or fails during computation is reported in
    its :class:`SlideResult` (``status="failed"``, ``reason``); the others go on.
    A slide whose map is complete is not recomputed (unless ``force``); an
    interrupted one resumes from the manifest of finished blocks kept beside
    its partial store, recomputing only the blocks missing from it.
    """
    return run_batch(client, slide_paths, out_dir, peaks=None, **options)


def run_detect(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    peak_block_px: int = PEAK_BLOCK_PX,
    **options,
) -> list[SlideResult]:
    """Maps, centres and outputs for every slide in one stream of tasks; writes ``OUT/batch.json``.

    Per slide in ``OUT/<slide-name>/``: ``prob.zarr``, ``centers.csv`` (+ ``centers.parquet``),
    ``centers.geojson``, ``summary.json``, ``overlay.png``, ``density.png``.  Failed slides keep
    their reason; the others finish.  Slides already finished are skipped unless ``force``; an
    interrupted one resumes.  ``options`` are those of :func:`run_batch`.
    """
    started = time.perf_counter()
    results = run_batch(client, slide_paths, out_dir, peaks=PeakOptions(threshold, peak_block_px), **options)
    write_json(Path(out_dir) / "batch.json", {
        "slides": [
            {"path": r.path, "name": r.name, "status": r.status, "reason": r.reason, "timings_s": r.seconds}
            for r in results
        ],
        "done": sum(r.status == "done" for r in results),
        "failed": sum(r.status != "done" for r in results),
        "wall_s": round(time.perf_counter() - started, 3),
    })
    return results

