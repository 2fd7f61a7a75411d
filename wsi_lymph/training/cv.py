"""Patient-level cross-validation as in the paper: patches -> folds -> one training per fold -> evaluation.

:func:`run_cv` runs the whole study on a Dask cluster:

1. patch extraction, one ``patches-*`` task per image (:mod:`wsi_lymph.training.patches`);
2. folds split by image (= patient), with the paper's list files and mean images (:mod:`wsi_lymph.training.folds`);
3. one ``train-*`` task per fold (:func:`run_fold`, asking for the Dask ``resources`` given, e.g.
   ``{"GPU": 1}`` when the cluster has GPU workers).  A fold holds out **validation images** drawn from its
   training images: the network is trained on the rest (validation patches give the loss/accuracy/AUC
   curves), the detection threshold is the F-optimal one on the validation images, and the fold's
   **test images** are scored with it;
4. ``cv_report.json`` and ``cv_report.md``: per image, per fold and pooled precision, recall and F,
   the thresholds chosen, and the same for a simple baseline (hematoxylin blob detection, its
   threshold chosen on the same validation images).

A fold task killed with its worker is retried and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from distributed import as_completed
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max

from wsi_lymph.constants import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX
from wsi_lymph.detection.evaluate import DetectionScore, match_points, pooled, threshold_sweep
from wsi_lymph.detection.inference import image_probabilities
from wsi_lymph.detection.peaks import greedy_peaks, smooth_probability
from wsi_lymph.engine.monitor import QuietTaskErrors
from wsi_lymph.io.outputs import write_atomic, write_json
from wsi_lymph.models.checkpoints import save_checkpoint_atomic
from wsi_lymph.models.device import select_device
from wsi_lymph.models.registry import load_model
from wsi_lymph.training.dataset import AnnotatedImage, read_dataset
from wsi_lymph.training.folds import Fold, make_folds, read_folds, write_folds
from wsi_lymph.training.patches import extract_patches
from wsi_lymph.training.settings import CVSettings
from wsi_lymph.training.train import train_model

#: Candidate thresholds of the sweep on validation images (smoothed P for the network).
SWEEP_THRESHOLDS = np.round(np.arange(0.30, 0.995, 0.01), 2)


# ------------------------------------------------------------------ detection on one image
def detect_in_image(members: list, rgb: np.ndarray, *, scale: float = 4.0, threshold: float = 0.5,
                    stride_px: int = 1, mirror: bool = False, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The paper's detection on an in-memory image: probability map, disk smoothing, greedy peaks.

    Returns
    -------
    xy : np.ndarray
        (n, 2) centres as image (x, y) pixel coordinates.
    scores : np.ndarray
        (n,) smoothed P of each centre (all > ``threshold``), so any higher threshold is a filter.
    """
    prob = image_probabilities(rgb, members, scale=scale, stride_px=stride_px, mirror=mirror, device=device)
    smoothed = smooth_probability(prob, SMOOTH_RADIUS_PX)
    centres = greedy_peaks(smoothed, threshold, CLEAR_RADIUS_PX)
    scores = smoothed[centres[:, 0], centres[:, 1]]
    rc = (centres + 0.5) / scale - 0.5
    return rc[:, ::-1], scores


def hematoxylin_blobs(
    rgb: np.ndarray, *, sigma_px: float = 2.0, min_distance_px: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Baseline detector: local maxima of the Gaussian-smoothed hematoxylin optical density.

    Lymphocytes are small, round and the most hematoxylin-dense nuclei, so the
    maxima of the smoothed hematoxylin channel (``rgb2hed``) with a minimum
    spacing of about one radius are a fair classical detector.  Thresholding
    the returned scores is done by the caller (a sweep on validation images).

    Returns (n, 2) image (x, y) pixels and (n,) smoothed OD at each maximum.
    """
    hema = ndimage.gaussian_filter(rgb2hed(rgb)[..., 0].astype(np.float64), sigma_px)
    peaks = peak_local_max(hema, min_distance=min_distance_px, exclude_border=False)
    return peaks[:, ::-1].astype(float), hema[peaks[:, 0], peaks[:, 1]]


def choose_threshold(detections: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray],
                     tolerance_px: float, thresholds: np.ndarray) -> tuple[float, DetectionScore]:
    """F-optimal threshold on validation images (ties: the lowest); its pooled score."""
    sweep = threshold_sweep(detections, truths, [tolerance_px] * len(truths), thresholds)
    best = max(sweep, key=lambda item: (round(item[1].f_score, 12), -item[0]))
    return best


def score_images(names: list[str], detections: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray],
                 threshold: float, tolerance_px: float) -> tuple[list[dict], DetectionScore]:
    """Per-image and pooled scores of detections kept above ``threshold``."""
    rows, scores = [], []
    for name, (xy, score), truth in zip(names, detections, truths, strict=True):
        result = match_points(xy[score > threshold], truth, tolerance_px)
        scores.append(result)
        rows.append({"image": name, **result.as_dict()})
    return rows, pooled(scores)


# ------------------------------------------------------------------ one fold
def validation_split(train_images: list[str], fraction: float, seed: int, fold: int) -> tuple[list[str], list[str]]:
    """Images used to fit and to validate, drawn from a fold's training images (seeded, at least one each)."""
    if len(train_images) < 2:
        raise ValueError(f"fold {fold}: {len(train_images)} training image(s); need 2 to hold one out for validation")
    n_val = min(len(train_images) - 1, max(1, round(fraction * len(train_images))))
    order = np.random.default_rng([seed, fold, 7]).permutation(len(train_images))
    val = sorted((train_images[i] for i in order[:n_val]), key=train_images.index)
    return [i for i in train_images if i not in val], val


def train_fold(fold: Fold, patches_zarr: str | os.PathLike, out_dir: str | os.PathLike, settings: CVSettings,
               *, log: Callable[[str], None] | None = None) -> tuple[Path, list[str], list[str]]:
    """Train one fold's network on its fit images (resuming from ``out_dir``); validation patches give the curves.

    Returns the model path and the fit and validation image ids.
    """
    group = zarr.open_group(str(patches_zarr), mode="r")
    image_ids = list(group.attrs["image_ids"])
    image_index = group["image_index"][:]
    fit, val = validation_split(fold.train_images, settings.validation_fraction, settings.seed, fold.fold)
    fit_rows = np.flatnonzero(np.isin(image_index, [image_ids.index(i) for i in fit]))
    val_rows = np.flatnonzero(np.isin(image_index, [image_ids.index(i) for i in val]))
    every = max(1, settings.iterations // 10)
    model = train_model(
        patches_zarr, fit_rows, val_rows, out_dir, recipe=settings.recipe, arch=settings.arch,
        iterations=settings.iterations, batch_size=settings.batch_size,
        checkpoint_every=settings.checkpoint_every or every, eval_every=settings.eval_every or every,
        seed=settings.seed + fold.fold, device=settings.device, fold=fold.fold, log=log,
    )
    return model, fit, val


Detector = Callable[[list[str]], list[tuple[np.ndarray, np.ndarray]]]


def run_fold(fold: Fold, dataset: str | os.PathLike, patches_zarr: str | os.PathLike, out_dir: str | os.PathLike,
             settings: CVSettings) -> dict:
    """One fold, start to end (a ``train-*`` task): train, choose the threshold on validation, score the test images.

    Returns the fold's entry of ``cv_report.json``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model_path, fit, val = train_fold(fold, patches_zarr, out_dir, settings)
    trained_s = time.perf_counter() - started
    device = select_device(settings.device)
    members = load_model(str(model_path), device).members
    images = {image.image_id: image for image in read_dataset(dataset)}
    truths = {i: images[i].centers_rc[:, ::-1].astype(float) for i in val + fold.test_images}

    def network(ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [detect_in_image(members, images[i].rgb, scale=settings.scale, threshold=float(SWEEP_THRESHOLDS[0]),
                                stride_px=settings.stride_px, mirror=settings.mirror, device=device) for i in ids]

    def blobs(ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [hematoxylin_blobs(images[i].rgb) for i in ids]

    entry = {"fold": fold.fold, "fit_images": fit, "validation_images": val, "test_images": fold.test_images,
             "model": str(model_path)}
    for name, detector, thresholds in (("network", network, SWEEP_THRESHOLDS), ("baseline", blobs, None)):
        entry[name] = _evaluate_detector(detector, thresholds, val, fold.test_images, truths,
                                         settings.tolerance_um / settings.mpp)
    entry["model"] = str(_store_threshold(model_path, entry["network"]["threshold"]))
    rows = json.loads((out_dir / "metrics.json").read_text())["rows"]
    entry["training"] = {"final_metrics": rows[-1] if rows else None, "seconds": round(trained_s, 1)}
    entry["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "fold_report.json").write_text(json.dumps(entry, indent=1))
    return entry


def _evaluate_detector(detector: Detector, thresholds: np.ndarray | None, val: list[str], test: list[str],
                       truths: dict[str, np.ndarray], tolerance_px: float) -> dict:
    """A detector's part of a fold entry: threshold chosen on the validation images, scores on the test images.

    ``thresholds`` None sweeps the range of the detector's own validation scores (the baseline's OD values).
    """
    val_detections = detector(val)
    if thresholds is None:
        values = np.concatenate([s for _, s in val_detections]) if val_detections else np.zeros(1)
        thresholds = np.unique(np.quantile(values, np.linspace(0, 0.99, 100))) if values.size else np.zeros(1)
    threshold, val_score = choose_threshold(val_detections, [truths[i] for i in val], tolerance_px, thresholds)
    per_image, test_score = score_images(test, detector(test), [truths[i] for i in test], threshold, tolerance_px)
    return {"threshold": float(threshold), "validation": val_score.as_dict(), "test": test_score.as_dict(),
            "per_image": per_image}


def _store_threshold(model_path: Path, threshold: float) -> Path:
    """``model-tuned.pt``: the fold's model carrying the threshold chosen on its validation images.

    ``wsi-lymph detect --model`` then uses it by default (a model carries its own threshold).
    """
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    checkpoint["meta"] = dict(checkpoint["meta"]) | {"threshold": float(threshold),
                                                     "threshold_source": "F-optimal on the fold's validation images"}
    return save_checkpoint_atomic(checkpoint, model_path.with_name("model-tuned.pt"))


# ------------------------------------------------------------------ the study
def run_cv(client, dataset: str | os.PathLike, out_dir: str | os.PathLike, settings: CVSettings | None = None,
           *, resources: dict[str, float] | None = None, log: Callable[[str], None] = print) -> dict:
    """Cross-validate the paper's method on a data set; writes ``OUT/cv_report.json`` and ``OUT/cv_report.md``.

    Parameters
    ----------
    client : distributed.Client
        Cluster; each fold is one task.
    dataset : path-like
        Folder in one of the layouts of :func:`wsi_lymph.training.dataset.read_dataset`.
    out_dir : path-like
        ``patches.zarr``, ``folds/`` (the paper's list files, ``folds.json``, mean images),
        ``fold<K>/`` (checkpoints, metrics, ``model.pt``, ``fold_report.json``) and the reports.
    settings : CVSettings
    resources : dict, optional
        Dask resources each fold task asks for: ``{"GPU": 1}`` pins the folds to GPU workers, one per GPU
        (``wsi-lymph cv`` passes it when the cluster's workers advertise ``GPU``).
    log : callable
        Called with one line per event (data set, patches, each fold's result).

    Returns
    -------
    dict
        The report.
    """
    settings = settings or CVSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images = read_dataset(dataset)
    log(f"{len(images)} images, {sum(len(i.centers_rc) for i in images)} annotated centres in {dataset}")
    patches_zarr = _patches(client, images, out_dir, settings)
    log(f"patches: {patches_zarr}")
    folds = _folds([image.image_id for image in images], patches_zarr, out_dir / "folds", dataset, settings)
    entries = _run_folds(client, folds, dataset, patches_zarr, out_dir, settings, resources, log)
    report = {
        "dataset": str(dataset),
        "settings": asdict(settings),
        "tolerance_px": settings.tolerance_um / settings.mpp,
        "folds": entries,
        "pooled": {
            name: pooled([DetectionScore.from_dict(entry[name]["test"]) for entry in entries]).as_dict()
            for name in ("network", "baseline")
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / "cv_report.json", report)
    write_atomic(out_dir / "cv_report.md", markdown_report(report).encode())
    return report


def _patches(client, images: list[AnnotatedImage], out_dir: Path, settings: CVSettings) -> Path:
    """``OUT/patches.zarr``, extracted unless a previous run left it complete."""
    patches_zarr = out_dir / "patches.zarr"
    if not (patches_zarr / "zarr.json").is_file():
        extract_patches(client, images, patches_zarr, seed=settings.seed, upscale=round(settings.scale),
                        max_positive=settings.max_positive, max_negative=settings.max_negative)
    return patches_zarr


def _folds(ids: list[str], patches_zarr: Path, folds_dir: Path, dataset: str | os.PathLike,
           settings: CVSettings) -> list[Fold]:
    """The folds of a previous run in ``folds_dir`` (checked against the data set), or new ones written there."""
    folds_json = folds_dir / "folds.json"
    if not folds_json.is_file():
        folds = make_folds(ids, settings.n_folds, settings.seed)
        write_folds(folds, patches_zarr, folds_dir, seed=settings.seed)
        return folds
    folds = read_folds(folds_json)
    if sorted(i for f in folds for i in f.test_images) != sorted(ids) or len(folds) != settings.n_folds:
        raise ValueError(f"{folds_json} does not split the images of {dataset} into {settings.n_folds} folds; "
                         "use another --out")
    return folds


def _run_folds(client, folds: list[Fold], dataset: str | os.PathLike, patches_zarr: Path, out_dir: Path,
               settings: CVSettings, resources: dict[str, float] | None, log: Callable[[str], None]) -> list[dict]:
    """One ``train-*`` task per fold (retried twice: a rerun resumes from the checkpoints); entries by fold."""
    token = f"{abs(hash((str(out_dir.resolve()), time.time()))):x}"[:12]
    client.register_plugin(QuietTaskErrors(("train",)))  # a failed fold is the driver's to report
    futures = {
        client.submit(run_fold, fold, str(Path(dataset).resolve()), str(patches_zarr.resolve()),
                      str((out_dir / f"fold{fold.fold}").resolve()), settings, key=(f"train-0{token}", fold.fold),
                      resources=resources, retries=2, pure=False): fold
        for fold in folds
    }
    entries = []
    for future in as_completed(futures):
        entry = future.result()
        entries.append(entry)
        log(f"fold {entry['fold']}: threshold {entry['network']['threshold']:.2f}, test F "
            f"{entry['network']['test']['f_score']:.3f} (baseline {entry['baseline']['test']['f_score']:.3f}), "
            f"{entry['seconds']:.0f} s")
    return sorted(entries, key=lambda e: e["fold"])


def markdown_report(report: dict) -> str:
    """A markdown table of the folds and the pooled result, network next to the baseline."""
    s = report["settings"]
    lines = [
        f"# Cross-validation: {report['dataset']}",
        "",
        f"{s['n_folds']} folds by image; {s['arch']} network, {s['recipe']} recipe, {s['iterations']} iterations; "
        f"matching within {s['tolerance_um']} µm; thresholds chosen on validation images.",
        "",
        "| fold | test images | threshold | P | R | F | baseline F |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in report["folds"]:
        net, base = entry["network"], entry["baseline"]
        lines.append(f"| {entry['fold']} | {len(entry['test_images'])} | {net['threshold']:.2f} | "
                     f"{net['test']['precision']:.3f} | {net['test']['recall']:.3f} | {net['test']['f_score']:.3f} | "
                     f"{base['test']['f_score']:.3f} |")
    net, base = report["pooled"]["network"], report["pooled"]["baseline"]
    lines.append(f"| pooled | {sum(len(e['test_images']) for e in report['folds'])} | | {net['precision']:.3f} | "
                 f"{net['recall']:.3f} | {net['f_score']:.3f} | {base['f_score']:.3f} |")
    return "\n".join(lines) + "\n"
