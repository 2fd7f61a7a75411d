"""``wsi-lymph`` training commands: dataset check, synthetic, patches, folds, train, cv.

Registered by :mod:`wsi_lymph.cli`; each handler parses nothing itself and calls library functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Imported by cli.build_parser, so cli is fully loaded by then.
from .cli import _add_cluster_options, _cluster_kind, _cluster_kwargs


def _training_options(parser: argparse.ArgumentParser) -> None:
    from .cv import CVSettings

    d = CVSettings()
    group = parser.add_argument_group("training")
    group.add_argument("--iterations", type=int, default=d.iterations, help=f"optimiser steps (default {d.iterations}; "
                       "the paper ran 600,000)")
    group.add_argument("--recipe", choices=["paper", "modern"], default=d.recipe,
                       help="paper: Adagrad as in Caffe; modern: AdamW, schedule, augmentation")
    group.add_argument("--arch", choices=["paper", "dense"], default=d.arch,
                       help="paper: the released network; dense: exact fully convolutional variant (fast maps)")
    group.add_argument("--batch-size", type=int, default=d.batch_size)
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument("--validation-fraction", type=float, default=d.validation_fraction,
                       help="share of a fold's training images held out to choose the threshold")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _settings(args: argparse.Namespace):
    from .cv import CVSettings

    return CVSettings(
        n_folds=getattr(args, "folds", 5), iterations=args.iterations, batch_size=args.batch_size,
        recipe=args.recipe, arch=args.arch, seed=args.seed, validation_fraction=args.validation_fraction,
        mpp=getattr(args, "mpp", 0.5), stride_px=getattr(args, "stride", 2),
        max_positive=getattr(args, "max_positive", 2000), max_negative=getattr(args, "max_negative", 4000),
        device=args.device, torch_threads=_torch_threads(args),
    )


def _torch_threads(args: argparse.Namespace) -> int | None:
    from .cluster import default_workers, torch_threads_per_worker

    if not hasattr(args, "workers") or _cluster_kind(args) != "local":
        return None  # the workers of jobs and remote clusters know their own cores
    return torch_threads_per_worker(args.workers or default_workers())


def _client(args: argparse.Namespace, *, default_jobs: int = 1):
    from .cluster import dask_client, default_workers

    return dask_client(**_cluster_kwargs(args, default_jobs=default_jobs) | {
        "workers": args.workers or default_workers()})


def cmd_dataset_check(args: argparse.Namespace) -> int:
    from .dataset import check_dataset

    report = check_dataset(args.dataset)
    print(report.format())
    return 0 if report.ok else 1


def cmd_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_dataset

    images = make_synthetic_dataset(args.out, n_images=args.images, size_px=args.size, seed=args.seed)
    print(f"{len(images)} synthetic images with {sum(len(i.centers_rc) for i in images)} lymphocytes in {args.out}")
    return 0


def cmd_patches(args: argparse.Namespace) -> int:
    from .dataset import DatasetError
    from .patches import export_png, extract_patches

    try:
        with _client(args) as client:
            store = extract_patches(client, args.dataset, args.out, seed=args.seed, max_positive=args.max_positive,
                                    max_negative=args.max_negative)
    except DatasetError as error:
        print(f"wsi-lymph patches: {error}", file=sys.stderr)
        return 1
    print(f"patches: {store}")
    if args.png:
        print(f"{export_png(store, args.png)} PNG files in {args.png}")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    import zarr

    from .folds import make_folds, write_folds

    ids = list(zarr.open_group(str(args.patches), mode="r").attrs["image_ids"])
    folds = make_folds(ids, args.folds, args.seed)
    print(f"{len(folds)} folds of {len(ids)} images: {write_folds(folds, args.patches, args.out, seed=args.seed)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .cv import train_fold
    from .folds import read_folds

    folds = {fold.fold: fold for fold in read_folds(args.folds_dir)}
    if args.fold not in folds:
        print(f"wsi-lymph train: no fold {args.fold} in {args.folds_dir} (folds {sorted(folds)})", file=sys.stderr)
        return 2
    model, fit, val = train_fold(folds[args.fold], args.patches, args.out, _settings(args), log=print)
    print(f"fold {args.fold}: trained on {len(fit)} images, validated on {len(val)}; model {model}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from .cv import run_cv
    from .dataset import DatasetError

    try:
        with _client(args, default_jobs=args.folds) as client:  # one worker job per fold
            report = run_cv(client, args.dataset, args.out, _settings(args))
    except (DatasetError, ValueError) as error:
        print(f"wsi-lymph cv: {error}", file=sys.stderr)
        return 1
    net, base = report["pooled"]["network"], report["pooled"]["baseline"]
    print(f"pooled over {len(report['folds'])} folds: P {net['precision']:.3f} R {net['recall']:.3f} "
          f"F {net['f_score']:.3f} (hematoxylin-blob baseline F {base['f_score']:.3f}); "
          f"report in {Path(args.out) / 'cv_report.json'}")
    return 0


def add_training_commands(commands) -> None:
    """Add the training commands to the ``wsi-lymph`` sub-command parser."""
    dataset = commands.add_parser("dataset", help="annotated data sets").add_subparsers(dest="action", required=True)
    check = dataset.add_parser("check", help="report images without masks, size mismatches, empty or unreadable")
    check.add_argument("dataset", type=Path)
    check.set_defaults(func=cmd_dataset_check)

    synthetic = commands.add_parser("synthetic", help="write a synthetic H&E-like data set with known centres")
    synthetic.add_argument("out", type=Path)
    synthetic.add_argument("--images", type=int, default=10)
    synthetic.add_argument("--size", type=int, default=100, help="image edge in pixels (20x, 0.5 µm/px)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(func=cmd_synthetic)

    patches = commands.add_parser("patches", help="training patches of a data set into a Zarr group")
    patches.add_argument("dataset", type=Path)
    patches.add_argument("--out", type=Path, required=True, help="patches.zarr (or a folder to hold it)")
    patches.add_argument("--seed", type=int, default=0)
    patches.add_argument("--max-positive", type=int, default=2000, help="positive locations per image")
    patches.add_argument("--max-negative", type=int, default=4000, help="negative locations per image")
    patches.add_argument("--png", type=Path, default=None, help="also export PNGs with the paper's names here")
    _add_cluster_options(patches)
    patches.set_defaults(func=cmd_patches)

    folds = commands.add_parser("folds", help="split images (patients) into folds; the paper's list files")
    folds.add_argument("patches", type=Path, help="patches.zarr")
    folds.add_argument("--out", type=Path, required=True)
    folds.add_argument("--folds", type=int, default=5)
    folds.add_argument("--seed", type=int, default=0)
    folds.set_defaults(func=cmd_folds)

    train = commands.add_parser("train", help="train one fold (resumes from the last checkpoint in --out)")
    train.add_argument("--fold", type=int, required=True)
    train.add_argument("--patches", type=Path, required=True, help="patches.zarr")
    train.add_argument("--folds-dir", type=Path, required=True, help="folder with folds.json")
    train.add_argument("--out", type=Path, required=True)
    _training_options(train)
    train.set_defaults(func=cmd_train)

    cv = commands.add_parser("cv", help="patches, folds, one training per fold as Dask tasks, evaluation")
    cv.add_argument("dataset", type=Path)
    cv.add_argument("--out", type=Path, required=True)
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--mpp", type=float, default=0.5, help="µm per pixel of the data set's images (default 0.5)")
    cv.add_argument("--stride", type=int, default=2, help="detection stride in the model frame (paper network)")
    cv.add_argument("--max-positive", type=int, default=2000, help="positive patch locations per image")
    cv.add_argument("--max-negative", type=int, default=4000, help="negative patch locations per image")
    _training_options(cv)
    _add_cluster_options(cv)
    cv.set_defaults(func=cmd_cv)
