"""``wsi-lymph`` training commands: dataset check, synthetic, patches, folds, train, cv, distill.

Registered by :mod:`wsi_lymph.cli`; each handler parses nothing itself and calls library functions.
The handlers import the library (torch, Dask) when they run, so that ``wsi-lymph --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_lymph.cli import checks, console
from wsi_lymph.cli.checks import UsageError, integer, number
from wsi_lymph.cli.options import add_cluster_options, cluster_kind_of, cluster_kwargs
from wsi_lymph.training.settings import DISTILL_MEMBERS, CVSettings, StudentRecipe

#: Seeds are numpy seeds: non-negative integers.
SEED = integer(0)


def _training_options(parser: argparse.ArgumentParser) -> None:
    d = CVSettings()
    group = parser.add_argument_group("training")
    group.add_argument("--iterations", type=integer(1), default=d.iterations, help=f"optimiser steps, ≥ 1 (default "
                       f"{d.iterations}; the paper ran 600,000)")
    group.add_argument("--recipe", choices=["paper", "modern"], default=d.recipe,
                       help="paper: Adagrad as in Caffe; modern: AdamW, schedule, augmentation")
    group.add_argument("--arch", choices=["paper", "dense"], default=d.arch,
                       help="paper: the released network; dense: exact fully convolutional variant (fast maps)")
    group.add_argument("--batch-size", type=integer(1), default=d.batch_size, help="patches per optimiser step, ≥ 1")
    group.add_argument("--seed", type=SEED, default=d.seed, help="seed of the validation split, the patch order and "
                       "the initial weights, ≥ 0")
    group.add_argument("--validation-fraction", type=number(0, 1, low_open=True, high_open=True),
                       default=d.validation_fraction,
                       help="share of a fold's training images held out to choose the threshold, between 0 and 1")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _settings(args: argparse.Namespace) -> CVSettings:
    return CVSettings(
        n_folds=getattr(args, "folds", 5), iterations=args.iterations, batch_size=args.batch_size,
        recipe=args.recipe, arch=args.arch, seed=args.seed, validation_fraction=args.validation_fraction,
        mpp=getattr(args, "mpp", 0.5), stride_px=getattr(args, "stride", 2),
        max_positive=getattr(args, "max_positive", 2000), max_negative=getattr(args, "max_negative", 4000),
        device=args.device, torch_threads=_torch_threads(args),
    )


def _torch_threads(args: argparse.Namespace) -> int | None:
    from wsi_lymph.engine.cluster import default_workers, torch_threads_per_worker

    if not hasattr(args, "workers") or cluster_kind_of(args) != "local":
        return None  # the workers of jobs and remote clusters know their own cores
    return torch_threads_per_worker(args.workers or default_workers())


def _client(args: argparse.Namespace, *, default_jobs: int = 1):
    """The command's cluster (:func:`wsi_lymph.cli.console.cluster`); its log goes to ``--out`` from now on."""
    from wsi_lymph.engine.cluster import default_workers

    # patches' --out is the Zarr group itself: its log goes to the cache folder, not into the group.
    log_dir = args.out if args.command in ("cv", "distill") else None
    return console.cluster(args.command, log_dir=log_dir, **cluster_kwargs(args, default_jobs=default_jobs) | {
        "workers": args.workers or default_workers()})


def _check_dataset(folder: Path) -> None:
    """A data set folder that holds no annotated images (or an unreadable listing) is refused before any cluster."""
    from wsi_lymph.training.dataset import DatasetError, read_dataset

    try:
        read_dataset(folder)
    except DatasetError as error:
        raise UsageError(f"data set {error}") from None


def cmd_dataset_check(args: argparse.Namespace) -> int:
    from wsi_lymph.training.dataset import check_dataset

    checks.check_exists(args.dataset, "data set", folder=True)
    report = check_dataset(args.dataset)
    print(report.format())
    return 0 if report.ok else 1


def cmd_synthetic(args: argparse.Namespace) -> int:
    from wsi_lymph.training.synthetic import make_synthetic_dataset

    checks.check_out_folder(args.out, "OUT")
    if args.out.is_dir() and any(not p.name.startswith(".") for p in args.out.iterdir()):
        raise UsageError(f"OUT {args.out}: not empty; give a new or empty folder")
    images = make_synthetic_dataset(args.out, n_images=args.images, size_px=args.size, seed=args.seed)
    print(f"{len(images)} synthetic images with {sum(len(i.centers_rc) for i in images)} lymphocytes in {args.out}")
    return 0


def cmd_patches(args: argparse.Namespace) -> int:
    from wsi_lymph.training.dataset import DatasetError
    from wsi_lymph.training.patches import export_png, extract_patches

    checks.check_exists(args.dataset, "data set", folder=True)
    checks.check_out_folder(args.out)
    if args.png is not None:
        checks.check_out_folder(args.png, "--png")
    _check_dataset(args.dataset)
    try:
        with _client(args) as client:
            store = extract_patches(client, args.dataset, args.out, seed=args.seed, max_positive=args.max_positive,
                                    max_negative=args.max_negative)
    except DatasetError as error:
        console.log.debug("wsi-lymph patches failed", exc_info=error)  # the traceback: log file only
        print(f"wsi-lymph patches: {error}", file=sys.stderr)
        return 1
    print(f"patches: {store}")
    if args.png:
        print(f"{export_png(store, args.png)} PNG files in {args.png}")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    import zarr

    from wsi_lymph.training.folds import make_folds, write_folds

    checks.check_exists(args.patches, "patches", folder=True)
    checks.check_out_folder(args.out)
    try:
        ids = list(zarr.open_group(str(args.patches), mode="r").attrs["image_ids"])
    except (KeyError, OSError, ValueError, zarr.errors.BaseZarrError) as error:
        raise UsageError(f"patches {args.patches}: not a patches.zarr written by wsi-lymph patches "
                         f"({type(error).__name__})") from error
    if len(ids) < args.folds:
        raise UsageError(f"--folds {args.folds}: {args.patches} holds {len(ids)} image(s); every fold needs a test "
                         f"image, so --folds must be from 2 to {len(ids)}")
    folds = make_folds(ids, args.folds, args.seed)
    print(f"{len(folds)} folds of {len(ids)} images: {write_folds(folds, args.patches, args.out, seed=args.seed)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from wsi_lymph.training.cv import train_fold
    from wsi_lymph.training.folds import read_folds

    checks.check_exists(args.patches, "--patches", folder=True)
    checks.check_exists(args.folds_dir, "--folds-dir", folder=True)
    checks.check_out_folder(args.out)
    folds = {fold.fold: fold for fold in read_folds(args.folds_dir)}
    if args.fold not in folds:
        print(f"wsi-lymph train: no fold {args.fold} in {args.folds_dir} (folds {sorted(folds)})", file=sys.stderr)
        return 2
    console.log_to(args.out)
    model, fit, val = train_fold(folds[args.fold], args.patches, args.out, _settings(args), log=console.say)
    print(f"fold {args.fold}: trained on {len(fit)} images, validated on {len(val)}; model {model}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from wsi_lymph.engine.cluster import has_gpu_workers
    from wsi_lymph.training.cv import run_cv
    from wsi_lymph.training.dataset import DatasetError

    checks.check_exists(args.dataset, "data set", folder=True)
    checks.check_out_folder(args.out)
    _check_dataset(args.dataset)
    try:
        with _client(args, default_jobs=args.folds) as client:  # one worker job per fold
            # The client has a worker by now (jobqueue clusters wait for one); GPU workers take one fold each.
            resources = {"GPU": 1} if has_gpu_workers(client) else None
            report = run_cv(client, args.dataset, args.out, _settings(args), resources=resources)
    except (DatasetError, ValueError) as error:
        console.log.debug("wsi-lymph cv failed", exc_info=error)  # the traceback: log file only
        print(f"wsi-lymph cv: {error}", file=sys.stderr)
        return 1
    net, base = report["pooled"]["network"], report["pooled"]["baseline"]
    print(f"pooled over {len(report['folds'])} folds: P {net['precision']:.3f} R {net['recall']:.3f} "
          f"F {net['f_score']:.3f} (hematoxylin-blob baseline F {base['f_score']:.3f}); "
          f"report in {Path(args.out) / 'cv_report.json'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from wsi_lymph.engine.cluster import has_gpu_workers
    from wsi_lymph.models.checkpoints import ModelError
    from wsi_lymph.training.dataset import DatasetError, read_dataset
    from wsi_lymph.training.distill import (
        check_out_dir,
        check_plan_images,
        read_plan,
        reference_statistics,
        run_distill,
        run_settings,
    )

    checks.check_exists(args.plan, "plan", folder=False)
    checks.check_exists(args.crops, "--crops", folder=True)
    checks.check_out_folder(args.out)
    checks.check_model_name(args.teacher, "--teacher")
    recipe = StudentRecipe(iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                           stain_jitter=args.stain_jitter, stain_copies=args.stain_copies,
                           scale_jitter=args.scale_jitter, flip_rotate=args.flip_rotate,
                           turned_copies=args.turned_copies,
                           checkpoint_every=min(args.checkpoint_every, args.iterations))
    # Everything the command reads before the cluster starts is a usage error: exit 2, before any work.
    try:
        plan = read_plan(args.plan)  # its errors name the plan file
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        check_plan_images(plan)  # its errors name the image file
    except ValueError as error:
        raise UsageError(f"plan {args.plan}: {error}") from None
    try:
        reference = reference_statistics([c.image_path for c in read_dataset(args.crops)])
    except (DatasetError, ValueError, OSError) as error:
        raise UsageError(f"--crops {args.crops}: {error}") from None
    settings = run_settings(plan, reference, recipe, args.teacher, args.teacher_stride)
    try:
        check_out_dir(args.out, settings)
    except ValueError as error:
        raise UsageError(f"--out {args.out}: {error}") from None
    try:
        with _client(args) as client:
            resources = {"GPU": 1} if has_gpu_workers(client) else None
            model = run_distill(client, plan, args.crops, args.out, recipe, members=args.members, teacher=args.teacher,
                                teacher_stride_px=args.teacher_stride, model_source=args.model_source,
                                resources=resources, device=args.device)
    except (DatasetError, ModelError, ValueError, RuntimeError) as error:
        console.log.debug("wsi-lymph distill failed", exc_info=error)  # the traceback: log file only
        print(f"wsi-lymph distill: {error}", file=sys.stderr)
        return 1
    print(f"student written to {model} (model card: {model.with_name('model-card.json')})")
    return 0


def add_training_commands(commands) -> None:
    """Add the training commands to the ``wsi-lymph`` sub-command parser."""
    dataset = commands.add_parser("dataset", help="annotated data sets").add_subparsers(dest="action", required=True)
    check = dataset.add_parser("check", help="report images without masks, size mismatches, empty or unreadable")
    check.add_argument("dataset", type=Path, help="folder of annotated images (im<N>.tif + <N>m.tif, <name>.<ext> + "
                       "<name>_seed.<ext>, or <name>.<ext> + <name>.csv)")
    check.set_defaults(func=cmd_dataset_check)

    synthetic = commands.add_parser("synthetic", help="write a synthetic H&E-like data set with known centres")
    synthetic.add_argument("out", type=Path, help="folder to write, new or empty")
    synthetic.add_argument("--images", type=integer(1), default=10, help="number of images, ≥ 1")
    synthetic.add_argument("--size", type=integer(16, 8192), default=100, help="image edge in pixels (20x, "
                           "0.5 µm/px), 16 to 8192")
    synthetic.add_argument("--seed", type=SEED, default=0, help="seed of the whole data set, ≥ 0")
    synthetic.set_defaults(func=cmd_synthetic)

    patches = commands.add_parser("patches", help="training patches of a data set into a Zarr group")
    patches.add_argument("dataset", type=Path, help="folder of annotated images (see dataset check)")
    patches.add_argument("--out", type=Path, required=True, help="patches.zarr (or a folder to hold it)")
    patches.add_argument("--seed", type=SEED, default=0, help="seed of the sampled locations, ≥ 0")
    patches.add_argument("--max-positive", type=integer(1), default=2000, help="positive locations per image, ≥ 1")
    patches.add_argument("--max-negative", type=integer(1), default=4000, help="negative locations per image, ≥ 1")
    patches.add_argument("--png", type=Path, default=None, help="also export PNGs with the paper's names here")
    add_cluster_options(patches)
    patches.set_defaults(func=cmd_patches)

    folds = commands.add_parser("folds", help="split images (patients) into folds; the paper's list files")
    folds.add_argument("patches", type=Path, help="patches.zarr")
    folds.add_argument("--out", type=Path, required=True, help="folder for folds.json, the list files and the mean "
                       "images")
    folds.add_argument("--folds", type=integer(2), default=5, help="number of folds, from 2 to the number of images")
    folds.add_argument("--seed", type=SEED, default=0, help="seed of the shuffle, ≥ 0")
    folds.set_defaults(func=cmd_folds)

    train = commands.add_parser("train", help="train one fold (resumes from the last checkpoint in --out)")
    train.add_argument("--fold", type=integer(1), required=True, help="the fold to train, ≥ 1 (folds.json lists them)")
    train.add_argument("--patches", type=Path, required=True, help="patches.zarr")
    train.add_argument("--folds-dir", type=Path, required=True, help="folder with folds.json")
    train.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and model.pt")
    _training_options(train)
    train.set_defaults(func=cmd_train)

    cv = commands.add_parser("cv", help="patches, folds, one training per fold as Dask tasks, evaluation")
    cv.add_argument("dataset", type=Path, help="folder of annotated images (see dataset check)")
    cv.add_argument("--out", type=Path, required=True, help="work and report folder (resumes what is in it)")
    cv.add_argument("--folds", type=integer(2), default=5, help="number of folds, from 2 to the number of images")
    cv.add_argument("--mpp", type=checks.mpp(), default=0.5, help="µm per pixel of the data set's images")
    cv.add_argument("--stride", type=integer(*checks.STRIDE_RANGE_PX), default=2,
                    help="detection stride in the model frame (paper network), 1 to 32")
    cv.add_argument("--max-positive", type=integer(1), default=2000, help="positive patch locations per image, ≥ 1")
    cv.add_argument("--max-negative", type=integer(1), default=4000, help="negative patch locations per image, ≥ 1")
    _training_options(cv)
    add_cluster_options(cv)
    cv.set_defaults(func=cmd_cv)

    d = StudentRecipe()
    distill = commands.add_parser(
        "distill", help="distil the paper's ensemble into the fast student: prepare, teacher maps, train, evaluate",
        description="The whole recipe of the shipped default model, resumable: run it again after an interruption.")
    distill.add_argument("plan", type=Path, help="JSON plan of training and held-out images (docs/distill-plan.json)")
    distill.add_argument("--crops", type=Path, required=True,
                         help="annotated crops: stain reference and threshold, never trained on")
    distill.add_argument("--out", type=Path, required=True, help="work and output folder (model.pt, model-card.json)")
    distill.add_argument("--teacher", default="janowczyk2016", help="teacher model (default: the 5-fold ensemble)")
    distill.add_argument("--teacher-stride", type=integer(*checks.STRIDE_RANGE_PX), default=4,
                         help="stride of the teacher's maps, 1 to 32 (default 4)")
    distill.add_argument("--model-source", default=None, help="URL or folder to fetch the paper's models from "
                         "(default: $WSI_LYMPH_MODEL_SOURCE, else the authors' repository)")
    distill.add_argument("--iterations", type=integer(1), default=d.iterations,
                         help=f"steps, ≥ 1 (default {d.iterations})")
    distill.add_argument("--batch-size", type=integer(1), default=d.batch_size,
                         help=f"crops a step, ≥ 1 (default {d.batch_size})")
    distill.add_argument("--checkpoint-every", type=integer(1), default=d.checkpoint_every,
                         help=f"steps between checkpoints, ≥ 1 (default {d.checkpoint_every})")
    distill.add_argument("--scale-jitter", type=number(0.0, 0.5, high_open=True), default=d.scale_jitter,
                         help="magnify each training crop by a random factor in 1 ± this, for scanners whose µm/px "
                         f"is only estimated (default {d.scale_jitter:g})")
    distill.add_argument("--stain-jitter", type=number(0.0, 0.5, high_open=True), default=d.stain_jitter,
                         help="perturb hematoxylin, eosin and DAB by a random scale in 1 ± this (shift ± this / 10): "
                         "on each stain copy, or with --stain-copies 0 on each crop as drawn, whose target then stays "
                         f"the teacher's map of the unperturbed crop (default {d.stain_jitter:g})")
    distill.add_argument("--stain-copies", type=integer(0, 16), default=d.stain_copies,
                         help="perturb N copies of each training image instead (each once, as a whole, by "
                         "--stain-jitter) and have the teacher map them, so the targets follow the colours; "
                         f"crops are then not perturbed as drawn; 0 to 16 (default {d.stain_copies})")
    distill.add_argument("--flip-rotate", action=argparse.BooleanOptionalAction, default=d.flip_rotate,
                         help="give each training crop and its target one of the 8 flips/rotations (default: "
                         f"{'on' if d.flip_rotate else 'off'}: crops as scanned, since the teacher is not equivariant "
                         "to them, so its maps of turned crops are not turned maps)")
    distill.add_argument("--turned-copies", type=integer(0, 7), default=d.turned_copies,
                         help="turn or flip N copies of each training image (each as a whole, each another of the "
                         "7 flips/rotations) and have the teacher map them: other orientations with the teacher's "
                         f"own targets; 0 to 7 (default {d.turned_copies})")
    distill.add_argument("--seed", type=SEED, default=d.seed,
                         help=f"crops and augmentation seed, ≥ 0 (default {d.seed})")
    distill.add_argument("--members", type=integer(1, 8), default=DISTILL_MEMBERS,
                         help="students to train, the k-th with seed --seed + k, each as its own task; the model "
                         "averages their maps as the teacher averages its folds, at that many times the cost of one; "
                         f"1 to 8 (default {DISTILL_MEMBERS})")
    distill.add_argument("--device", default=None, help="torch device of the training task (default: cuda if any)")
    add_cluster_options(distill)
    distill.set_defaults(func=cmd_distill)
