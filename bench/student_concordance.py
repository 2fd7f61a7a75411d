"""The student's concordance with the teacher over a sweep of its threshold, and the teacher against itself.

Reads a ``wsi-lymph distill`` work folder: the prepared held-out images (``images/``) and the teacher's stride-2
maps of them (``teacher-stride2/``).  Prints pooled F (matched within 3 µm) of the student's centres against the
teacher's (threshold 0.7706) for each student threshold, then per image at the student's own threshold (the
first ``--model``'s, or ``--threshold``), and, when ``--teacher-stride4`` names a folder of the
teacher's stride-4 maps of the same images (``wsi-lymph probmap IMAGES --model janowczyk2016 --stride 4 --dtype
float32 --out DIR``), the teacher's stride-4 centres against its stride-2 centres.  ``--errors T`` lists the
student's unmatched centres at threshold ``T`` and the teacher's, and counts those where the other side's smoothed
map passes its own threshold too (both maps see the object; the greedy picking placed the peaks differently) and
those where it does not (one map misses the object).  ``--margin-px N`` counts only the centres at least ``N``
model-frame px inside the image (the border band where the networks read the mirrored edge, not tissue).
``--refill-lattice`` scores the student's map rebuilt as the teacher's stride-4 map is built: its own values on
the model-frame lattice 0, 4, 8, ... (one per input pixel), cubic-filled in between
(:func:`wsi_lymph.slides.frame.interpolate_grid`); with ``--teacher-stride4`` it also prints, per image, how
closely the student's map follows the teacher's on that lattice (where the stride-4 map holds the teacher's exact
values) and off it.  Both ask whether the student's error lies in the shape it gives the map between lattice
points (its sub-pixel head) or in the values themselves.

How far the teacher agrees with itself when nothing visible changes: ``--prepare-perturbed WORK DIR`` writes each
prepared image of ``WORK/images`` with one grey level (``--levels``) of random noise per pixel and channel into
``DIR/images``; with the teacher's stride-2 maps of those copies (``wsi-lymph probmap DIR/images ... --out
DIR/teacher-stride2``), ``--teacher-perturbed DIR/teacher-stride2`` scores them against its maps of the images
themselves, as ``--teacher-stride4`` does for its stride-4 maps.

The plan's held-out regions are small (283 teacher centres in all), so ``--prepare-more DIR`` writes them and
seven more regions of the same three held-out images (none overlapping the plan's; never trained on), all prepared
as ``distill`` prepares images, into ``DIR/images``; the teacher's stride-2 maps of them then come from
``wsi-lymph probmap DIR/images --model janowczyk2016 --stride 2 --dtype float32 --out DIR/teacher-stride2``
(16 min on a 2-core VM), and ``--work DIR --images`` with the ten names scores the student on all ten.

Usage::

    .venv/bin/python bench/student_concordance.py --work distill/ [--model NAME_OR_CHECKPOINT ...] [--threshold T]
        [--member K ...] [--teacher-stride4 DIR] [--teacher-perturbed DIR] [--errors THRESHOLD] [--margin-px N]
        [--refill-lattice] [--images NAME ...]
    .venv/bin/python bench/student_concordance.py --prepare-more DIR
    .venv/bin/python bench/student_concordance.py --prepare-perturbed WORK DIR [--levels N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from scipy.spatial.distance import cdist

from wsi_lymph.constants import CLEAR_RADIUS_PX, DEFAULT_MODEL, DEFAULT_TOLERANCE_UM, PAPER_THRESHOLD, SMOOTH_RADIUS_PX
from wsi_lymph.detection.evaluate import DetectionScore, matched_pairs, pooled
from wsi_lymph.detection.peaks import greedy_peaks, smooth_probability
from wsi_lymph.io.probmap_store import open_probmap
from wsi_lymph.models.networks import STUDENT_UPSCALE
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.frame import choose_frame, interpolate_grid, stride_grid
from wsi_lymph.slides.reader import open_slide
from wsi_lymph.slides.resample import symmetric_index
from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.distill import (
    PlanImage,
    concordance,
    image_map,
    prepare_image,
    read_plan,
    reference_statistics,
)

SWEEP = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PLAN = Path(__file__).resolve().parents[1] / "docs" / "distill-plan.json"
#: More regions (level-0 x, y, width, height) of the plan's three held-out images, beside the plan's own
#: (tia 680, 300, 200, 200; stardist 180, 80, 128, 128; hl-lung 180, 180, 128, 128): name, file, µm/px, region.
MORE_HELD_OUT = (
    ("tia-2", "he-unlabeled/tiatoolbox-target-1000.png", 0.3, (100, 100, 300, 300)),
    ("tia-3", "he-unlabeled/tiatoolbox-target-1000.png", 0.3, (400, 600, 300, 300)),
    ("stardist-2", "images/stardist-histo.jpg", 0.5, (20, 60, 140, 140)),
    ("stardist-3", "images/stardist-histo.jpg", 0.5, (330, 40, 140, 140)),
    ("hl-lung-2", "he-unlabeled/histolab-tiles/tcga-lung-rgb.png", 0.5, (20, 20, 140, 140)),
    ("hl-lung-3", "he-unlabeled/histolab-tiles/tcga-lung-rgb.png", 0.5, (340, 340, 140, 140)),
    ("hl-lung-4", "he-unlabeled/histolab-tiles/tcga-lung-rgb.png", 0.5, (20, 340, 140, 140)),
)


def _map(path: Path):
    return open_probmap(path)[0].compute(scheduler="synchronous")


def refill_lattice(prob: np.ndarray, stride_px: int = STUDENT_UPSCALE) -> np.ndarray:
    """``prob``'s values on the lattice 0, s, 2s, ... (both axes), cubic-filled in between as the engine fills a
    stride-``s`` map; lattice points past the edge take the mirrored pixel's value, as the engine classifies them
    from the mirror padding."""
    rows, cols = prob.shape
    lattice_r, lattice_c = stride_grid(0, rows, stride_px), stride_grid(0, cols, stride_px)
    values = prob[np.ix_(symmetric_index(lattice_r, rows), symmetric_index(lattice_c, cols))]
    return interpolate_grid(values, (lattice_r, lattice_c), (0, rows, 0, cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="a wsi-lymph distill --out folder")
    parser.add_argument("--prepare-more", type=Path, default=None, metavar="DIR",
                        help="write the prepared images of the plan's held-out regions and of MORE_HELD_OUT into "
                             "DIR/images and stop")
    parser.add_argument("--teacher-stride4", type=Path, default=None)
    parser.add_argument("--teacher-perturbed", type=Path, default=None, metavar="DIR",
                        help="the teacher's stride-2 maps of perturbed copies of the images (--prepare-perturbed), "
                             "scored against its maps of the images themselves")
    parser.add_argument("--prepare-perturbed", type=Path, nargs=2, default=None, metavar=("WORK", "DIR"),
                        help="write WORK/images/*.tif with --levels grey levels of noise into DIR/images and stop")
    parser.add_argument("--levels", type=int, default=1, help="noise of --prepare-perturbed (default 1)")
    parser.add_argument("--images", nargs="+", default=["tia", "stardist", "hl-lung"])
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                        help="the student (default: the default model); several: their networks' maps averaged")
    parser.add_argument("--member", type=int, nargs="+", default=None, metavar="K",
                        help="score only these networks (1-based, in --model order) of the models' networks")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the student's threshold for the per-image figures (default: the first model's)")
    parser.add_argument("--margin-px", type=int, default=0,
                        help="count only centres at least this many model-frame px inside the image, where "
                             "both networks read image pixels, not the mirrored border (default 0: all)")
    parser.add_argument("--errors", type=float, default=None, metavar="THRESHOLD",
                        help="also list the unmatched centres at this student threshold")
    parser.add_argument("--refill-lattice", action="store_true",
                        help="score the student's map cubic-filled from its own stride-4 lattice values")
    args = parser.parse_args()
    if args.margin_px < 0:
        parser.error(f"--margin-px {args.margin_px}: a margin is 0 or more model-frame px")
    if args.prepare_perturbed is not None:
        if args.levels < 1:
            parser.error(f"--levels {args.levels}: one grey level or more")
        for path in prepare_perturbed(*args.prepare_perturbed, args.levels):
            print(path)
        return
    if args.prepare_more is not None:
        crops = read_dataset(DATA / "lymph-centers")
        reference = reference_statistics([crop.image_path for crop in crops])  # as distill's, from the crops
        more = [PlanImage(name=name, path=str(DATA / file), mpp=mpp, region_level0=region, role="heldout")
                for name, file, mpp, region in MORE_HELD_OUT]
        plan = [image for image in read_plan(PLAN) if image.role == "heldout"]
        for image in plan + more:
            print(prepare_image(image, reference, args.prepare_more / "images"))
        return
    if args.work is None:
        parser.error("--work is needed (unless --prepare-more)")
    models = [load_model(name) for name in args.model]
    members = [member for model in models for member in model.members]
    if args.member is not None:
        if not all(1 <= k <= len(members) for k in args.member):
            parser.error(f"--member {' '.join(map(str, args.member))}: the models hold networks 1 to {len(members)}")
        members = [members[k - 1] for k in args.member]
    threshold = models[0].threshold if args.threshold is None else args.threshold
    found, smoothed_teacher, teachers = {}, {}, {}
    for name in args.images:
        image = args.work / "images" / f"{name}.tif"
        teacher = teachers[name] = _map(args.work / "teacher-stride2" / name / "prob.zarr")
        student = image_map(members, image)
        rows, cols = min(student.shape[0], teacher.shape[0]), min(student.shape[1], teacher.shape[1])
        if args.refill_lattice:
            if args.teacher_stride4 is not None:
                _print_lattice_fit(name, student[:rows, :cols], _map(args.teacher_stride4 / name / "prob.zarr"))
            student = refill_lattice(student)
        mpp = choose_frame(open_slide(image)).mpp
        teacher_smoothed = smooth_probability(teacher[:rows, :cols], SMOOTH_RADIUS_PX)
        teacher_centres = greedy_peaks(teacher_smoothed, PAPER_THRESHOLD, CLEAR_RADIUS_PX)
        found[name] = (smooth_probability(student[:rows, :cols], SMOOTH_RADIUS_PX), teacher_centres, mpp)
        smoothed_teacher[name] = teacher_smoothed
    print("student threshold: pooled F (precision, recall) against the teacher's stride-2 centres")
    for swept in SWEEP:
        score = pooled(list(_scores(found, swept, args.margin_px).values()))
        print(f"{swept:.3f}: F {score.f_score:.3f} (P {score.precision:.3f}, R {score.recall:.3f})")
    print(f"at the student's threshold {threshold}, per image (teacher centres): F")
    scores = _scores(found, threshold, args.margin_px)
    for name, image_score in scores.items():
        print(f"  {name} ({image_score.true_positives + image_score.false_negatives}): {image_score.f_score:.3f}")
    score = pooled(list(scores.values()))
    print(f"  pooled: F {score.f_score:.3f} (P {score.precision:.3f}, R {score.recall:.3f}; "
          f"{score.true_positives} matched, {score.false_positives} + {score.false_negatives} unmatched)")
    if args.errors is not None:
        _print_errors(found, smoothed_teacher, args.errors)
    if args.teacher_stride4 is not None:
        _compare_teacher("the teacher's stride-4 map", args.teacher_stride4, teachers, found, smoothed_teacher,
                         args.errors is not None)
    if args.teacher_perturbed is not None:
        _compare_teacher(f"the teacher's map of the perturbed copies ({args.teacher_perturbed})",
                         args.teacher_perturbed, teachers, found, smoothed_teacher, args.errors is not None)


def _compare_teacher(label: str, folder: Path, teachers: dict, found: dict, smoothed_teacher: dict,
                     errors: bool) -> None:
    """Another map of the teacher's (``folder/<image>/prob.zarr``) in the student's place: its centres against the
    teacher's stride-2 centres, both at the paper's threshold (and, with ``errors``, its unmatched centres)."""
    print(f"{label} against the teacher's stride-2 map, both at the paper's threshold")
    scores, other = [], {}
    for name in teachers:
        prob = _map(folder / name / "prob.zarr")
        result = concordance(prob, teachers[name], found[name][2], PAPER_THRESHOLD, PAPER_THRESHOLD)
        scores.append(DetectionScore.from_dict(result))
        print(f"{name}: {result['student_centres']} vs {result['teacher_centres']} centres, "
              f"F {result['f_score']:.3f}, map correlation {result['map_correlation']:.4f}")
        rows, cols = smoothed_teacher[name].shape
        other[name] = (smooth_probability(prob[:rows, :cols], SMOOTH_RADIUS_PX), *found[name][1:])
    print(f"pooled F {pooled(scores).f_score:.3f}")
    if errors:
        print(f"the same for {label} in the student's place:")
        _print_errors(other, smoothed_teacher, PAPER_THRESHOLD)


def prepare_perturbed(source: Path, out: Path, levels: int, seed: int = 0) -> list[Path]:
    """``out/images/<name>.tif`` for each ``source/images/<name>.tif``: its pixels plus independent integer noise,
    uniform in ``-levels .. levels`` grey levels per pixel and channel (clipped to 0-255), with its resolution."""
    written = []
    for index, path in enumerate(sorted((source / "images").glob("*.tif"))):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            rgb = page.asarray()
            x_resolution, y_resolution = (page.tags[tag].value for tag in ("XResolution", "YResolution"))
            unit = page.tags["ResolutionUnit"].value
        noise = np.random.default_rng([seed, index]).integers(-levels, levels + 1, rgb.shape)
        perturbed = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        target = out / "images" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(target, perturbed, photometric="rgb", resolutionunit=unit,
                         resolution=(x_resolution[0] / x_resolution[1], y_resolution[0] / y_resolution[1]))
        written.append(target)
    return written


def _print_lattice_fit(name: str, student: np.ndarray, stride4: np.ndarray) -> None:
    """Correlation of the student's map with the teacher's stride-4 map on its lattice (one model-frame pixel per
    input pixel, where the stride-4 map is the teacher's own value) and off it (the cubic filling)."""
    rows, cols = min(student.shape[0], stride4.shape[0]), min(student.shape[1], stride4.shape[1])
    student, stride4 = student[:rows, :cols], stride4[:rows, :cols]
    on = np.zeros((rows, cols), dtype=bool)
    on[::STUDENT_UPSCALE, ::STUDENT_UPSCALE] = True
    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    print(f"{name}: map correlation with the teacher's stride-4 map on its lattice "
          f"{correlation(student[on], stride4[on]):.4f}, off it {correlation(student[~on], stride4[~on]):.4f}; "
          f"the student's map refilled from its lattice {correlation(refill_lattice(student), stride4):.4f}, "
          f"as it is {correlation(student, stride4):.4f}")


def _scores(found: dict, threshold: float, margin_px: int = 0) -> dict[str, DetectionScore]:
    """Per image, the student's centres at ``threshold`` against the teacher's (matched within 3 µm), counting
    only centres at least ``margin_px`` model-frame px inside the image (all centres take part in the matching)."""
    scores = {}
    for name, (smoothed, teacher_centres, mpp) in found.items():
        student_centres = greedy_peaks(smoothed, threshold, CLEAR_RADIUS_PX)
        pairs = matched_pairs(student_centres, teacher_centres, DEFAULT_TOLERANCE_UM / mpp)
        far = np.array(smoothed.shape) - margin_px
        student_in, teacher_in = (((c >= margin_px) & (c < far)).all(axis=1)
                                  for c in (student_centres, teacher_centres))
        # A matched pair counts where the teacher's centre lies; an unmatched centre where it lies itself.
        matched = int(teacher_in[pairs[1]].sum())
        extra = int(student_in.sum() - student_in[pairs[0]].sum())
        missed = int(teacher_in.sum() - matched)
        scores[name] = DetectionScore(matched, extra, missed)
    return scores


def _print_errors(found: dict, smoothed_teacher: dict, threshold: float) -> None:
    """Each unmatched centre, both smoothed maps there and the other side's nearest centre; counted by whether the
    other side's smoothed map passes its own threshold there too (both maps see the object, the greedy picking
    placed the other side's peak elsewhere) or not (one map misses the object)."""
    print(f"unmatched centres at student threshold {threshold} (rows, cols in model-frame px; smoothed P of the "
          f"student and the teacher there; the other side's nearest centre)")
    both = one = 0
    for name, (student_smoothed, teacher_centres, mpp) in found.items():
        student_centres = greedy_peaks(student_smoothed, threshold, CLEAR_RADIUS_PX)
        tolerance = DEFAULT_TOLERANCE_UM / mpp
        pairs = matched_pairs(student_centres, teacher_centres, tolerance)
        extra = np.setdiff1d(np.arange(len(student_centres)), pairs[0])
        missed = np.setdiff1d(np.arange(len(teacher_centres)), pairs[1])
        for kind, own, other, other_map, other_threshold in (
                ("student only", student_centres[extra], teacher_centres, smoothed_teacher[name], PAPER_THRESHOLD),
                ("teacher only", teacher_centres[missed], student_centres, student_smoothed, threshold)):
            for row, col in own:
                nearest = float(cdist([[row, col]], other).min()) if len(other) else float("inf")
                seen = other_map[row, col] >= other_threshold
                both, one = both + seen, one + (not seen)
                print(f"{name} {kind} at ({row}, {col}): student {student_smoothed[row, col]:.3f}, teacher "
                      f"{smoothed_teacher[name][row, col]:.3f}; other side's nearest centre {nearest:.1f} px "
                      f"(tolerance {tolerance:.1f})")
    print(f"of {both + one} unmatched centres, {both} lie where the other side's smoothed map passes its threshold "
          f"too, {one} where it does not")


if __name__ == "__main__":
    main()
