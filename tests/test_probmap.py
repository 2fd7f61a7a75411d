"""The probability-map engine on a real 2-worker cluster, against a plain per-pixel reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import CROPS, SLIDES, crop_centers, level0_to_frame
from distributed.diagnostics.plugin import SchedulerPlugin

from wsi_lymph.constants import PAPER_THRESHOLD
from wsi_lymph.detection.evaluate import match_points
from wsi_lymph.detection.peaks import detect_centers
from wsi_lymph.engine.batch import run_probmaps
from wsi_lymph.engine.centres import find_centres, plan_peaks
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.ome_zarr import PYRAMID_NAME, open_pyramid
from wsi_lymph.io.probmap_store import create_partial_store, encode, open_probmap, write_block
from wsi_lymph.models.checkpoints import load_checkpoint
from wsi_lymph.models.registry import resolve_model

FOLD = "janowczyk2016/fold1"
CROP_FILES = [CROPS / f"example_{i}.tif" for i in (1, 2, 3)]
STRIDES = (1, 2, 4)


def _load(out_dir, name="example_1") -> np.ndarray:
    return zarr.open_array(str(out_dir / name / "prob.zarr"), mode="r")[:]


@pytest.fixture(scope="session")
def crop_maps(client, tmp_path_factory):
    """Fold-1 float32 maps of the three annotated 20x crops at strides 1, 2, 4 (one batch per stride)."""
    maps = {}
    for stride in STRIDES:
        out = tmp_path_factory.mktemp(f"crops-s{stride}")
        params = ProbmapParams(stride_px=stride, dtype="float32", chunk_px=128, block_px=128, torch_threads=1)
        results = run_probmaps(client, CROP_FILES, out, model=FOLD, mpp=0.5, params=params, progress=False)
        assert [r.status for r in results] == ["done"] * 3, [r.reason for r in results]
        maps[stride] = {i: _load(out, f"example_{i}") for i in (1, 2, 3)}
        maps[stride]["out"] = out
    return maps


def test_probmap_writes_the_maps_pyramid_for_viewers(crop_maps):
    """probmap's product is the map, so it gets detect's OME-Zarr pyramid too: level 0 is the map's 4x4 means."""
    for stride in STRIDES:
        for i in (1, 2, 3):
            folder = crop_maps[stride]["out"] / f"example_{i}"
            levels, attrs = open_pyramid(folder / PYRAMID_NAME)
            prob = crop_maps[stride][i]
            rows, cols = prob.shape[0] // 4, prob.shape[1] // 4
            means = prob[: rows * 4, : cols * 4].reshape(rows, 4, cols, 4).mean(axis=(1, 3))
            level0 = levels[0].compute()
            assert level0.shape == (rows, cols) and attrs["multiscales"][0]["datasets"][0]["path"] == "0"
            np.testing.assert_allclose(level0, means, atol=0.5 / 255 + 1e-6)
            assert means.max() > 0.5  # a map with lymphocytes in it, not an empty one compared with an empty one



@pytest.mark.shared_data
def test_probmap_rerun_writes_a_missing_pyramid_without_inference(client, crop_maps, tmp_path):
    """A map finished without its pyramid (interrupted while writing it, or by an older version) gets it on rerun."""
    out = tmp_path / "out"
    shutil.copytree(crop_maps[4]["out"], out)
    shutil.rmtree(out / "example_1" / PYRAMID_NAME)
    store = out / "example_1" / "prob.zarr"
    map_files = {f: f.stat().st_mtime_ns for f in store.rglob("*") if f.is_file()}
    params = ProbmapParams(stride_px=4, dtype="float32", chunk_px=128, block_px=128, torch_threads=1)
    said = []
    [result] = run_probmaps(client, CROP_FILES[:1], out, model=FOLD, mpp=0.5, params=params, progress=False,
                            log=said.append)
    assert result.status == "done", result.reason
    assert any("writing its pyramid" in line for line in said), said
    assert {f: f.stat().st_mtime_ns for f in store.rglob("*") if f.is_file()} == map_files  # no block written again
    levels, _ = open_pyramid(out / "example_1" / PYRAMID_NAME)
    expected, _ = open_pyramid(crop_maps[4]["out"] / "example_1" / PYRAMID_NAME)
    np.testing.assert_array_equal(levels[0].compute(), expected[0].compute())


def _reference_probabilities(image_rgb: np.ndarray, pixels_rc: np.ndarray, checkpoint) -> np.ndarray:
    """Plain per-pixel reference, written independently of the engine.

    Upscale 4x with MATLAB's bicubic (Keys a=-0.5, symmetric edges) by direct
    evaluation of each output pixel, pad 16 symmetric, cut the 32x32 patch of
    each pixel, BGR, subtract the mean, classify one patch at a time.
    """
    net, mean, _ = load_checkpoint(checkpoint)
    image = image_rgb.astype(np.float64)
    padded_src = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="symmetric")

    def keys(t):
        t = abs(t)
        return 1.5 * t**3 - 2.5 * t**2 + 1 if t <= 1 else (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2 if t < 2 else 0.0)

    size = image.shape[0] * 4
    up = np.zeros((size, size, 3))
    for r in range(size):
        u = (r + 0.5) / 4 - 0.5
        wr = [(int(np.floor(u)) + k, keys(u - (np.floor(u) + k))) for k in (-1, 0, 1, 2)]
        for c in range(size):
            v = (c + 0.5) / 4 - 0.5
            value = 0.0
            for ir, w1 in wr:
                for k in (-1, 0, 1, 2):
                    ic = int(np.floor(v)) + k
                    value = value + w1 * keys(v - ic) * padded_src[ir + 4, ic + 4]
            up[r, c] = value
    frame = np.pad(up, ((16, 16), (16, 16), (0, 0)), mode="symmetric")
    out = []
    with torch.inference_mode():
        for r, c in pixels_rc:
            patch = frame[r : r + 32, c : c + 32, ::-1].transpose(2, 0, 1)  # RGB -> BGR, CHW
            x = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None] - mean
            out.append(torch.softmax(net(x), dim=1)[0, 1].item())
    return np.array(out)


@pytest.mark.shared_data
def test_engine_equals_per_pixel_reference(crop_maps, model_cache):
    prob = crop_maps[1][1]
    assert prob.shape == (400, 400) and prob.dtype == np.float32
    rng = np.random.default_rng(0)
    border = [(r, c) for r in range(400) for c in range(400) if min(r, c, 399 - r, 399 - c) < 2 and (r + c) % 3 == 0]
    interior = rng.integers(0, 400, size=(400, 2))
    block_edges = [(127 + dr, 128 * k + dc) for k in (1, 2) for dr in (0, 1) for dc in (-1, 0)]
    pixels = np.array(border + [tuple(p) for p in interior] + block_edges)
    image = tifffile.imread(CROPS / "example_1.tif")
    expected = _reference_probabilities(image, pixels, resolve_model(FOLD)[0])
    got = prob[pixels[:, 0], pixels[:, 1]]
    assert expected.min() < 0.05 and expected.max() > 0.95  # the sample covers both classes
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.shared_data
def test_paper_peak_procedure_finds_the_annotated_centres(crop_maps):
    centres = detect_centers(crop_maps[1][1])
    truth = level0_to_frame(crop_centers(1))
    score = match_points(centres, truth, tolerance=24.0)  # 6 px at 20x = one lymphocyte radius
    print(f"example_1 fold1 s=1: {score}, F={score.f_score:.3f}")
    assert len(truth) == 22
    assert score.true_positives >= 18


@pytest.mark.shared_data
def test_stride_keeps_the_centres(crop_maps):
    kept = {2: [0, 0], 4: [0, 0]}
    for index in (1, 2, 3):
        exact = detect_centers(crop_maps[1][index])
        for stride in (2, 4):
            strided = detect_centers(crop_maps[stride][index])
            score = match_points(strided, exact, tolerance=4.0)
            kept[stride][0] += score.true_positives
            kept[stride][1] += len(exact)
            print(f"example_{index} s={stride}: {score.true_positives}/{len(exact)} s=1 centres within 4 px, "
                  f"{score.false_positives} extra")
    for stride, (hits, total) in kept.items():
        print(f"s={stride}: {hits / total:.1%} of {total} s=1 centres kept")
    assert kept[4][0] >= 0.97 * kept[4][1]
    assert kept[2][0] >= 0.97 * kept[2][1]


@pytest.mark.shared_data
def test_map_attributes_and_report(crop_maps):
    out = crop_maps[1]["out"]
    prob, attrs = open_probmap(out / "example_1" / "prob.zarr")
    array = zarr.open_array(str(out / "example_1" / "prob.zarr"), mode="r")
    assert array.chunks == (128, 128) and array.dtype == np.float32
    assert attrs["mpp"] == 0.5 and attrs["level0_size_xy"] == [100, 100]
    assert attrs["frame"]["frame_scale"] == 4.0 and attrs["frame"]["mpp"] == 0.125
    assert attrs["model"]["name"] == FOLD and len(attrs["model"]["sha256"][0]) == 64
    np.testing.assert_array_equal(prob.compute(), crop_maps[1][1])
    report = json.loads((out / "example_1" / "probmap.json").read_text())
    assert report["status"] == "done" and report["patches"] == 160000 and report["blocks_total"] == 16
    assert not [p for p in (out / "example_1").iterdir() if p.name.startswith(".")]  # no temporary left


class ResourceRecorder(SchedulerPlugin):
    """Scheduler plugin recording the resource restrictions of the infer tasks it sees."""

    name = "resource-recorder"

    def __init__(self):
        self.seen = []

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing" and str(key).startswith("('infer-"):
            self.seen.append(dict(self.scheduler.tasks[key].resource_restrictions or {}))


@pytest.mark.shared_data
def test_one_worker_other_blocks_and_storage_equal_the_2_worker_map(crop_maps, model_cache):
    from wsi_lymph.engine.cluster import dask_client

    recorder = ResourceRecorder()
    with dask_client(1, dashboard_address=":0", resources={"GPU": 1}, quiet=True) as one:
        one.register_plugin(recorder)
        # Other chunking, float16 storage, exact stride, and two torch threads in the one worker (what the CLI
        # gives a lone worker on two cores; the 2-worker reference ran one each).
        out16 = crop_maps[1]["out"].parent / "one-worker-f16"
        params = ProbmapParams(stride_px=1, dtype="float16", chunk_px=64, block_px=192, torch_threads=2)
        [result] = run_probmaps(one, CROP_FILES[:1], out16, model=FOLD, mpp=0.5, params=params, progress=False)
        assert result.status == "done" and result.blocks_total == 9
        # Other chunking at stride 4 must be bit-identical (halo and interpolation are layout-free).
        out4 = crop_maps[1]["out"].parent / "one-worker-s4"
        params = ProbmapParams(stride_px=4, dtype="float32", chunk_px=96, block_px=96)
        [result] = run_probmaps(one, CROP_FILES[:1], out4, model=FOLD, mpp=0.5, params=params, progress=False)
        assert result.status == "done"
        seen = one.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["resource-recorder"].seen)
    stored = _load(out16)
    assert stored.dtype == np.float16 and stored.shape == (400, 400)
    reference = crop_maps[1][1]
    step = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float32)  # one float16 step at each value
    assert np.all(np.abs(stored.astype(np.float32) - reference) <= step)
    np.testing.assert_array_equal(_load(out4), crop_maps[4][1])
    assert seen and all(r == {"GPU": 1} for r in seen)  # inference asks for a GPU where workers have one


def test_float16_encoding_rounds_as_numpy_does():
    """The fast float16 path stores exactly NumPy's round-to-nearest-even values, ties and subnormals included."""
    rng = np.random.default_rng(3)
    halves = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves) & (halves >= 0) & (halves <= 1)].astype(np.float32)
    ties = (halves[:-1] + halves[1:]) / 2  # exactly between two float16 values (float32 holds them exactly)
    prob = np.concatenate([rng.random(100_000, dtype=np.float32), rng.random(1000, dtype=np.float32) * 1e-6,
                           halves, ties, np.nextafter(ties, 0), np.nextafter(ties, 1)])
    block = prob[: 400 * 400].reshape(400, 400)[::2, 1:]  # a strided view, as a block cut out of its window
    for values in (prob, block):
        np.testing.assert_array_equal(encode(values, "float16").view(np.uint16),
                                      values.astype(np.float16).view(np.uint16))


def test_a_block_writes_every_chunk_without_comparing_it_to_the_fill_value(tmp_path):
    """``write_block`` stores each chunk of its block, even one equal to the fill value (no per-chunk compare)."""
    store = tmp_path / "prob.zarr"
    create_partial_store(store, [(0, 32, 0, 32), (32, 64, 32, 64)], (0, 0), 32, "float16", {})
    prob = np.zeros((64, 64), dtype=np.float32)
    prob[:32, :32] = 0.5  # one chunk with values, three equal to the fill value 0
    write_block(store, (0, 64, 0, 64), (0, 0), prob, "float16")
    chunk_files = sorted(p.relative_to(store / "c").as_posix() for p in (store / "c").rglob("*") if p.is_file())
    assert chunk_files == ["0/0", "0/1", "1/0", "1/1"]
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], prob.astype(np.float16))


def test_the_model_chooses_the_map_chunk_and_block_unless_they_are_asked_for():
    from wsi_lymph.models.architectures import PATCHES, SUBPIXEL

    def chosen(evaluation: str, **asked) -> tuple[int, int]:
        params = ProbmapParams(**asked).for_model(evaluation)
        return params.chunk_px, params.block_px

    assert chosen(PATCHES) == (512, 512)  # one chunk per task for the paper's networks
    assert chosen(SUBPIXEL) == (1024, 2048)  # larger chunks and tasks for a fully convolutional model
    assert chosen(SUBPIXEL, block_px=4096) == (1024, 4096)
    assert chosen(SUBPIXEL, block_px=1536) == (512, 1536)  # the block is written in whole chunks
    assert chosen(SUBPIXEL, block_px=512) == (512, 512)
    assert chosen(PATCHES, block_px=2048) == (512, 2048)
    assert chosen(SUBPIXEL, chunk_px=256) == (256, 2048)
    assert chosen(PATCHES, chunk_px=256, block_px=768) == (256, 768)
    with pytest.raises(ValueError, match="multiple of chunk_px"):
        ProbmapParams(block_px=700)  # no chunk divides it


@pytest.mark.shared_data
def test_uint8_storage_is_within_one_step(client, crop_maps, tmp_path):
    params = ProbmapParams(stride_px=4, dtype="uint8", chunk_px=256, block_px=256, torch_threads=1)
    [result] = run_probmaps(client, CROP_FILES[:1], tmp_path, model=FOLD, mpp=0.5, params=params, progress=False)
    assert result.status == "done"
    prob, attrs = open_probmap(tmp_path / "example_1" / "prob.zarr")
    assert attrs["value_scale"] == pytest.approx(1 / 255)
    assert np.abs(prob.compute() - crop_maps[4][1]).max() <= 0.5 / 255 + 1e-6


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("slide", "mpp", "region"),
    [
        ("cmu-1-small-region.svs", None, (650, 950, 300, 300)),
        ("tcga-cr-7395-01a-01-ts1.svs", 0.5, (600, 600, 300, 300)),
    ],
)
def test_hematoxylin_skip_keeps_the_centres(client, tmp_path, slide, mpp, region):
    runs = {}
    for skip in (True, False):
        params = ProbmapParams(
            stride_px=4, chunk_px=256, block_px=256, region_level0=region, skip_hematoxylin=skip, torch_threads=1
        )
        out = tmp_path / f"skip-{skip}"
        [result] = run_probmaps(client, [SLIDES / slide], out, model=FOLD, mpp=mpp, params=params, progress=False)
        assert result.status == "done", result.reason
        prob = _load(out, result.name).astype(np.float32)
        runs[skip] = (result, detect_centers(prob))
        # The batch's blockwise peak stage on the stored map (3 x 3 peak blocks, restricted to the
        # classified blocks the map records) equals the global pass.
        store = out / result.name / "prob.zarr"
        assert len(plan_peaks(store, peak_block_px=512).graph.chunks[0]) >= 3
        row_major = runs[skip][1][np.lexsort((runs[skip][1][:, 1], runs[skip][1][:, 0]))]
        np.testing.assert_array_equal(find_centres(client, store, PAPER_THRESHOLD, peak_block_px=512)[0], row_major)
    skipped, full = runs[True], runs[False]
    score = match_points(skipped[1], full[1], tolerance=1.0)
    changed = score.false_positives + score.false_negatives
    print(f"{slide}: {skipped[0].blocks_skipped}/{skipped[0].blocks_total} blocks skipped "
          f"({skipped[0].skipped_fraction:.1%}), {len(full[1])} centres without skipping, {changed} changed")
    assert skipped[0].skipped_fraction >= 0.1
    assert full[0].blocks_skipped == 0
    assert len(full[1]) >= 10  # enough centres for the comparison to mean something
    assert changed < 0.01 * len(full[1])


@pytest.mark.shared_data
def test_slide_without_resolution_fails_clearly(client, tmp_path, model_cache):
    tcga = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
    [result] = run_probmaps(client, [tcga], tmp_path, model=FOLD, progress=False)
    assert result.status == "failed"
    assert str(tcga) in result.reason and "--mpp" in result.reason


@pytest.mark.shared_data
def test_cli_folder_with_a_non_slide(tmp_path, model_cache):
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(CROPS / "example_2.tif", folder / "example_2.tif")
    (folder / "notes.txt").write_text("this is not a slide\n")
    (folder / "truncated.svs").write_bytes((SLIDES / "cmu-1-small-region.svs").read_bytes()[:5000])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wsi_lymph.cli", "probmap", str(folder), "--out", str(out), "--mpp", "0.5",
               "--model", FOLD, "--stride", "4", "--workers", "1", "--dashboard", ":0"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert run.returncode == 1, run.stderr
    assert "Dask dashboard: http" in run.stdout
    # notes.txt is not a slide or image: left out and listed (issue 11, folder rules); truncated.svs fails.
    assert "1 of 2 slides done" in run.stdout
    assert "not a slide or image: notes.txt" in run.stdout
    assert "truncated.svs" in run.stderr
    assert (out / "example_2" / "prob.zarr" / "zarr.json").is_file()
    assert _load(out, "example_2").max() > 0.9
