"""Detection scores: one-to-one matching of detected and annotated centres."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage.io import imread

#: The counts of a :class:`DetectionScore`, as named in its fields and in the report files.
COUNT_KEYS = ("true_positives", "false_positives", "false_negatives")


@dataclass(frozen=True)
class DetectionScore:
    """Counts and scores of a detection against annotations."""

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 0.0

    @property
    def recall(self) -> float:
        annotated = self.true_positives + self.false_negatives
        return self.true_positives / annotated if annotated else 0.0

    @property
    def f_score(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """The entry of a report file (``evaluation.json``, ``cv_report.json``): counts, then P, R, F to 4 places."""
        return {"true_positives": self.true_positives, "false_positives": self.false_positives,
                "false_negatives": self.false_negatives, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f_score": round(self.f_score, 4)}

    @classmethod
    def from_dict(cls, entry: dict) -> DetectionScore:
        """The score of an :meth:`as_dict` entry (its counts; P, R and F follow from them)."""
        return cls(*(int(entry[key]) for key in COUNT_KEYS))


def matched_pairs(detected: np.ndarray, annotated: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian one-to-one matching; pairs farther apart than ``tolerance`` do not match.

    Parameters
    ----------
    detected, annotated : np.ndarray
        (n, 2) and (m, 2) coordinates in the same units and order.
    tolerance : float
        Largest matching distance, in the same units.

    Returns
    -------
    (np.ndarray, np.ndarray)
        Indices into ``detected`` and into ``annotated`` of the matched pairs, pair by pair.
    """
    detected = np.asarray(detected, dtype=float).reshape(-1, 2)
    annotated = np.asarray(annotated, dtype=float).reshape(-1, 2)
    if len(detected) == 0 or len(annotated) == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    distance = cdist(detected, annotated)
    # Pairs beyond the tolerance get a cost no valid matching would pick.
    cost = np.where(distance <= tolerance, distance, 1e9)
    rows, cols = linear_sum_assignment(cost)
    kept = distance[rows, cols] <= tolerance
    return rows[kept], cols[kept]


def match_points(detected: np.ndarray, annotated: np.ndarray, tolerance: float) -> DetectionScore:
    """True and false positives and false negatives of :func:`matched_pairs` (same parameters)."""
    matched = len(matched_pairs(detected, annotated, tolerance)[0])
    n_detected = len(np.asarray(detected).reshape(-1, 2))
    n_annotated = len(np.asarray(annotated).reshape(-1, 2))
    return DetectionScore(matched, n_detected - matched, n_annotated - matched)


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Annotated or detected centres as (n, 2) level-0 (x, y) pixels.

    Accepted: a CSV with ``x`` and ``y`` columns (wsi-lymph's ``centers.csv``,
    or any point list); a greyscale seed image (non-zero pixel = centre); the
    paper's RGBA mask ``<N>m.tif`` (non-zero alpha = centre).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"x", "y"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: a point list needs 'x' and 'y' columns, found {reader.fieldnames}")
            return np.array([[float(row["x"]), float(row["y"])] for row in reader]).reshape(-1, 2)
    image = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else imread(path)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., 3]
    elif image.ndim != 2:
        raise ValueError(f"{path}: expected a greyscale seed image or an RGBA mask, got shape {image.shape}")
    rows, cols = np.nonzero(image)
    return np.stack([cols, rows], axis=-1).astype(float)


def read_scores(path: str | os.PathLike) -> np.ndarray | None:
    """The ``probability`` column of a centres CSV, or None if it has none."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if "probability" not in (reader.fieldnames or []):
            return None
        return np.array([float(row["probability"]) for row in reader])


def pooled(scores: list[DetectionScore]) -> DetectionScore:
    """Sum of the counts of several images (or folds): the pooled score."""
    return DetectionScore(*(sum(getattr(s, key) for s in scores) for key in COUNT_KEYS))


def threshold_sweep(
    detections: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], tolerances: list[float],
    thresholds: np.ndarray,
) -> list[tuple[float, DetectionScore]]:
    """Pooled scores when only detections scoring above each threshold are kept.

    Exact for the paper's greedy peak picking: it takes centres in decreasing
    order of score, so raising the threshold only cuts the tail; detections
    must have been made at (or below) the lowest threshold swept.
    """
    return [
        (float(t), pooled([match_points(xy[score > t], truth, tolerance) for (xy, score), truth, tolerance in
                           zip(detections, truths, tolerances, strict=True)]))
        for t in thresholds
    ]
