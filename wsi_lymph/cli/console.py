"""What a user sees of a command, and where the rest goes.

* Log lines (:mod:`logging`, the ``wsi_lymph`` loggers) reach the console through :func:`tqdm.tqdm.write`, so they
  never tear the progress bars: information on stdout, warnings and errors on stderr.
* Everything, with timestamps, also goes to the command's log file: library log records and warnings, and the
  traceback of any error.  Commands with an output folder log to ``OUT/wsi-lymph.log`` once their cluster is up
  (:func:`log_to`), so that a refused command leaves no folder behind; before that, and for the other commands, the
  lines are held in memory and written to ``<cache>/logs/wsi-lymph.log`` only if an error needs its traceback kept.
* Library noise stays off the console: the dashboard's web server (bokeh, tornado: e.g. an ``AssertionError`` each
  time a dashboard tab closes), dask's "port already in use" warning (the dashboard link printed says where it is),
  Pillow's "Corrupt EXIF data" and tifffile's "invalid offset" (harmless metadata, the pixels read fine; a slide that
  cannot be read fails with its own one-line reason).  Other library warnings and errors are shown once each, in
  one line, without their source line.  ``--debug`` shows everything, tracebacks included.
* Ctrl-C raises :class:`KeyboardInterrupt` in the driver (libraries may have replaced Python's handler: dask-jobqueue
  installs one that exits with status 0); the workers of a local cluster ignore it, so the driver stops them in
  order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

LOG_NAME = "wsi-lymph.log"
#: Loggers of the dashboard's web server: only the log file hears them.
DASHBOARD_LOGGERS = ("bokeh", "tornado", "asyncio")
#: Library warnings and log records known to be harmless noise (regular expressions on the message).
NOISE = (
    re.compile(r"Port \d+ is already in use"),  # distributed: the dashboard moved to another port, the link says so
    re.compile(r"Corrupt EXIF data", re.IGNORECASE),  # Pillow: damaged EXIF block of a TIFF/JPEG, pixels are fine
    re.compile(r"invalid offset", re.IGNORECASE),  # tifffile: a tag points outside the file, the tag is skipped
    re.compile(r"Creating scratch directories is taking a surprisingly long time"),
)
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("wsi_lymph.cli")


class _State:
    """The console settings of the running command (one per process)."""

    debug = False
    interrupted = False  # after Ctrl-C: the libraries' shutdown chatter stays in the log file
    interrupt_told = False
    redelivered = False  # a swallowed Ctrl-C sent again (see _unraisable)
    seen: set[str] = set()


STATE = _State()


# ------------------------------------------------------------------------------------------ the console
class ConsoleHandler(logging.Handler):
    """Log records to the console through :func:`tqdm.write`, so that progress bars are cleared and redrawn around
    them: below WARNING on stdout, the rest (and tracebacks, with ``--debug``) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._text(record)
            if text is None:
                return
            stream = sys.stderr if record.levelno >= logging.WARNING or record.exc_info else sys.stdout
            tqdm.write(text, file=stream)
        except Exception:  # noqa: BLE001 - a console that cannot be written to must not end the run
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A closed console (a pipe to ``head``): nothing to tell it, and no "--- Logging error ---" dump."""

    def _text(self, record: logging.LogRecord) -> str | None:
        own = record.name == "wsi_lymph" or record.name.startswith("wsi_lymph.")
        if own:
            if STATE.debug:
                return logging.Formatter("%(message)s").format(record)
            return record.getMessage() if record.levelno >= logging.INFO else None
        if STATE.debug:
            return logging.Formatter("%(name)s %(levelname)s: %(message)s").format(record)
        message = record.getMessage()
        if (STATE.interrupted or record.levelno < logging.ERROR or _from_dashboard(record)
                or _is_noise(message)):
            return None
        first = message.strip().splitlines()[0] if message.strip() else type(record.exc_info[1]).__name__
        return _once(f"{record.name.split('.')[0]}: {first} (details in the log file)")


def _from_dashboard(record: logging.LogRecord) -> bool:
    """A record of the dashboard's web server: its loggers, or a traceback through bokeh or dask's dashboard code
    (distributed logs those errors under its own name, e.g. when a browser tab closes during an update)."""
    if record.name.split(".")[0] in DASHBOARD_LOGGERS:
        return True
    traceback_ = record.exc_info[2] if record.exc_info else None
    while traceback_ is not None:
        filename = traceback_.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/bokeh/" in filename or "/distributed/dashboard/" in filename or "/distributed/http/" in filename:
            return True
        traceback_ = traceback_.tb_next
    return False


def _is_noise(message: str) -> bool:
    return any(pattern.search(message) for pattern in NOISE)


def _once(text: str) -> str | None:
    if text in STATE.seen:
        return None
    STATE.seen.add(text)
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """:func:`warnings.showwarning` of the commands: the log file gets the warning and its origin; the console a
    plain line, once per message, unless it is known noise (``--debug``: the log record, :class:`ConsoleHandler`)."""
    text = str(message)
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, text, filename, lineno)
    if STATE.debug or STATE.interrupted or _is_noise(text):
        return
    if shown := _once(f"warning: {text.strip().splitlines()[0] if text.strip() else category.__name__}"):
        _write_console(shown, sys.stderr)


def _write_console(text: str, stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        tqdm.write(text, file=stream)


# ------------------------------------------------------------------------------------------ the log file
class LogFile(logging.Handler):
    """Every record, with its time and any traceback, into the command's log file.

    Records are held in memory until :meth:`open` names the file.  A file that stops taking lines (a full disk, a
    read-only folder) is swapped for ``<cache>/logs/wsi-lymph.log``, then for one in the temporary folder, without
    a word on the console: the run's own messages say what went wrong with the output folder.
    """

    HELD = 20_000  # records kept in memory before a file is named (the oldest go first)

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(_FILE_FORMAT))
        self.path: Path | None = None
        self._stream: TextIO | None = None
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, not a crash
            return
        if self._stream is None:
            self._held.append(text)
            del self._held[: -self.HELD]
        else:
            self._write([text])

    def open(self, path: Path) -> Path | None:
        """Write the held records and all later ones to ``path`` (appended); the file actually used, or None."""
        for candidate in (path, *_fallback_paths()):
            if self._try_open(candidate):
                return self.path
        return None

    def keep(self) -> Path | None:
        """Make sure the records so far are in a file (the fallback if none was named): where they are."""
        if self._stream is None:
            for candidate in _fallback_paths():
                if self._try_open(candidate):
                    break
        return self.path

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None
        super().close()

    def _try_open(self, path: Path) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole command
            stream.write("".join(f"{line}\n" for line in self._held))
            stream.flush()
        except OSError:
            return False
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream, self.path, self._held = stream, path, []
        return True

    def _write(self, lines: list[str]) -> None:
        try:
            self._stream.write("".join(f"{line}\n" for line in lines))
            self._stream.flush()
        except (OSError, ValueError):
            failed = self.path
            self._stream, self._held = None, lines
            for candidate in _fallback_paths():
                if candidate != failed and self._try_open(candidate):
                    return
            self._held = []  # nowhere to write: the console still has the one-line messages


def _fallback_paths() -> list[Path]:
    from wsi_lymph.cache import cache_dir

    return [cache_dir() / "logs" / LOG_NAME, Path(tempfile.gettempdir()) / f"wsi-lymph-{os.getuid()}.log"]


LOG_FILE = LogFile()


def log_to(folder: str | os.PathLike) -> Path | None:
    """Log the command into ``folder/wsi-lymph.log`` (created with the folder); the file used, or None."""
    return LOG_FILE.open(Path(folder) / LOG_NAME)


def say(line: str) -> None:
    """A command's progress line: through logging, so that it reaches the console above the progress bars (stdout)
    and the log file."""
    log.info(line)


# ------------------------------------------------------------------------------------------ setup
@contextlib.contextmanager
def session(*, debug: bool = False) -> Iterator[None]:
    """The console and the log file of one command, for the duration of a ``with`` block."""
    STATE.debug, STATE.interrupted, STATE.interrupt_told, STATE.seen = debug, False, False, set()
    STATE.redelivered = False
    root = logging.getLogger()
    console = ConsoleHandler(logging.DEBUG)
    saved = root.level, list(root.handlers), warnings.showwarning
    own = logging.getLogger("wsi_lymph")
    own_level = own.level
    root.handlers = [console, LOG_FILE]
    root.setLevel(logging.INFO)  # libraries' DEBUG chatter stays out even of the file
    own.setLevel(logging.DEBUG)  # our own DEBUG records (tracebacks of failed tasks) go to the file
    logging.captureWarnings(False)
    warnings.showwarning = _show_warning
    adopted = adopt_library_loggers()
    main_thread = threading.current_thread() is threading.main_thread()
    saved_interrupt = signal.getsignal(signal.SIGINT) if main_thread else None
    saved_unraisable = sys.unraisablehook
    interrupt_handler()
    sys.unraisablehook = _unraisable
    try:
        yield
    finally:
        sys.unraisablehook = saved_unraisable
        if main_thread:
            signal.signal(signal.SIGINT, saved_interrupt if saved_interrupt is not None else signal.SIG_DFL)
        root.setLevel(saved[0])
        root.handlers = saved[1]
        warnings.showwarning = saved[2]
        own.setLevel(own_level)
        for logger, handlers, propagate in adopted:
            logger.handlers, logger.propagate = handlers, propagate
        LOG_FILE.close()
        LOG_FILE.__init__()  # a fresh, unopened file for a later command in this process (tests)


def adopt_library_loggers() -> list[tuple[logging.Logger, list[logging.Handler], bool]]:
    """Route the records of the loggers distributed gave their own stderr handler through ours instead.

    distributed attaches a stream handler to ``distributed``, ``bokeh``, ``tornado``… when it is imported, unless
    the root logger already has handlers; it may have been imported before the command set them up.  Returns what
    was changed, ``(logger, its handlers, its propagate)``, for :func:`session` to put back.
    """
    import dask

    configured = dask.config.get("logging", {}) or {}
    names = {"distributed", "distributed.client", "distributed.gc", "bokeh", "tornado", "tornado.application",
             *(name for name in configured if isinstance(name, str))}
    changed = []
    for name in sorted(names):
        logger = logging.getLogger(name)
        changed.append((logger, list(logger.handlers), logger.propagate))
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
                    sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                logger.removeHandler(handler)
        logger.propagate = True
    return changed


def interrupt_handler() -> None:
    """Ctrl-C raises :class:`KeyboardInterrupt` in the driver.

    dask-jobqueue, when first imported, replaces Python's handler with one that exits with status 0 (its runner's
    "close gracefully"): it is imported first, so that ours comes last.
    """
    with contextlib.suppress(ImportError):
        import dask_jobqueue.runner  # noqa: F401 - for its import-time signal handler, replaced below
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)


def _on_interrupt(signum, frame) -> None:
    if STATE.redelivered:
        STATE.redelivered = False
        if STATE.interrupt_told:  # the command stopped meanwhile: nothing left to interrupt
            return
    STATE.interrupted = True  # from now on the libraries' shutdown messages go to the log file only
    raise KeyboardInterrupt


def _unraisable(unraisable) -> None:
    """:data:`sys.unraisablehook` of the commands: an error Python cannot raise (in a ``__del__``, a callback of
    the garbage collector) goes to the log file, not to the console as "Exception ignored ... Traceback".

    Ctrl-C can land in such a place (an asyncio future's ``__del__`` while the driver waits), where the
    :class:`KeyboardInterrupt` would be dropped and the run go on: the signal is sent to the main thread again, to be
    raised in an ordinary line.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt) or unraisable.exc_type is KeyboardInterrupt:
        log.debug("Ctrl-C reached %r, where it cannot be raised: delivered again", unraisable.object)
        STATE.redelivered = True
        # Sent from another thread, a moment later: sent from here, it would be raised inside this hook, and dropped
        # again.  A real signal (not _thread.interrupt_main) also wakes a main thread blocked in a wait.
        threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        return
    if STATE.debug:
        sys.__unraisablehook__(unraisable)
        return
    log.debug("%s: %s", unraisable.err_msg or "Exception ignored in", unraisable.object,
              exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def tell_interrupted(command: str, *, resumable: bool = True) -> None:
    """The one line of an interrupted command (printed once, as soon as the interrupt is caught)."""
    STATE.interrupted = True
    if STATE.interrupt_told:
        return
    STATE.interrupt_told = True
    hint = "; run the same command again to resume" if resumable else ""
    log.debug("interrupted by the user")
    for bar in list(getattr(tqdm, "_instances", ())):  # the bars of the batch, stopped where they were
        with contextlib.suppress(Exception):
            bar.close()
    _write_console(f"wsi-lymph {command}: interrupted{hint}", sys.stderr)


# ------------------------------------------------------------------------------------------ the cluster
@contextlib.contextmanager
def cluster(command: str, *, log_dir: str | os.PathLike | None = None, resumable: bool = True,
            **options) -> Iterator:
    """:func:`wsi_lymph.engine.cluster.dask_client` for a command: known library noise off on its workers, and
    Ctrl-C told at once, while the cluster stops.

    Parameters
    ----------
    command : str
        The command's name, for the interrupt line.
    log_dir : path-like, optional
        Once the cluster is up, the log goes on in ``log_dir/wsi-lymph.log`` (:func:`log_to`); a cluster that cannot
        be built from the options leaves no folder behind.
    resumable : bool
        The same command, run again, goes on where it stopped (the interrupt line says so).
    **options
        Keyword arguments of :func:`~wsi_lymph.engine.cluster.dask_client`.
    """
    from distributed import LocalCluster

    from wsi_lymph.engine.cluster import dask_client

    interrupt_handler()
    quiet_resource_tracker()
    with dask_client(**options) as client:
        if log_dir is not None:
            log_to(log_dir)
        quiet_workers(client, local=isinstance(getattr(client, "cluster", None), LocalCluster))
        try:
            yield client
        except KeyboardInterrupt:
            tell_interrupted(command, resumable=resumable)
            raise


#: A warnings filter (``-W`` syntax) for multiprocessing's resource tracker (a separate process).
RESOURCE_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
    """No "There appear to be N leaked semaphore objects" warning after a Ctrl-C.

    The cluster's processes hold multiprocessing semaphores; when the run is interrupted under a running task they
    are not all released in order, and multiprocessing's resource tracker, started as a child of this process,
    unlinks them at exit and warns about them on the console.  Nothing leaks: the tracker cleans
    them up.  It takes its warning filters from ``sys.warnoptions`` of the process that starts it, so the filter
    goes there, before the cluster (and the tracker) start.
    """
    if RESOURCE_TRACKER_FILTER not in sys.warnoptions:
        sys.warnoptions.append(RESOURCE_TRACKER_FILTER)


# ------------------------------------------------------------------------------------------ the workers
def quiet_workers(client, *, local: bool) -> None:
    """Library noise filtered on the workers too; the workers of a local cluster leave Ctrl-C to the driver.

    A local cluster's worker processes share the terminal: Ctrl-C reaches them as well, and a worker that quits on
    it dies under its running task.  The driver, which gets it too, stops them in order instead.
    """
    from wsi_lymph.cli.workers import QuietLibraries

    client.register_plugin(QuietLibraries(NOISE, ignore_interrupts=local))
