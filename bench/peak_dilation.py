"""The candidate-linking dilation of one peak block: disk structuring element against ``dilate_by_disk``.

``summarise_peak_block`` links candidates closer than the clearing radius by dilating them with a
disk of radius ~29 px.  Both ways give the same mask (asserted here and in tests/test_peaks.py);
this measures them on the same block in one run, each repeated, and the whole block summary.

Usage::

    .venv/bin/python bench/peak_dilation.py [--block-px 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from wsi_lymph.constants import PAPER_THRESHOLD, SMOOTH_RADIUS_PX
from wsi_lymph.detection.peaks import dilate_by_disk, disk_kernel, linking_reach_px, summarise_peak_block


def synthetic_block(size: int, seed: int = 0) -> np.ndarray:
    """Blobs of P like a lymphocyte-rich region (about 1% of pixels above the paper's threshold after smoothing)."""
    rng = np.random.default_rng(seed)
    prob = np.zeros((size, size), np.float32)
    for r, c in rng.integers(0, size, (size * size // 1400, 2)):
        prob[max(0, r - 8) : r + 8, max(0, c - 8) : c + 8] = rng.uniform(0.3, 1.0)
    prob = ndimage.gaussian_filter(prob, 3)
    return prob / prob.max()


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-px", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reach = linking_reach_px(28)
    halo = int(np.ceil(SMOOTH_RADIUS_PX)) + reach
    padded = synthetic_block(args.block_px + 2 * halo)
    smoothed = ndimage.convolve(padded.astype(np.float64), disk_kernel(SMOOTH_RADIUS_PX), mode="reflect")
    candidates = smoothed > PAPER_THRESHOLD
    offsets = np.arange(-reach, reach + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= reach * reach
    assert np.array_equal(dilate_by_disk(candidates, reach), ndimage.binary_dilation(candidates, structure=disk))
    dilation = timed(lambda: ndimage.binary_dilation(candidates, structure=disk), args.repeats)
    ours = timed(lambda: dilate_by_disk(candidates, reach), args.repeats)
    block = (0, args.block_px, 0, args.block_px)
    summary = timed(lambda: summarise_peak_block(padded, block, halo, PAPER_THRESHOLD), args.repeats)
    print(f"block {args.block_px}² px + halo {halo}, {candidates.mean():.2%} candidates, reach {reach} px")
    for name, times in (("binary_dilation (disk)", dilation), ("dilate_by_disk", ours),
                        ("whole summarise_peak_block", summary)):
        print(f"{name:<28} median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f})")
    print(f"ratio binary_dilation / dilate_by_disk: {statistics.median(dilation) / statistics.median(ours):.1f}x")


if __name__ == "__main__":
    main()
