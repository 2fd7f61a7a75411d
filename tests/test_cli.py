"""The command line, run as a user runs it (subprocess, exit status, messages)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_MIRROR, SLIDES


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "wsi_lymph.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env or os.environ.copy())


@pytest.mark.shared_data
def test_info_lists_levels_and_frame():
    run = _cli("info", str(SLIDES / "cmu-1-small-region.svs"), str(SLIDES / "tcga-cr-7395-01a-01-ts1.svs"))
    assert run.returncode == 0, run.stderr
    assert "level 0: 2220 x 2967 px" in run.stdout and "mpp: 0.499" in run.stdout
    assert "level 1: 2221 x 1783 px" in run.stdout and "mpp: None" in run.stdout
    assert "model frame: level 0 x4 -> 8880 x 11868 px" in run.stdout


@pytest.mark.shared_data
def test_models_fetch_and_import_caffe(tmp_path):
    env = os.environ.copy() | {"WSI_LYMPH_CACHE": str(tmp_path / "cache")}

    def listed() -> dict[str, str]:
        run = _cli("models", "list", env=env)
        assert run.returncode == 0, run.stderr
        return {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith(("wsi-lymph", "jan"))}

    before = listed()  # an empty cache: only the shipped student works offline, and listing fetched nothing
    assert len(before) == 7 and "shipped" in before["wsi-lymph-student"] and "(default)" in before["wsi-lymph-student"]
    # The shipped model is several students whose maps are averaged; the listing says how many it loaded.
    assert "2 networks averaged" in before["wsi-lymph-student"]
    assert all("not fetched" in before[name] for name in before if name.startswith("janowczyk2016"))
    assert not (tmp_path / "cache/models/janowczyk2016").exists()
    run = _cli("models", "fetch", "janowczyk2016", "--source", MODEL_MIRROR.as_uri(), env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("fold") >= 5 and (tmp_path / "cache/models/janowczyk2016/fold5.pt").is_file()
    after = listed()
    assert all("cached" in after[name] and "threshold 0.7706" in after[name] and "stain-norm auto = none" in after[name]
               for name in after if name.startswith("janowczyk2016")), after

    bad = _cli("models", "fetch", "janowczyk2016", "--source", (tmp_path / "nowhere").as_uri(), "--force", env=env)
    assert bad.returncode == 1 and "WSI_LYMPH_MODEL_SOURCE" in bad.stderr

    out = tmp_path / "fold2.pt"
    run = _cli("models", "import-caffe", str(MODEL_MIRROR / "2_caffenet_train_w32_iter_600000.caffemodel"),
               str(MODEL_MIRROR / "DB_train_w32_2.binaryproto"), "--out", str(out), "--fold", "2")
    assert run.returncode == 0, run.stderr
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["meta"]["fold"] == 2 and checkpoint["mean_bgr"].shape == (3, 32, 32)

    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\x00\xff" * 50)
    run = _cli("models", "import-caffe", str(garbage), str(MODEL_MIRROR / "DB_train_w32_2.binaryproto"),
               "--out", str(tmp_path / "x.pt"))
    assert run.returncode == 1 and "garbage.caffemodel" in run.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.shared_data
def test_demo_fetches_the_sample_slide_and_detects(tmp_path):
    import csv
    import json

    from conftest import DATA

    env = os.environ.copy() | {
        "WSI_LYMPH_CACHE": str(tmp_path / "cache"),
        "WSI_LYMPH_DATA_SOURCE": (DATA / "slides").as_uri(),
        "WSI_LYMPH_MODEL_SOURCE": MODEL_MIRROR.as_uri(),
    }
    out = tmp_path / "demo"
    run = _cli("demo", "--out", str(out), "--region", "700,1000,200,200", "--workers", "1", "--dashboard", ":0",
               env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cache" / "data" / "CMU-1-Small-Region.svs").stat().st_size == 1_938_955
    slide_dir = out / "CMU-1-Small-Region"
    summary = json.loads((slide_dir / "summary.json").read_text())
    with open(slide_dir / "centers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    features = json.loads((slide_dir / "centers.geojson").read_text())["features"]
    # This 100 x 100 µm region of CMU-1 holds lymphocytes; the count, the table and the GeoJSON agree.
    assert summary["count"] == len(rows) == len(features) > 0
    assert {"centers.csv", "centers.geojson", "summary.json", "prob.ome.zarr"} <= set(summary["outputs"])
    assert not (slide_dir / "prob.zarr").exists()  # the working map goes once the slide is done (no --keep-map)
    for name in summary["outputs"]:
        assert (slide_dir / name).exists(), name

    env["WSI_LYMPH_CACHE"] = str(tmp_path / "other-cache")
    env["WSI_LYMPH_DATA_SOURCE"] = (tmp_path / "empty").as_uri()
    run = _cli("demo", "--out", str(out), env=env)
    assert run.returncode == 1 and "CMU-1-Small-Region.svs" in run.stderr and "--source" in run.stderr


@pytest.mark.shared_data
def test_detect_with_a_missing_model_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import SLIDES

    run = subprocess.run(
        [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES / "cmu-1-small-region.svs"), "--out",
         str(tmp_path), "--model", str(tmp_path / "no-such-model.pt")],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    # A model file named on the command line that is not there is a typo, like a missing slide: exit 2, one line.
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("wsi-lymph detect: --model: unknown model") and "no-such-model.pt" in run.stderr
    assert not any(tmp_path.iterdir())  # refused before any work
