"""The student's concordance with the teacher over a sweep of its threshold, and the teacher against itself.

Reads a ``wsi-lymph distill`` work folder: the prepared held-out images (``images/``) and the teacher's stride-2
maps of them (``teacher-stride2/``).  Prints pooled F (matched within 3 µm) of the student's centres against the
teacher's (threshold 0.7706) for each student threshold, and, when ``--teacher-stride4`` names a folder of the
teacher's stride-4 maps of the same images (``wsi-lymph probmap IMAGES --model janowczyk2016 --stride 4 --dtype
float32 --out DIR``), the teacher's stride-4 centres against its stride-2 centres.

Usage::

    .venv/bin/python bench/student_concordance.py --work distill/ [--model NAME_OR_CHECKPOINT] [--teacher-stride4 DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_lymph.constants import CLEAR_RADIUS_PX, DEFAULT_MODEL, DEFAULT_TOLERANCE_UM, PAPER_THRESHOLD, SMOOTH_RADIUS_PX
from wsi_lymph.detection.evaluate import DetectionScore, match_points, pooled
from wsi_lymph.detection.peaks import greedy_peaks, smooth_probability
from wsi_lymph.io.probmap_store import open_probmap
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import open_slide
from wsi_lymph.training.distill import concordance, image_map

SWEEP = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925)


def _map(path: Path):
    return open_probmap(path)[0].compute(scheduler="synchronous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a wsi-lymph distill --out folder")
    parser.add_argument("--teacher-stride4", type=Path, default=None)
    parser.add_argument("--images", nargs="+", default=["tia", "stardist", "hl-lung"])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the student (default: the default model)")
    args = parser.parse_args()
    members = load_model(args.model).members
    found = {}
    for name in args.images:
        image = args.work / "images" / f"{name}.tif"
        teacher = _map(args.work / "teacher-stride2" / name / "prob.zarr")
        student = image_map(members, image)
        rows, cols = min(student.shape[0], teacher.shape[0]), min(student.shape[1], teacher.shape[1])
        mpp = choose_frame(open_slide(image)).mpp
        teacher_centres = greedy_peaks(smooth_probability(teacher[:rows, :cols], SMOOTH_RADIUS_PX), PAPER_THRESHOLD,
                                       CLEAR_RADIUS_PX)
        found[name] = (smooth_probability(student[:rows, :cols], SMOOTH_RADIUS_PX), teacher_centres, mpp)
    print("student threshold: pooled F (precision, recall) against the teacher's stride-2 centres")
    for threshold in SWEEP:
        scores = [match_points(greedy_peaks(smoothed, threshold, CLEAR_RADIUS_PX)[:, ::-1].astype(float),
                               centres[:, ::-1].astype(float), DEFAULT_TOLERANCE_UM / mpp)
                  for smoothed, centres, mpp in found.values()]
        score = pooled(scores)
        print(f"{threshold:.3f}: F {score.f_score:.3f} (P {score.precision:.3f}, R {score.recall:.3f})")
    if args.teacher_stride4 is not None:
        print("teacher stride 4 against stride 2, both at the paper's threshold")
        scores = []
        for name in args.images:
            image = args.work / "images" / f"{name}.tif"
            result = concordance(_map(args.teacher_stride4 / name / "prob.zarr"),
                                 _map(args.work / "teacher-stride2" / name / "prob.zarr"),
                                 choose_frame(open_slide(image)).mpp, PAPER_THRESHOLD, PAPER_THRESHOLD)
            scores.append(DetectionScore.from_dict(result))
            print(f"{name}: {result['student_centres']} vs {result['teacher_centres']} centres, "
                  f"F {result['f_score']:.3f}, map correlation {result['map_correlation']:.4f}")
        print(f"pooled F {pooled(scores).f_score:.3f}")


if __name__ == "__main__":
    main()
