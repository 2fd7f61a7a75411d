"""Run a command and sample the resident memory of its whole process tree (shared by the benchmarks)."""

from __future__ import annotations

import subprocess
import time

import psutil


def run_sampling_rss(command: list[str], env: dict | None = None, interval_s: float = 0.2,
                     per_process: dict | None = None) -> tuple[float, int, str]:
    """Run ``command``; return (wall seconds, peak summed RSS in bytes of it and its descendants, stderr).

    ``per_process``, when given, receives the peaks of single processes, in bytes: ``driver_peak_bytes`` (the
    command's own process; for ``wsi-lymph`` the driver, which also hosts a local cluster's scheduler) and
    ``largest_child_peak_bytes`` (the largest of its descendants at any sample: a worker or a nanny).  They show
    which process a peak of the sum comes from.

    Raises SystemExit with the command's stderr when it fails.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root, peak, driver_peak, child_peak = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:
        try:
            driver = root.memory_info().rss
            children = [p.memory_info().rss for p in root.children(recursive=True) if p.is_running()]
            peak = max(peak, driver + sum(children))
            driver_peak, child_peak = max(driver_peak, driver), max(child_peak, *children, 0)
        except psutil.Error:
            pass  # a process ended between listing and reading: the next sample sees the rest
        time.sleep(interval_s)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed: {stderr}")
    if per_process is not None:
        per_process.update(driver_peak_bytes=driver_peak, largest_child_peak_bytes=child_peak)
    return wall, peak, stderr
