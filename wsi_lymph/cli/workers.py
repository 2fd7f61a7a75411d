"""A worker plugin of the commands' clusters: known-harmless library noise off on every worker.

In a module of its own so that the command line imports :mod:`distributed` only when a cluster starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterable

from distributed.diagnostics.plugin import WorkerPlugin


class QuietLibraries(WorkerPlugin):
    """On each worker: warnings whose message matches ``noise`` ignored, tifffile's warnings off, and (workers of a
    local cluster, which share the driver's terminal) Ctrl-C does not stop them, so that the driver stops them in
    order; it only silences their standard output.

    Parameters
    ----------
    noise : iterable of re.Pattern
        Messages of harmless warnings (:data:`wsi_lymph.cli.console.NOISE`).
    ignore_interrupts : bool
        SIGINT does not interrupt the worker process; it sends the process's standard output to /dev/null.
    """

    name = "wsi-lymph-quiet-libraries"

    def __init__(self, noise: Iterable[re.Pattern], *, ignore_interrupts: bool) -> None:
        self.patterns = [pattern.pattern for pattern in noise]
        self.ignore_interrupts = ignore_interrupts

    def setup(self, worker) -> None:
        for pattern in self.patterns:
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        # tifffile logs metadata trouble it works around (e.g. "invalid offset") as warnings on its own logger.
        logging.getLogger("tifffile").setLevel(logging.ERROR)
        with contextlib.suppress(ImportError):  # its import-time SIGINT handler must not come after ours
            import dask_jobqueue.runner  # noqa: F401
        if self.ignore_interrupts and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _silence_stdout)
        worker_log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, HeartbeatAtShutdown) for f in worker_log.filters):
            worker_log.addFilter(HeartbeatAtShutdown(drop=self.ignore_interrupts))


def _silence_stdout(signum, frame) -> None:
    """SIGINT in a local cluster's worker: the task runs on until the driver stops the cluster, but what it prints
    (a student's training steps) would follow the driver's "interrupted" line on the shared terminal."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


class HeartbeatAtShutdown(logging.Filter):
    """distributed's worker logs a heartbeat its scheduler did not answer as an error with a traceback.

    At the end of a run the scheduler may close the connection while a heartbeat is on it (seen under load in
    CI), and the user would get a traceback after the last line of the run.  A worker of a local cluster shares
    the driver's terminal, and the driver reports a scheduler that really went away in its own words, so the record
    is dropped there; a batch-job worker keeps it in its job log as one warning line without the traceback.
    """

    MESSAGE = "Failed to communicate with scheduler during heartbeat."

    def __init__(self, *, drop: bool) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.MESSAGE:
            return True
        if self.drop:
            return False
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
