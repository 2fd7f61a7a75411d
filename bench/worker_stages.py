"""Where the student's ``infer`` tasks spend their time, measured inside the workers of a real LocalCluster.

Each stage of a block is one library function; on every worker (``client.run``) those functions are wrapped with
timers, then ``run_probmaps`` maps the whole ``cmu-1-small-region.svs`` with the default model, 2,048-px blocks,
on a fresh output per run, each run starting without the workers' colour tables, as a new slide does (a
warm-up run on a small region comes first and is not counted).  Printed per run and
worker: seconds spent reading the slide, in the colour transform, resampling, in the network and writing the
map, summed over that worker's blocks.  The wrappers change nothing but add a timer per call.

Usage::

    WSI_LYMPH_MODEL_SOURCE=file://$PWD/../shared/data/models/janowczyk2016-lymphocyte \\
        .venv/bin/python bench/worker_stages.py [--runs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from student_speed import SLIDE, new_slide

from wsi_lymph.engine.batch import run_probmaps
from wsi_lymph.engine.cluster import dask_client, torch_threads_per_worker
from wsi_lymph.engine.params import ProbmapParams


def wrap_stages(dask_worker) -> None:
    """On a worker: time each stage's function (module attributes the block kernel looks up at call time).

    The sums live on the worker object: this script's functions reach the workers pickled by value, each
    with its own copy of any module global.
    """
    import wsi_lymph.detection.inference as inference
    import wsi_lymph.detection.stain as stain
    import wsi_lymph.engine.batch as batch
    import wsi_lymph.slides.frame as frame

    seconds = dask_worker.wsi_lymph_stage_seconds = {}

    def timed(name, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return call

    frame.read_region = timed("read", frame.read_region)
    frame.resize_window = timed("resample", frame.resize_window)
    stain.ReinhardTransform.__call__ = timed("colour transform", stain.ReinhardTransform.__call__)
    inference.subpixel_probabilities = timed("network", inference.subpixel_probabilities)
    batch.write_block = timed("write", batch.write_block)


def take_seconds(dask_worker) -> dict[str, float]:
    """On a worker: the stage times since the last call, then reset."""
    seconds = dict(dask_worker.wsi_lymph_stage_seconds)
    dask_worker.wsi_lymph_stage_seconds.clear()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    threads = torch_threads_per_worker(args.workers)
    quiet = {"progress": False, "log": lambda _: None}
    with dask_client(args.workers, dashboard_address=":0", quiet=True) as client, \
            tempfile.TemporaryDirectory() as tmp:
        client.wait_for_workers(args.workers)
        client.run(wrap_stages)
        run_probmaps(client, [SLIDE], Path(tmp) / "warm", params=ProbmapParams(
            region_level0=(800, 1100, 256, 256), block_px=2048, torch_threads=threads), **quiet)
        client.run(take_seconds)
        params = ProbmapParams(torch_threads=threads)  # the model's default chunks and blocks
        for k in range(args.runs):
            client.run(new_slide)
            start = time.perf_counter()
            [result] = run_probmaps(client, [SLIDE], Path(tmp) / f"run-{k}", params=params, **quiet)
            print(f"run {k + 1}: map {time.perf_counter() - start:.1f} s, "
                  f"{result.blocks_total - result.blocks_skipped} blocks")
            for worker, seconds in client.run(take_seconds).items():
                print(f"  {worker}: " + ", ".join(f"{name} {value:.2f} s" for name, value in sorted(seconds.items())))


if __name__ == "__main__":
    main()
