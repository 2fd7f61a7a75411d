"""Run a command and sample the resident memory of its whole process tree (shared by the benchmarks)."""

from __future__ import annotations

import subprocess
import time

import psutil


def run_sampling_rss(command: list[str], env: dict | None = None, interval_s: float = 0.2) -> tuple[float, int, str]:
    """Run ``command``; return (wall seconds, peak summed RSS in bytes of it and its descendants, stderr).

    Raises SystemExit with the command's stderr when it fails.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass  # a process ended between listing and reading: the next sample sees the rest
        time.sleep(interval_s)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed: {stderr}")
    return wall, peak, stderr
