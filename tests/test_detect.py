"""wsi-lymph detect: centres and outputs on a real 2-worker cluster."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CROPS, crop_centers

from wsi_lymph.evaluate import match_points
from wsi_lymph.probmap import ProbmapParams

FOLD = "janowczyk2016/fold1"


def test_detect_writes_outputs_that_read_back(client, tmp_path):
    from wsi_lymph.detect import run_detect

    slides = [CROPS / f"example_{i}.tif" for i in (1, 2, 3)] + [CROPS / "missing.tif"]
    params = ProbmapParams(stride_px=4, chunk_px=128, block_px=128, torch_threads=1)
    results = run_detect(client, slides, tmp_path, model=FOLD, mpp=0.5, params=params, progress=False)
    assert [r.status for r in results] == ["done", "done", "done", "failed"]
    batch = json.loads((tmp_path / "batch.json").read_text())
    assert (batch["done"], batch["failed"]) == (3, 1) and "no such file" in batch["slides"][3]["reason"]

    pooled = [0, 0, 0]
    for i in (1, 2, 3):
        folder = tmp_path / f"example_{i}"
        with open(folder / "centers.csv") as handle:
            rows = list(csv.DictReader(handle))
        xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
        assert len(rows) > 10
        assert (xy >= -0.5).all() and (xy <= 99.5).all()  # inside the 100 x 100 slide
        np.testing.assert_allclose([float(r["x_um"]) for r in rows], xy[:, 0] * 0.5, atol=1e-3)
        assert all(float(r["probability"]) > 0.7706 for r in rows)

        geojson = json.loads((folder / "centers.geojson").read_text())
        assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == len(rows)
        feature = geojson["features"][0]
        assert feature["geometry"]["type"] == "Point"
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == "Lymphocyte"
        np.testing.assert_allclose([f["geometry"]["coordinates"] for f in geojson["features"]], xy)

        table = pq.read_table(folder / "centers.parquet").to_pydict()
        np.testing.assert_allclose(table["x"], xy[:, 0])

        for picture in ("overlay.png", "density.png", f"example_{i}_prob.png", f"example_{i}_class.png"):
            assert (folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["count"] == len(rows)
        assert summary["analysed_area_mm2"] == round(100 * 100 * 0.5**2 / 1e6, 6)
        assert summary["density_per_mm2_analysed"] == round(len(rows) / summary["analysed_area_mm2"], 3)
        # The crops are all tissue; hematoxylin cells are a part of it.
        assert 0.9 * summary["analysed_area_mm2"] <= summary["tissue_area_mm2"] <= summary["analysed_area_mm2"]
        assert 0 < summary["hematoxylin_area_mm2"] <= summary["analysed_area_mm2"]
        assert summary["density_per_mm2_tissue"] == pytest.approx(len(rows) / summary["tissue_area_mm2"], rel=1e-3)
        assert summary["model"]["name"] == FOLD and summary["threshold"] == 0.7706

        # The detections are where the pathologist marked lymphocytes (level-0 px, tolerance 6 px).
        truth = crop_centers(i)[:, ::-1]  # (row, col) -> (x, y)
        score = match_points(xy, truth, tolerance=6.0)
        counts = (score.true_positives, score.false_positives, score.false_negatives)
        pooled = [a + b for a, b in zip(pooled, counts, strict=True)]
    tp, fp, fn = pooled
    f_score = 2 * tp / (2 * tp + fp + fn)
    print(f"fold 1, stride 4, three crops pooled: TP {tp} FP {fp} FN {fn} F {f_score:.3f}")
    assert f_score >= 0.8
    # Every stage ran on the cluster under its own name (what the dashboard shows).
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    for stage in ("read", "hematoxylin", "infer", "peaks", "write"):
        assert any(p == stage or p.startswith(stage + "-") for p in prefixes), (stage, prefixes)


def test_ensemble_on_the_annotated_crops_and_evaluate_cli(client, tmp_path):
    """The five folds as an ensemble; ``wsi-lymph evaluate`` scores it and sweeps the threshold."""
    import os
    import subprocess
    import sys

    from wsi_lymph.detect import run_detect
    from wsi_lymph.evaluate import read_points, read_scores, threshold_sweep

    slides = [CROPS / f"example_{i}.tif" for i in (1, 2, 3)]
    params = ProbmapParams(stride_px=4, chunk_px=128, block_px=128, torch_threads=1)
    # Detected at a low threshold: the greedy takes centres in decreasing order, so any higher
    # threshold is the same run with the tail cut off.
    results = run_detect(client, slides, tmp_path, model="janowczyk2016", mpp=0.5, params=params, threshold=0.5,
                         progress=False)
    assert all(r.status == "done" for r in results)
    report_path = tmp_path / "evaluation.json"
    run = subprocess.run(
        [sys.executable, "-m", "wsi_lymph.cli", "evaluate", str(tmp_path), str(CROPS), "--sweep",
         "--json", str(report_path)], capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    report = json.loads(report_path.read_text())
    assert sorted(report["images"]) == ["example_1", "example_2", "example_3"]
    assert report["images"]["example_1"]["annotation"].endswith("example_1_seed.tif")
    assert 0.5 <= report["best_threshold"] < 0.99

    detections = [(read_points(tmp_path / f"example_{i}" / "centers.csv"),
                   read_scores(tmp_path / f"example_{i}" / "centers.csv")) for i in (1, 2, 3)]
    truths = [crop_centers(i)[:, ::-1] for i in (1, 2, 3)]
    [(_, paper)] = threshold_sweep(detections, truths, [6.0] * 3, np.array([0.7706]))
    print(f"ensemble, stride 4, paper threshold 0.7706: P {paper.precision:.3f} R {paper.recall:.3f} "
          f"F {paper.f_score:.3f}")
    assert paper.f_score >= 0.85


def test_detect_over_the_shared_slides_folder(model_cache, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import SLIDES

    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES), "--out", str(out), "--mpp", "0.5",
         "--region", "0,0,300,250", "--stride", "4", "--model", FOLD, "--workers", "2", "--dashboard", ":0"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stderr
    assert "3 of 3 slides done" in run.stdout
    batch = json.loads((out / "batch.json").read_text())
    assert [s["status"] for s in batch["slides"]] == ["done"] * 3
    for slide in batch["slides"]:
        folder = out / slide["name"]
        with open(folder / "centers.csv") as handle:
            rows = list(csv.DictReader(handle))
        geojson = json.loads((folder / "centers.geojson").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        assert len(geojson["features"]) == len(rows) == summary["count"]
        for row in rows:
            assert -0.5 <= float(row["x"]) <= 300 and -0.5 <= float(row["y"]) <= 250
        assert summary["analysed_area_mm2"] == round(300 * 250 * 0.5**2 / 1e6, 6)
        assert 0 <= summary["tissue_area_mm2"] <= summary["analysed_area_mm2"]
        # Slides in flight together must not share tasks: each slide's areas equal its own stain summary.
        alone = _stain_summary_alone(slide["path"], (0, 0, 300, 250))
        assert summary["tissue_area_mm2"] == pytest.approx(alone.tissue_mm2, abs=1e-6)
        assert summary["hematoxylin_area_mm2"] == pytest.approx(alone.hematoxylin_mm2, abs=1e-6)
    assert sum(json.loads((out / s["name"] / "summary.json").read_text())["count"] for s in batch["slides"]) > 0


def _stain_summary_alone(path: str, region_level0: tuple[int, int, int, int]):
    """The stain summary of one slide region, computed in-process (synchronous scheduler)."""
    import dask

    from wsi_lymph.frame import choose_frame
    from wsi_lymph.hematoxylin import stain_summary
    from wsi_lymph.probmap import frame_region
    from wsi_lymph.slide import open_slide

    info = open_slide(path, mpp=0.5)
    frame = choose_frame(info)
    parts, assemble = stain_summary(info, frame, frame_region(frame, region_level0))
    return assemble(*dask.compute(*parts, scheduler="sync"))
