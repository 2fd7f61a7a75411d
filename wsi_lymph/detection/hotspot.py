"""The densest circular field of a slide: the circle of a given area that holds the most lymphocyte centres.

TIL scoring reports the densest field as well as the mean density.  The field here is found exactly from the
centres, not from a grid of candidate positions: it is the classic maximum-points-in-a-circle problem.

Units and conventions
---------------------
Centres are ``(x, y)`` in µm from the slide's level-0 top-left corner (``x`` = column direction, ``y`` = row
direction: the ``x_um``/``y_um`` columns of ``centers.csv``).  The field's area is given in mm², its radius
``r = sqrt(area / π)`` is in µm (1 mm² -> 564.19 µm).  **A centre on the field's edge counts**: the field is the
closed disc, a centre counts when its distance from the field's centre is ≤ r; a relative tolerance of
:data:`EDGE_TOLERANCE` (1e-9, i.e. under a nanometre for a 1 mm² field) absorbs floating-point rounding, so points
placed exactly on a circle of radius r are counted whatever the rounding of their coordinates.

Algorithm
---------
*Why it is exact.*  Some best field has two distinct centres on its edge (or all its centres at one spot): move
a best disc until a covered point p reaches its edge, then turn the disc about p until a second one does; no
covered point leaves before that.  So the best count is found by an *angular sweep* around each point p: the
centres c of discs through p (|c - p| = r) form a circle, each neighbour q within 2r covers an arc of it,
and the deepest overlap of arcs (+ the points at p itself) is the best disc through p.  The sweep of one point
costs O(k log k) for its k neighbours within 2r (found with a :class:`scipy.spatial.cKDTree`); over all points
this is the textbook O(n² log n) algorithm (:func:`max_points_in_circle_all_sweeps`, the reference of the tests
and of ``bench/hotspot.py``).

*Why it is fast.*  A 1 mm² field holds thousands of centres in a dense slide, so sweeping every point is slow
(50,000 centres: half a minute to minutes, see BENCHMARKS.md).  A best-first branch and bound over the positions
of the field's centre prunes almost all of them: a square cell of positions with centre m and half-diagonal h
holds no field with more than ``count(|q - m| ≤ r + h)`` points (an upper bound) and the field at m itself is a
lower bound; cells whose bound cannot beat the best field found are dropped, the others split in four.  A cell
small enough (few points in its annulus) is settled exactly: a best disc centred in it has a point p of its edge
with ``r - h ≤ |p - m| ≤ r + h``, and only those points are swept.  Each point is swept at most once.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from wsi_lymph.constants import HOTSPOT_FIELD_MM2 as DEFAULT_FIELD_MM2

#: Relative slack on the radius that absorbs floating-point rounding (a centre on the edge counts).
EDGE_TOLERANCE = 1e-9
#: A cell of field positions is settled by sweeps once its annulus holds at most this many points (smaller:
#: more cells, fewer sweeps; 4 measured fastest of 4, 8, 16 and 48 on 50k-point sets, see BENCHMARKS.md).
LEAF_POINTS = 4


@dataclass(frozen=True)
class Hotspot:
    """The densest circular field of one slide.

    Attributes
    ----------
    count : int
        Centres in the field (its edge included).
    x_um, y_um : float or None
        The field's centre, µm from the slide's level-0 top-left corner (None without centres).
    radius_um : float
        The field's radius, µm.
    area_mm2 : float
        The field's area, mm² (π r²).
    """

    count: int
    x_um: float | None
    y_um: float | None
    radius_um: float
    area_mm2: float

    @property
    def density_per_mm2(self) -> float:
        """Centres per mm² of the field (count / area)."""
        return self.count / self.area_mm2

    def as_dict(self) -> dict:
        """The field as plain numbers, as ``summary.json`` records it (µm rounded to 0.1 nm)."""
        return {
            "count": self.count,
            "density_per_mm2": round(self.density_per_mm2, 3),
            "x_um": None if self.x_um is None else round(self.x_um, 4),
            "y_um": None if self.y_um is None else round(self.y_um, 4),
            "radius_um": round(self.radius_um, 4),
            "area_mm2": self.area_mm2,
        }


def field_radius_um(area_mm2: float) -> float:
    """Radius in µm of a circular field of ``area_mm2`` mm²."""
    if not area_mm2 > 0 or not math.isfinite(area_mm2):
        raise ValueError(f"the field's area must be a positive number of mm², got {area_mm2!r}")
    return math.sqrt(area_mm2 / math.pi) * 1000.0


def densest_field(centres_um: np.ndarray, area_mm2: float = DEFAULT_FIELD_MM2) -> Hotspot:
    """The circular field of ``area_mm2`` that holds the most centres (exact; see the module docstring).

    Parameters
    ----------
    centres_um : np.ndarray
        (n, 2) centres ``(x, y)`` in µm (n may be 0).
    area_mm2 : float
        The field's area in mm² (1 mm² by default: radius 564.19 µm).

    Returns
    -------
    Hotspot
        Count, centre (µm, ``(x, y)``), radius and area.  Several fields may tie; one of them is returned,
        moved to the centre of the smallest circle enclosing its centres (where it still holds them all).
    """
    radius_um = field_radius_um(area_mm2)
    centres_um = _as_points(centres_um)
    count, centre = max_points_in_circle(centres_um, radius_um)
    if centre is not None:
        centre = _centred(centres_um, centre, radius_um, count)
    x, y = (None, None) if centre is None else (float(centre[0]), float(centre[1]))
    return Hotspot(count, x, y, radius_um, float(area_mm2))


def _centred(points: np.ndarray, centre: np.ndarray, radius: float, count: int) -> np.ndarray:
    """Of the fields holding the same centres as the one at ``centre``, the most central one.

    A best field can usually move a little and keep its centres (always, when the field is larger than the
    region analysed); the one reported is centred on the smallest circle enclosing them, so it does not depend
    on how the search reached it, and its outline sits on the cluster.
    """
    reach = radius * (1 + EDGE_TOLERANCE)
    inside = points[np.hypot(*(points - centre).T) <= reach]
    middle = enclosing_circle(inside)[0]
    return middle if count_in_circle(points, middle, radius) >= count else centre


def enclosing_circle(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """The smallest circle enclosing ``points`` (Welzl's algorithm, iterative form; expected O(n)).

    Parameters
    ----------
    points : np.ndarray
        (n, 2) coordinates, n ≥ 1.
    seed : int
        Seed of the shuffle that makes the expected time linear (the circle does not depend on it).

    Returns
    -------
    (np.ndarray, float)
        Centre (2,) and radius.
    """
    points = _as_points(points)
    unique = np.unique(points, axis=0)
    order = np.random.default_rng(seed).permutation(len(unique))
    p = [tuple(map(float, xy)) for xy in unique[order]]
    scale = float(np.abs(unique).max()) or 1.0
    slack = 1e-12 * scale  # rounding of the circle's own arithmetic

    def outside(q, c, r) -> bool:
        return math.hypot(q[0] - c[0], q[1] - c[1]) > r + slack

    c, r = p[0], 0.0
    for i in range(1, len(p)):
        if not outside(p[i], c, r):
            continue
        c, r = p[i], 0.0
        for j in range(i):
            if not outside(p[j], c, r):
                continue
            c = ((p[i][0] + p[j][0]) / 2, (p[i][1] + p[j][1]) / 2)
            r = math.hypot(p[i][0] - c[0], p[i][1] - c[1])
            for k in range(j):
                if outside(p[k], c, r):
                    c, r = _circumcircle(p[i], p[j], p[k])
    return np.array(c), r


def _circumcircle(a, b, c) -> tuple[tuple[float, float], float]:
    """The circle through three points; for (nearly) collinear ones, the circle on the farthest two."""
    d = 2 * (a[0] * (b[1] - c[1]) + b[0] * (c[1] - a[1]) + c[0] * (a[1] - b[1]))
    if abs(d) < 1e-300:
        pairs = [(a, b), (a, c), (b, c)]
        u, v = max(pairs, key=lambda pair: math.hypot(pair[0][0] - pair[1][0], pair[0][1] - pair[1][1]))
        centre = ((u[0] + v[0]) / 2, (u[1] + v[1]) / 2)
        return centre, math.hypot(u[0] - centre[0], u[1] - centre[1])
    a2, b2, c2 = a[0] ** 2 + a[1] ** 2, b[0] ** 2 + b[1] ** 2, c[0] ** 2 + c[1] ** 2
    x = (a2 * (b[1] - c[1]) + b2 * (c[1] - a[1]) + c2 * (a[1] - b[1])) / d
    y = (a2 * (c[0] - b[0]) + b2 * (a[0] - c[0]) + c2 * (b[0] - a[0])) / d
    return (x, y), max(math.hypot(a[0] - x, a[1] - y), math.hypot(b[0] - x, b[1] - y), math.hypot(c[0] - x, c[1] - y))


def max_points_in_circle(points: np.ndarray, radius: float) -> tuple[int, np.ndarray | None]:
    """Most points a closed disc of ``radius`` can hold, and a centre of such a disc (branch and bound + sweeps).

    Parameters
    ----------
    points : np.ndarray
        (n, 2) coordinates, any length unit.
    radius : float
        The disc's radius, same unit (> 0).

    Returns
    -------
    (int, np.ndarray or None)
        The count (points at distance ≤ radius, relative tolerance :data:`EDGE_TOLERANCE`) and the disc's centre
        (2,), None when there are no points.
    """
    points = _as_points(points)
    search = _Search(points, float(radius))
    if search.n_locations <= 1:  # no point, or all at one spot: nothing to search
        return search.best_count, search.best_centre
    r = search.radius
    lo, hi = points.min(axis=0) - r, points.max(axis=0) + r  # every field holding a point has its centre here
    extent = float(np.max(hi - lo))
    # Root cells of about r (bounds tight enough to prune from the start), at most 512 x 512 of them (a tiny field
    # on a whole slide): the search refines from there.
    side = max(min(extent, r), extent / 512)
    nx, ny = (int(math.ceil(float(e) / side)) or 1 for e in hi - lo)
    gx, gy = np.meshgrid(lo[0] + side * (np.arange(nx) + 0.5), lo[1] + side * (np.arange(ny) + 0.5))
    search.add_cells(np.stack([gx.ravel(), gy.ravel()], axis=-1), side / 2)
    search.run()
    return search.best_count, search.best_centre


def max_points_in_circle_all_sweeps(points: np.ndarray, radius: float) -> tuple[int, np.ndarray | None]:
    """The textbook exact algorithm: an angular sweep around every point (O(n² log n); reference and benchmark).

    Same conventions and result as :func:`max_points_in_circle`, without its pruning.
    """
    points = _as_points(points)
    search = _Search(points, float(radius))
    for index in range(len(points)):
        search.sweep(index)
    return search.best_count, search.best_centre


def count_in_circle(points: np.ndarray, centre, radius: float) -> int:
    """Points at distance ≤ ``radius`` (relative tolerance :data:`EDGE_TOLERANCE`) from ``centre``."""
    points = _as_points(points)
    if not len(points):
        return 0
    distance = np.hypot(*(points - np.asarray(centre, dtype=np.float64)).T)
    return int(np.count_nonzero(distance <= radius * (1 + EDGE_TOLERANCE)))


def _as_points(points) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all():
        raise ValueError("centre coordinates must be finite numbers")
    return points


class _Search:
    """State of one search: the tree, the best field so far, the cells still open, the points already swept."""

    def __init__(self, points: np.ndarray, radius: float) -> None:
        if not radius > 0 or not math.isfinite(radius):
            raise ValueError(f"the radius must be a positive number, got {radius!r}")
        self.points, self.radius = points, radius
        self.reach = radius * (1 + EDGE_TOLERANCE)  # what counts as inside
        self.best_count, self.best_centre = 0, None
        self.n_locations = 0
        self.heap: list[tuple[int, int, float, float, float]] = []  # (-upper bound, tie, x, y, half side)
        self.swept = np.zeros(len(points), dtype=bool)
        if not len(points):
            return
        self.tree = cKDTree(points)
        # Points at one spot: the best field may hold nothing else (all other points farther than 2r).
        locations, counts = np.unique(points, axis=0, return_counts=True)
        self.n_locations = len(locations)
        self.best_count, self.best_centre = int(counts.max()), locations[int(counts.argmax())].copy()

    # ------------------------------------------------------------------ branch and bound over field positions
    def add_cells(self, centres: np.ndarray, half_side: float) -> None:
        """Bound cells of positions (square, ``half_side`` from centre to edge); keep those that may beat the best."""
        half_diagonal = half_side * math.sqrt(2.0)
        upper = self.tree.query_ball_point(centres, self.reach + half_diagonal, return_length=True)
        hopeful = upper > self.best_count
        if not hopeful.any():
            return
        centres, upper = centres[hopeful], upper[hopeful]
        lower = self.tree.query_ball_point(centres, self.reach, return_length=True)
        best = int(lower.argmax())
        if lower[best] > self.best_count:  # the field at a cell's centre is a real field
            self.best_count, self.best_centre = int(lower[best]), centres[best].copy()
        for (x, y), bound in zip(centres.tolist(), upper.tolist(), strict=True):
            if bound > self.best_count:
                heapq.heappush(self.heap, (-bound, len(self.heap), x, y, half_side))

    def run(self) -> None:
        """Best-first: open the cell with the highest bound until no open cell can beat the best field."""
        r = self.radius
        while self.heap:
            negative_bound, _, x, y, half_side = heapq.heappop(self.heap)
            if -negative_bound <= self.best_count:
                break  # the heap is ordered: no cell left can beat it
            centre = np.array([x, y])
            half_diagonal = half_side * math.sqrt(2.0)
            slack = self.reach - r
            outer_reach, inner_reach = r + half_diagonal + slack, r - half_diagonal - slack
            ring = self.tree.query_ball_point(np.stack([centre, centre]), [outer_reach, max(inner_reach, 0.0)],
                                              return_length=True)
            if ring[0] - (ring[1] if inner_reach > 0 else 0) <= LEAF_POINTS or half_side < r * 1e-6:
                # Settled exactly: a best field centred in this cell has a point of its edge in the annulus.
                annulus = np.asarray(self.tree.query_ball_point(centre, outer_reach), dtype=np.intp)
                if inner_reach > 0 and len(annulus):
                    annulus = annulus[np.hypot(*(self.points[annulus] - centre).T) >= inner_reach]
                for index in annulus[~self.swept[annulus]].tolist():
                    self.sweep(index)
                continue
            quarter = half_side / 2
            children = centre + quarter * np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=np.float64)
            self.add_cells(children, quarter)

    # ------------------------------------------------------------------ the exact angular sweep about one point
    def sweep(self, index: int) -> None:
        """The best field with point ``index`` on its edge (circle of field centres about it); keep it if better."""
        self.swept[index] = True
        r = self.radius
        p = self.points[index]
        neighbours = self.tree.query_ball_point(p, r + self.reach)
        if len(neighbours) <= self.best_count:
            return  # not even all of them together would beat it
        offset = self.points[neighbours] - p
        distance = np.hypot(offset[:, 0], offset[:, 1])
        # Field centres c = p + r (cos a, sin a); neighbour q at distance d, angle t is inside (|q - c| ≤ reach)
        # for |a - t| ≤ phi with cos(phi) = (d² + r² - reach²) / (2 d r): the law of cosines.  The reach's slack
        # keeps a point exactly on an edge strictly inside its arc, whatever the rounding.
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = (distance**2 + r * r - self.reach**2) / (2 * distance * r)
        always = (distance == 0) | (cosine <= -1)  # the point itself, its duplicates, any q the circle never leaves
        arcs = ~always & (cosine <= 1)
        base = int(np.count_nonzero(always))
        if base + int(np.count_nonzero(arcs)) <= self.best_count:
            return
        angle = np.arctan2(offset[arcs, 1], offset[arcs, 0])
        half_width = np.arccos(cosine[arcs])
        two_pi = 2 * math.pi
        start = np.mod(angle - half_width, two_pi)
        end = start + 2 * half_width
        wraps = end >= two_pi  # an arc over angle 0 is open at the start of the sweep and ends after it
        end = np.where(wraps, end - two_pi, end)
        event_angle = np.concatenate([start, end])
        event_step = np.concatenate([np.ones(len(start), dtype=np.int64), -np.ones(len(end), dtype=np.int64)])
        # Entries before exits at one angle: arcs that only touch still overlap (closed arcs, closed disc).
        order = np.lexsort((-event_step, event_angle))
        event_angle, event_step = event_angle[order], event_step[order]
        depth = base + int(np.count_nonzero(wraps)) + np.cumsum(event_step)
        deepest = int(depth.argmax())
        if depth[deepest] <= self.best_count:
            return
        # The deepest overlap starts at an entry and lasts until the next event: take the middle of it.
        following = event_angle[deepest + 1] if deepest + 1 < len(event_angle) else event_angle[0] + two_pi
        a = 0.5 * (event_angle[deepest] + following)
        centre = p + r * np.array([math.cos(a), math.sin(a)])
        count = int(self.tree.query_ball_point(centre, self.reach, return_length=True))  # what a reader counts
        if count > self.best_count:
            self.best_count, self.best_centre = count, centre
