"""Does the memory allocator decide the bare forward's speed?  Fresh processes, alternating, per allocator setting.

The issue saw the paper network's bare forward vary 2x between processes on one machine.  Each
setting below runs the same bare forward (``patch_throughput.bare_forward``: fold 1, 256-patch
batches from a 100 MB pool, channels_last, one warm-up batch excluded) in a new Python process;
settings alternate, so drift of the machine hits all of them alike.

Settings: glibc's malloc as a plain process has it; glibc with ``MALLOC_TRIM_THRESHOLD_=65536`` (what
``distributed`` sets in every worker it spawns, ``distributed.nanny.pre-spawn-environ``); glibc with a
1 GiB trim threshold, without and with mmap turned off (``MALLOC_MMAP_MAX_=0``: large buffers come from
the heap and are reused); a dask-like worker that calls ``reuse_freed_memory()`` as the engine's
workers do, with the forward on the main thread and, as a Dask task runs, on a second thread, without and
with ``MALLOC_ARENA_MAX=1`` (every thread but the first gets its own arena of at most 64 MB heaps); and
tcmalloc through ``LD_PRELOAD`` when ``libtcmalloc_minimal.so.4`` is installed.

Usage::

    .venv/bin/python bench/allocator.py [--rounds 4] [--patches 15360] [--threads 1] [--batch 256]
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
#: Not an environment variable: the child calls ``wsi_lymph.models.device.reuse_freed_memory()`` first.
MALLOPT = "reuse_freed_memory"
#: Nor this: the child runs the forward on a second thread, as a Dask worker runs a task.
THREAD = "second_thread"
CHILD = """
import sys, threading, torch
sys.path.insert(0, {bench!r})
from patch_throughput import _models, bare_forward
if {mallopt}:
    from wsi_lymph.models.device import reuse_freed_memory
    assert reuse_freed_memory()
torch.set_num_threads({threads})
rate = []
run = lambda: rate.append(bare_forward(_models()[0], {patches}, {batch}, True))
if {thread}:
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
else:
    run()
print(rate[0])
"""


def settings() -> dict[str, dict[str, str]]:
    big = str(1 << 30)
    found = {
        "glibc": {},
        "glibc, dask worker trim 64 KiB": {"MALLOC_TRIM_THRESHOLD_": "65536"},
        "glibc, 1 GiB trim threshold": {"MALLOC_TRIM_THRESHOLD_": big},
        "glibc, 1 GiB trim threshold, no mmap": {"MALLOC_TRIM_THRESHOLD_": big, "MALLOC_MMAP_MAX_": "0"},
        "glibc, dask worker + reuse_freed_memory()": {"MALLOC_TRIM_THRESHOLD_": "65536", MALLOPT: "1"},
        "the same, on a second thread (a Dask task)": {"MALLOC_TRIM_THRESHOLD_": "65536", MALLOPT: "1", THREAD: "1"},
        "the same, second thread, MALLOC_ARENA_MAX=1 (the engine)": {"MALLOC_TRIM_THRESHOLD_": "65536",
                                                                      "MALLOC_ARENA_MAX": "1", MALLOPT: "1",
                                                                      THREAD: "1"},
    }
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        candidate = Path(folder) / "libtcmalloc_minimal.so.4"
        if candidate.exists():
            tcmalloc = str(candidate)
    if tcmalloc:
        found["tcmalloc (LD_PRELOAD)"] = {"LD_PRELOAD": tcmalloc}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patches", type=int, default=15360)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="patches per forward (the engine's: 512)")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in settings()}
    for round_ in range(args.rounds):
        for name, env in settings().items():
            child = CHILD.format(bench=str(BENCH), threads=args.threads, patches=args.patches, batch=args.batch,
                                 mallopt=MALLOPT in env, thread=THREAD in env)
            env = {k: v for k, v in env.items() if k not in (MALLOPT, THREAD)}
            out = subprocess.run([sys.executable, "-c", child], env={**os.environ, **env}, check=True,
                                 capture_output=True, text=True).stdout
            rates[name].append(float(out.split()[-1]))
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:,.0f} patches/s", flush=True)
    reference = statistics.median(rates["glibc"])
    report = {name: {"median": statistics.median(r), "min": min(r), "max": max(r),
                     "over_glibc": statistics.median(r) / reference} for name, r in rates.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
