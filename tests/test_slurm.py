"""A real Slurm end to end: ``wsi-lymph cv --cluster slurm --jobs 2`` with TLS workers, one job cancelled mid-fold.

Needs the single-node Slurm of ``.ci/slurm-setup.sh`` (partition ``debug``; ``.ci/run`` starts it). Outside CI a
machine without Slurm skips this test; in CI (``CI`` set) a missing Slurm fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from wsi_lymph.engine.cluster import CLUSTER_KINDS, ClusterError, dask_client
from wsi_lymph.training.synthetic import make_synthetic_dataset

PROFILE = """\
jobqueue:
  slurm-test:
    name: {name}
    queue: debug
    cores: 1
    memory: 2GB
    processes: 1
    walltime: "00:15:00"
    # Dask's GPU resource without a GPU: each fold task asks for GPU=1, so a worker trains one fold at a time.
    worker-extra-args: ["--resources", "GPU=1"]
    job-extra-directives: []
    job-script-prologue: ["export OMP_NUM_THREADS=1"]
    log-directory: {logs}
    local-directory: {scratch}
"""


def _require_slurm() -> None:
    if shutil.which("sinfo") is None:
        if os.environ.get("CI"):
            pytest.fail("Slurm is missing in CI: .ci/run must run .ci/slurm-setup.sh before the tests")
        pytest.skip("no Slurm on this machine (sinfo absent); `sudo bash .ci/slurm-setup.sh` installs one")
    node = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert node.returncode == 0 and node.stdout.strip(), f"Slurm does not answer: {node.stderr}"


def _jobs(name: str) -> dict[str, str]:
    """Job id -> state of the jobs called ``name`` in ``squeue``."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def test_cv_on_slurm_over_tls_survives_a_cancelled_worker_job(tmp_path):
    _require_slurm()
    name = f"wsi-lymph-test-{os.getpid()}"
    data, out, logs = tmp_path / "data", tmp_path / "out", tmp_path / "logs"
    make_synthetic_dataset(data, n_images=10, seed=1)
    profile = tmp_path / "jobqueue.yaml"
    profile.write_text(PROFILE.format(name=name, logs=logs, scratch=tmp_path / "scratch"))
    env = os.environ | {
        "WSI_LYMPH_CACHE": str(tmp_path / "cache"),  # the private certificate folder goes under it
        "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "2s",  # notice the cancelled job sooner
    }
    command = [sys.executable, "-m", "wsi_lymph.cli", "cv", str(data), "--out", str(out), "--iterations", "100",
               "--batch-size", "32", "--recipe", "modern", "--arch", "dense", "--max-positive", "200",
               "--max-negative", "400", "--folds", "5", "--cluster", "slurm", "--jobs", "2",
               "--cluster-config", str(profile), "--profile", "slurm-test", "--dashboard", "localhost:0"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    seen: dict[str, set[str]] = {}  # job id -> states seen
    most_running, cancelled, dashboard, private_mode = 0, None, None, None
    try:
        deadline = time.monotonic() + 420
        while driver.poll() is None:
            assert time.monotonic() < deadline, "cv on Slurm did not finish in 7 min:\n" + "".join(lines)
            jobs = _jobs(name)
            for job, state in jobs.items():
                seen.setdefault(job, set()).add(state)
            most_running = max(most_running, sum(state == "RUNNING" for state in jobs.values()))
            text = "".join(lines)
            link = re.search(r"Dask dashboard: (\S+)", text)
            if link and dashboard is None:
                with urllib.request.urlopen(link.group(1), timeout=10) as response:
                    dashboard = response.status
            private = re.search(r"the workers' copies in (\S+)\)", text)
            if private and private_mode is None:
                private_mode = stat.S_IMODE(Path(private.group(1)).stat().st_mode)
            # Once a fold has written a checkpoint, cancel a running worker job: its fold must still finish.
            if cancelled is None and list(out.glob("fold*/checkpoint-*.pt")):
                running = sorted(job for job, state in jobs.items() if state == "RUNNING")
                if running:
                    cancelled = running[0]
                    subprocess.run(["scancel", cancelled], check=True, timeout=30)
            time.sleep(0.5)
        reader.join(timeout=30)
        output = "".join(lines)
        print(output)
        assert driver.returncode == 0, output
    finally:
        if driver.poll() is None:
            driver.kill()
        subprocess.run(["scancel", "-n", name], timeout=30)

    scheduler = re.search(r"Dask scheduler: (\S+)", output).group(1)
    assert scheduler.startswith("tls://"), scheduler
    assert private_mode == 0o700
    assert not Path(re.search(r"the workers' copies in (\S+)\)", output).group(1)).exists()
    worker_logs = "".join(p.read_text() for p in logs.glob("*.err"))
    assert re.search(r"Start worker at:\s+tls://", worker_logs), worker_logs[-2000:]
    assert dashboard == 200
    # Both jobs were in squeue and ran side by side; the cancelled one was replaced.
    assert most_running == 2, seen
    assert cancelled is not None, "no fold wrote a checkpoint while the jobs ran"
    assert len(seen) >= 3, f"no replacement job after cancelling {cancelled}: {seen}"
    report = json.loads((out / "cv_report.json").read_text())
    assert [fold["fold"] for fold in report["folds"]] == [1, 2, 3, 4, 5]
    for fold in report["folds"]:
        assert fold["training"]["final_metrics"]["iteration"] == 100
        assert (out / f"fold{fold['fold']}" / "fold_report.json").is_file()
    # The cluster cancelled its jobs on the way out.
    for _ in range(60):
        if not _jobs(name):
            break
        time.sleep(0.5)
    assert not _jobs(name), _jobs(name)


def test_jobs_that_end_without_a_worker_stop_the_driver_with_a_message(tmp_path):
    """A broken prologue (a module that does not load, a wrong venv) must not leave the driver waiting forever."""
    _require_slurm()
    name = f"wsi-lymph-broken-{os.getpid()}"
    make_synthetic_dataset(tmp_path / "data", n_images=2, seed=1)
    profile = tmp_path / "jobqueue.yaml"
    profile.write_text(PROFILE.format(name=name, logs=tmp_path / "logs", scratch=tmp_path / "scratch").replace(
        'job-script-prologue: ["export OMP_NUM_THREADS=1"]', 'job-script-prologue: ["exit 3"]'))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", "patches", str(tmp_path / "data"), "--out",
                          str(tmp_path / "patches.zarr"), "--cluster", "slurm", "--cluster-config", str(profile),
                          "--profile", "slurm-test", "--dashboard", "localhost:0"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env=os.environ | {"WSI_LYMPH_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ended without a worker joining" in run.stderr and str(tmp_path / "logs") in run.stderr, run.stderr
    print(f"stopped after {time.monotonic() - started:.1f} s: {run.stderr.strip().splitlines()[-1]}")
    assert not _jobs(name)


def test_the_slurm_entry_tells_a_queued_job_from_an_ended_one(tmp_path):
    """squeue through the table: a job is active while queued or running, not once cancelled or gone."""
    _require_slurm()
    slurm = CLUSTER_KINDS["slurm"]
    submitted = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-J", f"wsi-lymph-state-{os.getpid()}",
                                "-c", "1", "--mem=100M", "-o", str(tmp_path / "job.out"), "--wrap", "sleep 120"],
                               capture_output=True, text=True, timeout=30, check=True)
    job = submitted.stdout.strip().split(";")[0]
    try:
        assert slurm.active_jobs([job]) == {job}
    finally:
        subprocess.run(["scancel", job], timeout=30)
    for _ in range(60):
        if slurm.active_jobs([job]) == set():
            break
        time.sleep(0.5)
    assert slurm.active_jobs([job]) == set(), subprocess.run(["squeue", "-j", job], capture_output=True, text=True)


def test_a_refused_submission_stops_the_driver_with_sbatchs_message(tmp_path):
    """sbatch refuses the job (no such partition): its message is the error, not a wait for workers forever."""
    _require_slurm()
    name = f"wsi-lymph-refused-{os.getpid()}"
    profile = tmp_path / "jobqueue.yaml"
    profile.write_text(PROFILE.format(name=name, logs=tmp_path / "logs", scratch=tmp_path / "scratch"))
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"submitting the slurm worker jobs failed(?s:.*)(?i:invalid partition)"), \
            dask_client(cluster="slurm", config_file=profile, profile="slurm-test", jobs=2, quiet=True,
                        job_options={"queue": "no-such-partition"}, dashboard_address="localhost:0",
                        tls_dir=tmp_path / "tls"):
        pytest.fail("the cluster started without its jobs")
    assert time.monotonic() - started < 60
    assert not _jobs(name)
    assert list((tmp_path / "tls").iterdir()) == []  # the private certificate folder went with the cluster
