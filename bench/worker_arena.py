"""The paper network's forward inside Dask tasks, with and without one malloc arena per worker process.

A task runs in a worker's task thread, not its main thread, and glibc gives such threads arenas of their own
(``models/device.py::WORKER_MALLOC_ENVIRON`` says why that matters).  This bench runs the same task, the engine's
``patch_grid_probabilities`` (fold 1, one torch thread, 512-patch batches, channels_last, after
``reuse_freed_memory()``) over a random window of ``--grid``² patches, on real ``distributed`` workers in two
layouts, each with the nannies' default environment and with ``MALLOC_ARENA_MAX=1``:

* ``2 x 1``: two worker processes of one task thread each (the local cluster's default on two cores), one task
  on each at once;
* ``1 x 2``: one worker process of two task threads (as a PBS/Slurm worker of several threads), two tasks at once,
  so the threads share the one arena.

Settings alternate over ``--rounds``; every cluster is new; a warm-up task on each worker is not counted.  Printed:
patches/s of each task, and the median per setting.

Usage::

    .venv/bin/python bench/worker_arena.py [--rounds 2] [--grid 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def task_rate(grid: int) -> float:
    """Patches/s of one ``patch_grid_probabilities`` call over a random (grid + 31)² window, in this thread."""
    import time

    import numpy as np
    import torch

    sys.path.insert(0, str(BENCH))
    from patch_throughput import _models

    from wsi_lymph.models.checkpoints import load_checkpoint
    from wsi_lymph.models.device import reuse_freed_memory
    from wsi_lymph.models.networks import patch_grid_probabilities

    reuse_freed_memory()
    torch.set_num_threads(1)
    net, mean, _ = load_checkpoint(_models()[0])
    members = [(net.to(memory_format=torch.channels_last), mean)]
    window = np.random.default_rng(0).uniform(0, 255, (grid + 31, grid + 31, 3)).astype(np.float32)
    start = time.perf_counter()
    patch_grid_probabilities(members, window, batch_size=512)
    return grid * grid / (time.perf_counter() - start)


def run(layout: str, arena: bool, grid: int) -> list[float]:
    import dask
    from distributed import Client, LocalCluster

    workers, threads = (2, 1) if layout == "2 x 1" else (1, 2)
    environ = {"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": "1"} if arena else {}
    with (dask.config.set(environ),
          LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None) as lc,
          Client(lc) as client):
        client.wait_for_workers(workers)
        addresses = list(client.scheduler_info()["workers"])
        client.gather([client.submit(task_rate, 32, workers=[a], pure=False) for a in addresses])  # warm-up
        targets = addresses if workers == 2 else addresses * 2
        return client.gather([client.submit(task_rate, grid, workers=[a], pure=False) for a in targets])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--grid", type=int, default=256, help="patches per task: grid²")
    args = parser.parse_args()
    settings = [(layout, arena) for layout in ("2 x 1", "1 x 2") for arena in (False, True)]
    rates: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for layout, arena in settings:
            name = f"{layout}, {'MALLOC_ARENA_MAX=1' if arena else 'default arenas'}"
            found = run(layout, arena, args.grid)
            rates.setdefault(name, []).extend(found)
            print(f"round {round_ + 1}: {name}: {', '.join(f'{r:,.0f}' for r in found)} patches/s", flush=True)
    print(json.dumps({name: {"median": round(statistics.median(r)), "min": round(min(r)), "max": round(max(r))}
                      for name, r in rates.items()}, indent=2))


if __name__ == "__main__":
    main()
