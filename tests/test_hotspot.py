"""The hotspot (densest circular field) against a brute-force count, and the pictures that show it.

The brute force here is independent of :mod:`wsi_lymph.detection.hotspot`: every candidate field (a circle through
two points, or centred on one) is counted with plain distances.  A centre on the field's edge counts.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image

from wsi_lymph.detection.hotspot import (
    EDGE_TOLERANCE,
    densest_field,
    enclosing_circle,
    field_radius_um,
    max_points_in_circle,
    max_points_in_circle_all_sweeps,
)
from wsi_lymph.io.pictures import (
    HOTSPOT_COLOUR_RGB,
    density_bin_um,
    density_grid,
    write_density_png,
    write_overlay_png,
)


def _inside(points: np.ndarray, centre, radius: float) -> int:
    """Points at distance ≤ radius (the edge counts; rounding of the coordinates aside)."""
    return int(np.sum(np.hypot(points[:, 0] - centre[0], points[:, 1] - centre[1]) <= radius * (1 + EDGE_TOLERANCE)))


def _brute_force(points: np.ndarray, radius: float) -> int:
    """Most points in a closed disc: every disc with two points on its edge, or centred on a point (O(n³))."""
    if not len(points):
        return 0
    candidates = list(points)
    for a, b in itertools.combinations(points, 2):
        d = math.dist(a, b)
        if 0 < d <= 2 * radius:
            middle, along = (a + b) / 2, (b - a) / d
            normal = np.array([-along[1], along[0]]) * math.sqrt(max(radius**2 - (d / 2) ** 2, 0.0))
            candidates += [middle + normal, middle - normal]
    return max(_inside(points, c, radius) for c in candidates)


def _point_sets():
    rng = np.random.default_rng(12)
    for seed in range(24):
        n = int(rng.integers(2, 45))
        radius = float(rng.choice([2.5, 5.0, 10.0, 13.0]))
        kind = ("random", "clustered", "integer grid")[seed % 3]
        if kind == "random":
            points = rng.uniform(0, 100, (n, 2))
        elif kind == "clustered":
            points = np.concatenate([rng.normal(c, 4, (n // 3 + 1, 2)) for c in rng.uniform(0, 100, (3, 2))])
        else:  # many points exactly on the edge of many candidate fields (integer distances: 3-4-5, 5-12-13)
            points = rng.integers(0, 20, (n, 2)).astype(float)
        yield pytest.param(points, radius, id=f"{kind}-{seed}-n{len(points)}-r{radius:g}")


@pytest.mark.parametrize(("points", "radius"), list(_point_sets()))
def test_the_densest_field_equals_a_brute_force_count(points, radius):
    count, centre = max_points_in_circle(points, radius)
    assert count == _brute_force(points, radius)
    assert _inside(points, centre, radius) == count  # the field reported holds what is reported
    assert max_points_in_circle_all_sweeps(points, radius)[0] == count  # the textbook sweep agrees
    hotspot = densest_field(points, area_mm2=math.pi * (radius / 1000.0) ** 2)  # the points in µm: r µm
    assert hotspot.radius_um == pytest.approx(radius) and hotspot.count == count
    assert _inside(points, (hotspot.x_um, hotspot.y_um), radius) == count


def test_points_on_the_field_edge_count():
    rng = np.random.default_rng(3)
    # A ring of k points on a circle of exactly the field's radius: only the closed disc holds them all.
    for k in (3, 7, 24):
        radius = float(rng.uniform(50, 600))
        centre = rng.uniform(0, 20000, 2)
        angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(k) / k
        ring = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
        count, found = max_points_in_circle(ring, radius)
        assert count == k
        np.testing.assert_allclose(found, centre, atol=1e-6 * radius)  # the one field that holds them
    # Two points exactly a diameter apart share one field, centred between them; a hair farther, none.
    assert max_points_in_circle([[0.0, 0.0], [10.0, 0.0]], 5.0)[0] == 2
    np.testing.assert_allclose(max_points_in_circle([[0.0, 0.0], [10.0, 0.0]], 5.0)[1], [5.0, 0.0], atol=1e-9)
    assert max_points_in_circle([[0.0, 0.0], [10.0001, 0.0]], 5.0)[0] == 1
    # The integer lattice: a field of radius 5 on a lattice point holds 81 points, 12 of them on its edge
    # (±5, 0), (±3, ±4), ...; the open disc would hold 69.
    grid = np.stack(np.meshgrid(np.arange(-9, 10), np.arange(-9, 10)), axis=-1).reshape(-1, 2).astype(float)
    assert _inside(grid, (0, 0), 5.0) == 81
    assert int(np.sum(np.hypot(*grid.T) < 5.0)) == 69
    assert max_points_in_circle(grid, 5.0)[0] == _brute_force(grid, 5.0) >= 81


def test_degenerate_point_sets():
    none = densest_field(np.empty((0, 2)))
    assert (none.count, none.x_um, none.y_um, none.density_per_mm2) == (0, None, None, 0.0)
    assert none.as_dict()["x_um"] is None

    one = densest_field(np.array([[1234.5, 678.9]]))
    assert (one.count, one.x_um, one.y_um) == (1, 1234.5, 678.9)

    same = densest_field(np.full((7, 2), 250.0), area_mm2=0.5)
    assert (same.count, same.x_um, same.y_um) == (7, 250.0, 250.0)
    assert same.density_per_mm2 == pytest.approx(14.0)

    # Two stacks of duplicates farther apart than a diameter: the taller stack wins.
    stacks = np.concatenate([np.full((3, 2), 0.0), np.full((5, 2), 5000.0)])
    assert (densest_field(stacks).count, densest_field(stacks).x_um) == (5, 5000.0)

    with pytest.raises(ValueError, match="positive"):
        densest_field(np.zeros((1, 2)), area_mm2=0.0)
    with pytest.raises(ValueError, match="finite"):
        max_points_in_circle(np.array([[0.0, np.nan]]), 1.0)


def test_field_units_and_centring():
    assert field_radius_um(1.0) == pytest.approx(564.1896, abs=1e-4)  # 1 mm² = π r², r in µm
    rng = np.random.default_rng(7)
    # A cluster of 60 centres in 100 µm, far smaller than the 1 mm² field, and 40 scattered farther than 2r.
    cluster = rng.normal([3000.0, 2000.0], 20.0, (60, 2))
    scattered = np.stack([np.arange(40) * 1500.0 + 20000.0, np.full(40, 9000.0)], axis=-1)
    hotspot = densest_field(np.concatenate([cluster, scattered]))
    assert hotspot.count == 60 and hotspot.density_per_mm2 == pytest.approx(60.0)
    # Reported at the centre of the smallest circle around the cluster, not anywhere the field still holds it.
    middle, spread = enclosing_circle(cluster)
    assert math.dist((hotspot.x_um, hotspot.y_um), middle) < 1e-6 and spread < 100
    entry = hotspot.as_dict()
    assert set(entry) == {"count", "density_per_mm2", "x_um", "y_um", "radius_um", "area_mm2"}
    assert entry["radius_um"] == pytest.approx(564.1896, abs=1e-4)


# ------------------------------------------------------------------ the pictures
def test_density_png_colour_bar_starts_at_zero_over_the_thumbnail_with_the_hotspot(tmp_path):
    extent = (1000.0, 1600.0, 2000.0, 2400.0)  # a 600 x 400 µm region, x0 x1 y0 y1
    rng = np.random.default_rng(1)
    # Every 50-µm bin holds 2 to 4 centres: the smallest density is far above 0, the bar must still start at 0.
    xs, ys = np.meshgrid(np.arange(1000, 1600, 50) + 25.0, np.arange(2000, 2400, 50) + 25.0)
    base = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    centres = np.concatenate([base, base + 5, base[rng.random(len(base)) < 0.5] - 5])
    density, x_edges, y_edges = density_grid(centres, extent, 50.0)
    assert density.shape == (8, 12) and density.min() >= 2 / 0.0025
    hotspot = densest_field(centres, area_mm2=0.01).as_dict()
    thumbnail = np.full((200, 300, 3), 230, dtype=np.uint8)
    shown = write_density_png(tmp_path / "density.png", centres, extent, thumbnail_rgb=thumbnail, bin_um=50.0,
                              hotspot=hotspot)
    assert shown.vmin == 0.0 and shown.vmax == pytest.approx(density.max())
    assert shown.bin_um == 50.0 and shown.on_thumbnail and shown.hotspot_outlined
    assert Image.open(tmp_path / "density.png").format == "PNG"

    # No centre at all: the bar still runs from 0 (to 1), and there is no field to outline.
    empty = write_density_png(tmp_path / "empty.png", np.empty((0, 2)), extent,
                              hotspot=densest_field(np.empty((0, 2))).as_dict())
    assert (empty.vmin, empty.vmax, empty.hotspot_outlined, empty.on_thumbnail) == (0.0, 1.0, False, False)


def test_density_bins():
    assert density_bin_um((0, 20000, 0, 15000)) == 100.0  # a slide: the default
    assert density_bin_um((0, 1000, 0, 400)) == 50.0  # 1 mm across: 20 bins of 50 µm
    assert density_bin_um((0, 1481, 0, 1100)) == 50.0  # a round number, not 1481 / 20
    assert density_bin_um((0, 50, 0, 50)) == 25.0  # a crop: not finer than 25 µm
    assert density_bin_um((0, 20000, 0, 15000), 250.0) == 250.0  # as asked
    # A region of 230 µm in 100-µm bins: the last 30 µm join the bin before; each bin divided by its own area.
    density, x_edges, _ = density_grid(np.array([[225.0, 50.0]]), (0.0, 230.0, 0.0, 100.0), 100.0)
    np.testing.assert_allclose(x_edges, [0.0, 100.0, 230.0])
    assert density[0, 1] == pytest.approx(1 / (0.13 * 0.1))


def test_overlay_keeps_the_centres_and_outlines_the_hotspot(tmp_path):
    thumbnail = np.full((300, 400, 3), 255, dtype=np.uint8)
    centres = np.array([[50.0, 60.0], [350.0, 250.0]])
    write_overlay_png(tmp_path / "overlay.png", thumbnail, centres, scale=0.5, hotspot_xy_r=(200.0, 150.0, 80.0))
    image = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    hotspot = np.all(image == HOTSPOT_COLOUR_RGB, axis=-1)
    rows, cols = np.nonzero(hotspot)
    distance = np.hypot(rows - 150.0, cols - 200.0)
    assert len(rows) > 2 * math.pi * 80 and np.all(np.abs(distance - 80) <= 4)  # a ring, on the field's edge
    lymphocyte = np.all(image == (0, 160, 255), axis=-1)
    for x, y in centres.astype(int):  # each centre circled, about 3.5 px out at this scale
        assert lymphocyte[y - 6:y + 7, x - 6:x + 7].any() and not lymphocyte[y, x]
