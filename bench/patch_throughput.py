"""Exact patch throughput: the Dask engine against the tutorial's loop and a bare torch forward.

All three classify 32x32 patches with the same imported fold-1 network on the
same machine in one run, so the ratios are comparable.

    (a) tutorial loop: one forward pass per row of patches, patches cut one by one;
    (b) bare forward: batched forward on random patches already in memory;
    (c) engine: ``run_probmaps`` on a 1-worker LocalCluster, stride 1, no
        hematoxylin skipping, on a region of the real CMU-1 slide — reading,
        resampling, patch extraction, Dask scheduling and Zarr writes included;
        once on a fresh worker (model load and first-call set-up included) and
        once more on the same worker, on the next region (the rate a long slide sees).

Usage::

    .venv/bin/python bench/patch_throughput.py [--region-px 512] [--bare-patches 61440]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def engine(region_px: int, workers: int) -> dict[str, tuple[float, int]]:
    """Engine throughput on a fresh worker (model load included) and on the same worker again (warm)."""
    from wsi_lymph.engine.batch import run_probmaps
    from wsi_lymph.engine.cluster import dask_client, torch_threads_per_worker
    from wsi_lymph.engine.params import ProbmapParams

    slide = SHARED / "slides" / "cmu-1-small-region.svs"
    rates = {}
    with dask_client(workers, dashboard_address=":0", quiet=True) as client, tempfile.TemporaryDirectory() as out:
        client.wait_for_workers(workers)
        client.run(lambda: __import__("wsi_lymph.detection.inference"))  # imports are not part of the measurement
        for label, x0 in (("engine_cold", 1000), ("engine_warm", 1000 + region_px // 4)):
            params = ProbmapParams(
                stride_px=1, chunk_px=256, block_px=256, skip_hematoxylin=False,
                region_level0=(x0, 1200, region_px // 4, region_px // 4),
                torch_threads=torch_threads_per_worker(workers),
            )
            start = time.perf_counter()
            # A fresh output folder per run: the same folder would make the second run a skip of a finished map.
            [result] = run_probmaps(client, [slide], Path(out) / label, model="janowczyk2016/fold1", params=params,
                                    progress=False, log=lambda line: None)
            elapsed = time.perf_counter() - start
            assert result.status == "done" and not result.reused, result.reason
            rates[label] = (result.patches / elapsed, result.patches)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region-px", type=int, default=512, help="engine region edge in model-frame px")
    parser.add_argument("--bare-patches", type=int, default=61440)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tutorial-rows", type=int, default=40)
    args = parser.parse_args()
    [checkpoint] = _models()
    flops = 24.7e6
    results = {}
    results["tutorial_loop"] = tutorial_loop(checkpoint, args.tutorial_rows, 400)
    results["bare_nchw"] = bare_forward(checkpoint, args.bare_patches, args.batch, channels_last=False)
    # The bare reference is measured before and after the engine and averaged: on a shared 2-core VM
    # single short measurements drift by tens of percent.
    bare_before = bare_forward(checkpoint, args.bare_patches, args.batch, channels_last=True)
    engine_rates = engine(args.region_px, 1)
    bare_after = bare_forward(checkpoint, args.bare_patches, args.batch, channels_last=True)
    results["bare_nhwc"] = 0.5 * (bare_before + bare_after)
    results.update({label: rate for label, (rate, _) in engine_rates.items()})
    patches = engine_rates["engine_warm"][1]
    reference = results["bare_nhwc"]
    print(f"bare NHWC before/after the engine: {bare_before:.0f} / {bare_after:.0f} patches/s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; engine region {patches} patches")
    print(f"{'path':<18}{'patches/s':>12}{'GFLOP/s':>10}{'/ bare NHWC':>13}")
    for name, rate in results.items():
        print(f"{name:<18}{rate:>12.0f}{rate * flops / 1e9:>10.1f}{rate / reference:>13.2f}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
