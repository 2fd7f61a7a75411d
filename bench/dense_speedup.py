"""Every-pixel evaluation: patch by patch against the dense-exact fully convolutional path.

On the same random window (BGR 0-255) and with random weights, measures output
pixels per second of

    (a) ``patch_grid_probabilities`` with the paper's :class:`PatchNet`;
    (b) ``patch_grid_probabilities`` with :class:`DensePatchNet` (its patch forward);
    (c) ``dense_probabilities`` with the same DensePatchNet (a trous, fully convolutional);

and checks that (b) and (c) agree.  The patch-by-patch paths are timed on the
first ``--patch-rows`` output rows only (their rate does not depend on the
window's height); the dense path on the whole window.  Threads are pinned with
``torch.set_num_threads``; networks are in channels_last, as the engine runs them.

Usage::

    .venv/bin/python bench/dense_speedup.py [--out-px 512] [--threads 2] [--patch-rows 32] [--mirror]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from wsi_lymph.models.networks import (
    DENSE_FLOPS_PER_PATCH,
    DENSE_FLOPS_PER_PIXEL,
    FLOPS_PER_PATCH,
    DensePatchNet,
    PatchNet,
    dense_probabilities,
    patch_grid_probabilities,
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed_rounds(fns: list, repeats: int) -> tuple[list[float], list[np.ndarray]]:
    """Best wall time of each function over ``repeats`` rounds, and its last result.

    The functions alternate within each round, so a shared machine's changing
    load affects all of them alike.
    """
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-px", type=int, default=512, help="output window edge (pixels)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--patch-rows", type=int, default=32, help="output rows timed on the patchwise paths")
    parser.add_argument("--batch-size", type=int, default=1024, help="patches per forward (patchwise)")
    parser.add_argument("--tile-px", type=int, default=256, help="dense output tile edge")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best of each path is kept)")
    parser.add_argument("--mirror", action="store_true", help="average with the mirrored patch (all paths)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    patch_net = PatchNet().eval().to(device=device, memory_format=torch.channels_last)
    dense_net = DensePatchNet((45.0, 50.0, 40.0)).eval().to(device=device, memory_format=torch.channels_last)
    patch_mean = torch.rand(3, 32, 32) * 40 + 120
    dense_mean = torch.tensor([150.0, 120.0, 170.0]).view(3, 1, 1).expand(3, 32, 32).contiguous()
    n = args.out_px
    window = np.random.default_rng(0).uniform(0, 255, (n + 31, n + 31, 3)).astype(np.float32)
    rows = min(args.patch_rows, n)
    strip = window[: rows + 31]

    def patchwise(net, mean):
        return patch_grid_probabilities(
            [(net, mean)], strip, mirror=args.mirror, batch_size=args.batch_size, device=device
        )

    def dense():
        return dense_probabilities([(dense_net, dense_mean)], window, mirror=args.mirror, device=device,
                                   tile_px=args.tile_px)

    # Warm-up (first-call kernel selection) on small windows.
    patch_grid_probabilities([(patch_net, patch_mean)], window[:40, :64], batch_size=args.batch_size, device=device)
    patch_grid_probabilities([(dense_net, dense_mean)], window[:40, :64], batch_size=args.batch_size, device=device)
    dense_probabilities([(dense_net, dense_mean)], window[: args.tile_px + 31, : args.tile_px + 31], device=device,
                        tile_px=args.tile_px)

    (t_patch, t_dense_patch, t_dense), (_, ref, full) = _timed_rounds(
        [lambda: patchwise(patch_net, patch_mean), lambda: patchwise(dense_net, dense_mean), dense], args.repeats
    )
    diff = float(np.abs(full[:rows] - ref).max())

    views = 2 if args.mirror else 1
    rate_patch = rows * n / t_patch
    rate_dense_patch = rows * n / t_dense_patch
    rate_dense = n * n / t_dense
    print(f"machine: {_cpu_name()}, torch {torch.__version__}, {args.threads} threads, device {device}")
    print(f"window: {n}x{n} output pixels, mirror={args.mirror}, patchwise timed on {rows} rows, tile {args.tile_px}")
    for label, rate, flops in (
        ("(a) PatchNet patchwise:     ", rate_patch, FLOPS_PER_PATCH),
        ("(b) DensePatchNet patchwise:", rate_dense_patch, DENSE_FLOPS_PER_PATCH),
        ("(c) DensePatchNet dense:    ", rate_dense, DENSE_FLOPS_PER_PIXEL),
    ):
        print(f"{label} {rate:12.0f} px/s  ({rate * views * flops / 1e9:.1f} GFLOP/s)")
    print(f"speed-up (c)/(a): {rate_dense / rate_patch:.1f}x   (c)/(b): {rate_dense / rate_dense_patch:.1f}x")
    print(f"FLOP ratio per pixel: PatchNet/dense {FLOPS_PER_PATCH / DENSE_FLOPS_PER_PIXEL:.0f}x, "
          f"DensePatchNet patchwise/dense {DENSE_FLOPS_PER_PATCH / DENSE_FLOPS_PER_PIXEL:.0f}x")
    print(f"max |dense - patchwise| (same DensePatchNet): {diff:.2e}")
    print(
        f"SUMMARY | dense-exact every-pixel eval, {n}x{n}, {args.threads} CPU threads ({_cpu_name()}), "
        f"mirror={args.mirror} | PatchNet patchwise {rate_patch:,.0f} px/s | DensePatchNet patchwise "
        f"{rate_dense_patch:,.0f} px/s | dense {rate_dense:,.0f} px/s | {rate_dense / rate_patch:.0f}x vs PatchNet "
        f"(FLOP ratio {FLOPS_PER_PATCH / DENSE_FLOPS_PER_PIXEL:.0f}x) | max diff {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
