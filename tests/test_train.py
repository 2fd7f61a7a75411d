"""Training: learning on a separable synthetic patch set, metrics, checkpoints, kill-and-resume, determinism."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsi_lymph.models.architectures import DENSE_ARCH
from wsi_lymph.models.networks import DensePatchNet, PatchNet, dense_probabilities, patch_probabilities
from wsi_lymph.models.registry import load_model
from wsi_lymph.training.train import METRIC_COLUMNS, TrainingError, roc_auc, train_model

REPO = Path(__file__).resolve().parents[1]
N_PATCHES = 256
TRAIN = np.arange(0, 192)
VAL = np.arange(192, N_PATCHES)


def make_patch_set(path: Path, n: int = N_PATCHES, seed: int = 0) -> Path:
    """Pink noise with a dark purple disk (radius 5 px): centred = lymphocyte (1), 9-14 px off-centre = 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    patches = np.empty((n, 32, 32, 3), np.uint8)
    label = (np.arange(n) % 2).astype(np.uint8)
    for i in range(n):
        img = rng.normal([220, 170, 200], 12, (32, 32, 3))
        if label[i]:
            cy, cx = 16 + rng.uniform(-1, 1, 2)
        else:
            angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(9, 14)
            cy, cx = 16 + radius * np.sin(angle), 16 + radius * np.cos(angle)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = rng.normal([70, 50, 120], 10, 3)
        patches[i] = np.clip(img, 0, 255)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("patches", data=patches, chunks=(64, 32, 32, 3))
    group.create_array("label", data=label)
    group.create_array("kind", data=label.copy())
    group.create_array("rotation_deg", data=np.zeros(n, np.int16))
    group.create_array("center_rc", data=np.full((n, 2), 16, np.int32))
    group.create_array("image_index", data=(np.arange(n) // 32).astype(np.int32))
    group.attrs["image_ids"] = [f"im{k}" for k in range(n // 32)]
    return path


@pytest.fixture(scope="module")
def patch_set(tmp_path_factory) -> Path:
    return make_patch_set(tmp_path_factory.mktemp("patches") / "patches.zarr")


def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize(("recipe", "arch"), [("paper", "paper"), ("modern", "dense")])
def test_loss_decreases_and_model_loads(tmp_path, patch_set, recipe, arch):
    out = tmp_path / "run"
    lines: list[str] = []
    path = train_model(
        patch_set, TRAIN, VAL, out, recipe=recipe, arch=arch, iterations=40, batch_size=16,
        checkpoint_every=10, eval_every=10, seed=3, device="cpu", fold=2, log=lines.append,
    )
    assert path == out / "model.pt"
    rows = read_metrics(out)
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["iteration"]) for r in rows] == [10, 20, 30, 40]
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.5 * first and last < 0.3
    assert float(rows[-1]["val_accuracy"]) >= 0.95 and float(rows[-1]["val_auc"]) >= 0.98
    assert json.loads((out / "metrics.json").read_text())["rows"][-1]["iteration"] == 40
    # Only the last two training checkpoints are kept.
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-30.pt", "checkpoint-40.pt"]
    assert any("iteration 40/40" in line for line in lines)

    model = load_model(str(path))
    net, mean = model.members[0]
    assert isinstance(net, DensePatchNet if arch == "dense" else PatchNet)
    assert model.meta["fold"] == 2 and model.meta["channel_order"] == "BGR" and model.model_mpp == 0.125
    assert model.meta["training"]["recipe"] == recipe
    group = zarr.open_group(str(patch_set), mode="r")
    val_rgb = group["patches"][int(VAL[0]) :]
    bgr = torch.from_numpy(np.ascontiguousarray(val_rgb[..., ::-1].transpose(0, 3, 1, 2))).float()
    with torch.inference_mode():
        prob = patch_probabilities(net, bgr, mean, mirror=True).numpy()
    assert roc_auc(prob, group["label"][int(VAL[0]) :]) >= 0.98
    if arch == "dense":
        assert model.meta["arch"] == DENSE_ARCH
        # A trained dense model also evaluates fully convolutionally.
        window = np.ascontiguousarray(val_rgb[0, :, :, ::-1], dtype=np.float32)
        assert dense_probabilities(model.members, window).shape == (1, 1)


def test_two_runs_identical_and_settings_checked(tmp_path, patch_set):
    kwargs = dict(iterations=6, batch_size=8, checkpoint_every=3, eval_every=3, seed=11, device="cpu")
    a = train_model(patch_set, TRAIN, VAL, tmp_path / "a", arch="dense", **kwargs)
    b = train_model(patch_set, TRAIN, VAL, tmp_path / "b", arch="dense", **kwargs)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A finished run called again returns at once and leaves its log alone.
    before = (tmp_path / "a" / "metrics.csv").read_text()
    assert train_model(patch_set, TRAIN, VAL, tmp_path / "a", arch="dense", **kwargs) == a
    assert (tmp_path / "a" / "metrics.csv").read_text() == before
    with pytest.raises(TrainingError, match=r"seed: checkpoint has 11, this call has 12"):
        train_model(patch_set, TRAIN, VAL, tmp_path / "a", arch="dense", **{**kwargs, "seed": 12})
    with pytest.raises(TrainingError, match="train_indices"):
        train_model(patch_set, TRAIN[1:], VAL, tmp_path / "a", arch="dense", **kwargs)
    with pytest.raises(TrainingError, match="overlap"):
        train_model(patch_set, TRAIN, TRAIN[:5], tmp_path / "c", **kwargs)


KILL_RUN = dict(
    recipe="paper", arch="paper", iterations=24, batch_size=8, checkpoint_every=8, eval_every=4, seed=5, device="cpu"
)


def test_killed_run_resumes_to_identical_weights(tmp_path, patch_set):
    """SIGKILL a training process after checkpoint 8 and metric row 12, resume, compare with an uninterrupted run."""
    killed = tmp_path / "killed"
    # The child blocks in its log callback right after writing metric row 12, so the kill lands mid-run
    # (past checkpoint 8, before checkpoint 16) whatever the machine's speed.  Same thread count as here,
    # since CPU reductions may be split differently for another count.
    code = (
        "import time, numpy as np, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from wsi_lymph.training.train import train_model\n"
        "def log(line):\n"
        "    if line.startswith('iteration 12/'):\n"
        "        time.sleep(600)\n"
        f"train_model({str(patch_set)!r}, np.arange(0, 192), np.arange(192, 256), {str(killed)!r}, log=log,"
        f" **{KILL_RUN!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not any(r["iteration"] == "12" for r in _rows_if_any(killed)):
            assert proc.poll() is None, "training process ended before it could be killed"
            assert time.monotonic() < deadline, "training process did not reach iteration 12"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoint-8.pt").is_file() and not (killed / "checkpoint-16.pt").exists()
    assert not (killed / "model.pt").exists()

    resumed_log: list[str] = []
    final = train_model(patch_set, TRAIN, VAL, killed, log=resumed_log.append, **KILL_RUN)
    assert resumed_log[0].startswith("resuming") and "iteration 8/24" in resumed_log[0]
    reference = train_model(patch_set, TRAIN, VAL, tmp_path / "reference", **KILL_RUN)

    # Bit-identical weights and Adagrad state, same final iteration.
    w_resumed, w_reference = weights(final), weights(reference)
    assert all(torch.equal(w_resumed[k], w_reference[k]) for k in w_reference)
    last = torch.load(killed / "checkpoint-24.pt", map_location="cpu", weights_only=True)
    assert last["iteration"] == 24
    w_opt, ref_opt = last["optimizer"]["state"], torch.load(
        tmp_path / "reference" / "checkpoint-24.pt", map_location="cpu", weights_only=True
    )["optimizer"]["state"]
    assert all(torch.equal(w_opt[k]["sum"], ref_opt[k]["sum"]) for k in ref_opt)
    # The log continues: row 12 (written after checkpoint 8) was dropped and recomputed, no gaps or duplicates.
    rows, ref_rows = read_metrics(killed), read_metrics(tmp_path / "reference")
    assert [int(r["iteration"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref_rows)
    json_rows = json.loads((killed / "metrics.json").read_text())["rows"]
    assert [r["iteration"] for r in json_rows] == [4, 8, 12, 16, 20, 24]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)  # elapsed time carries over the resume


def _rows_if_any(out_dir: Path) -> list[dict]:
    try:
        return read_metrics(out_dir)
    except FileNotFoundError:
        return []


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.integers(0, 2, 200)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert roc_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert np.isnan(roc_auc(scores, np.zeros(200)))
    assert roc_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
