"""``--cluster pbs`` for real: ``#PBS`` job scripts through Slurm's ``qsub``/``qstat``/``qdel`` wrappers.

Debian's ``slurm-wlm-torque`` puts PBS-style commands over the single-node Slurm of ``.ci/slurm-setup.sh``: ``qsub``
hands the job script (with its ``#PBS`` lines) to ``sbatch``, ``qstat`` prints Slurm's jobs in Torque's format,
``qdel`` cancels.  dask-jobqueue's ``PBSCluster`` drives them as it would PBS Pro, so the PBS entry of
``CLUSTER_KINDS`` (how ``qstat`` says whether a job is still alive) is tested here against a real ``qstat``.  The
job-script syntax of PBS Pro stays pinned by ``tests/golden/pbs-gpu.sh`` (``test_cluster.py``).

Where the wrapper differs from PBS Pro: an ended job is listed as ``C`` (Torque's "completed") for Slurm's
``MinJobAge`` (60 s here), ids it does not know give no output at all and exit status 153, and the job logs go to
the submit folder as ``<script>.o<id>``/``.e<id>`` whatever the profile's ``log-directory`` says.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from cluster_harness import (
    a_refused_submission_stops_the_driver,
    assert_on_loopback,
    cv_with_a_removed_job,
    jobs,
    jobs_ending_without_a_worker_stop_the_driver,
    require_scheduler,
    run_driver,
    wait_until_no_jobs,
    write_profile,
)
from conftest import CROPS

from wsi_lymph.engine.cluster import CLUSTER_KINDS

PBS_SCRIPT = """\
#!/bin/sh
#PBS -N {name}
#PBS -q debug
#PBS -l select=1:ncpus=1:mem=100MB
#PBS -l walltime=00:05:00
sleep 120
"""


def _qstat(*ids: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["qstat", *ids], capture_output=True, text=True, timeout=60)
    print(f"$ qstat {' '.join(ids)}  (exit status {result.returncode})\n{result.stdout}{result.stderr}", end="")
    return result


def test_the_pbs_entry_reads_a_real_qstat(tmp_path):
    """A #PBS job through qsub: active while queued or running, ended once qdel'd (state C) and once forgotten."""
    require_scheduler("pbs")
    pbs = CLUSTER_KINDS["pbs"]
    script = tmp_path / "sleep.pbs"
    script.write_text(PBS_SCRIPT.format(name=f"pbs-state-{os.getpid()}"))
    submitted = subprocess.run(["qsub", str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.strip()
    try:
        listed = _qstat(job)
        assert listed.returncode == 0 and listed.stdout.splitlines()[-1].split()[4] in {"Q", "R"}
        assert pbs.parse_status([job], listed) == {job}
        assert pbs.active_jobs([job]) == {job}
    finally:
        subprocess.run(["qdel", job], check=True, timeout=60)
    # Slurm keeps the cancelled job for MinJobAge: qstat lists it as C (Torque's "completed"), which has ended.
    for _ in range(20):
        ended = _qstat(job)
        if ended.stdout.strip() and ended.stdout.splitlines()[-1].split()[4] == "C":
            break
        time.sleep(0.5)
    assert ended.returncode == 0 and ended.stdout.splitlines()[-1].split()[4] == "C", ended.stdout
    assert pbs.parse_status([job], ended) == set()
    assert pbs.active_jobs([job]) == set()
    # An id qstat does not know: no output, exit status 153 (PBS's "unknown job id"): ended, not "cannot say".
    unknown = _qstat("999999")
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (153, "", "")
    assert pbs.parse_status(["999999"], unknown) == set()
    assert pbs.active_jobs([job, "999999"]) == set()


def test_cv_on_pbs_over_tls_survives_a_worker_job_removed_with_qdel(tmp_path):
    cv_with_a_removed_job("pbs", tmp_path, remove="qdel", folds=2, iterations=20, images=4, timeout_s=240)


def test_detect_on_pbs_replaces_a_job_removed_while_queued(model_cache, tmp_path):
    """detect with 2 jobs of which only one fits the node: the queued one, qdel'd, is found ended by qstat and
    replaced; the slide is still done, and every socket stayed on loopback."""
    require_scheduler("pbs")
    name = f"wsi-lymph-pbs-detect-{os.getpid()}"
    node_mb = int(subprocess.run(["sinfo", "-h", "-o", "%m"], capture_output=True, text=True, timeout=30,
                                 check=True).stdout.split()[0])
    logs = tmp_path / "logs"
    logs.mkdir()
    # Each job asks for 60 % of the node's memory: one runs, the other waits in the queue (reason: Resources).
    profile = write_profile(tmp_path, "pbs", name, memory=f"{node_mb * 6 // 10}MB")
    env = os.environ | {
        "DASK_WSI_LYMPH__CLUSTER__STATUS_INTERVAL": "1s",  # ask qstat about jobs without a worker every second
        "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "2s",
    }
    seen: dict[str, set[str]] = {}
    state: dict[str, str | None] = {"deleted": None}

    def poll(text: str) -> None:
        current = jobs(name)
        for job, job_state in current.items():
            seen.setdefault(job, set()).add(job_state)
        pending = sorted(job for job, job_state in current.items() if job_state == "PENDING")
        if state["deleted"] is None and pending and "RUNNING" in current.values():
            _qstat(*sorted(current))
            state["deleted"] = pending[0]
            subprocess.run(["qdel", pending[0]], check=True, timeout=60)

    out = tmp_path / "out"
    command = ["detect", str(CROPS / "example_1.tif"), "--out", str(out), "--mpp", "0.5", "--stride", "8",
               "--model", "janowczyk2016/fold1", "--cluster", "pbs", "--jobs", "2", "--cluster-config", str(profile),
               "--profile", "pbs-test", "--dashboard", "localhost:0", "--tls-dir", str(tmp_path / "tls")]
    try:
        run = run_driver(command, cwd=logs, env=env, timeout_s=240, on_poll=poll)
        assert run.returncode == 0, run.output
    finally:
        subprocess.run(["scancel", "-n", name], timeout=30)
    print(f"detect on pbs: {run.seconds:.0f} s; jobs and their states: {seen}")
    assert state["deleted"] is not None, f"no job waited in the queue: {seen}"
    replacements = [job for job in seen if int(job) > int(state["deleted"])]
    assert replacements, f"no job replaced {state['deleted']}, deleted while queued: {seen}"
    batch = json.loads((out / "batch.json").read_text())
    assert [slide["status"] for slide in batch["slides"]] == ["done"]
    assert json.loads((out / "example_1" / "summary.json").read_text())["count"] > 0
    assert_on_loopback(run, {"driver", "job worker"})
    assert not wait_until_no_jobs(name)


def test_jobs_that_end_without_a_worker_stop_the_driver_through_qstat(tmp_path):
    jobs_ending_without_a_worker_stop_the_driver("pbs", tmp_path)


def test_a_refused_submission_stops_the_driver_with_qsubs_message(tmp_path):
    a_refused_submission_stops_the_driver("pbs", tmp_path, refusal="(?i:invalid partition)")
