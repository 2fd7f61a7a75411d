"""The fast sub-pixel student: cost, registry, blockwise maps equal to the whole map, stain normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CROPS, SLIDES

from wsi_lymph.detection.inference import slide_window_reader, window_probabilities
from wsi_lymph.detection.stain import LabStatistics, ReinhardTransform, lab_statistics, reference_reinhard
from wsi_lymph.models.architectures import STUDENT_ARCH, SUBPIXEL, architecture, architecture_of
from wsi_lymph.models.networks import STUDENT_UPSCALE, SubpixelStudentNet
from wsi_lymph.slides.frame import choose_frame, coarser_frame, read_frame_window
from wsi_lymph.slides.reader import open_slide, read_region

pytestmark = pytest.mark.shared_data


def _random_student(seed: int = 0) -> list:
    torch.manual_seed(seed)
    net = SubpixelStudentNet(input_std=(40.0, 45.0, 35.0)).eval()
    # Larger weights than the default initialisation, so the map varies and a misplaced pixel shows.
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    mean = torch.tensor([180.0, 120.0, 170.0]).view(3, 1, 1).expand(3, 32, 32).contiguous()
    return [(net.to(memory_format=torch.channels_last), mean)]


def test_the_student_costs_under_0_2_mflop_per_20x_pixel_and_is_registered():
    net = SubpixelStudentNet()
    assert net.flops_per_input_px() <= 0.2e6
    # 494 MFLOP per 20x pixel is the paper's default (5 folds, stride 2): at least 2,000x less.
    assert 494e6 / net.flops_per_input_px() >= 2000
    entry = architecture("student")
    assert entry.arch_id == STUDENT_ARCH and entry.evaluation == SUBPIXEL
    assert architecture_of(net) is entry


def test_output_grid_is_four_subpixels_per_input_pixel():
    net = SubpixelStudentNet().eval()
    x = torch.zeros(1, 3, 30, 41)
    with torch.no_grad():
        out = net(x)
    halo = net.halo_px
    assert out.shape == (1, 1, STUDENT_UPSCALE * (30 - 2 * halo), STUDENT_UPSCALE * (41 - 2 * halo))


def test_blockwise_student_map_equals_the_whole_map_on_a_real_slide():
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    frame = choose_frame(info)
    members = _random_student()
    reader = slide_window_reader(info, frame)
    # A box that starts off the 4-px input grid and reaches the slide's right edge (mirrored reads).
    r0, c0 = 4001, 8880 - 301
    box = (r0, r0 + 300, c0, 8880)
    whole, _ = window_probabilities(reader, box, members)
    assert whole.shape == (300, 301) and whole.std() > 1e-3
    blocks = np.zeros_like(whole)
    rows = [r0, r0 + 37, r0 + 128, r0 + 300]
    cols = [c0, c0 + 3, c0 + 190, c0 + 301]
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        for c, d in zip(cols[:-1], cols[1:], strict=True):
            blocks[a - r0 : b - r0, c - c0 : d - c0], _ = window_probabilities(reader, (a, b, c, d), members)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=2e-6)


def test_a_checkpoint_of_several_students_loads_as_one_model_averaging_their_maps(tmp_path):
    from wsi_lymph.models.checkpoints import (
        ModelError,
        ensemble_checkpoint,
        load_checkpoint,
        load_checkpoint_members,
        save_checkpoint_atomic,
    )
    from wsi_lymph.models.registry import load_model

    students = _random_student(0) + _random_student(1)
    meta = {"arch": STUDENT_ARCH, "name": "two-students", "threshold": 0.7, "model_mpp": 0.125,
            "channel_order": "BGR", "input_range": 255.0, "class_index": 1}
    both = save_checkpoint_atomic(ensemble_checkpoint(students, meta), tmp_path / "two.pt")
    one = save_checkpoint_atomic(ensemble_checkpoint(students[:1], meta), tmp_path / "one.pt")
    loaded, loaded_meta = load_checkpoint_members(both)
    assert len(loaded) == 2 and loaded_meta["format"] == "wsi-lymph-checkpoint/2"
    assert load_checkpoint(one)[2]["format"] == "wsi-lymph-checkpoint/1"  # one network: the format it always had
    with pytest.raises(ModelError, match=r"two.pt: holds 2 networks"):
        load_checkpoint(both)  # callers that expect one network are not handed the first member silently

    model = load_model(str(both))
    assert len(model.members) == 2 and model.threshold == 0.7
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    reader = slide_window_reader(info, choose_frame(info))
    box = (2000, 2101, 3001, 3100)
    averaged, _ = window_probabilities(reader, box, model.members)
    for (net, _), (saved, _) in zip(model.members, students, strict=True):
        pairs = zip(net.state_dict().values(), saved.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    alone = [window_probabilities(reader, box, [member])[0] for member in model.members]
    assert np.abs(alone[0] - alone[1]).max() > 1e-2  # two different students
    np.testing.assert_allclose(averaged, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-6)


def test_a_student_of_another_shape_loads_in_its_own_shape_and_a_wrong_shape_is_refused(tmp_path):
    from wsi_lymph.models.checkpoints import ModelError, ensemble_checkpoint, save_checkpoint_atomic
    from wsi_lymph.models.registry import load_model

    torch.manual_seed(3)
    wide = SubpixelStudentNet(input_std=(40.0, 45.0, 35.0), width=48, fine_width=8).eval()
    torch.nn.init.normal_(wide.fine_head.weight, std=0.1)  # zero at first: the stage would add nothing
    deep = SubpixelStudentNet(input_std=(40.0, 45.0, 35.0), width=24, dilations=(1, 2, 4, 2, 1, 1),
                              residual=True, activation="silu").eval()
    assert deep.halo_px == 13 and abs(deep.flops_per_input_px() - 71724) < 1
    assert wide.halo_px == 10 and wide.flops_per_input_px() == 159_000 + 2 * 48 * 32 + 4 * (2 * 9 * 64 + 2 * 32)
    mean = torch.tensor([180.0, 120.0, 170.0]).view(3, 1, 1).expand(3, 32, 32).contiguous()
    meta = {"arch": STUDENT_ARCH, "name": "wide", "threshold": 0.7, "model_mpp": 0.125,
            "channel_order": "BGR", "input_range": 255.0, "class_index": 1}
    checkpoint = ensemble_checkpoint([(wide, mean), (deep, mean)] + _random_student(0), meta)
    path = save_checkpoint_atomic(checkpoint, tmp_path / "wide.pt")
    model = load_model(str(path))
    assert [net.shape() for net, _ in model.members] == [
        {"width": 48, "dilations": [2, 4, 1], "residual": False, "activation": "relu", "fine_width": 8},
        {"width": 24, "dilations": [1, 2, 4, 2, 1, 1], "residual": True, "activation": "silu", "fine_width": 0},
        {"width": 32, "dilations": [2, 4, 1], "residual": False, "activation": "relu", "fine_width": 0}]
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    reader = slide_window_reader(info, choose_frame(info))
    box = (2000, 2101, 3001, 3100)
    for saved, loaded in zip((wide, deep), model.members[:2], strict=True):
        expected, _ = window_probabilities(reader, box, [(saved, mean)])
        np.testing.assert_array_equal(window_probabilities(reader, box, [loaded])[0], expected)
    # The deeper residual student's wider halo, and the fine stage's half-pixel one, still make the blockwise map
    # the whole map.
    for member in model.members[:2]:
        whole, _ = window_probabilities(reader, box, [member])
        assert whole.std() > 1e-3
        left, _ = window_probabilities(reader, (2000, 2101, 3001, 3050), [member])
        right, _ = window_probabilities(reader, (2000, 2101, 3050, 3100), [member])
        np.testing.assert_allclose(np.hstack([left, right]), whole, rtol=0, atol=2e-6)

    checkpoint["members"][0]["width"] = 32  # weights of width 48 under a record that says 32
    save_checkpoint_atomic(checkpoint, tmp_path / "mislabelled.pt")
    with pytest.raises(ModelError, match=r"mislabelled.pt \(member 1\): weights do not fit"):
        load_model(str(tmp_path / "mislabelled.pt"))
    checkpoint["members"][0]["width"] = "wide"
    save_checkpoint_atomic(checkpoint, tmp_path / "nonsense.pt")
    with pytest.raises(ModelError, match=r"nonsense.pt \(member 1\): width 'wide' is not a positive number"):
        load_model(str(tmp_path / "nonsense.pt"))
    checkpoint["members"][0]["width"] = 48
    checkpoint["members"][1]["dilations"] = [1, 2, 4]  # fewer layers than the weights hold
    save_checkpoint_atomic(checkpoint, tmp_path / "shallower.pt")
    with pytest.raises(ModelError, match=r"shallower.pt \(member 2\): weights do not fit"):
        load_model(str(tmp_path / "shallower.pt"))
    checkpoint["members"][1]["dilations"] = [1, 0]
    save_checkpoint_atomic(checkpoint, tmp_path / "zero.pt")
    with pytest.raises(ModelError, match=r"zero.pt \(member 2\): dilations \[1, 0\] are not one positive"):
        load_model(str(tmp_path / "zero.pt"))
    checkpoint["members"][1]["dilations"] = [1, 2, 4, 2, 1, 1]
    checkpoint["members"][1]["activation"] = "tanh"
    save_checkpoint_atomic(checkpoint, tmp_path / "tanh.pt")
    with pytest.raises(ModelError, match=r"tanh.pt \(member 2\): activation 'tanh' is not one of relu, silu"):
        load_model(str(tmp_path / "tanh.pt"))


def test_the_student_reads_the_slide_at_20x_without_resampling():
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    frame = coarser_frame(choose_frame(info), STUDENT_UPSCALE)
    assert frame.frame_scale == 1.0 and abs(frame.mpp - 0.499) < 1e-9
    window = read_frame_window(info, frame, np.arange(1000, 1016), np.arange(700, 720))
    from wsi_lymph.slides.reader import read_region

    np.testing.assert_array_equal(window, read_region(info, 0, 700, 1000, 20, 16)[..., ::-1].astype(np.float32))


def test_reinhard_moves_an_image_to_the_reference_statistics_pixel_by_pixel():
    import tifffile

    rgb = tifffile.imread(CROPS / "example_2.tif")
    source = lab_statistics(rgb)
    reference = lab_statistics(tifffile.imread(CROPS / "example_1.tif"))
    shifted = np.clip(rgb.astype(int) + np.array([25, -10, -30]), 0, 255).astype(np.uint8)
    transform = ReinhardTransform(lab_statistics(shifted), reference)
    out = transform(shifted)
    after = lab_statistics(out)
    # The shift moved the mean colour far from the reference; the transform brings it back.
    assert np.abs(np.subtract(lab_statistics(shifted).mean, reference.mean)).max() > 5
    assert np.abs(np.subtract(after.mean, reference.mean)).max() < 1.5
    # Per-pixel: a crop of the transformed image is the transform of the crop.
    np.testing.assert_array_equal(transform(shifted[10:40, 20:70]), out[10:40, 20:70])
    assert source != after


def test_the_fast_reinhard_path_equals_scikit_images_conversions():
    """The per-pixel path every block takes against the definition by ``rgb2lab`` / ``lab2rgb`` in float64."""
    import tifffile

    reference = lab_statistics(tifffile.imread(CROPS / "example_1.tif"))
    rng = np.random.default_rng(7)
    every_colour = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    slide = read_region(open_slide(SLIDES / "cmu-1-small-region.svs"), 0, 300, 900, 700, 500)
    # A strong shift (dark, saturated: many colours leave the gamut and are clipped) and the slide's own.
    for source in (LabStatistics((45.0, 35.0, -30.0), (25.0, 15.0, 12.0)), lab_statistics(slide)):
        transform = ReinhardTransform(source, reference)
        for rgb in (every_colour, slide):
            fast, definition = transform(rgb), reference_reinhard(rgb, source, reference)
            assert fast.dtype == np.uint8 and fast.shape == rgb.shape
            difference = np.abs(fast.astype(int) - definition)
            assert difference.max() <= 1  # float32 against float64 rounding, at a level's boundary
            assert (difference > 0).mean() < 1e-4


def test_the_colour_table_returns_each_colour_as_computed_whichever_block_met_it_first():
    """A worker remembers each colour's result; looked up or computed, every block gets the same pixels."""
    import pickle

    from wsi_lymph.detection.stain import _tables

    slide = read_region(open_slide(SLIDES / "cmu-1-small-region.svs"), 0, 300, 900, 700, 500)
    blocks = [slide[:300, :400], slide[200:, 300:], slide[:300, :400], slide]  # overlapping, one repeated
    for source in (lab_statistics(slide), LabStatistics((45.0, 35.0, -30.0), (25.0, 15.0, 12.0))):
        transform = pickle.loads(pickle.dumps(ReinhardTransform(source, lab_statistics(slide[:100]))))
        tables = _tables(transform.source, transform.reference)
        for rgb in blocks:
            computed = tables.compute(rgb.reshape(-1, 3)).reshape(rgb.shape)
            np.testing.assert_array_equal(transform(rgb), computed)
        known = tables.known[tables.known != 0].view(np.uint8).reshape(-1, 4)
        assert len(known) == len(np.unique(slide.reshape(-1, 3), axis=0)) and np.all(known[:, 3] == 1)


def test_the_paper_stain_reference_is_that_of_the_annotated_crops():
    from wsi_lymph.constants import PAPER_STAIN_REFERENCE
    from wsi_lymph.training.distill import reference_statistics

    measured = reference_statistics(sorted(CROPS.glob("example_?.tif")))
    np.testing.assert_allclose(PAPER_STAIN_REFERENCE["mean"], measured.mean, atol=1e-3)
    np.testing.assert_allclose(PAPER_STAIN_REFERENCE["std"], measured.std, atol=1e-3)


def test_the_shipped_student_matches_its_sha256_and_model_card():
    import json

    import pooch

    from wsi_lymph.constants import DEFAULT_MODEL
    from wsi_lymph.models.checkpoints import load_checkpoint_members
    from wsi_lymph.models.registry import SHIPPED_MODELS, SHIPPED_SHA256, resolve_model

    [path] = resolve_model(DEFAULT_MODEL, fetch_missing=False)
    assert path == SHIPPED_MODELS[DEFAULT_MODEL] and pooch.file_hash(str(path)) == SHIPPED_SHA256[DEFAULT_MODEL]
    card = json.loads(path.with_name(f"{DEFAULT_MODEL}.card.json").read_text())
    members, meta = load_checkpoint_members(path)  # weights_only=True inside
    assert card["sha256"] == SHIPPED_SHA256[DEFAULT_MODEL]
    assert meta["arch"] == STUDENT_ARCH == card["arch"] and meta["threshold"] == card["threshold"]
    # Every member runs on every pixel: the model's cost is theirs summed, still within the budget.
    assert len(members) == len(card.get("members", [None]))
    assert card["flops_per_20x_px"] == sum(net.flops_per_input_px() for net, _ in members) <= 0.2e6
    assert 494e6 / card["flops_per_20x_px"] >= 2000
    assert meta["stain_norm"] == "reinhard" and card["teacher"]["name"] == "janowczyk2016"
    assert len(card["teacher"]["member_sha256"]) == 5
    trained = {im["name"] for im in card["images"] if im["role"] == "train"}
    held_out = {im["name"] for im in card["images"] if im["role"] == "heldout"}
    assert trained and held_out and not trained & held_out
    # The annotated crops decide the threshold and are never trained on.
    assert not any("lymph-centers" in im["source"] for im in card["images"])


def test_a_damaged_shipped_model_is_refused(tmp_path, monkeypatch):
    from wsi_lymph.constants import DEFAULT_MODEL
    from wsi_lymph.models import registry
    from wsi_lymph.models.checkpoints import ModelError

    damaged = tmp_path / "student.pt"
    damaged.write_bytes(registry.SHIPPED_MODELS[DEFAULT_MODEL].read_bytes()[:-10] + b"0123456789")
    monkeypatch.setitem(registry.SHIPPED_MODELS, DEFAULT_MODEL, damaged)
    with pytest.raises(ModelError, match="damaged"):
        registry.resolve_model(DEFAULT_MODEL)


def test_detect_with_defaults_works_offline_on_an_empty_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = os.environ.copy() | {
        "WSI_LYMPH_CACHE": str(tmp_path / "empty-cache"),
        # Nothing can be fetched from here: any download attempt would fail the run.
        "WSI_LYMPH_MODEL_SOURCE": (tmp_path / "nowhere").as_uri(),
    }
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES / "cmu-1-small-region.svs"), "--out", str(out),
         "--region", "700,1000,300,300", "--keep-map", "--workers", "1", "--dashboard", ":0"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "cmu-1-small-region" / "summary.json").read_text())
    assert summary["model"]["name"] == "wsi-lymph-student" and summary["count"] > 0
    assert summary["params"]["stain_norm"] == "auto"
    assert not (tmp_path / "empty-cache" / "models").exists()
    metadata = json.loads((out / "cmu-1-small-region" / "prob.zarr" / "zarr.json").read_text())
    assert metadata["attributes"]["wsi_lymph"]["stain_normalisation"]["method"] == "reinhard"
    assert metadata["chunk_grid"]["configuration"]["chunk_shape"] == [1024, 1024]  # the student's default chunks


def test_stain_normalised_maps_are_the_same_for_any_block_layout(client, tmp_path):
    from wsi_lymph.engine.batch import run_probmaps
    from wsi_lymph.engine.params import ProbmapParams
    from wsi_lymph.io.probmap_store import open_probmap

    maps = []
    for block in (512, 1024):
        # Every block classified: which blocks the hematoxylin skip leaves at 0 depends on the block size.
        params = ProbmapParams(chunk_px=256, block_px=block, dtype="float32", region_level0=(700, 1000, 300, 260),
                               skip_hematoxylin=False)
        [result] = run_probmaps(client, [SLIDES / "cmu-1-small-region.svs"], tmp_path / str(block), params=params,
                                progress=False, log=lambda _: None)
        assert result.status == "done", result.reason
        maps.append(np.asarray(open_probmap(result.output)[0]))
    assert maps[0].max() > 0.5
    np.testing.assert_array_equal(maps[0], maps[1])
