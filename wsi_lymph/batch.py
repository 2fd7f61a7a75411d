"""A batch of slides as one stream of Dask tasks: stain map -> probability map -> peaks -> outputs.

Every slide goes through the same stages, named as the dashboard shows them:

``read-*``, ``hematoxylin-*``
    low-resolution stain map of the analysed region (:mod:`wsi_lymph.hematoxylin`);
    it decides which blocks can hold lymphocytes and gives the tissue area;
``infer-*``
    one task per kept block, writing whole chunks of the slide's Zarr map
    (:func:`wsi_lymph.probmap.infer_block`);
``peaks-*``
    blockwise smoothing, candidate linking and labelling of the finished map,
    only over the peak blocks that can hold centres (:mod:`wsi_lymph.peaks`);
``write-*``
    the slide's outputs (:func:`wsi_lymph.outputs.write_slide_outputs`).

The driver reacts to finished tasks as they arrive, so one slide's peaks and
outputs run while the next slide's blocks are still being classified.  Memory
stays bounded whatever the batch or slide size: at most ``max_slides`` slides
are open at once, and block tasks are submitted from a queue that keeps at
most ``max_blocks`` of them on the cluster.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, Future, as_completed

from .cluster import has_gpu_workers, worker_threads
from .frame import ModelFrame, block_boxes, choose_frame
from .hematoxylin import blocks_with_hematoxylin, stain_summary
from .probmap import (
    ProbmapParams,
    SlideResult,
    computed_blocks_attr,
    create_partial_store,
    frame_region,
    infer_block,
    map_attributes,
    model_description,
    output_name,
    replace_dir,
    run_fingerprint,
)
from .slide import SlideError, SlideInfo, open_slide

Logger = Callable[[str], None]


@dataclass(frozen=True)
class PeakOptions:
    """Peak detection after the map (``wsi-lymph detect``); None in a batch means maps only.

    Attributes
    ----------
    threshold : float or None
        Threshold on smoothed P; None = the model's own (0.7706 for the paper's).
    """

    threshold: float | None = None


@dataclass
class _Slide:
    """Driver-side state of one slide while it is in flight."""

    result: SlideResult
    info: SlideInfo
    frame: ModelFrame
    box: tuple[int, int, int, int]  # analysed model-frame region (r0, r1, c0, c1)
    boxes: list
    slide_dir: Path
    run_id: str
    started: float
    keep: np.ndarray | None = None
    queue: deque = field(default_factory=deque)  # kept blocks not yet submitted
    pending: int = 0  # kept blocks not yet finished
    failed: bool = False
    infer_seconds: float = 0.0
    manifest: object = None  # open append-only file of finished blocks
    bar: object = None
    peaks: dict = field(default_factory=dict)
    # Task keys: unique per slide in flight; a hex word with a digit, so the dashboard's prefix is the stage.
    token: str = field(default_factory=lambda: "0" + uuid.uuid4().hex[:15])

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


class _Batch:
    """The driver's event loop: every finished future is handed to the handler registered with it."""

    def __init__(self, client: Client, out_dir: Path, model: str, mpp: float | None, params: ProbmapParams,
                 peaks: PeakOptions | None, model_source: str | None, force: bool, progress: bool, log: Logger,
                 max_slides: int, max_blocks: int | None) -> None:
        self.client, self.out_dir, self.mpp, self.params = client, out_dir, mpp, params
        self.peak_options, self.force, self.progress, self.log = peaks, force, progress, log
        self.model_info = model_description(model, model_source)
        self.checkpoints = tuple(self.model_info["members"])
        self.resources = {"GPU": 1} if has_gpu_workers(client) else None
        self.max_slides = max_slides
        self.max_blocks = max_blocks or max(32, 4 * worker_threads(client))
        self.futures = as_completed()
        self.handlers: dict[int, tuple[Future, Callable[[Future], None]]] = {}
        self.open: list[_Slide] = []
        self.in_flight_blocks = 0
        self.names_taken: set[str] = set()
        self.bar_positions = list(range(1, max_slides + 1))

    # -------------------------------------------------------------- plumbing
    def watch(self, future: Future, handler: Callable[[Future], None]) -> None:
        self.handlers[id(future)] = (future, handler)
        self.futures.add(future)

    def run(self, slide_paths: Sequence[str | os.PathLike]) -> list[SlideResult]:
        from tqdm import tqdm

        waiting = deque(slide_paths)
        results: list[SlideResult] = []
        self.overall = tqdm(total=len(waiting), unit="slide", desc="batch", disable=not self.progress,
                            dynamic_ncols=True, position=0)
        self._open_more(waiting, results)
        for future in self.futures:
            _, handler = self.handlers.pop(id(future))
            handler(future)
            self._submit_blocks()
            self._open_more(waiting, results)
        self.overall.close()
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
                    str(slide.tmp_store), key=(f"infer-{slide.token}", box[0], box[2]), resources=self.resources,
                    pure=False,
                )
                self.in_flight_blocks += 1
                self.watch(future, lambda f, s=slide, b=box: self._on_block(s, b, f))

    # -------------------------------------------------------------- stage 0: open
    def _open_slide(self, result: SlideResult) -> None:
        params = self.params
        info = open_slide(result.path, mpp=self.mpp)
        frame = choose_frame(info, self.model_info["model_mpp"], self.model_info["source_scan_mpp"])
        box = frame_region(frame, params.region_level0)
        r0, r1, c0, c1 = box
        boxes = [(a + r0, b + r0, c + c0, d + c0) for a, b, c, d in block_boxes((r1 - r0, c1 - c0), params.block_px)]
        slide_dir = self.out_dir / result.name
        slide = _Slide(result, info, frame, box, boxes, slide_dir,
                       run_id=run_fingerprint(info, frame, box, self.model_info, params), started=time.perf_counter())
        result.blocks_total = len(boxes)
        if not self.force and self._reuse(slide):
            return
        slide_dir.mkdir(parents=True, exist_ok=True)
        self.open.append(slide)
        if self.progress:
            from tqdm import tqdm

            slide.bar = tqdm(total=0, unit="block", desc=result.name[:24], leave=False, dynamic_ncols=True,
                             position=self.bar_positions.pop(0))
            slide.bar.set_postfix_str("stain map")
        parts, assemble = stain_summary(info, frame, box, mask_mpp=params.mask_mpp,
                                        threshold_od=params.hematoxylin_threshold_od, margin_um=params.margin_um)
        # Unfused, so the dashboard shows the reads and the deconvolution as their own stages.
        futures = self.client.compute(parts, optimize_graph=False)
        future = self.client.submit(assemble, *futures, key=f"hematoxylin-summary-{slide.token}", pure=False)
        self.watch(future, lambda f: self._on_stain_map(slide, f))

    def _reuse(self, slide: _Slide) -> bool:
        """Skip or shortcut a slide finished (fully, or up to its map) by an earlier run."""
        result = slide.result
        report = slide.slide_dir / "probmap.json"
        if not slide.final_store.is_dir() or not report.is_file():
            return False
        earlier = json.loads(report.read_text())
        for key in ("blocks_total", "blocks_skipped", "patches", "hematoxylin_mm2", "tissue_mm2", "seconds"):
            setattr(result, key, earlier.get(key, getattr(result, key)))
        result.output, result.reused = str(slide.final_store), True
        if self.peak_options is None or (slide.slide_dir / "summary.json").is_file():
            result.status = "done"
            self.log(f"{result.name}: already done in {slide.slide_dir}, skipped (--force recomputes)")
            self.overall.update(1)
            return True
        self.log(f"{result.name}: map already complete in {slide.slide_dir}, finding centres")
        self.open.append(slide)
        self._start_peaks(slide)
        return True

    # -------------------------------------------------------------- stage 1: stain map
    def _on_stain_map(self, slide: _Slide, future: Future) -> None:
        params, result = self.params, slide.result
        try:
            summary = future.result()
        except Exception as error:  # a worker-side read error of this slide only
            return self._fail(slide, f"{slide.info.path}: reading for the hematoxylin mask failed: {error}")
        result.hematoxylin_mm2, result.tissue_mm2 = summary.hematoxylin_mm2, summary.tissue_mm2
        if params.skip_hematoxylin:
            keep = blocks_with_hematoxylin(summary, slide.frame, slide.boxes, params.margin_um)
        else:
            keep = np.ones(len(slide.boxes), dtype=bool)
        slide.keep = keep
        result.blocks_skipped = int((~keep).sum())
        result.seconds["hematoxylin"] = round(time.perf_counter() - slide.started, 3)
        finished = set() if self.force else slide.finished_blocks()
        if not finished:
            slide.manifest_path.unlink(missing_ok=True)
            attributes = map_attributes(slide.info, slide.frame, slide.origin_rc, self.model_info, params)
            attributes["wsi_lymph"]["run_id"] = slide.run_id
            create_partial_store(slide.tmp_store, slide.boxes, slide.origin_rc, params, attributes)
        slide.manifest = open(slide.manifest_path, "a")  # noqa: SIM115 (closed when the slide ends)
        todo = [b for b, flag in zip(slide.boxes, keep, strict=True) if flag and (b[0], b[2]) not in finished]
        result.blocks_resumed = int(keep.sum()) - len(todo)
        slide.queue.extend(todo)
        slide.pending = len(todo)
        if slide.bar is not None:
            slide.bar.reset(total=len(todo))
            slide.bar.set_postfix_str("infer")
        if not todo:
            self._finish_map(slide)

    # -------------------------------------------------------------- stage 2: infer
    def _on_block(self, slide: _Slide, box: tuple, future: Future) -> None:
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
        if slide.bar is not None:
            slide.bar.update(1)
        if slide.pending == 0:
            self._finish_map(slide)

    def _finish_map(self, slide: _Slide) -> None:
        result = slide.result
        result.seconds["infer_task_sum"] = round(slide.infer_seconds, 3)
        result.seconds["map_wall"] = round(time.perf_counter() - slide.started, 3)
        slide.manifest.close()
        array = zarr.open_array(str(slide.tmp_store), mode="r+")
        array.attrs["wsi_lymph"] = dict(array.attrs["wsi_lymph"]) | {
            "computed_blocks": computed_blocks_attr(slide.boxes, slide.keep, slide.origin_rc, self.params.block_px)
        }
        replace_dir(slide.tmp_store, slide.final_store)
        slide.manifest_path.unlink(missing_ok=True)
        result.output = str(slide.final_store)
        from .outputs import write_json

        # The map's own report: the map is done even if peaks and outputs are still to come.
        write_json(slide.slide_dir / "probmap.json",
                   asdict(result) | {"status": "done", "skipped_fraction": result.skipped_fraction})
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
        from .detect import peak_block_of_store, peak_graph

        if slide.bar is not None:
            slide.bar.set_postfix_str("peaks")
        slide.peaks["started"] = time.perf_counter()
        try:
            graph, attrs = peak_graph(slide.final_store, self.peak_options.threshold)
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        slide.peaks.update(graph=graph, attrs=attrs, summaries={})
        if not graph.blocks:
            return self._on_summaries_complete(slide)
        for index, box in zip(graph.blocks, graph.boxes, strict=True):
            future = self.client.submit(
                peak_block_of_store, str(slide.final_store), box, graph.halo_px, attrs["threshold_used"],
                key=(f"peaks-{slide.token}", *index), pure=False,
            )
            self.watch(future, lambda f, s=slide, i=index: self._on_summary(s, i, f))

    def _on_summary(self, slide: _Slide, index: tuple[int, int], future: Future) -> None:
        if slide.failed:
            return
        try:
            slide.peaks["summaries"][index] = future.result()
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        if len(slide.peaks["summaries"]) == len(slide.peaks["graph"].blocks):
            self._on_summaries_complete(slide)

    def _on_summaries_complete(self, slide: _Slide) -> None:
        from .detect import centres_of_graph, write_slide_outputs

        result = slide.result
        try:
            table = centres_of_graph(slide.peaks["graph"], slide.peaks["summaries"], slide.peaks["attrs"])
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        result.seconds["peaks"] = round(time.perf_counter() - slide.peaks["started"], 3)
        if slide.bar is not None:
            slide.bar.set_postfix_str("write")
        slide.peaks["written_at"] = time.perf_counter()
        future = self.client.submit(
            write_slide_outputs, slide.slide_dir, result.name, result.path, slide.peaks["attrs"], table,
            asdict(result), asdict(self.params), key=f"write-{slide.token}", pure=False,
        )
        self.watch(future, lambda f: self._on_written(slide, f))

    # -------------------------------------------------------------- stage 4: write
    def _on_written(self, slide: _Slide, future: Future) -> None:
        try:
            count, area_mm2 = future.result()
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: writing outputs failed: {_describe(error)}")
        slide.result.seconds["write"] = round(time.perf_counter() - slide.peaks["written_at"], 3)
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
            self.overall.update(1)

    def _close(self, slide: _Slide) -> None:
        if slide in self.open:
            self.open.remove(slide)
            self.overall.update(1)
        if slide.manifest is not None and not slide.manifest.closed:
            slide.manifest.close()
        if slide.bar is not None:
            self.bar_positions.append(slide.bar.pos if slide.bar.pos is not None else 1)
            slide.bar.close()
            slide.bar = None


def run_batch(
    client: Client,
    slide_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: str = "janowczyk2016",
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
        Slide files (expand folders with :func:`wsi_lymph.slide.find_slides`).
    out_dir : path-like
        Output folder; one sub-folder per slide (``OUT/<slide-name>/``).
    model : str
        Model name (``janowczyk2016``, ``janowczyk2016/fold3``) or checkpoint path.
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
