"""Run the CLI as a driver and watch its cluster: job states, network sockets, a worker job removed mid-run.

Shared by the end-to-end tests on the single-node Slurm of ``.ci/slurm-setup.sh`` (``test_slurm.py``: ``sbatch``,
``squeue``, ``scancel``; ``test_pbs.py``: ``#PBS`` job scripts through Slurm's ``qsub``/``qstat``/``qdel`` wrappers,
Debian's ``slurm-wlm-torque``) and by the loopback checks of local clusters (``test_cluster.py``).

Every test cluster binds to loopback: ``tests/conftest.py`` sets ``wsi-lymph.cluster.interface: lo`` for the whole
session (subprocesses included) and the job profiles below say ``interface: lo``.  :class:`SocketWatch` checks it
from the outside, on the driver's process tree and on the worker processes the jobs started.
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
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from wsi_lymph.engine.cluster import ClusterError, dask_client

#: A job profile for the single-node Slurm (partition debug), as ``--profile <kind>-test``.
PROFILE = """\
jobqueue:
  {kind}-test:
    name: {name}
    queue: debug
    cores: 1
    memory: {memory}
    processes: 1
    walltime: "00:15:00"
    # Dask's GPU resource without a GPU: each fold task asks for GPU=1, so a worker trains one fold at a time.
    # The worker's own diagnostics page listens on every interface unless told (interface: lo does not reach it).
    worker-extra-args: ["--resources", "GPU=1", "--dashboard-address", "127.0.0.1:0"]
    job-extra-directives: []
    job-script-prologue: {prologue}
    log-directory: {logs}
    local-directory: {scratch}
    # Scheduler and workers on loopback: no test traffic leaves the machine (SocketWatch checks it).
    interface: lo
"""

#: Addresses a test's sockets may use.
LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def require_scheduler(kind: str) -> None:
    """Skip (fail in CI) unless the single-node Slurm, and for ``pbs`` its qsub/qstat/qdel wrappers, are there."""
    tools = ["sinfo", "squeue"] + (["qsub", "qstat", "qdel"] if kind == "pbs" else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI: .ci/run must run .ci/slurm-setup.sh before the tests")
        pytest.skip(f"no {' '.join(missing)} on this machine; `sudo bash .ci/slurm-setup.sh` installs Slurm "
                    "and its PBS wrappers (slurm-wlm-torque)")
    node = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert node.returncode == 0 and node.stdout.strip(), f"Slurm does not answer: {node.stderr}"


def write_profile(folder: Path, kind: str, name: str, *, memory: str = "2GB", logs: Path | None = None,
                  prologue: str = '["export OMP_NUM_THREADS=1"]') -> Path:
    """``folder/jobqueue.yaml`` with the section ``jobqueue.<kind>-test``; ``logs=None``: the submit folder.

    Slurm's qsub wrapper names the job logs itself (``<script>.o<id>``, ``.e<id>`` in the submit folder): it passes
    ``-o``/``-e`` to sbatch, which override the ``#PBS -o``/``-e`` lines of a log directory.
    """
    profile = folder / "jobqueue.yaml"
    profile.write_text(PROFILE.format(kind=kind, name=name, memory=memory, prologue=prologue,
                                      logs=logs if logs is not None else "null", scratch=folder / "scratch"))
    return profile


def jobs(name: str) -> dict[str, str]:
    """Job id -> Slurm state of the jobs called ``name``: PBS jobs through the wrappers are Slurm jobs too.

    ``squeue`` filters by the full name; ``qstat`` would cut it to 16 characters.
    """
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def wait_until_no_jobs(name: str, timeout_s: float = 30) -> dict[str, str]:
    """Wait for the jobs called ``name`` to leave the queue; what is left then."""
    deadline = time.monotonic() + timeout_s
    while (left := jobs(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# ------------------------------------------------------------------------------------------ sockets
@dataclass
class SocketWatch:
    """The inet sockets of a driver's process tree and of the Dask workers its jobs started, sampled during a run.

    ``listening`` holds ``(role, address)`` of every listening socket seen, roles ``driver`` (the CLI: scheduler,
    dashboard), ``local worker`` (its children: a local cluster's nannies and workers) and ``job worker`` (processes
    a PBS/Slurm job started for the scheduler); ``foreign`` describes every socket with an end outside loopback (a
    listener on 0.0.0.0 counts: it accepts connections from any machine).
    """

    driver_pid: int
    scheduler_port: int | None = None
    listening: set[tuple[str, str]] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)

    def processes(self) -> list[tuple[str, psutil.Process]]:
        """The driver, its descendants, and (once the scheduler's port is known) job workers and their children."""
        found: list[tuple[str, psutil.Process]] = []
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            driver = psutil.Process(self.driver_pid)
            found = [("driver", driver)] + [("local worker", child) for child in driver.children(recursive=True)]
        if self.scheduler_port:
            mark = f":{self.scheduler_port} "
            for process in psutil.process_iter(["cmdline"]):
                cmdline = " ".join(process.info["cmdline"] or []) + " "
                if "distributed.cli.dask_worker" in cmdline and mark in cmdline:
                    with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        found += [("job worker", p) for p in (process, *process.children(recursive=True))]
        return found

    def sample(self) -> None:
        """Record the sockets the processes have now."""
        for role, process in self.processes():
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                for sock in process.net_connections(kind="inet"):
                    ends = [end for end in (sock.laddr, sock.raddr) if end]
                    if sock.status == psutil.CONN_LISTEN:
                        self.listening.add((role, f"{sock.laddr.ip}:{sock.laddr.port}"))
                    if any(end.ip not in LOOPBACK for end in ends):
                        self.foreign.add(f"{role} pid {process.pid} {sock.status} "
                                         + " -> ".join(f"{end.ip}:{end.port}" for end in ends))


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class DriverRun:
    """What a CLI run printed and what was watched while it ran."""

    returncode: int
    output: str
    sockets: SocketWatch
    seconds: float


def run_driver(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 300,
               on_poll: Callable[[str], None] | None = None, poll_s: float = 0.5) -> DriverRun:
    """Run ``wsi-lymph COMMAND…`` and sample its sockets (and call ``on_poll(output so far)``) until it ends."""
    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "wsi_lymph.cli", *command], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env or os.environ.copy())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    sockets = SocketWatch(driver.pid)
    try:
        while driver.poll() is None:
            assert time.monotonic() - started < timeout_s, (f"{command[0]} did not finish in {timeout_s:.0f} s:\n"
                                                            + "".join(lines))
            text = "".join(lines)
            if sockets.scheduler_port is None and (address := re.search(r"Dask scheduler: \S+:(\d+)", text)):
                sockets.scheduler_port = int(address.group(1))
            sockets.sample()
            if on_poll is not None:
                on_poll(text)
            time.sleep(poll_s)
        reader.join(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    output = "".join(lines)
    print(output)
    return DriverRun(driver.returncode, output, sockets, time.monotonic() - started)


def assert_on_loopback(run: DriverRun, roles: set[str]) -> None:
    """Every socket seen was on loopback, and listening sockets of each of ``roles`` (process names) were seen."""
    assert not run.sockets.foreign, sorted(run.sockets.foreign)
    seen = {name for name, _ in run.sockets.listening}
    assert roles <= seen, (roles, sorted(run.sockets.listening))
    if scheduler := re.search(r"Dask scheduler: (\S+)", run.output):
        assert re.fullmatch(r"(tls|tcp)://127\.0\.0\.1:\d+", scheduler.group(1)), scheduler.group(1)
    print(f"{len(run.sockets.listening)} listening sockets, all on loopback: {sorted(run.sockets.listening)}")


# ------------------------------------------------------------------------------------------ shared scenarios
def cv_with_a_removed_job(kind: str, tmp_path: Path, *, remove: str, folds: int, iterations: int,
                          images: int = 10, timeout_s: float = 420) -> None:
    """``cv --cluster KIND --jobs 2`` over TLS on loopback; once a fold has a checkpoint, ``remove`` (``scancel``,
    ``qdel``) one running job: its fold still finishes (resumed by a replacement job), and every check holds.
    """
    from wsi_lymph.training.synthetic import make_synthetic_dataset

    require_scheduler(kind)
    name = f"wsi-lymph-{kind}-{os.getpid()}"
    data, out, logs = tmp_path / "data", tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    make_synthetic_dataset(data, n_images=images, seed=1)
    # Slurm writes the job logs to the profile's log directory, the qsub wrapper to the submit folder (cwd).
    profile = write_profile(tmp_path, kind, name, logs=logs if kind == "slurm" else None)
    env = os.environ | {
        "WSI_LYMPH_CACHE": str(tmp_path / "cache"),  # the private certificate folder goes under it
        "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "2s",  # notice the removed job sooner
    }
    seen: dict[str, set[str]] = {}  # job id -> states seen
    state = {"most_running": 0, "removed": None, "dashboard": None, "private_mode": None}

    def poll(text: str) -> None:
        current = jobs(name)
        for job, job_state in current.items():
            seen.setdefault(job, set()).add(job_state)
        state["most_running"] = max(state["most_running"], sum(s == "RUNNING" for s in current.values()))
        link = re.search(r"Dask dashboard: (\S+)", text)
        if link and state["dashboard"] is None:
            with urllib.request.urlopen(link.group(1), timeout=10) as response:
                state["dashboard"] = response.status
        private = re.search(r"the workers' copies in (\S+)\)", text)
        if private and state["private_mode"] is None:
            state["private_mode"] = stat.S_IMODE(Path(private.group(1)).stat().st_mode)
        # Once a fold has written a checkpoint, remove a running worker job: its fold must still finish.
        if state["removed"] is None and list(out.glob("fold*/checkpoint-*.pt")):
            running = sorted(job for job, job_state in current.items() if job_state == "RUNNING")
            if running:
                state["removed"] = running[0]
                subprocess.run([remove, running[0]], check=True, timeout=30)

    command = ["cv", str(data), "--out", str(out), "--iterations", str(iterations), "--batch-size", "32",
               "--recipe", "modern", "--arch", "dense", "--max-positive", "200", "--max-negative", "400",
               "--folds", str(folds), "--cluster", kind, "--jobs", "2", "--cluster-config", str(profile),
               "--profile", f"{kind}-test", "--dashboard", "localhost:0"]
    try:
        run = run_driver(command, cwd=logs, env=env, timeout_s=timeout_s, on_poll=poll)
        assert run.returncode == 0, run.output
    finally:
        subprocess.run(["scancel", "-n", name], timeout=30)
    print(f"cv on {kind}: {run.seconds:.0f} s; jobs and their states: {seen}")

    scheduler = re.search(r"Dask scheduler: (\S+)", run.output).group(1)
    assert scheduler.startswith("tls://127.0.0.1:"), scheduler
    assert state["private_mode"] == 0o700
    assert not Path(re.search(r"the workers' copies in (\S+)\)", run.output).group(1)).exists()
    worker_logs = "".join(p.read_text(errors="replace") for p in logs.iterdir() if p.is_file())
    assert re.search(r"Start worker at:\s+tls://127\.0\.0\.1:", worker_logs), worker_logs[-2000:]
    assert_on_loopback(run, {"driver", "job worker"})
    assert state["dashboard"] == 200
    # Both jobs were in the queue and ran side by side; the removed one was replaced.
    assert state["most_running"] == 2, seen
    assert state["removed"] is not None, "no fold wrote a checkpoint while the jobs ran"
    assert len(seen) >= 3, f"no replacement job after removing {state['removed']}: {seen}"
    report = json.loads((out / "cv_report.json").read_text())
    assert [fold["fold"] for fold in report["folds"]] == list(range(1, folds + 1))
    for fold in report["folds"]:
        assert fold["training"]["final_metrics"]["iteration"] == iterations
        assert (out / f"fold{fold['fold']}" / "fold_report.json").is_file()
    # The cluster cancelled its jobs on the way out.
    assert not wait_until_no_jobs(name)


def jobs_ending_without_a_worker_stop_the_driver(kind: str, tmp_path: Path) -> None:
    """A broken prologue (a module that does not load, a wrong venv): the jobs end at once, and the driver, asking
    the status tool (squeue, qstat) about them, stops with a message instead of waiting forever.
    """
    from wsi_lymph.training.synthetic import make_synthetic_dataset

    require_scheduler(kind)
    name = f"wsi-lymph-broken-{kind}-{os.getpid()}"
    make_synthetic_dataset(tmp_path / "data", n_images=2, seed=1)
    logs = tmp_path / "logs"
    logs.mkdir()
    profile = write_profile(tmp_path, kind, name, logs=logs if kind == "slurm" else None, prologue='["exit 3"]')
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", "patches", str(tmp_path / "data"), "--out",
                          str(tmp_path / "patches.zarr"), "--cluster", kind, "--cluster-config", str(profile),
                          "--profile", f"{kind}-test", "--dashboard", "localhost:0"],
                         capture_output=True, text=True, timeout=180, cwd=logs,
                         env=os.environ | {"WSI_LYMPH_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2, run.stdout + run.stderr
    where = str(logs) if kind == "slurm" else "the folder the jobs were submitted from"
    assert "ended without a worker joining" in run.stderr and where in run.stderr, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    print(f"stopped after {time.monotonic() - started:.1f} s: {run.stderr.strip().splitlines()[-1]}")
    assert not jobs(name)


def a_refused_submission_stops_the_driver(kind: str, tmp_path: Path, refusal: str) -> None:
    """The submit tool refuses the job (no such queue): its message (``refusal``, a regular expression) is the
    error, not a wait for workers forever; nothing is left in the queue or on disk.
    """
    require_scheduler(kind)
    name = f"wsi-lymph-refused-{kind}-{os.getpid()}"
    profile = write_profile(tmp_path, kind, name, logs=tmp_path / "logs")
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"submitting the {kind} worker jobs failed(?s:.*){refusal}"), \
            dask_client(cluster=kind, config_file=profile, profile=f"{kind}-test", jobs=2, quiet=True,
                        job_options={"queue": "no-such-partition"}, dashboard_address="localhost:0",
                        tls_dir=tmp_path / "tls"):
        pytest.fail("the cluster started without its jobs")
    assert time.monotonic() - started < 60
    assert not jobs(name)
    assert list((tmp_path / "tls").iterdir()) == []  # the private certificate folder went with the cluster
