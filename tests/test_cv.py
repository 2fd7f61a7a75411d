"""Cross-validation end to end: ``wsi-lymph cv`` on a synthetic data set, five folds on a 2-worker LocalCluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import CROPS

from wsi_lymph.models.registry import load_model
from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.synthetic import make_synthetic_dataset


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_lymph.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_cv_runs_five_folds_by_image_and_beats_the_baseline(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic_dataset(data, n_images=10, seed=1)
    run = _cli("cv", str(data), "--out", str(out), "--iterations", "150", "--recipe", "modern", "--arch", "dense",
               "--max-positive", "300", "--max-negative", "600", "--workers", "2", "--dashboard", ":0")
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    report = json.loads((out / "cv_report.json").read_text())
    ids = [image.image_id for image in read_dataset(data)]
    folds = report["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3, 4, 5]
    # Split by image: every image is tested exactly once, never in its own fold's fit or validation set.
    assert sorted(i for f in folds for i in f["test_images"]) == sorted(ids)
    for fold in folds:
        assert not set(fold["test_images"]) & (set(fold["fit_images"]) | set(fold["validation_images"]))
        assert not set(fold["fit_images"]) & set(fold["validation_images"]) and fold["validation_images"]
        assert 0.3 <= fold["network"]["threshold"] < 1.0
        tuned = load_model(fold["model"]).meta
        assert tuned["fold"] == fold["fold"] and tuned["threshold"] == fold["network"]["threshold"]
        assert fold["training"]["final_metrics"]["iteration"] == 150
        assert (out / "folds" / f"train_w32_{fold['fold']}.txt").is_file()
        assert (out / "folds" / f"fold{fold['fold']}_mean_bgr.npy").is_file()
    network, baseline = report["pooled"]["network"], report["pooled"]["baseline"]
    # Pooled counts are the sums over the folds' test images.
    assert network["true_positives"] + network["false_negatives"] == sum(len(i.centers_rc) for i in read_dataset(data))
    print(f"pooled F: network {network['f_score']:.3f}, hematoxylin-blob baseline {baseline['f_score']:.3f}")
    assert network["f_score"] > baseline["f_score"]
    assert network["f_score"] >= 0.8
    table = (out / "cv_report.md").read_text()
    assert "| pooled |" in table and f"{network['f_score']:.3f}" in table


@pytest.mark.shared_data
def test_image_probabilities_equal_the_slide_engine(client, tmp_path):
    from wsi_lymph.detection.inference import image_probabilities
    from wsi_lymph.engine.batch import run_probmaps
    from wsi_lymph.engine.params import ProbmapParams
    from wsi_lymph.io.probmap_store import open_probmap

    crop = CROPS / "example_2.tif"
    params = ProbmapParams(stride_px=4, chunk_px=128, block_px=128, dtype="float32", torch_threads=1)
    [result] = run_probmaps(client, [crop], tmp_path, model="janowczyk2016/fold2", mpp=0.5, params=params,
                            progress=False)
    engine, _ = open_probmap(result.output)
    members = load_model("janowczyk2016/fold2").members
    in_memory = image_probabilities(tifffile.imread(crop), members, scale=4.0, stride_px=4)
    assert in_memory.shape == engine.shape == (400, 400)
    np.testing.assert_allclose(in_memory, engine.compute(), atol=1e-5)


def test_dataset_check_reports_problems_and_passes_a_clean_set(tmp_path):
    make_synthetic_dataset(tmp_path / "good", n_images=3, seed=2)
    run = _cli("dataset", "check", str(tmp_path / "good"))
    assert run.returncode == 0, run.stdout + run.stderr
    bad = tmp_path / "bad"
    make_synthetic_dataset(bad, n_images=3, seed=2)
    (bad / "2m.tif").unlink()  # an image without its mask
    tifffile.imwrite(bad / "3m.tif", np.zeros((50, 60, 4), np.uint8))  # a mask of another size
    (bad / "im4.tif").write_bytes(b"not a tiff")
    run = _cli("dataset", "check", str(bad))
    assert run.returncode == 1
    for name in ("im2.tif", "3m.tif", "im4.tif"):
        assert name in run.stdout, (name, run.stdout)


@pytest.mark.shared_data
def test_engine_evaluates_a_dense_model_fully_convolutionally(client, tmp_path):
    import torch
    from test_dense import _meta, channel_mean_image, random_dense_net

    from wsi_lymph.engine.batch import run_probmaps
    from wsi_lymph.engine.params import ProbmapParams
    from wsi_lymph.io.probmap_store import open_probmap
    from wsi_lymph.models.architectures import DENSE_ARCH
    from wsi_lymph.models.checkpoints import save_checkpoint_atomic
    from wsi_lymph.models.networks import patch_grid_probabilities
    from wsi_lymph.slides.frame import choose_frame, patch_rows, read_frame_window
    from wsi_lymph.slides.reader import open_slide

    net, mean = random_dense_net(3), channel_mean_image()
    meta = _meta(DENSE_ARCH, "dense-test") | {"source_scan_mpp": 0.5}
    path = save_checkpoint_atomic({"state_dict": net.state_dict(), "mean_bgr": mean, "meta": meta}, tmp_path / "d.pt")
    crop = CROPS / "example_3.tif"
    params = ProbmapParams(stride_px=4, chunk_px=128, block_px=128, dtype="float32", skip_hematoxylin=False,
                           torch_threads=1)
    [result] = run_probmaps(client, [crop], tmp_path / "out", model=str(path), mpp=0.5, params=params,
                            progress=False)
    assert result.status == "done", result.reason
    assert result.patches == 400 * 400  # every pixel: a dense model is exact, the stride does not apply
    engine, _ = open_probmap(result.output)
    # Reference: patch-by-patch classification of a window inside the map.
    info = open_slide(crop, mpp=0.5)
    rows, cols = np.arange(100, 164), np.arange(250, 314)
    window = read_frame_window(info, choose_frame(info), patch_rows(rows), patch_rows(cols))
    with torch.inference_mode():
        reference = patch_grid_probabilities([(net, mean)], window, stride_px=1)
    np.testing.assert_allclose(engine[100:164, 250:314].compute(), reference, atol=1e-5)
    assert reference.std() > 0.01  # a map with structure, not a constant
