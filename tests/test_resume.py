"""Interrupted detect runs end with the outputs of an uninterrupted one, byte for byte.

SIGKILL of the CLI (and its local cluster) at a random block, then the same command again: only the missing
blocks are recomputed.  SIGKILL of a worker process mid-run: the nanny starts another, its tasks run again,
and the run completes.  The block the kill lands on is drawn at random; ``WSI_LYMPH_TEST_SEED`` replays a draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from conftest import SLIDES

SLIDE = "cmu-1-small-region"
# The default (student) model, 10 x 10 blocks of 128 model-frame px.  The student takes ~20 ms a block here, so
# the kills are drawn in the first half: the blocks left give the poll below a second or more to see the count.
ARGS = ["--chunk", "128", "--block", "128", "--no-skip", "--keep-map", "--region", "700,1000,300,300", "--workers", "1",
        "--dashboard", "127.0.0.1:0"]
BLOCKS = 100
# Written per run: timings, how many blocks this run took over, where it wrote.
VOLATILE = {"summary.json": ("timings_s", "blocks_resumed"),
            "probmap.json": ("seconds", "blocks_resumed", "patches", "output")}


def _detect(out, extra=(), **popen):
    command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDES / f"{SLIDE}.svs"),
               "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy(), **popen)


def _outputs(out: Path) -> dict[str, str]:
    """Every file of the slide's folder by relative path: sha256 of its bytes (reports: without their timings)."""
    files = {}
    for path in sorted((out / SLIDE).rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(out / SLIDE))
        if name in VOLATILE:
            report = json.loads(path.read_text())
            files[name] = json.dumps({k: v for k, v in report.items() if k not in VOLATILE[name]}, sort_keys=True)
        else:
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _draw(low: int, high: int) -> tuple[int, int]:
    seed = int(os.environ.get("WSI_LYMPH_TEST_SEED", time.time_ns() % 2**31))
    return random.Random(seed).randint(low, high), seed


def _wait_for_blocks(run: subprocess.Popen, manifest: Path, count: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= count:
            return
        assert run.poll() is None, f"the run ended before {count} blocks: {run.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} blocks in {timeout_s} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _detect(out)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    return out


@pytest.mark.shared_data
def test_sigkill_at_a_random_block_then_resume(tmp_path, reference):
    kill_after, seed = _draw(1, BLOCKS // 2)
    note = f"(killed after {kill_after} blocks; WSI_LYMPH_TEST_SEED={seed} replays it)"
    out = tmp_path / "interrupted"
    run = _detect(out, start_new_session=True)
    manifest = out / SLIDE / ".prob.zarr.partial.blocks"
    _wait_for_blocks(run, manifest, kill_after)
    os.killpg(run.pid, signal.SIGKILL)  # the CLI and its local cluster, with no chance to clean up
    run.wait(timeout=30)
    finished_before = len(manifest.read_text().splitlines())
    assert not (out / SLIDE / "prob.zarr").exists(), note

    again = _detect(out)
    again_out, again_err = again.communicate(timeout=300)
    assert again.returncode == 0, again_err
    assert "Traceback" not in again_out + again_err
    report = json.loads((out / SLIDE / "probmap.json").read_text())
    full = json.loads((reference / SLIDE / "probmap.json").read_text())
    assert report["blocks_resumed"] >= finished_before >= kill_after, note
    assert report["patches"] < full["patches"], note  # less than the whole slide was recomputed
    assert not manifest.exists()
    assert _outputs(out) == _outputs(reference), note

    # A finished slide is not recomputed; --force recomputes it, every block, to the same outputs.
    skip = _detect(out)
    skip_out, _ = skip.communicate(timeout=300)
    assert skip.returncode == 0 and "already done" in skip_out
    forced = _detect(out, extra=["--force"])
    forced_out, forced_err = forced.communicate(timeout=300)
    assert forced.returncode == 0, forced_err
    assert "already done" not in forced_out
    report = json.loads((out / SLIDE / "probmap.json").read_text())
    assert report["blocks_resumed"] == 0 and report["patches"] == full["patches"]
    np.testing.assert_array_equal(zarr.open_array(str(out / SLIDE / "prob.zarr"))[:],
                                  zarr.open_array(str(reference / SLIDE / "prob.zarr"))[:])
    assert _outputs(out) == _outputs(reference)


@pytest.mark.shared_data
def test_a_killed_worker_is_replaced_and_the_run_completes(tmp_path, reference):
    kill_after, seed = _draw(1, BLOCKS // 2)
    note = f"(worker killed after {kill_after} blocks; WSI_LYMPH_TEST_SEED={seed} replays it)"
    out = tmp_path / "worker-killed"
    run = _detect(out)
    _wait_for_blocks(run, out / SLIDE / ".prob.zarr.partial.blocks", kill_after)
    # The local cluster's worker: a process the CLI started (its nanny lives in the CLI).
    workers = [p for p in psutil.Process(run.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in psutil.Process(run.pid).children()]
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, f"{note}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    assert "1 of 1 slides done" in stdout
    assert _outputs(out) == _outputs(reference), note
