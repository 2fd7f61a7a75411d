"""A worker plugin of the commands' clusters: known-harmless library noise off on every worker.

In a module of its own so that the command line imports :mod:`distributed` only when a cluster starts.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import warnings
from collections.abc import Iterable

from distributed.diagnostics.plugin import WorkerPlugin


class QuietLibraries(WorkerPlugin):
    """On each worker: warnings whose message matches ``noise`` ignored, tifffile's warnings off, and, on workers of
    a local cluster, which share the driver's terminal, Ctrl-C ignored (the driver stops them in order) and the
    traceback of a failed task left to the driver.

    Parameters
    ----------
    noise : iterable of re.Pattern
        Messages of harmless warnings (:data:`wsi_lymph.cli.console.NOISE`).
    shares_terminal : bool
        The worker process writes to the driver's terminal (a local cluster).
    """

    name = "wsi-lymph-quiet-libraries"

    def __init__(self, noise: Iterable[re.Pattern], *, shares_terminal: bool) -> None:
        self.patterns = [pattern.pattern for pattern in noise]
        self.shares_terminal = shares_terminal

    def setup(self, worker) -> None:
        for pattern in self.patterns:
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        # tifffile logs metadata trouble it works around (e.g. "invalid offset") as warnings on its own logger.
        logging.getLogger("tifffile").setLevel(logging.ERROR)
        with contextlib.suppress(ImportError):  # its import-time SIGINT handler must not come after ours
            import dask_jobqueue.runner  # noqa: F401
        if not self.shares_terminal:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A failed task's error reaches the driver, which reports it in one line and logs its traceback; the
        # worker's own "Compute Failed" dump would reach the shared terminal as a traceback.  Job workers keep it:
        # their log is a file of the job's.
        worker_log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _TaskFailures) for f in worker_log.filters):
            worker_log.addFilter(_TaskFailures())


class _TaskFailures(logging.Filter):
    """Drops distributed's "Compute Failed" records (see :meth:`QuietLibraries.setup`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Compute Failed"))
