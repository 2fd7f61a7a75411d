"""The cluster factory: PBS/Slurm job scripts of the profiles (golden), TLS that refuses strangers, the dashboard.

The job scripts are pinned by golden files in ``tests/golden/`` (scheduler address, interpreter and certificate
paths replaced by placeholders); regenerate them after a deliberate change with ``WSI_LYMPH_UPDATE_GOLDEN=1``.
A real Slurm cluster runs in ``test_slurm.py``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dask
import pytest
from conftest import CROPS, REPO
from distributed import Client
from distributed.security import Security

from wsi_lymph.engine.cluster import (
    CLUSTER_KINDS,
    ClusterError,
    cluster_kind,
    dask_client,
    dask_config_file,
    jobqueue_cluster,
    jobqueue_job_script,
    resolve_job_options,
    user_security,
    walltime_seconds,
)
from wsi_lymph.models.device import WORKER_MALLOC_ENVIRON

GOLDEN = Path(__file__).parent / "golden"
PROFILES = REPO / "cluster" / "jobqueue.yaml"


def _normalised(script: str) -> str:
    """A job script without what changes from run to run: scheduler address, interpreter, certificate files."""
    script = script.replace(sys.executable, "PYTHON")
    script = re.sub(r"tls://\S+", "tls://SCHEDULER:PORT", script)
    return re.sub(r"\S*/tls-[^/\s]+/\.dask-jobqueue\.worker\.(\w+)\.\S+", r"PRIVATE_TLS_DIR/\1", script)


@pytest.mark.parametrize("kind", ["pbs", "slurm"])
def test_job_scripts_of_the_profiles_match_the_golden_files(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("WSI_LYMPH_CACHE", str(tmp_path))  # the private certificate folder goes there
    with dask.config.set({"wsi-lymph.cluster.interface": None}):  # the shipped profiles as they are (tests: lo)
        script = _normalised(jobqueue_job_script(kind, config_file=PROFILES))
    golden = GOLDEN / f"{kind}-gpu.sh"
    if os.environ.get("WSI_LYMPH_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"{kind} job script changed; WSI_LYMPH_UPDATE_GOLDEN=1 rewrites {golden}"
    # What the golden file must say, spelled out.
    header = {"pbs": ["#PBS -N wsi-lymph", "#PBS -q gpu", "#PBS -l select=1:ncpus=8:ngpus=1:mem=32GB",
                      "#PBS -l walltime=04:00:00", "#PBS -j oe"],
              "slurm": ["#SBATCH -J wsi-lymph", "#SBATCH -p gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G",
                        "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1"]}[kind]
    lines = script.splitlines()
    prologue = ["export MALLOC_ARENA_MAX=1", "module load cuda/12.4", "source $HOME/wsi-lymph/.venv/bin/activate"]
    for line in header + prologue:
        assert line in lines, (line, script)
    worker = lines[-1]
    for part in ("--nthreads 8 ", "--memory-limit 29.80GiB", "--resources GPU=1", "--lifetime 225m",
                 "--lifetime-stagger 5m", "--protocol tls://", "--local-directory ${TMPDIR:-/tmp}",
                 "--tls-ca-file PRIVATE_TLS_DIR/ca_file", "--tls-cert PRIVATE_TLS_DIR/cert",
                 "--tls-key PRIVATE_TLS_DIR/key"):
        assert part in worker, (part, worker)
    assert "--nworkers" not in worker  # one worker process per GPU job


def test_flags_override_the_profile_and_keep_the_lifetime_inside_the_walltime(tmp_path, monkeypatch):
    monkeypatch.setenv("WSI_LYMPH_CACHE", str(tmp_path))
    flags = dict(queue="short", account="proj42", walltime="01:00:00", cores=4, memory="16GB", gpus=2)
    pbs = jobqueue_job_script("pbs", config_file=PROFILES, overrides=flags).splitlines()
    assert {"#PBS -q short", "#PBS -A proj42", "#PBS -l select=1:ncpus=4:ngpus=2:mem=15GB",
            "#PBS -l walltime=01:00:00"} <= set(pbs)
    assert "--nthreads 4 --memory-limit 14.90GiB" in pbs[-1]
    assert "--resources GPU=2 --lifetime 55m --lifetime-stagger 100s" in pbs[-1]  # 55 min ± 100 s < 1 h
    slurm = jobqueue_job_script("slurm", config_file=PROFILES, overrides=flags | {"walltime": "30"}).splitlines()
    assert {"#SBATCH -p short", "#SBATCH -A proj42", "#SBATCH --gres=gpu:2", "#SBATCH -t 30"} <= set(slurm)
    assert "--lifetime 25m --lifetime-stagger 100s" in slurm[-1]
    # CPU-only jobs: no GPU anywhere; a CPU profile over the kind's section.
    cpu = jobqueue_job_script("slurm", config_file=PROFILES, overrides={"gpus": 0})
    assert "gres" not in cpu and "GPU=" not in cpu
    with dask_config_file(PROFILES), dask.config.set({"jobqueue.pbs.account": "site-account"}):
        profile = resolve_job_options("pbs", "pbs-cpu")
    assert profile["queue"] == "workq" and profile["processes"] == 4
    assert profile["account"] == "site-account"  # a key the profile does not set comes from jobqueue.pbs
    with dask.config.set({"jobqueue.mine": {"queue": "q", "cores": 2, "memory": "4GB"}}):
        options = resolve_job_options("slurm", "mine", {"walltime": "2-00:00:00"})
    assert options["queue"] == "q" and options["cores"] == 2
    assert options["worker_extra_args"][-4:] == ["--lifetime", "2736m", "--lifetime-stagger", "48m"]
    assert walltime_seconds("1-02:03:04", "slurm") == 93784 and walltime_seconds("90", "pbs") == 90
    with pytest.raises(ClusterError, match="no profile 'nope'"):
        resolve_job_options("slurm", "nope")
    with pytest.raises(ClusterError, match="local, pbs, slurm"):
        cluster_kind("nonsense")
    # No cores or memory anywhere: one line naming the flags (dask-jobqueue's own text spans lines and shows
    # made-up values), before any job or certificate exists.
    for kind in CLUSTER_KINDS:
        unset = dask.config.set({f"jobqueue.{kind}.cores": None, f"jobqueue.{kind}.memory": None})
        need_both = pytest.raises(ClusterError, match=rf"^{kind} jobs need --cores and --memory: pass them")
        with unset, need_both as error, jobqueue_cluster(kind, overrides={"walltime": "01:00:00"}):
            pass
        assert "\n" not in str(error.value)
        unset = dask.config.set({f"jobqueue.{kind}.cores": None, f"jobqueue.{kind}.memory": None})
        with unset, pytest.raises(ClusterError, match=rf"^{kind} jobs need --memory: "), \
                jobqueue_cluster(kind, overrides={"cores": 2}):
            pass
    assert cluster_kind("tls://10.0.0.1:8786") == "address" and cluster_kind(None) == "local"
    # A scheduler address where none listens: one line naming it (was distributed's OSError, exit 1).
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            pytest.raises(ClusterError, match=r"^cannot reach the scheduler at tcp://127.0.0.1:1: "), \
            dask_client(scheduler="tcp://127.0.0.1:1", quiet=True):
        pass


def test_each_schedulers_table_entry_reads_its_status_tool_and_walltimes():
    """qstat rows as PBS prints them (no PBS here; Slurm's squeue runs for real in test_slurm.py)."""
    pbs, slurm = CLUSTER_KINDS["pbs"], CLUSTER_KINDS["slurm"]
    ids = ["12.pbs-server", "13.pbs-server", "14.pbs-server"]
    assert [pbs.status_tool, *pbs.status_args(ids)] == ["qstat", *ids]
    qstat = subprocess.CompletedProcess(["qstat", *ids], 153, stdout=(
        "Job id            Name             User              Time Use S Queue\n"
        "----------------  ---------------- ----------------  -------- - -----\n"
        "12.pbs-server     wsi-lymph        me                00:00:01 R gpu\n"
        "13.pbs-server     wsi-lymph        me                00:00:00 F gpu\n"),
        stderr="qstat: Unknown Job Id 14.pbs-server\n")
    assert pbs.parse_status(ids, qstat) == {"12.pbs-server"}  # 13 finished (F), 14 left the history
    unreachable = subprocess.CompletedProcess(["qstat"], 1, stdout="", stderr="qstat: cannot connect to server")
    assert pbs.parse_status(ids, unreachable) is None  # cannot say: the driver keeps waiting
    forgotten = subprocess.CompletedProcess(["qstat"], 153, "", "qstat: Unknown Job Id 14.pbs-server\n")
    assert pbs.parse_status(["14.pbs-server"], forgotten) == set()
    # Slurm's qstat wrapper (Debian's slurm-wlm-torque; test_pbs.py runs the real one): Torque's C for a job that
    # ended, ids it does not know left out silently, exit status 153 when it knows none of them.
    torque = subprocess.CompletedProcess(["qstat", "31", "32", "33"], 0, stdout=(
        "Job id              Name             Username        Time Use S Queue          \n"
        "------------------- ---------------- --------------- -------- - ---------------\n"
        "31                  wsi-lymph-pbs-de root            00:00:12 R debug          \n"
        "32                  wsi-lymph-pbs-de root            00:00:00 C debug          \n"), stderr="")
    assert pbs.parse_status(["31", "32", "33"], torque) == {"31"}
    assert pbs.parse_status(["33"], subprocess.CompletedProcess(["qstat", "33"], 153, "", "")) == set()
    gone = subprocess.CompletedProcess(["squeue"], 1, "", "slurm_load_jobs error: Invalid job id specified")
    assert slurm.parse_status(["7"], gone) == set()
    assert [walltime_seconds("30", kind) for kind in ("pbs", "slurm")] == [30, 1800]
    assert [walltime_seconds("01:30", kind) for kind in ("pbs", "slurm")] == [90, 90]
    assert walltime_seconds("2-03", "slurm") == 2 * 86400 + 3 * 3600 and walltime_seconds("4:00:00:00", "pbs") is None
    assert all(cluster_kind(name) == name for name in CLUSTER_KINDS)
    with pytest.raises(ClusterError, match="no job scheduler 'lsf'; known: pbs, slurm"):
        resolve_job_options("lsf")


def test_scheduler_refuses_clients_without_the_clusters_certificates(tmp_path):
    with jobqueue_cluster("slurm", overrides=dict(cores=1, memory="1GB"), tls_dir=tmp_path / "tls",
                          dashboard_address="localhost:0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        private = cluster.private_tls_dir
        assert private.parent == tmp_path / "tls" and stat.S_IMODE(private.stat().st_mode) == 0o700
        files = sorted(p.name.split(".")[3] for p in private.iterdir())
        assert files == ["ca_file", "cert", "key"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private.iterdir())
        with Client(cluster, timeout="10s") as client:  # the cluster's own certificates
            assert client.run_on_scheduler(lambda: 42) == 42
        for who, target, security in (("plain TCP", address.replace("tls://", "tcp://"), None),
                                      ("other certificates", address, Security.temporary())):
            started = time.perf_counter()
            with pytest.raises(OSError):
                Client(target, security=security, timeout="3s")
            print(f"{who}: refused in {time.perf_counter() - started:.1f} s")
    assert not private.exists()  # the workers' copies of the certificates are gone with the cluster


@pytest.mark.shared_data
def test_dashboard_answers_during_a_run_and_names_the_stages(model_cache, tmp_path, capsys):
    """detect and cv on a fresh local cluster: /status answers during the run, the task prefixes are the stages."""
    from wsi_lymph.engine.batch import run_detect
    from wsi_lymph.engine.params import ProbmapParams
    from wsi_lymph.training.cv import CVSettings, run_cv
    from wsi_lymph.training.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=4, seed=3)
    template = "{scheme}://{host}:{port}/status?link=from-config"
    with dask.config.set({"distributed.dashboard.link": template}), \
            dask_client(2, dashboard_address="localhost:0") as client:
        link = re.search(r"Dask dashboard: (\S+)", capsys.readouterr().out).group(1)
        assert re.fullmatch(r"http://localhost:\d+/status\?link=from-config", link), link
        answers: list[int] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                with urllib.request.urlopen(link, timeout=10) as response:
                    answers.append(response.status)
                done.wait(0.5)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        params = ProbmapParams(stride_px=4, chunk_px=128, block_px=128, torch_threads=1, region_level0=(0, 0, 64, 64))
        [result] = run_detect(client, [CROPS / "example_1.tif"], tmp_path / "detect", model="janowczyk2016/fold1",
                              mpp=0.5, params=params, progress=False)
        assert result.status == "done", result.reason
        settings = CVSettings(n_folds=2, iterations=10, batch_size=16, recipe="modern", arch="dense",
                              max_positive=40, max_negative=80, torch_threads=1, checkpoint_every=10, eval_every=10)
        report = run_cv(client, tmp_path / "data", tmp_path / "cv", settings, log=lambda _: None)
        done.set()
        poller.join(timeout=15)
        assert len(report["folds"]) == 2
        assert answers and set(answers) == {200}, answers
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    for stage in ("read", "hematoxylin", "infer", "peaks", "write", "patches", "train"):
        assert any(p == stage or p.startswith(stage + "-") for p in prefixes), (stage, prefixes)


def test_the_users_certificates_are_used_where_they_are(tmp_path):
    temporary = Security.temporary()  # a self-signed certificate: its own CA
    for name, text in (("ca.pem", temporary.tls_ca_file), ("cert.pem", temporary.tls_client_cert),
                       ("key.pem", temporary.tls_client_key)):
        (tmp_path / name).write_text(text)
    security = user_security(str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with jobqueue_cluster("pbs", overrides=dict(cores=1, memory="1GB"), security=security,
                          dashboard_address="localhost:0") as cluster:
        assert cluster.private_tls_dir is None  # nothing copied: the workers read the user's files
        worker = cluster.job_script().splitlines()[-1]
        assert f"--tls-ca-file {tmp_path / 'ca.pem'} --tls-cert {tmp_path / 'cert.pem'}" in worker, worker
        with Client(cluster.scheduler_address, security=security, timeout="10s") as client:
            assert client.run_on_scheduler(lambda: 7) == 7
    with pytest.raises(ClusterError, match="--tls-cert"):
        user_security(str(tmp_path / "ca.pem"))


def test_local_workers_start_with_one_malloc_arena(client):
    """Tasks run in a worker's second thread; one arena gives its forward pass the reused heap (models/device.py)."""
    environ = client.run(lambda: {key: os.environ.get(key) for key in WORKER_MALLOC_ENVIRON})
    assert len(environ) == 2 and all(env == WORKER_MALLOC_ENVIRON for env in environ.values()), environ


def test_test_clusters_bind_to_loopback(client):
    """The session's LocalCluster: scheduler, nannies, workers and dashboard listen on 127.0.0.1 only."""
    from cluster_harness import SocketWatch

    info = client.scheduler_info(n_workers=-1)
    addresses = [client.scheduler.address, *info["workers"], *(w["nanny"] for w in info["workers"].values())]
    assert len(addresses) == 5 and all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", a) for a in addresses), addresses
    ports = {int(client.scheduler.address.rsplit(":", 1)[1]), info["services"]["dashboard"]}
    watch = SocketWatch(os.getpid())
    watch.sample()
    # This process holds other tests' sockets too: of its own, only the scheduler's and the dashboard's count.
    mine = {(role, address) for role, address in watch.listening
            if role != "driver" or int(address.rsplit(":", 1)[1]) in ports}
    assert {int(address.rsplit(":", 1)[1]) for role, address in mine if role == "driver"} == ports, mine
    assert {role for role, _ in mine} == {"driver", "local worker"}, mine
    assert all(address.startswith("127.0.0.1:") for _, address in mine), mine
    assert not [f for f in watch.foreign if not f.startswith("driver")], watch.foreign


def test_the_clis_local_cluster_binds_to_loopback(tmp_path):
    """The CLI's embedded LocalCluster, with the tests' --interface default (lo) and a host-less --dashboard :0."""
    from cluster_harness import assert_on_loopback, run_driver

    from wsi_lymph.training.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", n_images=2, seed=1)
    run = run_driver(["patches", str(tmp_path / "data"), "--out", str(tmp_path / "patches.zarr"), "--workers", "1",
                      "--dashboard", ":0"], cwd=tmp_path, timeout_s=120, poll_s=0.2)
    assert run.returncode == 0, run.output
    assert re.search(r"Dask dashboard: http://127\.0\.0\.1:\d+/status", run.output), run.output
    assert_on_loopback(run, {"driver", "local worker"})
    # The option says the same, and a name that is no interface here is a usage error before any cluster starts.
    bad = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", "patches", str(tmp_path / "data"), "--out",
                          str(tmp_path / "other.zarr"), "--interface", "nosuch0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "--interface 'nosuch0'" in bad.stderr and "lo" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "other.zarr").exists()
