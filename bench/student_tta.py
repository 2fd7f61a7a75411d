"""Does averaging the 8 flips/rotations (test-time augmentation) make the student more accurate?

On the three annotated crops (never trained on), Reinhard-normalised to the model's reference as the engine
does: the student's map of each crop alone, and the mean of its maps of the 8 dihedral transforms of the crop
(each transformed back).  At 0.5 µm/px the student's input pixels are the crop's pixels, so the transforms are
exact symmetries of the model-frame grid.  Both are scored leave-one-crop-out (threshold chosen on two crops,
scored on the third) exactly as the model card's figures, and timed.

With ``--views`` it also scores each of the 8 transforms alone (a single pass on the turned crops): how much the
model's accuracy depends on the orientation the slide was scanned in.

A model without a stain reference of its own (the paper's) is given the default model's, so both see the same
crops; ``--stride`` is the model-frame stride of such patch models (the student maps every pixel).

Usage::

    .venv/bin/python bench/student_tta.py [--model NAME_OR_CHECKPOINT] [--views] [--stride PX]
"""

from __future__ import annotations

import argparse
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
from wsi_lymph.training.distill import DIHEDRAL_VIEWS, dihedral, leave_one_crop_out

CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lymph-centers"
CROPS_MPP = 0.5


def _undo(prob: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    return np.rot90(prob[:, ::-1] if flip else prob, -turns)


#: The 8 dihedral transforms as (quarter turns, flip); the first is the crop as scanned.
VIEWS = list(DIHEDRAL_VIEWS)


def crop_map(members: list, rgb: np.ndarray, tta: bool, views: list[tuple[int, bool]] | None = None,
             stride_px: int = 1) -> np.ndarray:
    """The model-frame map of one crop: as scanned, the mean over ``views`` (default: all 8 with ``tta``)."""
    views = views or (VIEWS if tta else [(0, False)])
    maps = [_undo(image_probabilities(np.ascontiguousarray(dihedral(rgb, t, f)), members, scale=FRAME_SCALE,
                                      stride_px=stride_px), t, f)
            for t, f in views]
    return np.mean(maps, axis=0)


def detections(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x, y) in crop pixels and their smoothed P, everything above 0.3 (thresholds filter later)."""
    smoothed = smooth_probability(prob, SMOOTH_RADIUS_PX)
    centres = greedy_peaks(smoothed, 0.3, CLEAR_RADIUS_PX)
    rc = (centres + 0.5) / FRAME_SCALE - 0.5
    return rc[:, ::-1], smoothed[centres[:, 0], centres[:, 1]]


def score(names: list[str], dets: list, truths: list[np.ndarray]) -> dict:
    """Leave-one-crop-out figures of detections on the three crops."""
    loco = leave_one_crop_out(names, dets, truths, DEFAULT_TOLERANCE_UM / CROPS_MPP)
    return {"loco_pooled": loco["pooled"], "loco_per_crop_f": [row["f_score"] for row in loco["per_crop"]],
            "threshold_all_crops": loco["threshold_all_crops"],
            "f_all_crops_at_it": loco["score_all_crops_at_it"]["f_score"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint (default: the default model)")
    parser.add_argument("--views", action="store_true", help="also score each flip/rotation alone")
    parser.add_argument("--stride", type=int, default=1, help="model-frame stride of patch models (default 1)")
    args = parser.parse_args()
    model = load_model(args.model)
    reference = LabStatistics.from_dict(model.meta.get("stain_reference") or
                                        load_model(DEFAULT_MODEL).meta["stain_reference"])
    crops = read_dataset(CROPS)
    names = [c.image_id for c in crops]
    truths = [c.centers_rc[:, ::-1].astype(float) for c in crops]
    normalised = [ReinhardTransform(lab_statistics(c.rgb), reference)(c.rgb) for c in crops]
    crop_map(model.members, normalised[0][:64, :64], tta=False, stride_px=args.stride)  # warm-up, not timed
    report = {"model": args.model, "stride_px": args.stride}
    # Each view's map of each crop, computed once: the single pass is the first view, the mean is over all 8.
    start = time.perf_counter()
    maps = [[crop_map(model.members, rgb, False, [view], args.stride) for rgb in normalised]
            for view in (VIEWS if args.views else VIEWS[:1])]
    single_seconds = (time.perf_counter() - start) / len(maps)
    if not args.views:
        start = time.perf_counter()
        maps.append([crop_map(model.members, rgb, True, stride_px=args.stride) for rgb in normalised])
        mean_seconds = time.perf_counter() - start
        mean_maps = maps.pop()
    else:
        mean_seconds = single_seconds * len(VIEWS)  # the mean costs the 8 views' time, measured above
        mean_maps = [np.mean([view[k] for view in maps], axis=0) for k in range(len(crops))]
    for label, per_crop, seconds in (("single pass", maps[0], single_seconds),
                                     ("8 flips/rotations", mean_maps, mean_seconds)):
        report[label] = {"seconds": round(seconds, 2), **score(names, [detections(m) for m in per_crop], truths)}
        print(f"{label}: leave-one-crop-out pooled F {report[label]['loco_pooled']['f_score']:.3f} "
              f"(per crop {', '.join(f'{f:.3f}' for f in report[label]['loco_per_crop_f'])}); "
              f"threshold on all three {report[label]['threshold_all_crops']}; {seconds:.1f} s for the three crops")
    if args.views:
        per_view = [{"quarter_turns": turns, "flip": flip, **score(names, [detections(m) for m in per_crop], truths)}
                    for (turns, flip), per_crop in zip(VIEWS, maps, strict=True)]
        f_scores = [v["loco_pooled"]["f_score"] for v in per_view]
        report["each view alone"] = per_view
        print(f"each of the 8 flips/rotations alone: leave-one-crop-out pooled F median {np.median(f_scores):.3f}, "
              f"min {min(f_scores):.3f}, max {max(f_scores):.3f} "
              f"({', '.join(f'{f:.3f}' for f in f_scores)})")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
