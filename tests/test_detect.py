"""wsi-lymph detect: centres and outputs on a real 2-worker cluster."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict

import dask
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from conftest import CROPS, SLIDES, crop_centers
from scipy import ndimage

from wsi_lymph.constants import CLEAR_RADIUS_PX
from wsi_lymph.detection.evaluate import match_points, read_points, read_scores, threshold_sweep
from wsi_lymph.detection.hematoxylin import stain_summary
from wsi_lymph.detection.peaks import detect_centers, greedy_peaks, linking_reach_px, smooth_probability
from wsi_lymph.engine.batch import map_attributes, model_description, run_detect
from wsi_lymph.engine.centres import plan_peaks
from wsi_lymph.engine.params import ProbmapParams, SlideResult
from wsi_lymph.io.outputs import write_json
from wsi_lymph.io.probmap_store import computed_blocks_attr, create_partial_store, write_block
from wsi_lymph.slides.frame import block_boxes, choose_frame, frame_region
from wsi_lymph.slides.reader import open_slide

FOLD = "janowczyk2016/fold1"


@pytest.mark.shared_data
def test_detect_writes_outputs_that_read_back(client, tmp_path):
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


@pytest.mark.shared_data
def test_ensemble_on_the_annotated_crops_and_evaluate_cli(client, tmp_path):
    """The five folds as an ensemble; ``wsi-lymph evaluate`` scores it and sweeps the threshold."""
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


@pytest.mark.shared_data
def test_detect_over_the_shared_slides_folder(model_cache, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES), "--out", str(out), "--mpp", "0.5",
         "--region", "0,0,300,250", "--stride", "4", "--model", FOLD, "--workers", "2", "--dashboard", ":0",
         "--no-stain-check"],  # small-he-levels.tiff is coloured rectangles (refused by default: test_inputs.py)
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
    info = open_slide(path, mpp=0.5)
    frame = choose_frame(info)
    parts, assemble = stain_summary(info, frame, frame_region(frame, region_level0))
    return assemble(*dask.compute(*parts, scheduler="sync"))


# ------------------------------------------------------------------ the peak stage of `wsi-lymph detect`
PEAK_BLOCK_PX = 64  # peak blocks of 2 x 2 map chunks of 32 px: 4 x 4 blocks on the 200 x 200 map below


def _chains_map(shape=(200, 200), seed=0) -> np.ndarray:
    """Chains of blobs spaced under the clearing radius, across the borders and corners of 64-px blocks."""
    chains = [
        [(20, 10 + 26 * k) for k in range(8)],  # along row 20, across the column borders 64, 128, 192
        [(60 + 26 * k, 30) for k in range(6)],  # down column 30, across the row borders 64, 128 (and near 192)
        [(128 + 13 * k, 128 + 13 * k) for k in range(-3, 4)],  # diagonally through the corner (128, 128)
        [(192, 128)],  # alone on the corner of four blocks, two of them 8 px thin
    ]
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    prob = np.zeros(shape)
    for chain in chains:
        # Decreasing along each chain, so the suppression alternates along it.
        for (r, c), value in zip(chain, np.linspace(0.99, 0.92, len(chain)), strict=True):
            prob = np.maximum(prob, value * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 9.0**2)))
    prob += np.random.default_rng(seed).uniform(0, 0.02, shape)  # many nearby candidates, no exact ties
    return np.clip(prob, 0, 1).astype(np.float32)


def _place_complete_map(slide_path, out_dir, prob: np.ndarray, params: ProbmapParams) -> dict:
    """Leave ``OUT/<slide>/prob.zarr`` + ``probmap.json`` as a finished ``wsi-lymph probmap`` run does.

    The map's attributes are the batch's own for this slide and model; its values are ``prob``.
    """
    model = model_description(FOLD)
    info = open_slide(slide_path, mpp=0.5, fingerprint=True)  # as the batch opens it
    frame = choose_frame(info, model["model_mpp"], model["source_scan_mpp"])
    box = frame_region(frame, None)
    origin_rc = (box[0], box[2])
    assert (box[1] - box[0], box[3] - box[2]) == prob.shape
    boxes = block_boxes(prob.shape, params.block_px)
    attributes = map_attributes(info, frame, origin_rc, model, params)
    attributes["wsi_lymph"]["computed_blocks"] = computed_blocks_attr(
        boxes, np.ones(len(boxes), dtype=bool), origin_rc, params.block_px
    )
    folder = out_dir / slide_path.stem
    create_partial_store(folder / "prob.zarr", boxes, origin_rc, params.chunk_px, params.dtype, attributes)
    write_block(folder / "prob.zarr", box, origin_rc, prob, params.dtype)
    result = SlideResult(path=str(slide_path), name=slide_path.stem, blocks_total=len(boxes),
                         output=str(folder / "prob.zarr"))
    write_json(folder / "probmap.json", asdict(result) | {"status": "done", "skipped_fraction": 0.0})
    return attributes["wsi_lymph"]


def _block_sets(mask: np.ndarray, chunks) -> list[set[tuple[int, int]]]:
    """For each 8-connected component of ``mask``, the set of blocks (of ``chunks``) its pixels lie in."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    block_row = np.repeat(np.arange(len(chunks[0])), chunks[0])
    block_col = np.repeat(np.arange(len(chunks[1])), chunks[1])
    rows, cols = np.nonzero(labels)
    blocks = [set() for _ in range(count)]
    for label, i, j in zip(labels[rows, cols], block_row[rows], block_col[cols], strict=True):
        blocks[label - 1].add((int(i), int(j)))
    return blocks


@pytest.mark.shared_data
def test_detect_peak_stage_equals_one_global_greedy_pass(client, tmp_path):
    """`wsi-lymph detect`'s own peak stage on a map of 4 x 4 peak blocks == one global greedy pass.

    ``run_detect`` on a real slide file whose map is already complete (as an interrupted
    ``detect`` or an earlier ``probmap`` leaves it) runs exactly the peak stage and the outputs.
    """
    slide_path = tmp_path / "slides" / "chains.tif"
    slide_path.parent.mkdir()
    # A 50 x 50 px slide at 0.5 µm/px: a 200 x 200 model-frame map (4x).
    tifffile.imwrite(slide_path, np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8),
                     photometric="rgb")
    params = ProbmapParams(chunk_px=32, block_px=32, dtype="float32", torch_threads=1)
    prob = _chains_map()
    attrs = _place_complete_map(slide_path, tmp_path / "out", prob, params)

    [result] = run_detect(client, [slide_path], tmp_path / "out", model=FOLD, mpp=0.5, params=params,
                          peak_block_px=PEAK_BLOCK_PX, keep_map=True, progress=False)
    assert result.status == "done" and result.reused, result.reason
    assert {"peaks", "write"} <= set(result.seconds)

    # The map really spans >= 3 x 3 peak blocks, every one of them computed.
    graph = plan_peaks(tmp_path / "out" / "chains" / "prob.zarr", peak_block_px=PEAK_BLOCK_PX).graph
    assert graph.chunks == ((64, 64, 64, 8), (64, 64, 64, 8)) and len(graph.blocks) == 16
    # The components of linked candidates cross block edges and corners (the test is not vacuous).
    threshold = attrs["model"]["threshold"]
    smoothed = smooth_probability(prob)
    reach = linking_reach_px(CLEAR_RADIUS_PX)
    disk = np.hypot(*np.mgrid[-reach : reach + 1, -reach : reach + 1]) <= reach
    linked = ndimage.binary_dilation(smoothed > threshold, structure=disk)
    spans = _block_sets(linked, graph.chunks)
    assert any(len({j for _, j in blocks}) >= 3 for blocks in spans)  # across >= 2 column borders
    assert any(len({i for i, _ in blocks}) >= 3 for blocks in spans)  # across >= 2 row borders
    assert any({(1, 1), (1, 2), (2, 1), (2, 2)} <= blocks for blocks in spans)  # around the corner (128, 128)
    assert any({(2, 1), (2, 2), (3, 1), (3, 2)} <= blocks for blocks in spans)  # around (192, 128), thin blocks
    # ... and they matter: a greedy pass on each block alone finds other centres.
    expected = detect_centers(prob, threshold)
    per_block = np.concatenate([
        greedy_peaks(smoothed[r0:r1, c0:c1], threshold) + [r0, c0] for r0, r1, c0, c1 in graph.boxes
    ])
    assert len(per_block) > len(expected) >= 12

    # centers.csv (level-0 x, y) is the global greedy pass's centres in the same conversion.
    with open(tmp_path / "out" / "chains" / "centers.csv") as handle:
        rows = list(csv.DictReader(handle))
    got = np.array([[float(r["y"]), float(r["x"])] for r in rows])
    assert attrs["frame"]["level0_per_frame_px"] == 0.25 and attrs["origin_rc"] == [0, 0]
    expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
    np.testing.assert_array_equal(got, (expected + 0.5) * 0.25 - 0.5)  # (row, col) -> level-0 (y, x)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], smoothed[expected[:, 0], expected[:, 1]],
                               atol=5e-5)
    summary = json.loads((tmp_path / "out" / "chains" / "summary.json").read_text())
    assert summary["count"] == len(expected) and summary["threshold"] == threshold
