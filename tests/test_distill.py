"""``wsi-lymph distill`` end to end on tiny data through a real LocalCluster, interrupted and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pooch
import pytest
import torch
from conftest import CROPS, SLIDES
from scipy import ndimage

from wsi_lymph.cli.main import main
from wsi_lymph.detection.stain import lab_statistics
from wsi_lymph.models.architectures import STUDENT_ARCH
from wsi_lymph.models.checkpoints import load_checkpoint_members
from wsi_lymph.models.networks import SubpixelStudentNet
from wsi_lymph.training.distill import (
    RUN_SETTINGS_FILE,
    DistillPair,
    claim_out_dir,
    copy_view,
    input_normalisation,
    read_plan,
    reference_statistics,
    run_settings,
    sample_batch,
    scaled_crop,
    stain_copy,
    train_student,
    turned_copy,
)
from wsi_lymph.training.settings import RECIPE_FIELDS_ADDED, StudentRecipe


def _plan(folder: Path) -> Path:
    slide = str(SLIDES / "cmu-1-small-region.svs")
    plan = {"images": [
        {"name": "a", "path": slide, "region": [700, 1000, 48, 48], "role": "train"},
        {"name": "b", "path": slide, "region": [1000, 1100, 48, 48], "role": "train"},
        {"name": "c", "path": slide, "region": [800, 1200, 40, 40], "role": "heldout"},
    ]}
    path = folder / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def _distill(plan: Path, out: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "wsi_lymph.cli", "distill", str(plan), "--crops", str(CROPS), "--out", str(out),
               "--teacher", "janowczyk2016/fold1", "--teacher-stride", "8", "--iterations", "60",
               "--batch-size", "4", "--checkpoint-every", "20", "--stain-copies", "1", "--turned-copies", "1",
               "--members", "2", "--workers", "1",
               "--dashboard", ":0"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.shared_data
@pytest.mark.slow
def test_ctrl_c_while_students_train_ends_on_the_interrupt_line(tmp_path, model_cache):
    # Ctrl-C reaches the whole process group.  The workers run their training task on until the driver stops the
    # cluster; nothing they print, nor multiprocessing's leaked-semaphore warning, may follow the driver's line.
    command = [sys.executable, "-m", "wsi_lymph.cli", "distill", str(_plan(tmp_path)), "--crops", str(CROPS),
               "--out", str(tmp_path / "distill"), "--teacher", "janowczyk2016/fold1", "--teacher-stride", "8",
               "--iterations", "5000", "--batch-size", "4", "--stain-copies", "0", "--workers", "2",
               "--dashboard", ":0"]
    run = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    lines = []
    for line in run.stdout:  # until both students have printed a training step
        lines.append(line)
        if sum(line.startswith("step ") for line in lines) >= 2:
            break
    assert run.poll() is None, "".join(lines)
    os.killpg(run.pid, signal.SIGINT)
    rest, _ = run.communicate(timeout=120)
    assert run.returncode == 130, "".join(lines) + rest
    assert rest.strip().splitlines()[-1] == "wsi-lymph distill: interrupted; run the same command again to resume"
    after = rest.split("wsi-lymph distill: interrupted")[1]
    assert "step " not in after and "leaked" not in rest and "Traceback" not in rest, rest


@pytest.mark.shared_data
@pytest.mark.slow
def test_distill_runs_end_to_end_and_resumes_after_a_kill(tmp_path, model_cache):
    env = os.environ.copy()
    out = tmp_path / "distill"
    plan = _plan(tmp_path)
    first = _distill(plan, out, env)
    state = out / "training" / "student-state-20.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), first.communicate()[0] if first.poll() is not None else "no checkpoint in time"
    os.killpg(first.pid, signal.SIGKILL)  # the command, its scheduler and its worker: a machine that went away
    first.wait()
    assert not (out / "model.pt").exists()

    second = _distill(plan, out, env)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    assert "Traceback" not in output

    card = json.loads((out / "model-card.json").read_text())
    # Resumed: training went on from a checkpoint of the killed run, not from step 0.
    assert card["evaluation"]["training_resumed_from_step"][0] >= 20
    # Two students, seeds 0 and 1, each trained in its own folder, both in the one model file.
    members, meta = load_checkpoint_members(out / "model.pt")
    assert card["members"] == [{"seed": 0, "training": "training"}, {"seed": 1, "training": "training-member2"}]
    assert len(members) == 2 and (out / "training-member2" / "student-state-60.pt").is_file()
    first, second = (dict(net.named_parameters()) for net, _ in members)
    assert not torch.equal(first["head.weight"], second["head.weight"])
    assert meta["arch"] == STUDENT_ARCH and meta["stain_norm"] == "reinhard"
    assert card["sha256"] == pooch.file_hash(str(out / "model.pt"))
    assert card["threshold"] == meta["threshold"] and 0.3 <= meta["threshold"] < 1
    assert card["flops_per_20x_px"] <= 0.2e6 and card["recipe"]["iterations"] == 60
    assert card["teacher"]["name"] == "janowczyk2016/fold1" and len(card["teacher"]["member_sha256"]) == 1
    # The stain reference stored with the model is that of the crops, and every plan image is on record.
    reference = reference_statistics(sorted(CROPS.glob("example_?.tif")))
    np.testing.assert_allclose(meta["stain_reference"]["mean"], reference.mean, atol=1e-9)
    names = {entry["name"]: entry for entry in card["images"]}
    assert set(names) == {im.name for im in read_plan(plan)}
    assert names["c"]["role"] == "heldout" and len(names["a"]["prepared_sha256"]) == 64
    # One stain-jittered copy of each training image, mapped by the teacher like the originals (none of the held-out).
    assert card["recipe"]["stain_copies"] == 1
    assert [c["name"] for c in names["a"]["stain_copies"]] == ["a-stain1"] and names["c"]["stain_copies"] == []
    assert names["a"]["stain_copies"][0]["sha256"] == pooch.file_hash(str(out / "images" / "a-stain1.tif"))
    assert json.loads((out / RUN_SETTINGS_FILE).read_text())["teacher_stride"] == 8  # what a rerun must match
    assert sorted(p.name for p in (out / "images").glob("*-stain*.tif")) == ["a-stain1.tif", "b-stain1.tif"]
    assert all((out / "teacher" / name / "prob.zarr" / "zarr.json").is_file() for name in ("a-stain1", "b-stain1"))
    # And one turned copy of each, mapped by the teacher too, its orientation on record.
    assert card["recipe"]["turned_copies"] == 1 and names["c"]["turned_copies"] == []
    [turned] = names["a"]["turned_copies"]
    assert turned["name"] == "a-turn1" and turned["quarter_turns_and_flip"] == list(copy_view("a", 1, seed=0))
    assert (out / "teacher" / "b-turn1" / "prob.zarr" / "zarr.json").is_file()
    # Scores: leave-one-crop-out over the 3 crops, concordance on the held-out image, the stain-shift curve.
    loco = card["evaluation"]["crops_leave_one_out"]
    assert [row["image"] for row in loco["per_crop"]] == ["example_1", "example_2", "example_3"]
    assert "c" in card["evaluation"]["concordance"]["per_image"]
    assert len(card["evaluation"]["stain_shift_f"]) == 10
    # The prepared images are normalised to the reference domain.
    import tifffile

    prepared = tifffile.imread(out / "images" / "a.tif")
    assert abs(lab_statistics(prepared).mean[2] - reference.mean[2]) < 8


@pytest.mark.shared_data
def test_a_rerun_with_other_settings_is_refused_before_it_reuses_the_folder(tmp_path, capsys):
    plan = _plan(tmp_path)
    out = tmp_path / "distill"
    reference = reference_statistics(sorted(CROPS.glob("example_?.tif")))
    settings = run_settings(read_plan(plan), reference, StudentRecipe(), "janowczyk2016/fold1", 8)
    claim_out_dir(out, settings)
    record = (out / RUN_SETTINGS_FILE).read_text()
    claim_out_dir(out, settings)  # the same settings: the folder is reused

    # Another seed would reuse stain copies drawn from the old one: refused before a cluster starts, exit 2.
    argv = ["distill", str(plan), "--crops", str(CROPS), "--out", str(out), "--teacher", "janowczyk2016/fold1",
            "--teacher-stride", "8", "--seed", "1"]
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and f"--out {out}" in err and "seed 0 (now 1)" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [RUN_SETTINGS_FILE]
    assert (out / RUN_SETTINGS_FILE).read_text() == record

    # Another plan region would reuse the old prepared image.
    moved = json.loads(plan.read_text())
    moved["images"][0]["region"] = [710, 1000, 48, 48]
    plan.write_text(json.dumps(moved))
    with pytest.raises(ValueError, match=f"{RUN_SETTINGS_FILE}: this folder was made with another plan"):
        claim_out_dir(out, run_settings(read_plan(plan), reference, StudentRecipe(), "janowczyk2016/fold1", 8))


def test_a_plan_without_names_or_with_an_unknown_role_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"images": [{"path": "a.tif"}]}))
    with pytest.raises(ValueError, match="plan.json: image 1 of the plan needs a 'name' and a 'path'"):
        read_plan(bad)
    bad.write_text(json.dumps({"images": [{"name": "a", "path": "a.tif", "role": "test"}]}))
    with pytest.raises(ValueError, match="role 'test'"):
        read_plan(bad)


@pytest.mark.shared_data
@pytest.mark.parametrize("mistake", ["not json", "no images", "missing file", "region outside"])
def test_plan_mistakes_are_usage_errors_found_before_any_cluster(tmp_path, capsys, mistake):
    plan = _plan(tmp_path)
    entries = json.loads(plan.read_text())
    if mistake == "not json":
        plan.write_text("{images: [")
    elif mistake == "no images":
        plan.write_text(json.dumps({"about": "nothing"}))
    elif mistake == "missing file":
        entries["images"][1]["path"] = str(tmp_path / "gone.svs")
        plan.write_text(json.dumps(entries))
    else:
        entries["images"][2]["region"] = [2200, 2900, 48, 48]  # level 0 is 2220 x 2967 px
        plan.write_text(json.dumps(entries))
    out = tmp_path / "distill"
    try:
        status = main(["distill", str(plan), "--crops", str(CROPS), "--out", str(out), "--dashboard", ":0"])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    assert status == 2, err
    assert err.count("\n") == 1 and str(plan) in err and "Traceback" not in err, err
    named = {"missing file": "gone.svs: no such file", "region outside": "region [2200, 2900, 48, 48]"}
    assert named.get(mistake, "not a distillation plan") in err, err
    assert "Dask dashboard" not in captured.out  # no cluster was started
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.shared_data
def test_a_plan_image_whose_pixels_cannot_be_decoded_fails_in_one_line_with_its_traceback_in_the_log(tmp_path):
    import tifffile

    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    image = tmp_path / "broken.tif"
    tifffile.imwrite(image, pixels, photometric="rgb", tile=(128, 128), compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(image) as tif:  # the header stays readable, the tiles' JPEG data is gone
        spans = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts, strict=True))
    data = bytearray(image.read_bytes())
    for offset, count in spans:
        data[offset:offset + count] = bytes(count)
    image.write_bytes(bytes(data))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"images": [{"name": "broken", "path": str(image)}]}))
    out = tmp_path / "distill"
    run = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", "distill", str(plan), "--crops", str(CROPS),
                          "--out", str(out), "--workers", "1", "--dashboard", ":0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    # One line naming the file and the decoder's complaint; not the worker's "Compute Failed" dump.
    assert run.stderr.count("\n") == 1, run.stderr
    assert f"{image}: cannot read the pixels of plan image 'broken' (Jpeg8Error" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr and "Compute Failed" not in run.stdout + run.stderr
    assert "Traceback" in (out / "wsi-lymph.log").read_text()  # kept for whoever debugs it


def test_a_scaled_crop_keeps_the_teacher_map_on_its_pixels():
    rng = np.random.default_rng(1)
    inputs = rng.uniform(0, 255, (120, 130, 3)).astype(np.float32)
    target = rng.uniform(0, 1, (480, 520)).astype(np.float32)
    # Magnification 1 at an integer origin is the plain crop: the window and the map of its centre, as stored.
    x, y = scaled_crop(DistillPair("noise", inputs, target), 7.0, 11.0, 40, 9, 1.0)
    np.testing.assert_array_equal(x, inputs[7:65, 11:69])
    np.testing.assert_array_equal(y, target[64:224, 80:240])

    # A smooth image whose map is its own 4x bilinear enlargement: magnified (or shrunk) crops keep that relation.
    rows, cols = np.mgrid[0:120, 0:130]
    smooth = (np.sin(rows / 7.0) + np.cos(cols / 5.0)).astype(np.float32)
    pair = DistillPair("smooth", np.repeat(smooth[..., None], 3, axis=-1),
                       ndimage.zoom(smooth, 4, order=1, grid_mode=True, mode="nearest").astype(np.float32))
    for magnification in (0.9, 1.1):
        x, y = scaled_crop(pair, 10.3, 12.7, 40, 9, magnification)
        enlarged = ndimage.zoom(x[9:-9, 9:-9, 0], 4, order=1, grid_mode=True, mode="nearest")
        # A shift of one model-frame pixel would differ by ~0.05 where the image changes fastest.
        assert np.abs(enlarged - y)[8:-8, 8:-8].max() < 0.015

    batch_x, batch_y = sample_batch([pair], StudentRecipe(batch_size=3, scale_jitter=0.1), 9, step=0)
    assert batch_x.shape == (3, 3, 58, 58) and batch_y.shape == (3, 1, 160, 160)


def test_stain_copies_carry_the_jitter_instead_of_the_crops(tmp_path):
    """A copy is the image with its stain perturbed once (same size and µm/px, the same on a rerun); with copies,
    crops are drawn unperturbed."""
    import tifffile

    rng = np.random.default_rng(3)
    image = tmp_path / "a" / "img.tif"
    image.parent.mkdir()
    rgb = rng.integers(60, 230, (50, 60, 3), dtype=np.uint8)
    tifffile.imwrite(image, rgb, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    copy = stain_copy(image, 1, 0.08, seed=0)
    assert copy == image.with_name("img-stain1.tif")
    with tifffile.TiffFile(copy) as tif:
        jittered = tif.pages[0].asarray()
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)
    assert jittered.shape == rgb.shape and np.abs(jittered.astype(int) - rgb).mean() > 1
    again = tmp_path / "b" / "img.tif"
    again.parent.mkdir()
    tifffile.imwrite(again, rgb, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    np.testing.assert_array_equal(tifffile.imread(stain_copy(again, 1, 0.08, seed=0)), jittered)
    assert not np.array_equal(tifffile.imread(stain_copy(again, 2, 0.08, seed=0)), jittered)

    pair = DistillPair("noise", rng.uniform(0, 255, (80, 80, 3)).astype(np.float32),
                       rng.uniform(0, 1, (320, 320)).astype(np.float32))
    copies, plain, on_the_fly = (sample_batch([pair], StudentRecipe(batch_size=2, **fields), 9, step=0)[0]
                                 for fields in ({"stain_copies": 1}, {"stain_jitter": 0.0}, {"stain_copies": 0}))
    np.testing.assert_array_equal(copies, plain)
    assert not np.array_equal(copies, on_the_fly)


def test_turned_copies_are_the_other_seven_orientations_of_the_image_each_once(tmp_path):
    """Copies 1 to 7 of an image are its 7 non-identity flips/rotations, each once, with the image's µm/px (x and
    y swapped by a quarter turn); a rerun writes the same copy, and images do not all turn alike."""
    import tifffile

    rng = np.random.default_rng(6)
    image = tmp_path / "img.tif"
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(image, rgb, photometric="rgb", resolution=(2e4, 1e4), resolutionunit="CENTIMETER")
    views = {(turns, flip): np.rot90(rgb, turns)[:, ::-1] if flip else np.rot90(rgb, turns)
             for turns in range(4) for flip in (False, True)}
    found = []
    for copy in range(1, 8):
        path = turned_copy(image, copy, seed=0)
        assert path == image.with_name(f"img-turn{copy}.tif")
        with tifffile.TiffFile(path) as tif:
            pixels = tif.pages[0].asarray()
            x_res, y_res = (tif.pages[0].tags[t].value for t in ("XResolution", "YResolution"))
        [view] = [v for v, turned in views.items() if turned.shape == pixels.shape and np.array_equal(turned, pixels)]
        assert view == copy_view("img", copy, seed=0)
        assert (x_res, y_res) == (((10000, 1), (20000, 1)) if view[0] % 2 else ((20000, 1), (10000, 1)))
        found.append(view)
    assert sorted(found) == sorted(v for v in views if v != (0, False))
    before = turned_copy(image, 1, seed=0).stat().st_mtime_ns
    assert turned_copy(image, 1, seed=0).stat().st_mtime_ns == before  # reused, not written again
    assert len({copy_view(name, 1, seed=0) for name in "abcdefgh"}) > 1
    with pytest.raises(ValueError, match="turned copy 8"):
        copy_view("img", 8, seed=0)


def test_a_plan_image_named_like_a_copy_is_refused(tmp_path):
    plan = tmp_path / "plan.json"
    for name in ("a-turn1", "a-stain2", "x/y", ""):
        plan.write_text(json.dumps({"images": [{"name": name, "path": "a.tif"}]}))
        with pytest.raises(ValueError, match=f"plan.json: image name {name!r}"):
            read_plan(plan)


def test_without_flip_rotate_crops_are_windows_of_the_image_as_scanned():
    """Each crop is a window of the image, unturned, with the teacher's map of its centre as stored; with
    ``flip_rotate`` the step's batch is another."""
    rng = np.random.default_rng(5)
    pair = DistillPair("noise", rng.uniform(0, 255, (70, 75, 3)).astype(np.float32),
                       rng.uniform(0, 1, (280, 300)).astype(np.float32))
    recipe = StudentRecipe(batch_size=8, stain_jitter=0.0, stain_copies=0, scale_jitter=0.0, flip_rotate=False)
    inputs, targets = sample_batch([pair], recipe, 9, step=0)
    for x, y in zip(inputs, targets, strict=True):
        [(i, j)] = [(i, j) for i in range(70 - 58 + 1) for j in range(75 - 58 + 1)
                    if np.array_equal(pair.inputs_bgr[i:i + 58, j:j + 58].transpose(2, 0, 1), x)]
        np.testing.assert_array_equal(y[0], pair.target[4 * (i + 9):4 * (i + 49), 4 * (j + 9):4 * (j + 49)])
    turned, _ = sample_batch([pair], replace(recipe, flip_rotate=True), 9, step=0)
    assert not np.array_equal(turned, inputs)


def test_train_student_trains_the_network_it_is_given(tmp_path):
    """A network passed in (wider here, or the shipped one to train further) is the one trained and returned."""
    rng = np.random.default_rng(2)
    pair = DistillPair("noise", rng.uniform(0, 255, (80, 80, 3)).astype(np.float32),
                       rng.uniform(0, 1, (320, 320)).astype(np.float32))
    wide = SubpixelStudentNet((50.0, 50.0, 50.0), width=16)
    before = wide.conv5.weight.detach().clone()
    recipe = StudentRecipe(iterations=3, batch_size=2, checkpoint_every=3)
    net, _, start = train_student([pair], tmp_path, recipe, net=wide, log=lambda message: None)
    assert net is wide and start == 0 and net.conv5.out_channels == 16
    assert not torch.equal(net.conv5.weight, before)  # trained, not just handed back


def test_train_student_draws_its_batches_from_the_sampler_it_is_given_and_resumes_at_the_next_step(tmp_path):
    """A sampler passed in is asked for each step's batch (the bench draws some crops elsewhere); resumed, it is
    asked only for the steps not yet trained.  Trained on its all-zero targets, the map goes down everywhere."""
    rng = np.random.default_rng(3)
    pair = DistillPair("noise", rng.uniform(0, 255, (80, 80, 3)).astype(np.float32),
                       rng.uniform(0, 1, (320, 320)).astype(np.float32))
    asked = []

    def zeros(pairs, recipe, halo_px, step):
        asked.append(step)
        inputs, targets = sample_batch(pairs, recipe, halo_px, step)
        return inputs, np.zeros_like(targets)

    recipe = StudentRecipe(iterations=6, batch_size=2, checkpoint_every=3, lr=1e-2)
    torch.manual_seed(recipe.seed)
    window = torch.from_numpy(pair.inputs_bgr[:40, :40].transpose(2, 0, 1)[None].copy())
    mean_bgr, std_bgr = input_normalisation([pair])
    mean = torch.as_tensor(mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)
    before = torch.sigmoid(SubpixelStudentNet(tuple(std_bgr))(window - mean)).mean()
    train_student([pair], tmp_path, replace(recipe, iterations=3), log=lambda message: None, sample=zeros)
    state = torch.load(tmp_path / "student-state-3.pt", weights_only=True)
    state["recipe"]["iterations"] = 6  # the same run, continued
    torch.save(state, tmp_path / "student-state-3.pt")
    net, _, start = train_student([pair], tmp_path, recipe, log=lambda message: None, sample=zeros)
    assert asked == [0, 1, 2, 3, 4, 5] and start == 3
    with torch.no_grad():
        after = torch.sigmoid(net(window - mean)).mean()
    assert after < 0.5 * before


def test_a_checkpoint_from_before_a_recipe_field_resumes_only_the_recipe_it_was_trained_with(tmp_path):
    """A checkpoint saved before ``scale_jitter``, ``stain_copies``, ``flip_rotate`` and ``turned_copies`` existed
    was trained with
    the values of :data:`RECIPE_FIELDS_ADDED` (no jitter, no copies, flips/rotations on), whatever today's defaults
    are: it resumes that recipe and refuses one that differs in any of them.  Resuming also removes the
    hidden temporary file of a save that a kill cut short."""
    rng = np.random.default_rng(4)
    pair = DistillPair("noise", rng.uniform(0, 255, (80, 80, 3)).astype(np.float32),
                       rng.uniform(0, 1, (320, 320)).astype(np.float32))
    old = StudentRecipe(iterations=4, batch_size=2, checkpoint_every=2, scale_jitter=0.0, stain_copies=0,
                        flip_rotate=True)
    train_student([pair], tmp_path, replace(old, iterations=2), log=lambda message: None)
    [state_path] = tmp_path.glob("student-state-2.pt")
    state = torch.load(state_path, weights_only=True)
    for field in RECIPE_FIELDS_ADDED:
        del state["recipe"][field]
    state["recipe"]["iterations"] = 4
    torch.save(state, state_path)
    for changed in ({"scale_jitter": 0.1}, {"stain_copies": 1}, {"flip_rotate": False}, {"turned_copies": 1}):
        with pytest.raises(ValueError, match="saved with another recipe"):
            train_student([pair], tmp_path, replace(old, **changed), log=lambda message: None)
    (tmp_path / ".student-state-4.pt.x1y2z3.tmp").write_bytes(b"")  # a save a kill cut short
    _, _, start = train_student([pair], tmp_path, old, log=lambda message: None)
    assert start == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student-state-2.pt", "student-state-4.pt"]
