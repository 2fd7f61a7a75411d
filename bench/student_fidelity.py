"""What limits the student's fidelity to the teacher: capacity, optimisation or augmentation?

Reads a ``wsi-lymph distill`` work folder (``images/`` with any stain copies, the teacher's stride-4 maps of the
training images and copies in ``teacher/``, its stride-2 maps of the held-out images in ``teacher-stride2/``) and
scores one student:

* ``--variant shipped``: the shipped student as it is;
* ``--variant further``: one of the shipped student's networks (``--member K``) trained ``--iterations`` more
  steps (learning rate ``--lr``, warm-up and cosine decay as in distillation), with the recipe's augmentations or
  others (``--stain-jitter``, ``--scale-jitter``), the recipe's crops per step or ``--batch-size``, with the
  distillation loss alone or plus a loss on the two maps smoothed as the peaks see them (``--smoothed-loss
  WEIGHT``), and with crops drawn uniformly or, for a fraction of each batch, around the teacher's centres near
  the threshold (``--hard-fraction``, ``--hard-band``);
* ``--variant wider``: a fresh student of ``--width`` channels (and inner layers of ``--dilations``, with
  ``--residual`` connections: e.g. a deeper one of the shipped cost, ``--width 24 --dilations 1 2 4 2 1 1``; with
  another ``--activation``; with a stage of ``--fine-width`` channels at twice the input resolution) trained
  with the shipped recipe (``--iterations`` steps, other augmentations, losses and crops as for ``further``);
* ``--variant members``: the checkpoints given with ``--members`` (each holding one network or several), all
  their networks' maps averaged (e.g. two seeds);
* ``--variant complement``: a fresh network of ``--width`` channels trained, with the shipped recipe, so that the
  average of its map and the shipped networks' maps (held fixed) follows the teacher, so that it may learn what the
  shipped networks get wrong together (BENCHMARKS.md: on these images it does not).  Its checkpoint holds the new
  network alone; it is scored averaged with the shipped ones, as the engine would average them.

A trained variant is also written as a checkpoint, ``--out``/model.pt (the shipped student's metadata), so that
``--variant members`` and ``bench/student_concordance.py --model`` can average several (the checkpoint records
each network's shape; those written before 2026-12-05 did not, and a wider one of them does not load). For each,
leave-one-crop-out F on the three annotated crops (as the model card), and on held-out and training images the map
correlation with the teacher and the concordance F (3 µm) at the student's threshold and at 0.70 (the best matched
threshold of the shipped student). The teacher's threshold is the paper's, 0.7706. ``--margin-px N`` adds the map
correlation without the ``N``-px border band of model-frame pixels (where both networks read the mirrored edge).

Usage (one process, two threads; a ``further`` run of 4,000 steps takes ~7 min on a 2-core VM)::

    .venv/bin/python bench/student_fidelity.py --work distill/ --variant further --iterations 4000 \\
        --stain-jitter 0 --scale-jitter 0 --out fidelity-further/ [--margin-px 44]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from wsi_lymph.constants import (
    CLEAR_RADIUS_PX,
    DEFAULT_MODEL,
    DEFAULT_TOLERANCE_UM,
    PAPER_THRESHOLD,
    SMOOTH_RADIUS_PX,
)
from wsi_lymph.detection.evaluate import DetectionScore, pooled
from wsi_lymph.detection.peaks import disk_kernel, greedy_peaks, smooth_probability
from wsi_lymph.io.probmap_store import open_probmap
from wsi_lymph.models.checkpoints import ensemble_checkpoint, load_checkpoint_members, save_checkpoint_atomic
from wsi_lymph.models.networks import STUDENT_UPSCALE, SubpixelStudentNet
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import open_slide
from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.distill import (
    CROPS_MPP,
    DistillPair,
    concordance,
    crop_detections,
    image_map,
    input_normalisation,
    leave_one_crop_out,
    load_pair,
    read_plan,
    reference_statistics,
    sample_batch,
    scaled_crop,
    teacher_loss,
    train_student,
)
from wsi_lymph.training.settings import StudentRecipe

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT.parent / "shared" / "data" / "lymph-centers"
HELD_OUT = ("tia", "stardist", "hl-lung")
TRAINING = ("cmu-a", "hl-high", "prostate-a", "hl-tissue-a")
MATCHED_THRESHOLD = 0.70


def _student(args, pairs) -> list[tuple[SubpixelStudentNet, torch.Tensor]]:
    """The networks to score: shipped, shipped and trained further, or a fresh wider one trained."""
    shipped_members = load_model(DEFAULT_MODEL).members
    if args.variant == "shipped":
        return shipped_members
    if not 0 <= args.member < len(shipped_members):
        raise SystemExit(f"--member {args.member}: the shipped student has {len(shipped_members)} networks")
    shipped = shipped_members[args.member][0]
    # The shipped recipe puts the stain jitter on copies of the images; a work folder without copies gets it on
    # the crops as they are drawn (the recipe of the students shipped before 2026-12-03).
    has_copies = any("-stain" in pair.name for pair in pairs)
    recipe = StudentRecipe() if has_copies else StudentRecipe(stain_copies=0)
    # Recorded in the checkpoints only: the turned copies are among the pairs already.
    recipe = replace(recipe, turned_copies=len({pair.name.rsplit("-turn", 1)[1] for pair in pairs
                                                if "-turn" in pair.name}))
    if args.variant == "further":
        # Other crops than before: the shipped networks were trained with seeds 0, 1, ...
        recipe = replace(recipe, iterations=args.iterations or 4000, lr=args.lr, seed=args.member + 1)
        net = shipped
    elif args.variant == "complement":
        # A seed of its own: the shipped networks were trained with seeds 0, 1, ...
        recipe = replace(recipe, iterations=args.iterations or recipe.iterations,
                         seed=len(shipped_members) if args.seed is None else args.seed)
        torch.manual_seed(recipe.seed)
        mean, std = input_normalisation(pairs)
        net = _Complement(SubpixelStudentNet(tuple(std), width=args.width), shipped_members, mean)
    else:
        recipe = replace(recipe, iterations=args.iterations or recipe.iterations,
                         seed=recipe.seed if args.seed is None else args.seed)
        torch.manual_seed(recipe.seed)
        inner = {"dilations": tuple(args.dilations)} if args.dilations else {}  # else the network's default
        net = SubpixelStudentNet(tuple(input_normalisation(pairs)[1]), width=args.width, residual=args.residual,
                                 activation=args.activation, fine_width=args.fine_width, **inner)
    if args.stain_jitter is not None:
        recipe = replace(recipe, stain_jitter=args.stain_jitter)
    if args.scale_jitter is not None:
        recipe = replace(recipe, scale_jitter=args.scale_jitter)
    if args.batch_size is not None:
        recipe = replace(recipe, batch_size=args.batch_size)
    if args.flip_rotate is not None:
        recipe = replace(recipe, flip_rotate=args.flip_rotate)
    started = time.perf_counter()
    sample = _hard_sampler(pairs, args.hard_fraction, *args.hard_band) if args.hard_fraction else None
    net, mean_image, _ = train_student(pairs, args.out, recipe, net=net, log=lambda m: print(m, flush=True),
                                       loss=_smoothed_loss(args.smoothed_loss) if args.smoothed_loss else None,
                                       sample=sample)
    fixed = []
    if isinstance(net, _Complement):
        net, fixed = net.new, shipped_members
    print(f"trained in {time.perf_counter() - started:.0f} s; {net.flops_per_input_px() / 1e3:.1f} kFLOP per 20x "
          f"pixel (with the networks it complements: "
          f"{sum(n.flops_per_input_px() for n, _ in [*fixed, (net, None)]) / 1e3:.1f}); "
          f"recipe {json.dumps(asdict(recipe))}")
    meta = {key: value for key, value in load_model(DEFAULT_MODEL).meta.items() if key != "member_sha256"}
    save_checkpoint_atomic(ensemble_checkpoint([(net, mean_image)], meta), args.out / "model.pt")
    return [*fixed, (net, mean_image)]


class _Complement(torch.nn.Module):
    """A new network and fixed ones, as one network to ``train_student``: its output is the logit of the average
    of all their P, as the engine averages a model's networks, and only the new network learns.

    ``train_student`` feeds inputs minus the training pixels' mean; each fixed network gets its own mean taken off
    instead (the constant of its mean image).
    """

    def __init__(self, new: SubpixelStudentNet, fixed: list, training_mean_bgr: np.ndarray) -> None:
        super().__init__()
        if any(network.halo_px != new.halo_px for network, _ in fixed):
            raise SystemExit("--variant complement: the new network must read the shipped networks' halo")
        self.new, self.halo_px = new, new.halo_px
        self.fixed = torch.nn.ModuleList([network.eval().requires_grad_(False) for network, _ in fixed])
        offsets = [torch.as_tensor(training_mean_bgr, dtype=torch.float32) - mean[:, 0, 0] for _, mean in fixed]
        self.register_buffer("offsets", torch.stack(offsets).view(len(fixed), 1, 3, 1, 1))

    def train(self, mode: bool = True) -> _Complement:
        self.new.train(mode)  # the fixed networks stay as they are
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fixed = sum(torch.sigmoid(network(x + offset)) for network, offset in zip(self.fixed, self.offsets,
                                                                                       strict=True))
        prob = (fixed + torch.sigmoid(self.new(x))) / (len(self.fixed) + 1)
        return torch.logit(prob.clamp(1e-6, 1.0 - 1e-6))


def _hard_sampler(pairs: list[DistillPair], fraction: float, low: float, high: float):
    """A ``train_student`` sampler: the recipe's batch, its first ``fraction`` of crops replaced by crops that hold
    one of the teacher's centres whose smoothed P lies in [low, high] (anywhere in the crop's core, magnified as the
    recipe's scale jitter says).  The centres are picked on each target as the peaks would (greedy, at ``low``)."""
    sites = []
    for pair in pairs:
        smoothed = smooth_probability(pair.target, SMOOTH_RADIUS_PX)
        centres = greedy_peaks(smoothed, low, CLEAR_RADIUS_PX)
        sites.append(centres[smoothed[centres[:, 0], centres[:, 1]] <= high])
    counts = np.array([len(s) for s in sites], dtype=float)
    if not counts.sum():
        raise SystemExit(f"--hard-band {low} {high}: no teacher centre of the training images lies in it")
    print(f"hard crops: {int(counts.sum())} teacher centres with smoothed P in [{low}, {high}] "
          f"in {int((counts > 0).sum())} of {len(pairs)} images", flush=True)

    def sample(pairs: list[DistillPair], recipe: StudentRecipe, halo_px: int, step: int):
        inputs, targets = sample_batch(pairs, recipe, halo_px, step)
        rng = np.random.default_rng([recipe.seed, step, 1])  # not the batch's own stream
        size, up = recipe.crop_px, STUDENT_UPSCALE
        for k in range(round(fraction * recipe.batch_size)):
            index = rng.choice(len(pairs), p=counts / counts.sum())
            pair, (row, col) = pairs[index], sites[index][rng.integers(len(sites[index]))]
            magnification = 1.0 + float(rng.uniform(-recipe.scale_jitter, recipe.scale_jitter))
            span = (size + 2 * halo_px) / magnification  # source input pixels the crop covers
            core_row, core_col = rng.uniform(0.0, size, 2)  # where the centre falls in the crop's core
            rows, cols = pair.inputs_bgr.shape[:2]
            top = np.clip(row / up - (halo_px + core_row) / magnification, 0.0, rows - span - 1.0)
            left = np.clip(col / up - (halo_px + core_col) / magnification, 0.0, cols - span - 1.0)
            x, y = scaled_crop(pair, float(top), float(left), size, halo_px, magnification)
            inputs[k], targets[k, 0] = x.transpose(2, 0, 1), y
        return inputs, targets

    return sample


def _smoothed_loss(weight: float):
    """The distillation loss plus ``weight`` x the same cross-entropy between the two maps smoothed as the peaks
    see them (the disk of ``SMOOTH_RADIUS_PX``; "valid", so the crop's border rows drop out): the centres are
    picked on the smoothed map, not on the map."""
    kernel = torch.as_tensor(disk_kernel(SMOOTH_RADIUS_PX).copy(), dtype=torch.float32)[None, None]

    def loss(logits: torch.Tensor, target: torch.Tensor, recipe: StudentRecipe) -> torch.Tensor:
        student = F.conv2d(torch.sigmoid(logits), kernel).clamp(1e-6, 1 - 1e-6)
        teacher = F.conv2d(target, kernel).clamp(0.0, 1.0)
        smoothed = F.binary_cross_entropy(student, teacher, weight=1.0 + recipe.peak_weight * teacher)
        return teacher_loss(logits, target, recipe) + weight * smoothed

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a wsi-lymph distill --out folder")
    parser.add_argument("--variant", choices=("shipped", "further", "wider", "members", "complement"),
                        default="shipped")
    parser.add_argument("--members", type=Path, nargs="+", default=[], help="checkpoints of --variant members")
    parser.add_argument("--out", type=Path, default=None, help="an empty or new folder for a trained variant's "
                        "checkpoints (default: a fresh temporary one); one holding checkpoints is refused, since "
                        "training would resume from them rather than run")
    parser.add_argument("--iterations", type=int, default=None,
                        help="steps of --variant further (default 4000), wider or complement (default: the "
                        "recipe's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of --variant further")
    parser.add_argument("--width", type=int, default=48, help="channels of --variant wider or complement")
    parser.add_argument("--dilations", type=int, nargs="+", default=None,
                        help="dilation of each inner layer of --variant wider (default: the shipped 2 4 1)")
    parser.add_argument("--residual", action="store_true", help="--variant wider with residual inner layers")
    parser.add_argument("--activation", choices=tuple(SubpixelStudentNet.ACTIVATIONS), default="relu",
                        help="non-linearity of --variant wider (default relu, the shipped one)")
    parser.add_argument("--fine-width", type=int, default=0,
                        help="--variant wider with a stage of this many channels at twice the input resolution "
                        "(default 0: none, as shipped)")
    parser.add_argument("--seed", type=int, default=None, help="seed of --variant wider (default: the recipe's) or "
                        "complement (default: the number of shipped networks)")
    parser.add_argument("--flip-rotate", action=argparse.BooleanOptionalAction, default=None,
                        help="the recipe field flip_rotate (default: the recipe's, off)")
    parser.add_argument("--stain-jitter", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--scale-jitter", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="crops per step (default: the recipe's)")
    parser.add_argument("--plan", type=Path, default=ROOT / "docs" / "distill-plan.json",
                        help="the plan the work folder was made from (default: the shipped student's)")
    parser.add_argument("--smoothed-loss", type=float, default=0.0, metavar="WEIGHT",
                        help="--variant further or wider: add WEIGHT x the loss between the two maps smoothed as "
                        "the peaks see them (default 0: the distillation loss alone)")
    parser.add_argument("--member", type=int, default=0,
                        help="--variant further: which of the shipped student's networks to train (0, 1, ...)")
    parser.add_argument("--hard-fraction", type=float, default=0.0,
                        help="--variant further or wider: the fraction of each batch's crops drawn around the "
                        "teacher's centres in --hard-band (default 0: all crops uniform)")
    parser.add_argument("--hard-band", type=float, nargs=2, default=(0.6, 0.9), metavar=("LOW", "HIGH"),
                        help="smoothed teacher P of the centres --hard-fraction draws around (default 0.6 0.9)")
    parser.add_argument("--margin-px", type=int, default=0,
                        help="also print the map correlation without this border band of model-frame px (0: not)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trains = ("further", "wider", "complement")
    if args.smoothed_loss and args.variant not in trains:
        parser.error("--smoothed-loss trains a student: it goes with --variant further, wider or complement")
    if args.hard_fraction and args.variant not in trains:
        parser.error("--hard-fraction trains a student: it goes with --variant further, wider or complement")
    if (args.dilations or args.residual or args.activation != "relu" or args.fine_width) and args.variant != "wider":
        parser.error("--dilations, --residual, --activation and --fine-width shape a fresh student: they go with "
                     "--variant wider")
    if args.variant in ("wider", "complement"):
        try:  # the network's own check of its shape, before any image is read
            SubpixelStudentNet(width=args.width, fine_width=args.fine_width,
                               **({"dilations": args.dilations} if args.dilations else {}))
        except ValueError as error:
            parser.error(f"--width/--dilations/--fine-width: {error}")
    if args.batch_size is not None and args.variant not in trains:
        parser.error("--batch-size trains a student: it goes with --variant further, wider or complement")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: one crop or more")
    if args.margin_px < 0:
        parser.error(f"--margin-px {args.margin_px}: a number of pixels, 0 or more")
    if not 0.0 <= args.hard_fraction <= 1.0:
        parser.error(f"--hard-fraction {args.hard_fraction}: a fraction of the batch, 0 to 1")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="student-fidelity-"))
    elif any(args.out.glob("student-state-*.pt")):
        parser.error(f"--out {args.out} holds checkpoints of an earlier run; choose a new folder")
    torch.set_num_threads(args.threads)

    if args.variant == "members":
        if not args.members:
            parser.error("--variant members needs --members")
        score_student([member for path in args.members for member in load_checkpoint_members(path)[0]], args.work,
                      args.margin_px)
        return
    plan = [image for image in read_plan(args.plan) if image.role == "train"]
    # Each training image, and its stain and turned copies where the folder has them (with the teacher's maps).
    images = [args.work / "images" / f"{image.name}.tif" for image in plan]
    images += [copy for image in plan for kind in ("stain", "turn")
               for copy in sorted((args.work / "images").glob(f"{image.name}-{kind}*.tif"))
               if (args.work / "teacher" / copy.stem / "prob.zarr").is_dir()]
    pairs = [load_pair(path.stem, path, args.work / "teacher" / path.stem / "prob.zarr") for path in images]
    score_student([(net.eval(), mean) for net, mean in _student(args, pairs)], args.work, args.margin_px)


def score_student(members: list, work: Path, margin_px: int = 0) -> None:
    """Print the student's leave-one-crop-out F, and its map correlation (also without the ``margin_px`` border band
    where that is > 0) and concordance with the teacher."""
    crops = read_dataset(CROPS)
    detections = crop_detections(members, crops, reference_statistics([c.image_path for c in crops]))
    loco = leave_one_crop_out([c.image_id for c in crops], detections,
                              [c.centers_rc[:, ::-1].astype(float) for c in crops], DEFAULT_TOLERANCE_UM / CROPS_MPP)
    threshold = loco["threshold_all_crops"]
    print(f"crops, leave one crop out: pooled F {loco['pooled']['f_score']:.3f}; threshold on all three {threshold}")

    interior = f" (without the {margin_px}-px border)" if margin_px else ""
    print(f"image (teacher map): map correlation{interior}; concordance F (P, R) at the student's threshold | at 0.70")
    held_out: list[list[DetectionScore]] = [[], []]
    for folder, names in (("teacher-stride2", HELD_OUT), ("teacher", TRAINING)):
        for name in names:
            image = work / "images" / f"{name}.tif"
            teacher = open_probmap(work / folder / name / "prob.zarr")[0].compute(scheduler="synchronous")
            student = image_map(members, image)
            mpp = choose_frame(open_slide(image)).mpp
            scores = [concordance(student, teacher, mpp, t, PAPER_THRESHOLD) for t in (threshold, MATCHED_THRESHOLD)]
            role = "held out" if folder == "teacher-stride2" else "training"
            inside = f" ({_interior_correlation(student, teacher, margin_px):.4f})" if margin_px else ""
            print(f"{name} ({role}): {scores[0]['map_correlation']:.4f}{inside}; "
                  + " | ".join(f"{s['f_score']:.3f} ({s['precision']:.2f}, {s['recall']:.2f})" for s in scores),
                  flush=True)
            if folder == "teacher-stride2":
                for kept, score in zip(held_out, scores, strict=True):
                    kept.append(DetectionScore.from_dict(score))
    both = " | ".join(f"{pooled(scores).f_score:.3f}" for scores in held_out)
    print(f"held out, pooled concordance F at the student's threshold | at 0.70: {both}")


def _interior_correlation(student: np.ndarray, teacher: np.ndarray, margin_px: int) -> float:
    """Correlation of the two maps over the part both cover, without its ``margin_px`` border band."""
    rows, cols = (min(a, b) - margin_px for a, b in zip(student.shape, teacher.shape, strict=True))
    inner = (slice(margin_px, rows), slice(margin_px, cols))
    return float(np.corrcoef(student[inner].ravel(), teacher[inner].ravel())[0, 1])


if __name__ == "__main__":
    main()
