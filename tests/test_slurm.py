"""A real Slurm end to end: ``wsi-lymph cv --cluster slurm --jobs 2`` with TLS workers, one job cancelled mid-fold.

Needs the single-node Slurm of ``.ci/slurm-setup.sh`` (partition ``debug``; ``.ci/run`` starts it). Outside CI a
machine without Slurm skips these tests; in CI (``CI`` set) a missing Slurm fails them.  The scenarios are shared
with ``test_pbs.py`` (the same Slurm through its PBS wrappers) in ``cluster_harness.py``; every cluster binds to
loopback and the runs check it.
"""

from __future__ import annotations

import os
import subprocess
import time

from cluster_harness import (
    a_refused_submission_stops_the_driver,
    cv_with_a_removed_job,
    jobs_ending_without_a_worker_stop_the_driver,
    require_scheduler,
)

from wsi_lymph.engine.cluster import CLUSTER_KINDS


def test_cv_on_slurm_over_tls_survives_a_cancelled_worker_job(tmp_path):
    cv_with_a_removed_job("slurm", tmp_path, remove="scancel", folds=5, iterations=100)


def test_jobs_that_end_without_a_worker_stop_the_driver_with_a_message(tmp_path):
    """A broken prologue (a module that does not load, a wrong venv) must not leave the driver waiting forever."""
    jobs_ending_without_a_worker_stop_the_driver("slurm", tmp_path)


def test_the_slurm_entry_tells_a_queued_job_from_an_ended_one(tmp_path):
    """squeue through the table: a job is active while queued or running, not once cancelled or gone."""
    require_scheduler("slurm")
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
    a_refused_submission_stops_the_driver("slurm", tmp_path, refusal="(?i:invalid partition)")
