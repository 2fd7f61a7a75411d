"""An interrupted detect run (SIGKILL mid-slide) resumes: it recomputes only the missing blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import SLIDES

ARGS = ["--model", "janowczyk2016/fold1", "--stride", "4", "--chunk", "128", "--no-skip",
        "--region", "700,1000,200,200", "--workers", "1", "--dashboard", ":0"]


def _detect(out, extra=(), **popen):
    command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES / "cmu-1-small-region.svs"),
               "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy(), **popen)


@pytest.mark.shared_data
def test_sigkill_mid_slide_then_resume(tmp_path, model_cache):
    reference = tmp_path / "uninterrupted"
    done = _detect(reference)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    out = tmp_path / "interrupted"
    run = _detect(out, start_new_session=True)
    manifest = out / "cmu-1-small-region" / ".prob.zarr.partial.blocks"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 12:
            break
        assert run.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the CLI and its local cluster, with no chance to clean up
    run.wait(timeout=30)
    finished_before = len(manifest.read_text().splitlines())
    assert not (out / "cmu-1-small-region" / "prob.zarr").exists()

    again = _detect(out)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    report = json.loads((out / "cmu-1-small-region" / "probmap.json").read_text())
    full = json.loads((reference / "cmu-1-small-region" / "probmap.json").read_text())
    assert report["blocks_resumed"] >= finished_before >= 12
    assert report["patches"] < full["patches"]  # less than the whole slide was recomputed
    assert not manifest.exists()

    np.testing.assert_array_equal(
        zarr.open_array(str(out / "cmu-1-small-region" / "prob.zarr"))[:],
        zarr.open_array(str(reference / "cmu-1-small-region" / "prob.zarr"))[:],
    )
    for name in ("centers.csv", "centers.geojson"):
        assert (out / "cmu-1-small-region" / name).read_text() == (reference / "cmu-1-small-region" / name).read_text()

    # A finished slide is not recomputed; --force recomputes it, every block, to the same outputs.
    skip = _detect(out)
    assert skip.wait(timeout=300) == 0 and "already done" in skip.stdout.read()
    forced = _detect(out, extra=["--force"])
    forced_out, forced_err = forced.communicate(timeout=300)
    assert forced.returncode == 0, forced_err
    assert "already done" not in forced_out
    report = json.loads((out / "cmu-1-small-region" / "probmap.json").read_text())
    assert report["blocks_resumed"] == 0 and report["patches"] == full["patches"]
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "cmu-1-small-region" / "prob.zarr"))[:],
        zarr.open_array(str(reference / "cmu-1-small-region" / "prob.zarr"))[:],
    )
    for name in ("centers.csv", "centers.geojson"):
        assert (out / "cmu-1-small-region" / name).read_text() == (reference / "cmu-1-small-region" / name).read_text()
