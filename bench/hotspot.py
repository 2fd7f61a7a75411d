"""The hotspot search on slide-sized sets of centres: branch and bound against the textbook all-points sweep.

:func:`wsi_lymph.detection.hotspot.max_points_in_circle` (best-first branch and bound over field positions,
angular sweeps only where a cell is settled) and
:func:`~wsi_lymph.detection.hotspot.max_points_in_circle_all_sweeps` (an angular sweep around every point: the
classic exact O(n² log n) algorithm) run on the same centres in one process; their counts must be equal
(asserted).  Times are CPU seconds of this process (``time.process_time``), steadier than wall time on a shared
machine; both searches are single-threaded.

Point sets (µm, 1 mm² field = radius 564 µm):

``clustered``
    half the centres scattered over a 15 x 12 mm tissue, half in 12 lymphoid aggregates (Gaussian, σ 150-600 µm),
    like a lymphocyte-rich resection;
``uniform``
    all centres uniform over 5 x 5 mm (2,000 per mm²): no hotspot stands out, the worst case for pruning.

Usage::

    .venv/bin/python bench/hotspot.py [--points 50000] [--repeats 3] [--leaf-points 4 8 16 48] [--no-reference]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from wsi_lymph.detection import hotspot


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Half scattered over a 15 x 12 mm tissue, half in 12 aggregates of σ 150-600 µm (µm)."""
    rng = np.random.default_rng(seed)
    scattered = rng.uniform([0, 0], [15000, 12000], (n // 2, 2))
    centres = rng.uniform([1000, 1000], [14000, 11000], (12, 2))
    sizes = np.floor(rng.dirichlet(np.ones(12)) * (n - n // 2)).astype(int)
    sizes[0] += n - n // 2 - sizes.sum()
    aggregates = [rng.normal(c, rng.uniform(150, 600), (k, 2)) for c, k in zip(centres, sizes, strict=True)]
    return np.concatenate([scattered, *aggregates])


def uniform(n: int, seed: int = 0) -> np.ndarray:
    """Uniform over 5 x 5 mm (µm)."""
    return np.random.default_rng(seed).uniform(0, 5000, (n, 2))


def cpu_seconds(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = function()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=50000)
    parser.add_argument("--area-mm2", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--leaf-points", type=int, nargs="+", default=[hotspot.LEAF_POINTS],
                        help="annulus size at which a cell is settled by sweeps (the module's is "
                        f"{hotspot.LEAF_POINTS})")
    parser.add_argument("--no-reference", action="store_true", help="skip the all-points sweep (minutes)")
    args = parser.parse_args()
    radius = hotspot.field_radius_um(args.area_mm2)
    print(f"{args.points} centres, field {args.area_mm2:g} mm² (radius {radius:.1f} µm), CPU s, median of "
          f"{args.repeats}")
    print(f"{'set':<10}{'leaf':>6}{'count':>8}{'branch and bound':>18}{'all sweeps':>12}{'ratio':>8}")
    default_leaf = hotspot.LEAF_POINTS
    for name, points in (("clustered", clustered(args.points)), ("uniform", uniform(args.points))):
        reference = None
        if not args.no_reference:
            reference = cpu_seconds(lambda p=points: hotspot.max_points_in_circle_all_sweeps(p, radius), 1)
        for leaf in args.leaf_points:
            hotspot.LEAF_POINTS = leaf
            seconds, (count, _) = cpu_seconds(lambda p=points: hotspot.max_points_in_circle(p, radius), args.repeats)
            line = f"{name:<10}{leaf:>6}{count:>8}{seconds:>18.2f}"
            if reference is not None:
                assert reference[1][0] == count, (name, leaf, reference[1][0], count)
                line += f"{reference[0]:>12.1f}{reference[0] / seconds:>7.0f}x"
            print(line, flush=True)
        hotspot.LEAF_POINTS = default_leaf


if __name__ == "__main__":
    main()
