"""Exact patch throughput: the Dask engine against the tutorial's loop and a bare torch forward.

All three classify 32x32 patches with the same imported fold-1 network on the
same machine in one run, so the ratios are comparable.

    (a) tutorial loop: one forward pass per row of patches, patches cut one by one;
    (b) bare forward: batched forward on random patches already in memory;
    (c) engine: ``run_probmaps`` on a LocalCluster (1 worker by default), stride 1, no
        hematoxylin skipping, on a region of the real CMU-1 slide — reading,
        resampling, patch extraction, Dask scheduling and Zarr writes included.

(b) NHWC and (c) alternate for ``--rounds`` rounds after a warm-up that is not counted;
each engine run writes a fresh output folder.  Reported: median and range of each, and
the engine's rate over the bare rate of the same round.

Usage::

    .venv/bin/python bench/patch_throughput.py [--region-px 512] [--bare-patches 61440] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _models() -> list[str]:
    os.environ.setdefault("WSI_LYMPH_MODEL_SOURCE", str(SHARED / "models" / "janowczyk2016-lymphocyte"))
    from wsi_lymph.models.registry import resolve_model

    return [str(p) for p in resolve_model("janowczyk2016/fold1")]


def bare_forward(checkpoint: str, patches: int, batch: int, channels_last: bool) -> float:
    from wsi_lymph.models.checkpoints import load_checkpoint
    from wsi_lymph.models.networks import patch_probabilities

    net, mean, _ = load_checkpoint(checkpoint)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    # A pool of distinct batches (~100 MB), so the input is not cache-resident as one reused tensor would be.
    pool = [(torch.rand(batch, 3, 32, 32) * 255).contiguous(memory_format=fmt) for _ in range(16)]
    with torch.inference_mode():
        patch_probabilities(net, pool[0], mean)  # warm-up
        start = time.perf_counter()
        for i in range(patches // batch):
            patch_probabilities(net, pool[i % len(pool)], mean)
        return (patches // batch) * batch / (time.perf_counter() - start)


def tutorial_loop(checkpoint: str, rows: int, width: int) -> float:
    """The original's structure: for each output row, cut its patches one by one, one forward per row.

    The batch is made C-contiguous NCHW like a Caffe blob (``np.stack`` of transposed HWC views would
    otherwise keep the HWC memory order, i.e. torch's faster channels_last layout).
    """
    from wsi_lymph.models.checkpoints import load_checkpoint
    from wsi_lymph.models.networks import patch_probabilities

    net, mean, _ = load_checkpoint(checkpoint)
    image = np.random.default_rng(0).uniform(0, 255, (rows + 32, width + 32, 3)).astype(np.float32)
    with torch.inference_mode():
        start = time.perf_counter()
        for r in range(rows):
            patches = [image[r : r + 32, c : c + 32].transpose(2, 0, 1) for c in range(width)]
            batch = np.ascontiguousarray(np.stack(patches))
            patch_probabilities(net, torch.from_numpy(batch), mean)
        return rows * width / (time.perf_counter() - start)


def engine_runs(client, region_px: int, workers: int, rounds: int, bare) -> dict[str, list[float]]:
    """Interleaved warm runs: the bare forward in this process, then the engine on a fresh output, ``rounds`` times.

    One warm-up engine run (model load, worker imports, allocator growth) comes first and is not counted;
    every engine run classifies the same region into its own new folder (a reused folder would be skipped
    as finished).
    """
    from wsi_lymph.engine.batch import run_probmaps
    from wsi_lymph.engine.cluster import torch_threads_per_worker
    from wsi_lymph.engine.params import ProbmapParams

    slide = SHARED / "slides" / "cmu-1-small-region.svs"
    params = ProbmapParams(stride_px=1, chunk_px=256, block_px=256, skip_hematoxylin=False,
                           region_level0=(1000, 1200, region_px // 4, region_px // 4),
                           torch_threads=torch_threads_per_worker(workers))
    rates: dict[str, list[float]] = {"bare_nhwc": [], "engine": []}
    with tempfile.TemporaryDirectory() as out:
        for k in range(rounds + 1):
            if k > 0:
                rates["bare_nhwc"].append(bare())
            start = time.perf_counter()
            [result] = run_probmaps(client, [slide], Path(out) / f"run-{k}", model="janowczyk2016/fold1",
                                    params=params, progress=False, log=lambda line: None)
            elapsed = time.perf_counter() - start
            assert result.status == "done" and not result.reused, result.reason
            if k > 0:
                rates["engine"].append(result.patches / elapsed)
                print(f"round {k}: bare {rates['bare_nhwc'][-1]:,.0f}, engine {rates['engine'][-1]:,.0f} patches/s "
                      f"({result.patches:,} patches)", flush=True)
    return rates


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    from wsi_lymph.models.device import reuse_freed_memory

    reuse_freed_memory()  # the bare reference takes the fast allocator path the engine's workers take
    from wsi_lymph.engine.cluster import dask_client

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region-px", type=int, default=512, help="engine region edge in model-frame px")
    parser.add_argument("--bare-patches", type=int, default=61440)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tutorial-rows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare/engine rounds after the warm-up")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    [checkpoint] = _models()
    flops = 24.7e6
    threads = torch.get_num_threads()
    bare_forward(checkpoint, args.batch * 4, args.batch, channels_last=True)  # warm-up, not counted
    single = {"tutorial_loop": tutorial_loop(checkpoint, args.tutorial_rows, 400),
              "bare_nchw": bare_forward(checkpoint, args.bare_patches, args.batch, channels_last=False)}
    with dask_client(args.workers, dashboard_address=":0", quiet=True) as client:
        client.wait_for_workers(args.workers)
        rates = engine_runs(client, args.region_px, args.workers, args.rounds,
                            lambda: bare_forward(checkpoint, args.bare_patches, args.batch, channels_last=True))
    reference = statistics.median(rates["bare_nhwc"])
    ratios = [e / b for e, b in zip(rates["engine"], rates["bare_nhwc"], strict=True)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads "
          f"in this process, {args.workers} worker(s); {args.rounds} rounds after a warm-up")
    print(f"{'path':<16}{'patches/s: median (range)':>34}{'GFLOP/s':>10}{'/ bare NHWC':>13}")
    for name, values in {**{k: [v] for k, v in single.items()}, **rates}.items():
        rate = statistics.median(values)
        print(f"{name:<16}{_spread(values):>34}{rate * flops / 1e9:>10.1f}{rate / reference:>13.2f}")
    print(f"engine / bare per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"against the fastest bare round: {statistics.median(rates['engine']) / max(rates['bare_nhwc']):.2f}")
    print(json.dumps({"single": single, **rates, "engine_over_bare_per_round": ratios}))


if __name__ == "__main__":
    main()
