"""Detection scores: one-to-one matching of detected and annotated centres."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


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


def match_points(detected: np.ndarray, annotated: np.ndarray, tolerance: float) -> DetectionScore:
    """Hungarian one-to-one matching; pairs farther apart than ``tolerance`` do not match.

    Parameters
    ----------
    detected, annotated : np.ndarray
        (n, 2) and (m, 2) coordinates in the same units and order.
    tolerance : float
        Largest matching distance, in the same units.
    """
    detected = np.asarray(detected, dtype=float).reshape(-1, 2)
    annotated = np.asarray(annotated, dtype=float).reshape(-1, 2)
    if len(detected) == 0 or len(annotated) == 0:
        return DetectionScore(0, len(detected), len(annotated))
    distance = cdist(detected, annotated)
    # Pairs beyond the tolerance get a cost no valid matching would pick.
    cost = np.where(distance <= tolerance, distance, 1e9)
    rows, cols = linear_sum_assignment(cost)
    matched = int((distance[rows, cols] <= tolerance).sum())
    return DetectionScore(matched, len(detected) - matched, len(annotated) - matched)
