"""A batch of slides as one stream of Dask tasks: stain map -> probability map -> peaks -> outputs.

Every slide goes through the same stages, named as the dashboard shows them:

``read-*``, ``hematoxylin-*``
    low-resolution stain map of the analysed region (:mod:`wsi_lymph.detection.hematoxylin`);
    it decides which blocks can hold lymphocytes and gives the tissue area;
``infer-*``
    one task per kept block, writing whole chunks of the slide's Zarr map (:func:`infer_block`);
``peaks-*``, ``peaks-border-*``
    blockwise smoothing, candidate linking and labelling of the finished map,
    only over the peak blocks that can hold centres, then the components that
    cross block borders, solved from windows of the map (:mod:`wsi_lymph.engine.centres`);
``write-*``
    the slide's hotspot and outputs (:func:`wsi_lymph.engine.write_task.write_slide`).

The driver reacts to finished tasks as they arrive, so one slide's peaks and
outputs run while the next slide's blocks are still being classified.  Memory
stays bounded whatever the batch or slide size: at most ``max_slides`` slides
are open at once, and block tasks are submitted from a queue that keeps at
most ``max_blocks`` of them on the cluster.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow
import zarr
from distributed import Client, Future, as_completed
from tqdm import tqdm

from wsi_lymph import __version__
from wsi_lymph.constants import (
    CLEAR_RADIUS_PX,
    DEFAULT_MODEL,
    HOTSPOT_FIELD_MM2,
    PAPER_STAIN_REFERENCE,
    SMOOTH_RADIUS_PX,
)
from wsi_lymph.detection.hematoxylin import StainSummary, blocks_with_hematoxylin, stain_summary
from wsi_lymph.detection.inference import block_probabilities
from wsi_lymph.detection.peaks import PEAK_BLOCK_PX
from wsi_lymph.detection.sanity import check_stain, implausible_results
from wsi_lymph.detection.stain import LabStatistics, ReinhardTransform, slide_lab_statistics
from wsi_lymph.engine.centres import (
    PeakStage,
    centres_of_stage,
    new_task_token,
    plan_border,
    plan_peaks,
    submit_border_solves,
    submit_peak_blocks,
)
from wsi_lymph.engine.cluster import has_gpu_workers, worker_threads
from wsi_lymph.engine.monitor import ProgressPublisher, QuietTaskErrors
from wsi_lymph.engine.params import (
    RESULTS_VERSION,
    PeakOptions,
    ProbmapParams,
    SlideResult,
    map_settings,
    settings_difference,
)
from wsi_lymph.engine.write_task import write_slide
from wsi_lymph.io.batch_table import BatchTable
from wsi_lymph.io.ome_zarr import (
    PYRAMID_NAME,
    finished_map_attributes,
    publish_pyramid,
    remove_working_map,
    submit_pyramid,
)
from wsi_lymph.io.outputs import read_centres_parquet, write_json
from wsi_lymph.io.pictures import density_bin_um
from wsi_lymph.io.probmap_store import (
    STORE_DTYPES,
    computed_blocks_attr,
    create_partial_store,
    replace_dir,
    write_block,
)
from wsi_lymph.io.report import write_report
from wsi_lymph.io.slide_outputs import analysed_extent_um
from wsi_lymph.models.architectures import SUBPIXEL, architecture_of
from wsi_lymph.models.registry import load_model, resolve_model
from wsi_lymph.slides.frame import ModelFrame, block_boxes, choose_frame, frame_region
from wsi_lymph.slides.reader import SlideError, SlideInfo, check_min_size, open_slide

Logger = Callable[[str], None]
Box = tuple[int, int, int, int]  # model-frame (r0, r1, c0, c1)
logger = logging.getLogger(__name__)  # tracebacks of failed tasks, at DEBUG: the console gets one line per slide

#: Key prefixes of the batch's tasks, one per stage (see the module docstring).
STAGES = ("read", "hematoxylin", "hematoxylin-cells", "hematoxylin-summary", "stain-statistics", "infer", "peaks",
          "peaks-border", "pyramid", "write")
#: Errors that will not go away by trying again: the slide stops at once, its other tasks are cancelled.
LASTING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                            errno.ENOTDIR, errno.EISDIR, errno.EFBIG})
#: Errors that may: a task that hit one runs again, up to :data:`TASK_RETRIES` more times.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
                              errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})
TASK_RETRIES = 2
#: Where a rerun that finds a slide's centres again sets its earlier ``summary.json`` aside until it writes its own.
SUPERSEDED_SUMMARY = "summary.superseded.json"


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
    # The full-resolution map was kept by an earlier run (--keep-map then): this run keeps it too, with or without.
    keeps_earlier_map: bool = False
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
            # A line is only complete once its newline is written: a torn last line (a full disk) is ignored.
            lines = self.manifest_path.read_text().split("\n")[:-1] if same_run else []
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
            return set()
        return {tuple(map(int, line.split())) for line in lines if len(line.split()) == 2}

    def record(self, r0: int, c0: int) -> None:
        self.manifest.write(f"{r0} {c0}\n")
        self.manifest.flush()
        os.fsync(self.manifest.fileno())


# ------------------------------------------------------------------ the steps of one slide
def _plan_slide(result: SlideResult, out_dir: Path, mpp: float | None, model_info: dict,
                params: ProbmapParams) -> _Slide:
    """Open a slide, bring it to the model frame and tile its analysed region into inference blocks."""
    # With its content's fingerprint: a slide written again under the same name is not "already done".
    info = open_slide(result.path, mpp=mpp, fingerprint=True)
    frame = choose_frame(info, model_info["model_mpp"], model_info["source_scan_mpp"])
    if params.region_level0 is not None:
        x, y, width, height = params.region_level0
        slide_width, slide_height = info.level_sizes_xy[0]
        if x + width > slide_width or y + height > slide_height:  # refused, not clipped (cli/checks.py says why)
            raise SlideError(f"{info.path}: region {x},{y},{width},{height} (level-0 x, y, width, height) reaches "
                             f"beyond the slide ({slide_width} x {slide_height} level-0 px)")
    box = frame_region(frame, params.region_level0)
    r0, r1, c0, c1 = box
    boxes = [(a + r0, b + r0, c + c0, d + c0) for a, b, c, d in block_boxes((r1 - r0, c1 - c0), params.block_px)]
    if params.region_level0 is not None:  # the whole image was measured when it was opened
        per = frame.level0_per_frame_px
        check_min_size(info, ((c1 - c0) * per, (r1 - r0) * per), "the analysed region (--region)")
    slide = _Slide(result, info, frame, box, boxes, out_dir / result.name,
                   run_id=run_fingerprint(info, frame, box, model_info, params), started=time.perf_counter())
    result.blocks_total = len(boxes)
    return slide


def _load_earlier_map(slide: _Slide, model_info: dict, params: ProbmapParams) -> bool:
    """Take over the report of a map completed by an earlier run with the same settings; False where there is none.

    Raises
    ------
    SlideError
        The map there was made with other settings (:func:`~wsi_lymph.engine.params.map_settings`),
        or cannot be read back.  Its results are left untouched: skipping would pass them off
        as this run's, and replacing them unasked would lose them.
    """
    result = slide.result
    report = slide.slide_dir / "probmap.json"
    if not report.is_file():
        return False
    refuse = "pass --force to recompute it (replacing those results) or choose another --out"
    try:
        # The working map, or the pyramid that records its attributes once it was deleted (no --keep-map).
        stored = finished_map_attributes(slide.slide_dir)
        if stored is None:
            return False
        finished = map_settings(stored[0], stored[1])
        earlier = json.loads(report.read_text())
    except (KeyError, TypeError, ValueError, OSError, zarr.errors.BaseZarrError) as error:
        raise SlideError(f"{slide.info.path}: the finished map in {slide.slide_dir} cannot be read back "
                         f"({type(error).__name__}: {error}); {refuse}") from None
    r0, r1, c0, c1 = slide.box
    asked = map_settings(map_attributes(slide.info, slide.frame, slide.origin_rc, model_info, params)["wsi_lymph"],
                         (r1 - r0, c1 - c0))
    difference = settings_difference(finished, asked)
    if difference is not None:
        raise SlideError(f"{slide.info.path}: finished in {slide.slide_dir} with {difference[0]}, "
                         f"asked {difference[1]}; {refuse}")
    for key in ("blocks_total", "blocks_skipped", "patches", "hematoxylin_mm2", "tissue_mm2", "seconds", "flags"):
        setattr(result, key, earlier.get(key, getattr(result, key)))
    result.output, result.reused = str(stored[2]), True
    return True


def _kept_map(slide_dir: Path) -> bool:
    """Whether the last run that finished the slide kept its full-resolution map (``--keep-map``).

    Read from its ``summary.json``, or from the copy a later run set aside (:data:`SUPERSEDED_SUMMARY`)
    when it began finding the centres again and was interrupted before writing its own.
    """
    for name in ("summary.json", SUPERSEDED_SUMMARY):
        try:
            return bool(json.loads((slide_dir / name).read_text())["params"]["keep_map"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _set_summary_aside(slide_dir: Path) -> None:
    """Move ``summary.json`` to :data:`SUPERSEDED_SUMMARY` before a finished slide's outputs are written again.

    Without ``summary.json`` the slide counts as unfinished until the new outputs are complete; the copy
    keeps what :func:`_kept_map` needs through an interruption before then.
    """
    with contextlib.suppress(FileNotFoundError):
        (slide_dir / "summary.json").replace(slide_dir / SUPERSEDED_SUMMARY)


def _peak_changes(summary_path: Path, threshold: float) -> str | None:
    """How the centres in ``summary.json`` were found differently from how they are asked for now.

    Returns None when they were found the same way, ``""`` when there are none (no or an
    unreadable summary: the slide's outputs are unfinished), else the changes in words.
    """
    try:
        summary = json.loads(summary_path.read_text())
        found = {"--threshold": summary["threshold"], "smoothing radius": summary["smooth_radius_px"],
                 "clearing radius": summary["clear_radius_px"]}
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    asked = {"--threshold": threshold, "smoothing radius": SMOOTH_RADIUS_PX, "clearing radius": CLEAR_RADIUS_PX}
    changes = [f"{key} {found[key]:g} -> {asked[key]:g}" for key in asked if found[key] != asked[key]]
    return ", ".join(changes) or None


def _output_changes(summary: dict, map_attrs: dict, shape_rc: tuple[int, int], hotspot_mm2: float,
                    density_bin: float | None) -> str | None:
    """How the outputs in ``summary`` (``summary.json``) were drawn differently from how they are asked for now.

    The hotspot's field area and ``density.png``'s bin (None: automatic, from the analysed extent, as
    :func:`~wsi_lymph.io.pictures.density_bin_um` chooses it).  Returns None when they are the same, else the
    changes in words.
    """
    found_hotspot = (summary.get("hotspot") or {}).get("area_mm2")
    asked_bin = density_bin_um(analysed_extent_um(map_attrs, shape_rc), density_bin)
    changes = []
    if found_hotspot is not None and found_hotspot != hotspot_mm2:
        changes.append(f"--hotspot-mm2 {found_hotspot:g} -> {hotspot_mm2:g}")
    if summary.get("density_png_bin_um") != asked_bin:
        changes.append(f"density bin {summary.get('density_png_bin_um')} -> {asked_bin:g} µm")
    return ", ".join(changes) or None


def _check_input(slide: _Slide, log: Logger) -> None:
    """The stain check before any work on a slide (:mod:`wsi_lymph.detection.sanity`): refuse or flag non-H&E.

    It runs on the driver: a low-resolution view of at most 512 x 512 pixels, a fraction of a
    second, and a slide refused here never occupies the cluster.
    """
    check = check_stain(slide.info)
    if check.verdict == "not h&e":
        raise SlideError(f"{slide.info.path}: does not look like H&E, refused before inference: {check.message()}; "
                         "pass --no-stain-check to analyse it anyway")
    if check.verdict == "unclear":
        flag = f"stain partly unlike H&E: {check.message()}; results may be unreliable"
        slide.result.flags.append(flag)
        log(f"{slide.name}: FLAGGED: {flag}")


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
    # Zarr writes each chunk through a `<chunk>.<uuid>.partial` file: one a killed worker left is no part of the map.
    for stray in slide.tmp_store.rglob("*.partial"):
        stray.unlink(missing_ok=True)
    replace_dir(slide.tmp_store, slide.final_store)
    slide.manifest_path.unlink(missing_ok=True)
    result.output = str(slide.final_store)
    # The map's own report: the map is done even if peaks and outputs are still to come.
    write_json(slide.slide_dir / "probmap.json",
               asdict(result) | {"status": "done", "skipped_fraction": result.skipped_fraction})


# ------------------------------------------------------------------ the driver's pieces
class _TaskStream:
    """Futures taken in the order they finish, each with the handler it was watched with.

    A task that failed for a reason that may pass (:data:`TRANSIENT_ERRNOS`) runs again, up to
    :data:`TASK_RETRIES` times, before its handler sees the error.  A handler that raises (the driver's
    own writes: a full disk under the manifest) hands the error to ``on_error`` with the future.
    """

    def __init__(self, client: Client, on_error: Callable[[Future, Exception], None]) -> None:
        self.client, self.on_error = client, on_error
        self.futures = as_completed()
        self.handlers: dict[int, tuple[Future, Callable[[Future], None]]] = {}
        self.retries: dict[int, int] = {}

    def watch(self, future: Future, handler: Callable[[Future], None]) -> None:
        self.handlers[id(future)] = (future, handler)
        self.futures.add(future)

    def cancel(self, token: str) -> list[Future]:
        """Cancel the watched futures whose key holds ``token`` (one slide's); their handlers still get them."""
        futures = [future for future, _ in self.handlers.values() if token in _key_name(future.key)]
        unfinished = [future for future in futures if not future.done()]
        if unfinished:
            self.client.cancel(unfinished)
        return unfinished

    def __iter__(self) -> Iterator[tuple[Callable[[Future], None], Future]]:
        for future in self.futures:
            if future.status == "error" and self._retried(future):
                continue
            _, handler = self.handlers.pop(id(future))
            self.retries.pop(id(future), None)
            yield self._guarded(handler), future

    def _retried(self, future: Future) -> bool:
        error = future.exception()
        attempts = self.retries.get(id(future), 0)
        if not _transient(error) or attempts >= TASK_RETRIES:
            return False
        logger.debug("task %s failed (%s: %s), trying again", future.key, type(error).__name__, error)
        self.retries[id(future)] = attempts + 1
        self.client.retry([future])
        self.futures.add(future)
        return True

    def _guarded(self, handler: Callable[[Future], None]) -> Callable[[Future], None]:
        def run(future: Future) -> None:
            try:
                handler(future)
            except Exception as error:  # one slide's failure must not end the batch
                self.on_error(future, error)

        return run


class _Bars:
    """Progress on stderr.  On a terminal: tqdm bars, the batch's at the top (slides finished, failed ones included
    and counted in its postfix), one per open slide below it.  Elsewhere (output redirected to a file, a Slurm or
    PBS job's log) no bar frame at all, but a plain line through ``log`` every ``interval_s`` seconds while the work
    goes on.  Nothing when disabled.
    """

    def __init__(self, enabled: bool, max_slides: int, log: Logger = print, interval_s: float | None = None) -> None:
        self.lines = enabled and not _is_terminal(sys.stderr)
        self.enabled = enabled and not self.lines
        self.log = log
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        self.positions = list(range(1, max_slides + 1))
        self.overall: tqdm | None = None
        self.total = self.finished = self.failed = 0
        self.open_slides: dict[str, list] = {}  # lines: name -> [stage, blocks done, blocks total]
        self.last_line = time.monotonic()

    def start(self, slides: int) -> None:
        self.total = slides
        self.overall = tqdm(total=slides, unit="slide", desc="batch", disable=not self.enabled, dynamic_ncols=True,
                            position=0)

    def slide_ended(self, result: SlideResult | None = None) -> None:
        """A slide finished: done, skipped or failed (``result.status``)."""
        self.finished += 1
        if result is not None:
            self.open_slides.pop(result.name, None)
        if result is not None and result.status == "failed":
            self.failed += 1
            self.overall.set_postfix_str(f"{self.failed} failed", refresh=False)
        self.overall.update(1)
        self._tick()

    def open(self, slide: _Slide) -> None:
        if self.enabled:
            slide.bar = tqdm(total=0, unit="block", desc=slide.name[:24], leave=False, dynamic_ncols=True,
                             position=self.positions.pop(0))
        elif self.lines:
            self.open_slides[slide.name] = ["opening", 0, 0]

    def stage(self, slide: _Slide, name: str, blocks: int | None = None) -> None:
        """Show the slide's stage; ``blocks`` restarts its bar at that many steps."""
        if slide.bar is not None:
            if blocks is not None:
                slide.bar.reset(total=blocks)
            slide.bar.set_postfix_str(name)
        elif slide.name in self.open_slides:
            state = self.open_slides[slide.name]
            state[0] = name
            if blocks is not None:
                state[1:] = [0, blocks]

    def step(self, slide: _Slide) -> None:
        if slide.bar is not None:
            slide.bar.update(1)
        elif slide.name in self.open_slides:
            self.open_slides[slide.name][1] += 1
            self._tick()

    def close(self, slide: _Slide) -> None:
        if slide.bar is not None:
            self.positions.append(slide.bar.pos if slide.bar.pos is not None else 1)
            slide.bar.close()
            slide.bar = None
        self.open_slides.pop(slide.name, None)

    def finish(self) -> None:
        if self.overall is not None:
            self.overall.close()
        for name in list(self.open_slides):  # an interrupted run: no state left for the next batch
            self.open_slides.pop(name)

    def _tick(self) -> None:
        """Without bars: a progress line when ``interval_s`` has passed since the last one."""
        if not self.lines or time.monotonic() - self.last_line < self.interval_s:
            return
        self.last_line = time.monotonic()
        line = f"progress: {self.finished} of {self.total} slides finished"
        line += f" ({self.failed} failed)" if self.failed else ""
        slides = [f"{name} {stage} {done}/{total} blocks" if total else f"{name} {stage}"
                  for name, (stage, done, total) in self.open_slides.items()]
        self.log(line + (f"; {', '.join(slides)}" if slides else ""))


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_interval_s() -> float:
    """Seconds between progress lines when stderr is not a terminal: ``$WSI_LYMPH_PROGRESS_INTERVAL``, else 30."""
    try:
        return max(0.0, float(os.environ.get("WSI_LYMPH_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


class _Batch:
    """The driver's event loop: every finished future is handed to the handler registered with it."""

    check_stain = True  # refuse non-H&E input before inference (run_batch's check_stain)
    keep_map = False  # keep the full-resolution prob.zarr of a finished slide (run_batch's keep_map)

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
        self.tasks = _TaskStream(client, self._on_driver_error)
        # Failed tasks are reported here, one line per slide, not as a worker's "Compute Failed" dump.
        client.register_plugin(QuietTaskErrors(STAGES))
        self.progress = ProgressPublisher(client)  # the dashboard's /wsi-lymph page: the console's numbers
        self.results: list[SlideResult] = []
        self.waiting: deque = deque()
        self.table = BatchTable(out_dir)  # OUT/batch.csv + .parquet (wsi_lymph/io/batch_table.py)
        self.bars = _Bars(progress, max_slides, log)
        self.open: list[_Slide] = []
        self.in_flight_blocks = 0
        self.names_taken: set[str] = set()

    # -------------------------------------------------------------- plumbing
    def run(self, slide_paths: Sequence[str | os.PathLike]) -> list[SlideResult]:
        waiting = self.waiting = deque(slide_paths)
        results = self.results
        self.bars.start(len(waiting))
        self.progress.publish(self._progress_report, force=True)
        self._open_more(waiting, results)
        for handler, future in self.tasks:
            handler(future)
            self._submit_blocks()
            self._open_more(waiting, results)
            self.progress.publish(self._progress_report, stages=self._progress_stages())
            # OUT/batch.csv as each slide finishes, report.html from it (run_detect writes the last of both)
            if self.peak_options is not None and self.table.update(results):
                with contextlib.suppress(OSError):  # run_detect reports a report it cannot write
                    write_report(self.out_dir)
        self.progress.publish(self._progress_report, force=True)
        self.bars.finish()
        return results

    def _progress_report(self) -> dict:
        """The batch's progress as the dashboard page shows it: per slide its stage and steps done of total."""
        slides = []
        for result in self.results:
            slide = next((s for s in self.open if s.result is result), None)
            if slide is not None:
                slides.append(self._progress_row(slide))
                continue
            note = result.reason
            if result.reused and result.status == "done":
                note = "map from an earlier run" if "write" in result.seconds else "already done, skipped"
            done = result.blocks_total if result.status == "done" else 0
            slides.append({"name": result.name, "stage": result.status or "?", "done": done,
                           "total": result.blocks_total, "note": note})
        finished = sum(r.status == "done" for r in self.results)
        failed = sum(r.status == "failed" for r in self.results)
        batch = {"slides": len(self.results) + len(self.waiting), "done": finished, "failed": failed,
                 "running": len(self.open), "waiting": len(self.waiting),
                 "finished": not self.open and not self.waiting}
        return {"batch": batch, "slides": slides}

    def _progress_row(self, slide: _Slide) -> dict:
        """One open slide's row of the dashboard page: its stage and the steps of it done, of how many."""
        result = slide.result
        stage, done, total, note = "stain map", 0, 1, ""
        if slide.write_started:  # also where only the outputs are written again (no peak stage)
            stage, done, total = "write", 0, 1
        elif slide.peaks is not None:
            stage, done, total = "peaks", slide.peaks.tasks_done, slide.peaks.tasks_total
            if slide.peaks.complete:  # the centres are found: the map's pyramid is written, then the outputs
                stage, done, total = "pyramid", 0, 1
        elif slide.needs_statistics:
            stage = "stain statistics"
        elif slide.todo is not None:
            stage, done, total = "infer", len(slide.todo) - slide.pending, len(slide.todo)
            note = (f"blocks: {result.blocks_resumed} resumed, {result.blocks_skipped} without hematoxylin, "
                    f"of {result.blocks_total}")
        return {"name": result.name, "stage": stage, "done": done, "total": total, "note": note}

    def _progress_stages(self) -> tuple:
        """What changes when a slide opens, changes stage or ends: the page is updated at once then."""
        return len(self.waiting), tuple((slide.name, self._progress_row(slide)["stage"]) for slide in self.open)

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
        if not self.force and _load_earlier_map(slide, self.model_info, self.params):
            return self._reuse(slide)
        if self.check_stain:
            _check_input(slide, self.log)
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
        """Skip a slide finished by an earlier run with the same settings, or go on to the centres of its map.

        The map is the costly part and was made with the settings asked for (else
        :func:`_load_earlier_map` refused the slide).  The centres are a cheap function of it,
        the threshold and the peak radii, so when only those changed the centres are found
        again from the stored map, without inference, rather than refusing: a fresh run would
        compute the very same map and then these centres (tested).  ``summary.json`` is
        set aside first, so until the new outputs are complete the slide counts as unfinished.
        """
        result = slide.result
        summary = slide.slide_dir / "summary.json"
        slide.keeps_earlier_map = slide.final_store.is_dir() and _kept_map(slide.slide_dir)
        if self.peak_options is None:
            changes = None
        else:
            threshold = self.peak_options.threshold
            changes = _peak_changes(summary, self.model_info["threshold"] if threshold is None else threshold)
        if changes is None and self.peak_options is not None and self._rewrite_outputs(slide, summary):
            return
        if self.peak_options is None and not (slide.slide_dir / PYRAMID_NAME).is_dir():
            # probmap's map is complete but its pyramid is not: interrupted while writing it, or made by a
            # version that wrote none.  The pyramid is a function of the map: write it, no inference.
            self.log(f"{result.name}: map already complete in {slide.slide_dir}; writing its pyramid")
            self.open.append(slide)
            return self._start_pyramid(slide, lambda: self._done(slide))
        if changes is None:
            result.status = "done"
            if summary.is_file() and self.peak_options is not None:
                result.flags = json.loads(summary.read_text()).get("flags", result.flags)
            self.log(f"{result.name}: already done in {slide.slide_dir} with the same settings, skipped "
                     "(--force recomputes)")
            self.bars.slide_ended(result)
            return
        if not slide.final_store.is_dir():  # deleted when the slide was done (no --keep-map): only its pyramid is left
            raise SlideError(f"{slide.info.path}: {changes or 'its outputs are unfinished'}, but the centres need the "
                             f"full-resolution map, which was not kept in {slide.slide_dir} (only {PYRAMID_NAME}); "
                             "pass --force to recompute the slide (replacing those results), with --keep-map to "
                             "keep its map for other thresholds later")
        if changes:
            _set_summary_aside(slide.slide_dir)
            self.log(f"{result.name}: map already complete in {slide.slide_dir} with the same settings; {changes}: "
                     "finding the centres again from the stored map (no inference)")
        else:
            self.log(f"{result.name}: map already complete in {slide.slide_dir}, finding centres")
        self.open.append(slide)
        self._start_peaks(slide)

    def _rewrite_outputs(self, slide: _Slide, summary_path: Path) -> bool:
        """Write a finished slide's outputs again where only the hotspot's area or the density bin changed.

        Those are drawn from the centres alone, so the centre table is read back from ``centers.parquet``
        and only the ``write`` task runs: no map needed (it may have been deleted), the centres unchanged.
        Returns False where nothing changed.
        """
        stored = finished_map_attributes(slide.slide_dir)
        summary = json.loads(summary_path.read_text())
        if stored is None:  # _load_earlier_map found it
            return False
        map_attrs, shape_rc, _ = stored
        changes = _output_changes(summary, map_attrs, shape_rc, self.peak_options.hotspot_mm2,
                                  self.peak_options.density_bin_um)
        if changes is None:
            return False
        try:
            table = read_centres_parquet(slide.slide_dir / "centers.parquet")
        except (OSError, ValueError, KeyError, pyarrow.ArrowException) as error:
            raise SlideError(f"{slide.info.path}: {changes}, but its centres cannot be read back from "
                             f"{slide.slide_dir / 'centers.parquet'} ({_describe(error)}); pass --force to "
                             "recompute the slide (replacing those results)") from None
        result = slide.result
        result.flags = summary.get("flags", result.flags)
        _set_summary_aside(slide.slide_dir)
        self.log(f"{result.name}: already done in {slide.slide_dir}; {changes}: writing its outputs again from "
                 "its centres (same centres, no inference)")
        self.open.append(slide)
        self._start_write(slide, table, dict(map_attrs, threshold_used=summary["threshold"]), shape_rc)
        return True

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
            # The partial map and its manifest stay for a later resume; the slide's other blocks stop now.
            logger.debug("%s: block (row %d, col %d) failed", slide.name, box[0], box[2], exc_info=error)
            finished = len(slide.todo or ()) - slide.pending
            where = f"block (row {box[0]}, col {box[2]})"
            if _lasting(error):
                reason = f"{where}: {_plain_os_error(error)}; {_remedy(error, finished)}"
            else:
                reason = f"{slide.info.path}: {where} failed: {type(error).__name__}: {error}"
            return self._fail(slide, reason)
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
        # Patch classifiers count patches; a model that emits the map's pixels directly counts those.
        counted = "model-frame px" if self.model_info["evaluation"] == SUBPIXEL else "patches"
        self.log(
            f"{result.name}: map done, {result.blocks_total} blocks, {result.skipped_fraction:.1%} skipped "
            f"(no hematoxylin), {result.patches:,} {counted}, {result.seconds['map_wall']:.1f} s -> {result.output}"
        )
        if self.peak_options is None:  # probmap: the map is the product; its pyramid lets viewers open it
            self._start_pyramid(slide, lambda: self._done(slide))
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
        if slide.peaks.blocks_done:  # no block can hold a centre
            return self._start_border(slide)
        for index, future in submit_peak_blocks(self.client, slide.peaks, slide.token):
            self.tasks.watch(future, lambda f, s=slide, i=index: self._on_peak_task(s, i, f))

    def _start_border(self, slide: _Slide) -> None:
        """The second round: the components that cross block borders, solved on the workers."""
        try:
            plan_border(slide.peaks)
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        if slide.peaks.complete:  # no component crosses a border
            return self._on_peaks_complete(slide)
        for number, future in submit_border_solves(self.client, slide.peaks, slide.token):
            self.tasks.watch(future, lambda f, s=slide, n=number: self._on_peak_task(s, n, f))

    def _on_peak_task(self, slide: _Slide, index: tuple[int, int] | int, future: Future) -> None:
        """A ``peaks`` block (index (i, j)) or a ``peaks-border`` task (its number) has finished."""
        if slide.failed:
            return
        try:
            result = future.result()
        except Exception as error:
            logger.debug("%s: peak task %s failed", slide.name, index, exc_info=error)
            return self._fail(slide, f"peak detection failed: {_plain_os_error(error)}; {_remedy(error)}"
                              if _lasting(error) else f"{slide.info.path}: peak detection failed: {_describe(error)}")
        if isinstance(index, tuple):
            slide.peaks.summaries[index] = result
            if slide.peaks.blocks_done:
                self._start_border(slide)
        else:
            slide.peaks.solved[index] = result
            if slide.peaks.complete:
                self._on_peaks_complete(slide)

    def _on_peaks_complete(self, slide: _Slide) -> None:
        result = slide.result
        try:
            table = centres_of_stage(slide.peaks)
        except Exception as error:
            return self._fail(slide, f"{slide.info.path}: peak detection failed: {_describe(error)}")
        result.seconds["peaks"] = round(time.perf_counter() - slide.peaks_started, 3)
        clear_radius_um = CLEAR_RADIUS_PX * slide.peaks.attrs["frame"]["mpp"]
        for flag in implausible_results(table["x_um"], table["y_um"], result.tissue_mm2, clear_radius_um):
            result.flags.append(flag)  # before the write task: summary.json records it
            self.log(f"{result.name}: FLAGGED: {flag}")
        self._start_pyramid(slide, lambda: self._start_write(slide, table, slide.peaks.attrs, slide.peaks.shape_rc))

    # -------------------------------------------------------------- stage 4: the map's pyramid for viewers
    def _start_pyramid(self, slide: _Slide, then: Callable[[], None]) -> None:
        """``prob.ome.zarr`` (:mod:`wsi_lymph.io.ome_zarr`), then ``then()``: for ``detect`` the outputs are
        written after it, so ``summary.json`` can list it; for ``probmap`` the slide is done."""
        if slide.result.reused and (slide.slide_dir / PYRAMID_NAME).is_dir():  # the same map: the same pyramid
            return then()
        self.bars.stage(slide, "pyramid")
        started = time.perf_counter()
        future = submit_pyramid(self.client, slide.final_store, slide.slide_dir, slide.name, slide.token)
        self.tasks.watch(future, lambda f: self._on_pyramid(slide, then, started, f))

    def _on_pyramid(self, slide: _Slide, then: Callable[[], None], started: float, future: Future) -> None:
        if slide.failed:
            return
        try:
            future.result()
            publish_pyramid(slide.slide_dir)
        except Exception as error:
            logger.debug("%s: the pyramid failed", slide.name, exc_info=error)
            return self._fail(slide, f"writing the map's pyramid failed: {_plain_os_error(error)}; {_remedy(error)}"
                              if _lasting(error) else f"{slide.info.path}: writing the map's pyramid failed: "
                              f"{_describe(error)}")
        slide.result.seconds["pyramid"] = round(time.perf_counter() - started, 3)
        then()

    def _start_write(self, slide: _Slide, table: dict, attrs: dict, shape_rc: tuple[int, int]) -> None:
        """The ``write`` task: hotspot and every output file of the slide, from its centre table and map attributes."""
        result = slide.result
        self.bars.stage(slide, "write")
        slide.write_started = time.perf_counter()
        future = self.client.submit(
            write_slide, slide.slide_dir, result.name, result.path, attrs, shape_rc, table,
            asdict(result), asdict(self.params) | {"keep_map": self._keeps_map(slide)}, self.peak_options.hotspot_mm2,
            self.peak_options.density_bin_um, key=f"write-{slide.token}", pure=False,
        )
        self.tasks.watch(future, lambda f: self._on_written(slide, f))

    # -------------------------------------------------------------- stage 5: write
    def _on_written(self, slide: _Slide, future: Future) -> None:
        if slide.failed:
            return
        try:
            count, area_mm2 = future.result()
        except Exception as error:
            logger.debug("%s: writing outputs failed", slide.name, exc_info=error)
            # The map is complete: a later run finds its centres again and writes the outputs.
            return self._fail(slide, f"writing outputs failed: {_plain_os_error(error)}; {_remedy(error)}"
                              if _lasting(error) else f"{slide.info.path}: writing outputs failed: {_describe(error)}")
        slide.result.seconds["write"] = round(time.perf_counter() - slide.write_started, 3)
        density = f"{count / area_mm2:.0f} per mm² of tissue" if area_mm2 else "no tissue"
        self.log(f"{slide.name}: {count} lymphocytes, {density}")
        with contextlib.suppress(OSError):  # the new summary.json records keep_map now
            (slide.slide_dir / SUPERSEDED_SUMMARY).unlink(missing_ok=True)
        if not self._keeps_map(slide):  # summary.json is written: the slide is done, its pyramid stays (GBs less)
            with contextlib.suppress(OSError):  # a map left behind costs space, not results
                remove_working_map(slide.slide_dir)
        self._done(slide)

    def _keeps_map(self, slide: _Slide) -> bool:
        """Whether the slide's full-resolution map stays once it is done: asked now, or kept by an earlier run.

        A map a user kept for other thresholds later is not this run's to delete: a rerun without
        ``--keep-map`` that only finds the centres again from it leaves it where it was.
        """
        return self.keep_map or slide.keeps_earlier_map

    # -------------------------------------------------------------- endings
    def _done(self, slide: _Slide) -> None:
        slide.result.status = "done"
        slide.result.seconds["wall"] = round(time.perf_counter() - slide.started, 3)
        self._close(slide)

    def _fail(self, slide: _Slide, reason: str) -> None:
        """Stop a slide at once: no more of its blocks are sent, those on the cluster are cancelled."""
        slide.failed = True
        slide.queue.clear()
        self.tasks.cancel(slide.token)  # their handlers still come, see `failed` and return
        self._fail_result(slide.result, reason)
        self._close(slide)

    def _on_driver_error(self, future: Future, error: Exception) -> None:
        """A handler raised (the driver's own writes, e.g. the manifest on a full disk): the slide of its task fails."""
        key = _key_name(future.key)
        slide = next((s for s in self.open if s.token in key), None)
        if slide is None:  # not a slide's task: nothing to fail, but nothing to hide either
            raise error
        logger.debug("%s: the driver failed on %s", slide.name, future.key, exc_info=error)
        if _lasting(error):
            reason = f"{_plain_os_error(error)}; {_remedy(error)}"
        else:
            reason = f"{slide.info.path}: {_describe(error)}"
        self._fail(slide, reason)

    def _fail_result(self, result: SlideResult, reason: str) -> None:
        result.status, result.reason = "failed", reason
        self.log(f"{result.name}: FAILED: {reason}")
        if not any(s.result is result for s in self.open):
            self.bars.slide_ended(result)

    def _close(self, slide: _Slide) -> None:
        if slide in self.open:
            self.open.remove(slide)
            self.bars.slide_ended(slide.result)
        if slide.manifest is not None and not slide.manifest.closed:
            # Its buffer may not be writable (a full disk): lines not written are not claimed.
            with contextlib.suppress(OSError):
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
    check_stain: bool = True,
    keep_map: bool = False,
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
        Recompute slides already finished, and ignore partial maps.  Without it, a slide
        finished with the same settings is skipped, one finished with another threshold
        gets its centres again from its stored map, and one finished with other map
        settings is refused (its results are kept; the reason names what differs).
    progress : bool
        Progress bars on stderr: one for the batch, one per open slide.
    log : callable
        Receives one line per slide event (map done, centres found, failure).
    max_slides : int
        Slides open at once.
    max_blocks : int, optional
        Block tasks on the cluster at once (default: 4 per worker thread, at least 32).
    check_stain : bool
        Refuse slides that do not look like H&E before any work on them
        (:func:`wsi_lymph.detection.sanity.check_stain`); False analyses them anyway.
    keep_map : bool
        Keep each finished slide's full-resolution ``prob.zarr`` (needed to find its centres again at
        another threshold).  By default it is deleted once the slide's outputs are written; its pyramid
        ``prob.ome.zarr`` (:mod:`wsi_lymph.io.ome_zarr`) stays.  Maps-only batches (``peaks=None``) keep it.

    Returns
    -------
    list of SlideResult
        One per slide, in input order; failures carry ``status="failed"`` and the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = params or ProbmapParams()
    if params.block_px is None or params.chunk_px is None:
        params = params.for_model(architecture_of(load_model(model, source=model_source).members[0][0]).evaluation)
    batch = _Batch(client, out_dir, model, mpp, params, peaks, model_source, force, progress, log,
                   max_slides, max_blocks)
    batch.check_stain = check_stain
    batch.keep_map = keep_map
    return batch.run(slide_paths)


def _describe(error: BaseException, path: str | None = None) -> str:
    text = str(error) if isinstance(error, SlideError | ValueError) else f"{type(error).__name__}: {error}"
    return text if path is None else naming_file(text, path)


def naming_file(reason: str, path: str) -> str:
    """``path: reason``, unless the reason already names the file, as given or absolute (the slide readers'
    messages start with its absolute path), so that a one-line failure names the file once."""
    if path in reason or os.path.abspath(path) in reason:
        return reason
    return f"{path}: {reason}"


def _key_name(key) -> str:
    """The name part of a task key (``infer-<token>`` of ``("infer-<token>", row, col)``)."""
    return str(key[0] if isinstance(key, tuple) else key)


def _lasting(error: BaseException) -> bool:
    """An error that trying again will not mend: a full disk, a read-only or forbidden path, a missing file."""
    return isinstance(error, OSError) and error.errno in LASTING_ERRNOS


def _transient(error: BaseException) -> bool:
    """An error that may pass: an I/O hiccup, a timeout, a dropped connection (worth another try)."""
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


def _plain_os_error(error: OSError) -> str:
    """``no space left on device (/out/x/file)``: the system's words for the error, and the file if known."""
    text = os.strerror(error.errno).lower() if error.errno else str(error)
    return f"{text} ({error.filename})" if error.filename else text


def _remedy(error: OSError, finished_blocks: int | None = None) -> str:
    """What to do about a lasting error, in one clause."""
    again = "then run the same command again"
    if finished_blocks:
        again += f": it keeps the {finished_blocks} blocks already finished"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free some space (or choose another --out), {again}"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make the file writable (or readable, for a slide) or choose another --out, {again}"
    return f"a file the run needs is missing (was the slide or --out moved or deleted?); {again}"


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
            "results_version": RESULTS_VERSION,
            "quantity": "P(lymphocyte center) per model-frame pixel",
            "value_scale": STORE_DTYPES[params.dtype],
            "slide": info.name,
            "slide_path": info.path,
            "slide_fingerprint": info.content_fingerprint or None,
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
    payload = [info.path, info.content_fingerprint, info.mpp, frame.attrs(), list(box), model["sha256"], settings]
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
    hotspot_mm2: float = HOTSPOT_FIELD_MM2,
    density_bin_um: float | None = None,
    **options,
) -> list[SlideResult]:
    """Maps, centres and outputs for every slide in one stream of tasks; writes ``OUT/batch.json``, ``OUT/report.html``.

    Per slide in ``OUT/<slide-name>/``: ``prob.ome.zarr`` (and ``prob.zarr`` with ``keep_map``), ``centers.csv``
    (+ ``centers.parquet``), ``centers.geojson``, ``summary.json``, ``overlay.png``, ``density.png``.  Failed slides
    keep their reason; the others finish.  Slides already finished are skipped unless ``force``; an
    interrupted one resumes.  ``options`` are those of :func:`run_batch`.
    """
    started = time.perf_counter()
    peaks = PeakOptions(threshold, peak_block_px, hotspot_mm2, density_bin_um)
    results = run_batch(client, slide_paths, out_dir, peaks=peaks, **options)
    try:
        _write_batch_report(Path(out_dir) / "batch.json", results, started)
        BatchTable(out_dir).write(results)  # OUT/batch.csv + .parquet: one row per slide (io/batch_table.py)
        write_report(out_dir)  # the batch at a glance (wsi_lymph/io/report.py), from the files just written
    except OSError as error:  # written atomically: an earlier batch.json is left whole
        logger.debug("the batch's reports not written", exc_info=error)
        raise BatchReportError(f"could not write {error.filename or Path(out_dir) / 'batch.json'}: "
                               f"{os.strerror(error.errno).lower() if error.errno else error}; the slides' own "
                               "outputs are as reported above", results) from error
    return results


class BatchReportError(RuntimeError):
    """``OUT/batch.json`` (or the batch table or report) could not be written; the slides' results are in ``results``.

    The slides' own outputs are complete as reported; the CLI says so in one line and exits 1.
    """

    def __init__(self, message: str, results: list[SlideResult]) -> None:
        super().__init__(message)
        self.results = results


def _write_batch_report(path: Path, results: list[SlideResult], started: float) -> None:
    write_json(path, {
        "slides": [
            {"path": r.path, "name": r.name, "status": r.status, "reason": r.reason, "flags": r.flags,
             "timings_s": r.seconds}
            for r in results
        ],
        "flagged": sum(bool(r.flags) for r in results),
        "done": sum(r.status == "done" for r in results),
        "failed": sum(r.status != "done" for r in results),
        "wall_s": round(time.perf_counter() - started, 3),
    })
