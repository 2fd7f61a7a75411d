"""What a user watches besides the console: the batch's page on the Dask dashboard, and quiet worker logs.

The dashboard's own Progress panel counts the tasks the scheduler has been given.  The batch feeds
block tasks from a queue (memory stays bounded), so that panel shows ``infer 1/33`` while 100 blocks
are to come.  The driver therefore publishes its own counts, the ones the console shows, to the
scheduler (:class:`ProgressPublisher`, kept with ``Client.set_metadata``), and a page registered on the
scheduler's web server shows them: ``/wsi-lymph`` (a table that refreshes itself) and
``/wsi-lymph.json`` (the same numbers for scripts).

Task failures are the driver's to report (one line per slide); :class:`QuietTaskErrors` keeps the
workers from also printing each failed task's "Compute Failed" dump with its traceback.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable

from dask.utils import key_split
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin
from tornado import web

#: Scheduler metadata key under which the driver keeps the batch's progress.
PROGRESS_KEY = "wsi-lymph-progress"
#: Path of the batch page on the dashboard (and of its JSON twin, with ``.json``).
PAGE_PATH = "/wsi-lymph"
#: Seconds between two publications while a batch runs: a round trip to the scheduler each.
PUBLISH_INTERVAL_S = 0.5
#: Seconds between two refreshes of the page in the browser.
PAGE_REFRESH_S = 2


# ------------------------------------------------------------------ worker logs
class _DropTaskFailures(logging.Filter):
    """Drop the workers' records of batch tasks that failed or were cancelled (the driver reports those).

    ``distributed.worker`` logs "Compute Failed" with the traceback of every failed task;
    ``distributed.worker.state_machine`` warns "Async instruction ... ended with CancelledError"
    when the cluster closes while a cancelled task (a failed slide's block) is still running, and
    ``asyncio`` then reports that task's unfinished Zarr writes ("Task was destroyed but it is
    pending!") as the worker process exits.  When one chunk write of a block fails (a full disk),
    ``asyncio`` also reports each sibling write's error as "Future exception was never retrieved".
    """

    def __init__(self, stages: frozenset[str]) -> None:
        super().__init__()
        self.stages = stages

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Compute Failed") and record.args:
            return key_split(record.args[0]) not in self.stages
        if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
            return not any(f"'{stage}-" in message for stage in self.stages)
        if message.startswith("Task was destroyed but it is pending!"):
            return "zarr" not in message
        if message.startswith(("Future exception was never retrieved", "Task exception was never retrieved")):
            return not _raised_in_zarr(record.exc_info)
        return True


def _raised_in_zarr(exc_info) -> bool:
    """The exception of a log record was raised inside Zarr (a write of a block's chunks)."""
    if not exc_info or exc_info[2] is None:
        return False
    return any(f"{os.sep}zarr{os.sep}" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc_info[2]))


class QuietTaskErrors(WorkerPlugin):
    """A worker plugin: failures of the given stages' tasks are not logged by the worker (the driver reports them).

    Registered on a client (:meth:`distributed.Client.register_plugin`) by whoever submits those tasks: the batch,
    and the training commands for theirs; workers that join or are restarted later get it too.

    Parameters
    ----------
    stages : iterable of str
        Task key prefixes (``infer``, ``peaks``, ...) whose failures the driver reports.
    """

    def __init__(self, stages: Iterable[str]) -> None:
        self.stages = frozenset(stages)
        # One plugin per set of stages: the batch's and a training command's (which runs batches) stay side by side.
        self.name = "wsi-lymph-quiet-task-errors:" + ",".join(sorted(self.stages))

    def setup(self, worker) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine", "asyncio"):
            logger = logging.getLogger(name)
            for old in [f for f in logger.filters if isinstance(f, _DropTaskFailures) and f.stages == self.stages]:
                logger.removeFilter(old)
            logger.addFilter(_DropTaskFailures(self.stages))


# ------------------------------------------------------------------ the batch page
class _ProgressJSON(web.RequestHandler):
    def initialize(self, dask_server=None) -> None:
        self.server = dask_server

    def report(self) -> dict:
        """The batch's published progress, and the scheduler's own counts of each stage's tasks."""
        progress = self.server.task_metadata.get(PROGRESS_KEY) or {"batch": None, "slides": []}
        # Accumulated transitions per task prefix (a task retried is counted again): what reached the cluster.
        tasks = {prefix.name: {state: prefix.state_counts.get(state, 0) for state in TASK_STATES}
                 for prefix in self.server.task_prefixes.values()}
        return dict(progress) | {"tasks": tasks}

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(self.report())


class _ProgressPage(_ProgressJSON):
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(self.report()))


#: Task states counted on the page: sent to a worker, finished, failed, cancelled or released before running.
TASK_STATES = ("processing", "memory", "erred", "released")


def render_page(progress: dict | None) -> str:
    """The batch page: one line for the batch, one table row per slide (stage, steps done of total).

    Below it, the scheduler's counts of each stage's tasks (``progress["tasks"]``, if given).
    """
    head = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{PAGE_REFRESH_S}">'
            "<title>wsi-lymph batch</title><style>body{font-family:sans-serif;margin:1.5em}"
            "td,th{padding:.2em .8em;text-align:left}td.n{text-align:right}</style></head><body>")
    if not progress or not progress.get("batch"):
        return head + "<h2>wsi-lymph</h2><p>No batch has started on this cluster.</p></body></html>"
    batch = progress["batch"]
    lines = [head, "<h2>wsi-lymph batch</h2>",
             f"<p>{batch['done']} done, {batch['failed']} failed, {batch['running']} running, "
             f"{batch['waiting']} waiting, of {batch['slides']} slides"
             f"{' (finished)' if batch.get('finished') else ''}</p>",
             "<table><tr><th>slide</th><th>stage</th><th>done</th><th>of</th><th>note</th></tr>"]
    for slide in progress["slides"]:
        lines.append(
            f"<tr><td>{html.escape(slide['name'])}</td><td>{html.escape(slide['stage'])}</td>"
            f"<td class=n>{slide['done']}</td><td class=n>{slide['total']}</td>"
            f"<td>{html.escape(slide.get('note') or '')}</td></tr>")
    lines.append("</table><p>Blocks are sent to the cluster a few at a time, so the dashboard's Progress panel "
                 "counts only those sent; the numbers above are the batch's own.</p>")
    if progress.get("tasks"):
        lines.append("<h3>Tasks by stage (the scheduler's counts)</h3><table><tr><th>stage</th>"
                     "<th>sent to a worker</th><th>finished</th><th>failed</th><th>released</th></tr>")
        for name, counts in sorted(progress["tasks"].items()):
            cells = "".join(f"<td class=n>{counts.get(state, 0)}</td>" for state in TASK_STATES)
            lines.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
        lines.append("</table>")
    lines.append("</body></html>")
    return "".join(lines)


def add_progress_page(dask_scheduler) -> str | None:
    """Register the batch page on a scheduler's web server (run on the scheduler); its path, or None without one."""
    application = getattr(dask_scheduler, "http_application", None)
    if application is None:
        return None
    if not getattr(dask_scheduler, "_wsi_lymph_page", False):
        target = {"dask_server": dask_scheduler}
        application.add_handlers(r".*$", [(PAGE_PATH + r"\.json", _ProgressJSON, target),
                                          (PAGE_PATH + "/?", _ProgressPage, target)])
        dask_scheduler._wsi_lymph_page = True
    return PAGE_PATH


class ProgressPublisher:
    """Sends the batch's progress to the scheduler, at most every :data:`PUBLISH_INTERVAL_S` seconds.

    Publishing is best effort: a scheduler that cannot take the page (no web server, or one that
    cannot import this package) leaves the batch running as before.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.last = 0.0
        self.stages: object = None
        try:
            self.page = client.run_on_scheduler(add_progress_page)
        except Exception:  # a scheduler without this package: no page, the same batch
            self.page = None

    def publish(self, progress: Callable[[], dict], *, force: bool = False, stages: object = None) -> None:
        """Store ``progress()`` (JSON-like) on the scheduler.

        Parameters
        ----------
        progress : callable
            Builds the report; called only when it is stored.
        force : bool
            Store it now.
        stages : object, optional
            What the slides are doing (comparable): a change is stored at once, so that no stage is
            missed; counts within a stage are stored at most every :data:`PUBLISH_INTERVAL_S` seconds.
        """
        now = time.monotonic()
        if not force and stages == self.stages and now - self.last < PUBLISH_INTERVAL_S:
            return
        self.last, self.stages = now, stages
        # A lost scheduler is reported by the tasks themselves.
        with contextlib.suppress(Exception):
            self.client.set_metadata(PROGRESS_KEY, progress())


def published_progress(dask_scheduler) -> dict | None:
    """The progress last published (run on the scheduler: ``client.run_on_scheduler(published_progress)``)."""
    return dask_scheduler.task_metadata.get(PROGRESS_KEY)
