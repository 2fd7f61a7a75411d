"""Does Reinhard normalisation protect the paper's ensemble from stain shifts?

The same curve as the student's in its model card (:func:`wsi_lymph.training.distill.stain_shift_curve`): the
three annotated crops (``shared/data/lymph-centers``), their stains perturbed in HED space by ``s`` (each stain's
optical density scaled by ``1 ± s`` and shifted by ``± s / 10``; ``--draws`` random draws per size), detected by the
paper's 5-fold ensemble at its threshold, each crop Reinhard-normalised to the paper's stain reference first
(``--stain-norm reinhard``) or fed as it is (the default for the paper's models), and pooled F over the crops.

The ensemble is expensive (494 MFLOP per 20x pixel at stride 2), so the default here is stride 4 (cubic filling of
the map between the computed positions, as ``--stride 4``): 2 draws of 3 crops, 2 settings, 5 sizes is ~20 min on
2 CPU cores.

Usage::

    WSI_LYMPH_MODEL_SOURCE=file://$PWD/../shared/data/models/janowczyk2016-lymphocyte \\
        .venv/bin/python bench/ensemble_stain_shift.py --stride 4 --draws 2 --json ensemble-shift.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wsi_lymph.constants import DEFAULT_TOLERANCE_UM, PAPER_STAIN_REFERENCE
from wsi_lymph.detection.stain import LabStatistics
from wsi_lymph.models.registry import load_model
from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.distill import STAIN_SHIFTS, stain_shift_curve

CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lymph-centers"
CROPS_MPP = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="janowczyk2016", help="model name (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=4, help="model-frame stride (default: %(default)s)")
    parser.add_argument("--draws", type=int, default=2, help="random shifts per size (default: %(default)s)")
    parser.add_argument("--shifts", type=float, nargs="+", default=list(STAIN_SHIFTS),
                        help="shift sizes s (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()

    model = load_model(args.model)
    threshold = float(model.meta["threshold"])
    reference = LabStatistics.from_dict(model.meta.get("stain_reference", PAPER_STAIN_REFERENCE))
    crops = read_dataset(CROPS)
    start = time.perf_counter()
    rows = stain_shift_curve(model.members, crops, reference, threshold, DEFAULT_TOLERANCE_UM / CROPS_MPP,
                             draws=args.draws, stride_px=args.stride, shifts=tuple(args.shifts))
    seconds = time.perf_counter() - start
    print(f"{args.model}, {len(model.members)} member(s), stride {args.stride}, threshold {threshold}, "
          f"{args.draws} draws per size, {seconds:.0f} s")
    print("| s | F, normalised | F, not normalised |")
    print("|---:|---:|---:|")
    for shift in args.shifts:
        f = {row["normalised"]: row["f_score"] for row in rows if row["shift"] == shift}
        print(f"| {shift:.1f} | {f[True]:.3f} | {f[False]:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "stride": args.stride, "threshold": threshold,
                                         "draws": args.draws, "seconds": round(seconds, 1), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
