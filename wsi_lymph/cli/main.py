"""``wsi-lymph`` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

# Library modules that load torch, zarr or distributed are imported inside the commands, so that --help and
# usage errors answer at once.
from wsi_lymph.cli import checks, console
from wsi_lymph.cli.checks import UsageError
from wsi_lymph.cli.options import add_cluster_options, cluster_kind_of, cluster_kwargs
from wsi_lymph.cli.parser import DEBUG_HELP, Parser
from wsi_lymph.cli.training import add_training_commands
from wsi_lymph.constants import (
    DEFAULT_MODEL,
    DENSITY_BIN_UM,
    FAST_BLOCK_PX,
    FAST_CHUNK_PX,
    FRAME_SCALE,
    HOTSPOT_FIELD_MM2,
    MAP_CHUNK_PX,
    PAPER_THRESHOLD,
    SOURCE_SCAN_MPP,
)


def _add_probmap_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", help="slide files and/or folders of slides")
    parser.add_argument("--out", required=True, type=Path, help="output folder, created if missing; one sub-folder "
                        "per slide, the log in OUT/wsi-lymph.log")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{DEFAULT_MODEL} (default: the fast student, shipped), janowczyk2016 (the paper's "
                        "5-fold ensemble, exact patches), janowczyk2016/foldK, or a checkpoint file")
    parser.add_argument("--model-source", default=None, help="URL or folder to fetch the paper's models from "
                        "(default: $WSI_LYMPH_MODEL_SOURCE, else the authors' repository)")
    parser.add_argument("--mpp", type=checks.mpp(), default=None, help="level-0 µm per pixel, overriding the files "
                        "(default: the files' own)")
    parser.add_argument("--stride", type=checks.integer(*checks.STRIDE_RANGE_PX), default=2,
                        help="paper's networks: classify every S-th model-frame pixel, cubic filling between, 1 to 32 "
                        "(default 2; 1 = exact); fully convolutional models ignore it")
    parser.add_argument("--stain-norm", default="auto", choices=["auto", "none", "reinhard"],
                        help="colour normalisation to the model's training domain (default auto: the model's own, "
                        "Reinhard for the student, none for the paper's networks)")
    parser.add_argument("--mirror", action="store_true", help="average each patch with its horizontal mirror")
    parser.add_argument("--region", type=checks.region, default=None, help="X,Y,WIDTH,HEIGHT: only this level-0 "
                        "rectangle, which must lie inside every slide (default: the whole slide)")
    parser.add_argument("--no-skip", action="store_true", help="evaluate blocks without hematoxylin too")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8"],
                        help="number type of the stored map (uint8: P x 255, rounded)")
    parser.add_argument("--chunk", type=checks.integer(*checks.CHUNK_RANGE_PX), default=None,
                        help=f"Zarr chunk edge, model-frame px, 32 to 8192 (default: {MAP_CHUNK_PX} for patch models, "
                        f"{FAST_CHUNK_PX} for fully convolutional ones, or {MAP_CHUNK_PX} where --block is not a "
                        f"multiple of {FAST_CHUNK_PX})")
    parser.add_argument("--block", type=checks.integer(checks.CHUNK_RANGE_PX[0], checks.BLOCK_MAX_PX), default=None,
                        help=f"inference task edge, model-frame px, a multiple of --chunk up to {checks.BLOCK_MAX_PX} "
                        f"(default: the chunk for patch models, {FAST_BLOCK_PX} for fully convolutional ones)")
    parser.add_argument("--batch-size", type=checks.integer(*checks.BATCH_RANGE), default=512,
                        help="patches per forward pass, 1 to 65536")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--force", action="store_true", help="recompute slides already finished in --out")
    parser.add_argument("--glob", default=None, metavar="PATTERN",
                        help="in folders, analyse the files whose name matches this shell pattern (case-sensitive, "
                        "e.g. '*.svs') (default: every slide or image file, leaving out hidden files and annotations: "
                        "*_seed.*, <N>m.tif, *.csv, *.geojson)")
    parser.add_argument("--no-stain-check", action="store_true",
                        help="analyse slides that do not look like H&E (default: refused before inference)")
    add_cluster_options(parser)


def _run_batch(args: argparse.Namespace, command: str) -> int:
    """Shared body of ``probmap`` and ``detect``: check the options, find slides, start the cluster, run, report."""
    from wsi_lymph.engine.cluster import default_workers
    from wsi_lymph.slides.reader import SLIDE_SUFFIXES, scan_slides

    checks.check_out_folder(args.out)
    checks.check_block(args.block, args.chunk)
    # A path named on the command line that is not there is a typo to fix before the batch, as in every other
    # command; a slide that vanishes during the batch fails alone (engine/batch.py).
    missing = [str(path) for path in args.slides if not Path(path).exists()]
    if missing:
        print(f"wsi-lymph {command}: {', '.join(missing)}: not found", file=sys.stderr)
        return 2
    search = scan_slides(args.slides, args.glob)
    skipped = search.skipped_line()
    if search.empty:  # a folder with nothing to analyse is a mistake in the command, found before any cluster
        wanted = (f"file matching --glob {args.glob!r}" if args.glob
                  else f"slide or image file ({' '.join(SLIDE_SUFFIXES)})")
        print(f"wsi-lymph {command}: nothing to analyse in {', '.join(map(str, search.empty))}: no {wanted}"
              + (f"; {skipped}" if skipped else ""), file=sys.stderr)
        return 2
    slides = search.slides
    checks.check_region_inside(args.region, slides, args.mpp)
    from wsi_lymph.models.checkpoints import ModelError
    from wsi_lymph.models.registry import load_model

    checks.check_model_name(args.model)
    try:
        # Before any cluster starts: a missing or broken model is a one-line error, not a traceback.
        load_model(args.model, source=args.model_source)
    except ModelError as error:
        print(f"wsi-lymph {command}: {error}", file=sys.stderr)
        return 1
    workers = args.workers or default_workers()
    params = _probmap_params(args, workers)
    for line in (skipped, search.repeated_line()):  # after every usage check: an error stays one line alone
        if line:
            print(line)
    options = dict(model=args.model, mpp=args.mpp, params=params, model_source=args.model_source, force=args.force,
                   check_stain=not args.no_stain_check, log=_say)
    report_error = ""
    with console.cluster(command, log_dir=args.out, **cluster_kwargs(args) | {"workers": workers}) as client:
        if command == "detect":
            from wsi_lymph.engine.batch import BatchReportError, run_detect

            try:
                results = run_detect(client, slides, args.out, threshold=args.threshold, keep_map=args.keep_map,
                                     hotspot_mm2=args.hotspot_mm2, density_bin_um=args.density_bin_um, **options)
            except BatchReportError as error:  # the slides are as reported; only batch.json is missing
                results, report_error = error.results, f"wsi-lymph {command}: {error}"
        else:
            from wsi_lymph.engine.batch import run_probmaps

            results = run_probmaps(client, slides, args.out, **options)
    from wsi_lymph.engine.batch import naming_file

    failed = [r for r in results if r.status != "done"]
    print(f"{len(results) - len(failed)} of {len(results)} slides done; outputs in {args.out}")
    for result in failed:
        print(f"FAILED {naming_file(result.reason, result.path)}", file=sys.stderr)
    for result in results:
        for flag in result.flags:
            print(f"FLAGGED {result.path}: {flag}", file=sys.stderr)
    if report_error:
        print(report_error, file=sys.stderr)
    return 1 if failed or report_error else 0


_say = console.say  # the batch's log lines: above the progress bars, and in the log file


def cmd_probmap(args: argparse.Namespace) -> int:
    return _run_batch(args, "probmap")


def cmd_detect(args: argparse.Namespace) -> int:
    return _run_batch(args, "detect")


def _fully_convolutional(loaded) -> bool:
    from wsi_lymph.models.architectures import PATCHES, architecture_of

    return architecture_of(loaded.members[0][0]).evaluation != PATCHES


def _probmap_params(args: argparse.Namespace, workers: int):
    from wsi_lymph.engine.cluster import torch_threads_per_worker
    from wsi_lymph.engine.params import ProbmapParams

    return ProbmapParams(
        stride_px=args.stride,
        mirror=args.mirror,
        chunk_px=args.chunk,  # None: the model's default (engine/params.py, default_chunk_px)
        block_px=args.block,  # None: the model's default (engine/params.py, default_block_px)
        stain_norm=args.stain_norm,
        dtype=args.dtype,
        batch_size=args.batch_size,
        skip_hematoxylin=not args.no_skip,
        region_level0=args.region,
        device=args.device,
        # Workers of other clusters know their own cores (jobs set OMP_NUM_THREADS, see cluster/jobqueue.yaml).
        torch_threads=torch_threads_per_worker(workers) if cluster_kind_of(args) == "local" else None,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Fetch the public demo slide (and the paper's models if asked for), then run ``detect`` on it."""
    from wsi_lymph.engine.batch import run_detect
    from wsi_lymph.engine.cluster import default_workers
    from wsi_lymph.models.checkpoints import ModelError
    from wsi_lymph.models.registry import load_model
    from wsi_lymph.slides.sample import DEMO_REGION_LEVEL0, DataError, fetch_demo_slide

    checks.check_out_folder(args.out)
    checks.check_model_name(args.model)
    try:
        slide = fetch_demo_slide(args.source)
        fast = _fully_convolutional(load_model(args.model, source=args.model_source))
    except (DataError, ModelError) as error:
        print(f"wsi-lymph demo: {error}", file=sys.stderr)
        return 1
    checks.check_region_inside(args.region, [slide])
    # The fast model does the whole slide in about a minute; the paper's exact networks a 600-px region.
    args.region = args.region or (None if fast else DEMO_REGION_LEVEL0)
    workers = args.workers or default_workers()
    with console.cluster("demo", log_dir=args.out, **cluster_kwargs(args) | {"workers": workers}) as client:
        [result] = run_detect(
            client, [slide], args.out, model=args.model,
            params=_probmap_params(args, workers),
            model_source=args.model_source, force=args.force, log=_say,
        )
    if result.status != "done":
        print(f"wsi-lymph demo: {result.reason}", file=sys.stderr)
        return 1
    print(f"demo done: outputs in {Path(result.output).parent}")
    return 0


def _evaluation_pairs(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """(name, centres CSV, annotation file) pairs; folders are paired by slide name."""
    if pred.is_file():
        return [(pred.parent.name, pred, truth)]
    pairs = []
    for centres in sorted(pred.glob("*/centers.csv")):
        name = centres.parent.name
        bare = name[2:] if name.startswith("im") else name  # the paper's im<N>.tif goes with <N>m.tif
        # Annotation files: <name>_seed.*, <name>.csv / <name>_*.csv, or the paper's mask <N>m.tif.
        candidates = [
            p for p in ([truth] if truth.is_file() else sorted(truth.iterdir()))
            if p.stem in (f"{name}_seed", f"{bare}m")
            or (p.suffix.lower() == ".csv" and (p.stem == name or p.stem.startswith(f"{name}_")))
        ]
        if candidates:
            pairs.append((name, centres, candidates[0]))
    return pairs


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from wsi_lymph.detection.evaluate import match_points, pooled, read_points, read_scores, threshold_sweep

    checks.check_exists(args.pred, "predictions")
    checks.check_exists(args.truth, "annotations")
    if args.json is not None:
        checks.check_out_file(args.json, "--json")
    pairs = _evaluation_pairs(args.pred, args.truth)
    if not pairs:
        print(f"wsi-lymph evaluate: no predictions in {args.pred} match annotations in {args.truth}", file=sys.stderr)
        return 2
    # Everything is read before the table starts: a mistake is one line, not a half-printed table.
    inputs = []
    for name, centres, annotation in pairs:
        mpp = args.mpp
        summary = centres.parent / "summary.json"
        if mpp is None and summary.is_file():
            mpp = json.loads(summary.read_text())["mpp"]
        if mpp is None:
            print(f"wsi-lymph evaluate: {centres}: no summary.json with µm/px beside it; pass --mpp", file=sys.stderr)
            return 2
        try:
            found, truth, probability = read_points(centres), read_points(annotation), read_scores(centres)
        except (OSError, ValueError) as error:
            print(f"wsi-lymph evaluate: {error}", file=sys.stderr)
            return 1
        if args.sweep and probability is None:
            print(f"wsi-lymph evaluate: --sweep needs the 'probability' column of centers.csv; {centres} has none",
                  file=sys.stderr)
            return 2
        inputs.append((name, annotation, found, truth, probability, args.tolerance_um / mpp))
    report = {"tolerance_um": args.tolerance_um, "images": {}}
    detections, truths, scores, tolerances = [], [], [], []
    print(f"{'image':<28}{'TP':>5}{'FP':>5}{'FN':>5}{'precision':>11}{'recall':>8}{'F':>7}")
    for name, annotation, found, truth, probability, tolerance in inputs:
        tolerances.append(tolerance)
        score = match_points(found, truth, tolerance)
        detections.append((found, probability))
        truths.append(truth)
        scores.append(score)
        report["images"][name] = score.as_dict() | {"annotation": str(annotation), "tolerance_px": tolerance}
        print(f"{name:<28}{score.true_positives:>5}{score.false_positives:>5}{score.false_negatives:>5}"
              f"{score.precision:>11.3f}{score.recall:>8.3f}{score.f_score:>7.3f}")
    total = pooled(scores)
    report["pooled"] = total.as_dict()
    print(f"{'pooled':<28}{total.true_positives:>5}{total.false_positives:>5}{total.false_negatives:>5}"
          f"{total.precision:>11.3f}{total.recall:>8.3f}{total.f_score:>7.3f}")
    if args.sweep:
        sweep = threshold_sweep(detections, truths, tolerances, np.round(np.arange(0.5, 0.99, 0.01), 2))
        best_threshold, best = max(sweep, key=lambda item: (item[1].f_score, -item[0]))
        report["sweep"] = [{"threshold": t, **s.as_dict()} for t, s in sweep]
        report["best_threshold"] = best_threshold
        print(f"F-optimal threshold: {best_threshold:.2f} (F {best.f_score:.3f}); detections must have been made "
              "at or below the lowest threshold swept (0.50), e.g. detect --threshold 0.5")
    if args.json:
        from wsi_lymph.io.outputs import write_json

        write_json(args.json, report)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from wsi_lymph.slides.frame import choose_frame
    from wsi_lymph.slides.reader import SlideError, find_slides, open_slide

    slides = find_slides(args.slides)
    if not slides:
        raise UsageError("no slides found in " + ", ".join(args.slides))
    status = 0
    for path in slides:
        try:
            info = open_slide(path, mpp=args.mpp)
        except SlideError as error:
            print(f"FAILED {error}", file=sys.stderr)
            status = 1
            continue
        print(f"{info.path}\n  reader {info.reader} ({info.vendor}), {info.level_count} levels")
        for level, ((w, h), down) in enumerate(zip(info.level_sizes_xy, info.level_downsamples, strict=True)):
            print(f"  level {level}: {w} x {h} px (w x h), downsample {down:.4g}")
        print(f"  mpp: {info.mpp} µm/px ({info.mpp_source})")
        if info.mpp is not None:
            frame = choose_frame(info)
            print(f"  model frame: level {frame.level} x{frame.frame_scale:g} -> {frame.shape_rc[1]} x "
                  f"{frame.shape_rc[0]} px at {frame.mpp:.4g} µm/px")
    return status


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from wsi_lymph.models.checkpoints import ModelError
    from wsi_lymph.models.registry import fetch_janowczyk2016

    if args.name != "janowczyk2016":
        print(f"wsi-lymph models fetch: unknown model {args.name!r}; known: janowczyk2016", file=sys.stderr)
        return 2
    try:
        paths = fetch_janowczyk2016(args.source, force=args.force, progress=print)
    except ModelError as error:
        print(f"wsi-lymph models fetch: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from wsi_lymph.cache import cache_dir
    from wsi_lymph.models.checkpoints import ModelError
    from wsi_lymph.models.registry import model_inventory

    try:
        entries = model_inventory()
    except ModelError as error:
        print(f"wsi-lymph models list: {error}", file=sys.stderr)
        return 1
    width = max(len(entry.name) for entry in entries)
    for entry in entries:
        threshold = f"threshold {entry.threshold:g}" if entry.threshold is not None else "threshold -"
        stain = f"stain-norm auto = {entry.stain_norm}" if entry.stain_norm else "stain-norm -"
        flag = " (default)" if entry.default else ""
        print(f"{entry.name:<{width}}  {entry.where:<11}  {threshold:<16}  {stain:<26}  {entry.summary}{flag}")
    if any(entry.where == "not fetched" for entry in entries):
        print(f"not fetched: `wsi-lymph models fetch janowczyk2016` puts them in {cache_dir() / 'models'}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from wsi_lymph.models.caffe import CaffeImportError, import_caffe

    checks.check_exists(args.caffemodel, "caffemodel", folder=False)
    checks.check_exists(args.mean, "mean", folder=False)
    checks.check_out_file(args.out)
    try:
        out = import_caffe(
            args.caffemodel, args.mean, args.out, name=args.name or args.out.stem, fold=args.fold,
            threshold=args.threshold, source_scan_mpp=args.source_mpp, frame_scale=args.frame_scale,
        )
    except (CaffeImportError, OSError) as error:
        print(f"wsi-lymph models import-caffe: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``wsi-lymph`` parser: every command, its options and their defaults (``--help``)."""
    from wsi_lymph import __version__

    parser = Parser(prog="wsi-lymph", description="Lymphocyte detection in H&E whole-slide images.",
                    epilog="Exit status: 0 done, 1 a failure during the run (one line each; the traceback in the "
                    "log file), 2 a mistake in the command line (found before any work), 130 interrupted (Ctrl-C).")
    parser.add_argument("--version", action="version", version=f"wsi-lymph {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probmap = commands.add_parser("probmap", help="slides -> Zarr maps of P(lymphocyte center)")
    _add_probmap_options(probmap)
    probmap.set_defaults(func=cmd_probmap)

    detect = commands.add_parser("detect", help="slides -> lymphocyte centres (CSV, GeoJSON, summary)")
    _add_probmap_options(detect)
    detect.add_argument("--threshold", type=checks.probability(), default=None,
                        help="peak threshold on smoothed P, between 0 and 1 (default: the model's)")
    detect.add_argument("--keep-map", action="store_true", help="keep each slide's full-resolution map prob.zarr "
                        "(needed to find centres again at another --threshold); by default it is deleted once the "
                        "slide is done, and its pyramid prob.ome.zarr stays (a map kept by an earlier run stays kept)")
    detect.add_argument("--hotspot-mm2", type=checks.number(0, 100, low_open=True, unit=" mm²"),
                        default=HOTSPOT_FIELD_MM2, help="area of the hotspot field, the densest circle reported per "
                        f"slide, > 0 and ≤ 100 mm² (default {HOTSPOT_FIELD_MM2:g})")
    detect.add_argument("--density-bin-um", type=checks.number(5, 5000, unit=" µm"), default=None,
                        help=f"bin edge of density.png, 5 to 5000 µm (default {DENSITY_BIN_UM:g}; 50 for regions "
                        "under 2 mm across, 25 under 1 mm)")
    detect.set_defaults(func=cmd_detect)

    demo = commands.add_parser("demo", help="fetch a public sample slide, run detect on it (the whole slide with "
                               "the default model)")
    demo.add_argument("--out", required=True, type=Path, help="output folder, created if missing")
    demo.add_argument("--source", default=None, help="URL or folder holding CMU-1-Small-Region.svs "
                      "(default: $WSI_LYMPH_DATA_SOURCE, else OpenSlide's test data)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint file, as for detect")
    demo.add_argument("--model-source", default=None, help="URL or folder to fetch the paper's models from "
                      "(default: $WSI_LYMPH_MODEL_SOURCE, else the authors' repository)")
    demo.add_argument("--stride", type=checks.integer(*checks.STRIDE_RANGE_PX), default=4,
                      help="paper's networks: classify every S-th model-frame pixel, 1 to 32")
    demo.add_argument("--region", type=checks.region, default=None, help="level-0 X,Y,W,H (default: the whole "
                      "slide with a fully convolutional model, a 600-px region with the paper's networks)")
    demo.add_argument("--mirror", action="store_true", help="average each patch with its horizontal mirror")
    demo.add_argument("--no-skip", action="store_true", help="evaluate blocks without hematoxylin too")
    demo.add_argument("--force", action="store_true", help="recompute a demo already finished in --out")
    demo.set_defaults(func=cmd_demo, dtype="float16", chunk=None, block=None, batch_size=512, device=None, mpp=None,
                      stain_norm="auto")
    add_cluster_options(demo)

    evaluate = commands.add_parser("evaluate", help="precision, recall and F of detections against annotations")
    evaluate.add_argument("pred", type=Path, help="a centers.csv or a detect output folder")
    evaluate.add_argument("truth", type=Path, help="annotations: CSV of x,y, seed image or RGBA mask, or a folder")
    evaluate.add_argument("--tolerance-um", type=checks.number(0, 100, low_open=True, unit=" µm"), default=3.0,
                          help="matching distance in µm, > 0 (default: 3 µm, one lymphocyte radius)")
    evaluate.add_argument("--mpp", type=checks.mpp(), default=None, help="µm/px of the images (default: the "
                          "summary.json beside each centers.csv)")
    evaluate.add_argument("--sweep", action="store_true", help="report the F-optimal threshold")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    evaluate.set_defaults(func=cmd_evaluate)

    info = commands.add_parser("info", help="print a slide's levels, resolution and model frame")
    info.add_argument("slides", nargs="+", help="slide files and/or folders of slides")
    info.add_argument("--mpp", type=checks.mpp(), default=None, help="level-0 µm per pixel, overriding the files "
                      "(default: the files' own)")
    info.set_defaults(func=cmd_info)

    models = commands.add_parser("models", help="list, fetch or import models").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    listing = models.add_parser("list", help="every model name, whether it works offline here, its threshold")
    listing.set_defaults(func=cmd_models_list)
    fetch = models.add_parser("fetch", help="download, verify and convert the paper's released models")
    fetch.add_argument("name", choices=["janowczyk2016"], help="the models to fetch: janowczyk2016")
    fetch.add_argument("--source", default=None, help="base URL or folder (default: $WSI_LYMPH_MODEL_SOURCE, else "
                       "the authors' repository)")
    fetch.add_argument("--force", action="store_true", help="download and convert again, even if cached")
    fetch.set_defaults(func=cmd_models_fetch)
    imp = models.add_parser("import-caffe", help="convert a .caffemodel + mean .binaryproto into a checkpoint")
    imp.add_argument("caffemodel", type=Path, help="the Caffe weights (.caffemodel)")
    imp.add_argument("mean", type=Path, help="mean image .binaryproto")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    imp.add_argument("--name", default=None, help="model name recorded in the checkpoint (default: --out's stem)")
    imp.add_argument("--fold", type=checks.integer(1), default=None, help="cross-validation fold the model comes "
                     "from, ≥ 1 (default: none recorded)")
    imp.add_argument("--threshold", type=checks.probability(), default=PAPER_THRESHOLD,
                     help="peak threshold of this model, between 0 and 1")
    imp.add_argument("--source-mpp", type=checks.mpp(), default=SOURCE_SCAN_MPP, help="µm/px of the training scans")
    imp.add_argument("--frame-scale", type=checks.number(0, 64, low_open=True), default=FRAME_SCALE,
                     help="upscaling applied before patches, > 0 and ≤ 64")
    imp.set_defaults(func=cmd_models_import)

    add_training_commands(commands)
    return parser


#: Commands that go on where they stopped when run again (the interrupt line says so).
RESUMABLE = frozenset({"probmap", "detect", "demo", "patches", "train", "cv", "distill"})


def main(argv: list[str] | None = None) -> int:
    """Run one ``wsi-lymph`` command.

    Returns
    -------
    int
        Exit status: 0 done; 1 a failure during the run (one line each, the traceback in the log file); 2 a
        mistake in the command line, found before any work or cluster; 130 interrupted (Ctrl-C).
    """
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    debug = bool(args.debug or os.environ.get("WSI_LYMPH_DEBUG"))
    with console.session(debug=debug):
        try:
            status = args.func(args)
        except UsageError as error:
            print(f"wsi-lymph {command}: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            console.tell_interrupted(command, resumable=args.command in RESUMABLE)
            return 130
        except BrokenPipeError:  # stdout's reader went away (``| head``): nothing left to tell it
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except Exception as error:  # noqa: BLE001 - the one place that turns any error into one line
            return _failed(command, error, debug)
        if console.STATE.interrupted:  # Ctrl-C that a library swallowed: still an interrupted run for the caller
            console.tell_interrupted(command, resumable=args.command in RESUMABLE)
            return 130
        return status


def _failed(command: str, error: Exception, debug: bool) -> int:
    """One line for an error nobody caught: what it is and where its traceback went; exit status 1 (2 for a
    cluster that cannot be built from the options)."""
    from wsi_lymph.engine.cluster import ClusterError

    if isinstance(error, ClusterError):  # bad cluster options or refused job submissions
        logging.getLogger("wsi_lymph.cli").debug("cluster error", exc_info=error)
        print(f"wsi-lymph {command}: {error}", file=sys.stderr)
        return 2
    logging.getLogger("wsi_lymph.cli").debug("wsi-lymph %s failed", command, exc_info=error)
    path = console.LOG_FILE.keep()
    where = f"traceback in {path}" if path else "no log file could be written"
    print(f"wsi-lymph {command}: {_describe(error)} ({where}{'' if debug else '; --debug prints it'})",
          file=sys.stderr)
    return 1


def _describe(error: BaseException) -> str:
    """An error in plain words: a file error as ``path: reason``, others as ``Type: message``."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
