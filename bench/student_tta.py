"""Does averaging the 8 flips/rotations (test-time augmentation) make the student more accurate?

On the three annotated crops (never trained on), Reinhard-normalised to the model's reference as the engine
does: the student's map of each crop alone, and the mean of its maps of the 8 dihedral transforms of the crop
(each transformed back).  At 0.5 µm/px the student's input pixels are the crop's pixels, so the transforms are
exact symmetries of the model-frame grid.  Both are scored leave-one-crop-out (threshold chosen on two crops,
scored on the third) exactly as the model card's figures, and timed.

Usage::

    .venv/bin/python bench/student_tta.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from wsi_lymph.constants import CLEAR_RADIUS_PX, DEFAULT_MODEL, DEFAULT_TOLERANCE_UM, FRAME_SCALE, SMOOTH_RADIUS_PX
from wsi_lymph.detection.inference import image_probabilities
from wsi_lymph.detection.peaks import greedy_peaks, smooth_probability
from wsi_lymph.detection.stain import LabStatistics, ReinhardTransform, lab_statistics
from wsi_lymph.models.registry import load_model
from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.distill import leave_one_crop_out

CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lymph-centers"
CROPS_MPP = 0.5


def _dihedral(image: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    image = np.rot90(image, turns)
    return image[:, ::-1] if flip else image


def _undo(prob: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    return np.rot90(prob[:, ::-1] if flip else prob, -turns)


def crop_map(members: list, rgb: np.ndarray, tta: bool) -> np.ndarray:
    """The model-frame map of one crop, or the mean over its 8 flips/rotations."""
    views = [(t, f) for t in range(4) for f in (False, True)] if tta else [(0, False)]
    maps = [_undo(image_probabilities(np.ascontiguousarray(_dihedral(rgb, t, f)), members, scale=FRAME_SCALE), t, f)
            for t, f in views]
    return np.mean(maps, axis=0)


def detections(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x, y) in crop pixels and their smoothed P, everything above 0.3 (thresholds filter later)."""
    smoothed = smooth_probability(prob, SMOOTH_RADIUS_PX)
    centres = greedy_peaks(smoothed, 0.3, CLEAR_RADIUS_PX)
    rc = (centres + 0.5) / FRAME_SCALE - 0.5
    return rc[:, ::-1], smoothed[centres[:, 0], centres[:, 1]]


def main() -> None:
    model = load_model(DEFAULT_MODEL)
    reference = LabStatistics.from_dict(model.meta["stain_reference"])
    crops = read_dataset(CROPS)
    names = [c.image_id for c in crops]
    truths = [c.centers_rc[:, ::-1].astype(float) for c in crops]
    normalised = [ReinhardTransform(lab_statistics(c.rgb), reference)(c.rgb) for c in crops]
    crop_map(model.members, normalised[0][:64, :64], tta=False)  # warm-up, not timed
    report = {}
    for label, tta in (("single pass", False), ("8 flips/rotations", True)):
        start = time.perf_counter()
        dets = [detections(crop_map(model.members, rgb, tta)) for rgb in normalised]
        seconds = time.perf_counter() - start
        loco = leave_one_crop_out(names, dets, truths, DEFAULT_TOLERANCE_UM / CROPS_MPP)
        report[label] = {"seconds": round(seconds, 2), "loco_pooled": loco["pooled"],
                         "loco_per_crop_f": [row["f_score"] for row in loco["per_crop"]],
                         "threshold_all_crops": loco["threshold_all_crops"],
                         "f_all_crops_at_it": loco["score_all_crops_at_it"]["f_score"]}
        print(f"{label}: leave-one-crop-out pooled F {loco['pooled']['f_score']:.3f} "
              f"(per crop {', '.join(f'{f:.3f}' for f in report[label]['loco_per_crop_f'])}); "
              f"threshold on all three {loco['threshold_all_crops']}; {seconds:.1f} s for the three crops")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
