"""The one place that builds Dask clusters for every command.

:func:`dask_client` is the factory behind ``--cluster local|pbs|slurm|ADDRESS``:

* ``local`` (default): an embedded ``distributed.LocalCluster`` (worker processes, one task thread each,
  torch using the remaining cores);
* ``pbs`` / ``slurm``: a scheduler in this process and worker **jobs** submitted through dask-jobqueue
  (``PBSCluster`` / ``SLURMCluster``), ``scale(jobs=N)`` or adaptive between 1 and N jobs.  Job options come
  from the Dask config section ``jobqueue.<kind>`` (``cluster/jobqueue.yaml`` is a commented template), an
  optional profile section ``jobqueue.<profile>`` layered over it, then flags (``--queue``, ``--walltime``,
  ``--cores``, ``--memory``, ``--gpus``, ``--account``).  Scheduler and workers talk TLS: temporary
  certificates (``Security.temporary()``) whose worker copies live in a private (0700) directory, or the
  user's own.  A job that ends (walltime, preemption, ``scancel``/``qdel``) is replaced, and the tasks it ran
  go back to the scheduler (a fold resumes from its last checkpoint);
* an address (``tcp://host:8786``, ``tls://…``): join a running scheduler.

The dashboard binds where ``dashboard_address`` says (default: localhost of the machine running the driver;
reach it through an SSH tunnel), and the printed link follows ``distributed.dashboard.link``.

Dask config keys of wsi-lymph (e.g. in ``~/.config/dask/wsi-lymph.yaml``): ``wsi-lymph.cluster.kind`` (default of
``--cluster``), ``wsi-lymph.cluster.profile``, ``wsi-lymph.cluster.jobs``, ``wsi-lymph.cluster.tls-dir``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import dask
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, LocalCluster
from distributed.security import Security

logger = logging.getLogger(__name__)

#: Job schedulers reachable through dask-jobqueue.
JOBQUEUE_KINDS = ("pbs", "slurm")
#: Where the dashboard listens unless told: the driver machine's loopback, reached through an SSH tunnel.
DEFAULT_DASHBOARD = "localhost:8787"
#: Flags that override a profile's job options (``--gpus`` rewrites several options at once).
JOB_OPTION_FLAGS = ("queue", "account", "walltime", "cores", "memory", "gpus")


class ClusterError(RuntimeError):
    """A cluster cannot be built from the options given (unknown kind or profile, missing certificates, …)."""


def default_workers() -> int:
    """Worker processes for a local cluster: one per two cores (inference is multi-threaded)."""
    return max(1, (os.cpu_count() or 1) // 2)


def torch_threads_per_worker(workers: int) -> int:
    """Intra-op torch threads so that ``workers`` local processes share the cores without oversubscription."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def has_gpu_workers(client: Client) -> bool:
    """Whether any worker advertises the abstract resource ``GPU`` (then GPU work asks for it)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    return any(worker.get("resources", {}).get("GPU", 0) > 0 for worker in workers)


def worker_threads(client: Client) -> int:
    """Threads of all connected workers together (at least 1)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    return sum(worker.get("nthreads", 1) for worker in workers) or 1


def cluster_kind(target: str | None) -> str:
    """``"local"``, ``"pbs"``, ``"slurm"`` or ``"address"`` for a ``--cluster`` value (None: Dask config, local)."""
    target = target or dask.config.get("wsi-lymph.cluster.kind", None) or "local"
    if target in ("local", *JOBQUEUE_KINDS):
        return target
    if "://" in target or re.fullmatch(r"[\w.\-\[\]:]+:\d+", target):
        return "address"
    raise ClusterError(f"--cluster wants local, pbs, slurm or a scheduler address (tcp://host:8786), got {target!r}")


# ------------------------------------------------------------------------------------------ job options
def resolve_job_options(kind: str, profile: str | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's cluster class: the kind's section, a profile over it, flags over both.

    Parameters
    ----------
    kind : {"pbs", "slurm"}
        Job scheduler; its section ``jobqueue.<kind>`` of the Dask config holds the defaults.
    profile : str, optional
        Another section ``jobqueue.<profile>`` (e.g. ``slurm-cpu``) whose keys replace the kind's.
    overrides : mapping, optional
        Flag values (``queue``, ``account``, ``walltime``, ``cores``, ``memory``, ``gpus``); None = not given.
        ``gpus`` sets the worker resource ``GPU=N``, Slurm's ``--gres=gpu:N`` or PBS's ``ngpus=N`` and one
        worker process per job; ``cores``/``memory`` also rewrite PBS's ``resource_spec``.

    Returns
    -------
    dict
        Options with underscores (``job_extra_directives``, …); a ``--lifetime`` below the walltime is ensured.
    """
    import dask_jobqueue  # noqa: F401  (its import adds the jobqueue.* defaults to the Dask config)

    if kind not in JOBQUEUE_KINDS:
        raise ClusterError(f"no job scheduler {kind!r}; known: {', '.join(JOBQUEUE_KINDS)}")
    options = _section(kind)
    if profile and profile != kind:
        section = dask.config.get(f"jobqueue.{profile}", default=None)
        if not isinstance(section, Mapping):
            raise ClusterError(f"no profile {profile!r}: add a section jobqueue.{profile} to your Dask config (e.g. "
                               "~/.config/dask/jobqueue.yaml, see cluster/jobqueue.yaml) or pass --cluster-config")
        options.update(_normalise(section))
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(flags) - set(JOB_OPTION_FLAGS)
    if unknown:
        raise ClusterError(f"unknown job options {sorted(unknown)}; known: {', '.join(JOB_OPTION_FLAGS)}")
    gpus = flags.pop("gpus", None)
    options.update(flags)
    for key in ("worker_extra_args", "job_extra_directives", "job_script_prologue"):
        options[key] = list(options.get(key) or [])
    if kind == "pbs" and ({"cores", "memory"} & set(flags) or gpus is not None):
        options["resource_spec"] = _pbs_resource_spec(options, flags, gpus)
    if gpus is not None:
        _set_gpus(kind, options, int(gpus))
    _fit_lifetime(kind, options)
    return {key: value for key, value in options.items() if value is not None}


def _normalise(section: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys as keyword arguments; the section's ``name`` is the job name (a cluster's ``name`` is not)."""
    options = {str(key).replace("-", "_"): value for key, value in section.items()}
    if "name" in options:
        options["job_name"] = options.pop("name")
    return options


def _section(kind: str) -> dict[str, Any]:
    section = dask.config.get(f"jobqueue.{kind}", default=None)
    if not isinstance(section, Mapping):  # dask-jobqueue ships defaults for both: reaching here means no jobqueue
        raise ClusterError(f"no Dask config section jobqueue.{kind}; is dask-jobqueue installed?")
    return _normalise(section)


def _pbs_resource_spec(options: dict[str, Any], flags: Mapping[str, Any], gpus: int | None) -> str:
    """PBS ``select`` statement with the flags' cores, memory and GPUs put in (its other fields kept)."""
    from dask_jobqueue.pbs import pbs_format_bytes_ceil

    def mem(memory: Any) -> str:  # PBS reads GB as GiB, like dask-jobqueue's own default statement
        return pbs_format_bytes_ceil(parse_bytes(memory))

    spec = options.get("resource_spec")
    if not spec:  # what dask-jobqueue would write, plus the GPUs below
        spec = f"select=1:ncpus={int(options['cores'])}:mem={mem(options['memory'])}"
    if flags.get("cores") is not None:
        spec = re.sub(r"ncpus=\d+", f"ncpus={int(flags['cores'])}", spec)
    if flags.get("memory") is not None:
        spec = re.sub(r"(?<![\w])mem=[^:,+\s]+", f"mem={mem(flags['memory'])}", spec)
    if gpus is not None:
        if re.search(r"ngpus=\d+", spec):
            spec = re.sub(r":?ngpus=\d+", f":ngpus={gpus}" if gpus else "", spec)
        elif gpus:
            spec = re.sub(r"(ncpus=\d+)", rf"\1:ngpus={gpus}", spec, count=1)
    return spec


def _set_gpus(kind: str, options: dict[str, Any], gpus: int) -> None:
    """Worker resource ``GPU=N`` and the scheduler's GPU request; GPU jobs run one worker process."""
    args = options["worker_extra_args"]
    resources: list[str] = []
    for i, arg in reversed(list(enumerate(args))):
        if arg == "--resources" and i + 1 < len(args):
            resources = [r for r in str(args[i + 1]).replace(",", " ").split() if not r.startswith("GPU=")] + resources
            del args[i:i + 2]
        elif str(arg).startswith("--resources="):
            resources = [r for r in str(arg)[12:].replace(",", " ").split() if not r.startswith("GPU=")] + resources
            del args[i]
    if gpus:
        resources.append(f"GPU={gpus}")
    if resources:
        args += ["--resources", ",".join(resources)]
    if kind == "slurm":
        directives = [d for d in options["job_extra_directives"] if not re.match(r"--(gres[= ]gpu|gpus)", str(d))]
        options["job_extra_directives"] = directives + ([f"--gres=gpu:{gpus}"] if gpus else [])
    if gpus:
        # Each process of a job would advertise the job's GPUs: Dask would count processes x GPUs.
        options["processes"] = 1


def walltime_seconds(walltime: str | int | None, kind: str) -> int | None:
    """Seconds of a PBS/Slurm walltime (``[D-]HH:MM:SS``, ``MM:SS``; a bare number: Slurm minutes, PBS seconds)."""
    if walltime is None:
        return None
    text = str(walltime).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if len(numbers) == 1:
        seconds = numbers[0] * (60 if kind == "slurm" and not days else 1)
        if days:  # Slurm "D-HH"
            seconds = numbers[0] * 3600
    elif len(numbers) == 2:
        seconds = numbers[0] * 3600 + numbers[1] * 60 if days else numbers[0] * 60 + numbers[1]
    else:
        seconds = numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    return seconds + int(days or 0) * 86400


def _fit_lifetime(kind: str, options: dict[str, Any]) -> None:
    """Make workers retire before their job's walltime kills them: ``--lifetime`` (± stagger) inside the walltime.

    A retiring worker hands its tasks back to the scheduler (they do not count as failures) and its job ends; the
    cluster submits a replacement.  Values from the profile are kept when they fit.
    """
    walltime = walltime_seconds(options.get("walltime"), kind)
    if not walltime:
        return
    args = options["worker_extra_args"]

    def value(flag: str) -> float | None:
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                return parse_timedelta(str(args[i + 1]))
            if str(arg).startswith(flag + "="):
                return parse_timedelta(str(arg).split("=", 1)[1])
        return None

    lifetime, stagger = value("--lifetime"), value("--lifetime-stagger") or 0
    slack = min(120, 0.1 * walltime)  # time to retire: hand tasks back, close
    if lifetime is not None and lifetime > 0 and lifetime + stagger <= walltime - slack:
        return
    margin = min(max(300, 0.05 * walltime), 0.5 * walltime)
    lifetime, stagger = walltime - margin, margin / 3
    for flag in ("--lifetime", "--lifetime-stagger"):
        for i in reversed(range(len(args))):
            if args[i] == flag:
                del args[i:i + 2]
            elif str(args[i]).startswith(flag + "="):
                del args[i]
    args += ["--lifetime", _duration(lifetime), "--lifetime-stagger", _duration(stagger)]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


# ------------------------------------------------------------------------------------------ security
def user_security(ca_file: str | None = None, cert: str | None = None, key: str | None = None) -> Security | None:
    """TLS from the user's certificates: flags first, else Dask's ``distributed.comm.tls.*`` config, else None.

    One certificate (and key) signed by the CA serves the scheduler, the workers and the client.
    """
    if ca_file or cert or key:
        if not (ca_file and cert):
            raise ClusterError("TLS certificates need both --tls-ca-file and --tls-cert (and --tls-key unless the "
                               "certificate file holds the key)")
        for path in filter(None, (ca_file, cert, key)):
            if not Path(path).expanduser().is_file():
                raise ClusterError(f"TLS file {path} does not exist")
        files = {"ca_file": str(Path(ca_file).expanduser()), "cert": str(Path(cert).expanduser()),
                 "key": str(Path(key).expanduser()) if key else None}
        return Security(
            tls_ca_file=files["ca_file"], require_encryption=True,
            **{f"tls_{role}_{part}": files[part] for role in ("client", "scheduler", "worker")
               for part in ("cert", "key")},
        )
    if dask.config.get("distributed.comm.tls.ca-file", None):
        return Security()  # the user's Dask config names the certificates
    return None


def private_directory(base: str | os.PathLike | None = None) -> Path:
    """A fresh directory only its owner can open (mode 0700), for the workers' copies of TLS certificates.

    ``base`` (default: ``wsi-lymph.cluster.tls-dir`` from the Dask config, else ``<cache>/tls`` in the wsi-lymph
    cache, ``~/.cache/wsi-lymph``) must be on a file system the compute nodes see, like the home directory.
    """
    from .models import cache_dir

    base = Path(os.path.expandvars(str(base or dask.config.get("wsi-lymph.cluster.tls-dir", None)
                                       or cache_dir() / "tls"))).expanduser()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix="tls-", dir=base))  # mkdtemp: mode 0700 whatever the umask
    path.chmod(0o700)
    return path


def _inline_credentials(security: Security) -> bool:
    """Whether the workers' TLS credentials are in memory (``Security.temporary()``) and must go to files."""
    return any(value is not None and "\n" in value for value in security.get_tls_config_for_role("worker").values())


# ------------------------------------------------------------------------------------------ jobqueue clusters
@contextmanager
def jobqueue_cluster(
    kind: str,
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    security: Security | bool | None = True,
    dashboard_address: str | None = None,
    tls_dir: str | os.PathLike | None = None,
    replace_interval: str | float = "2s",
) -> Iterator[Any]:
    """A dask-jobqueue cluster (no jobs yet) for the duration of a ``with`` block.

    Parameters
    ----------
    kind : {"pbs", "slurm"}
    profile, overrides
        See :func:`resolve_job_options`.
    security : Security, bool or None
        True (default): temporary self-signed TLS, the workers' files in a private directory;
        a ``Security``: the user's certificates; False/None: plain TCP (anyone who reaches the port can connect).
    dashboard_address : str, optional
        Where the dashboard listens (default: the profile's ``scheduler-options``, else ``localhost:8787``).
    tls_dir : path-like, optional
        Base of the private certificate directory (default: ``jobqueue.<kind>.shared-temp-directory``, else
        ``wsi-lymph.cluster.tls-dir``, else ``~/.cache/wsi-lymph/tls``).
    replace_interval : str or float
        How often to look for jobs that ended and submit replacements.

    Yields
    ------
    dask_jobqueue.PBSCluster or dask_jobqueue.SLURMCluster
        ``cluster.job_script()`` shows the script each job runs; ``cluster.private_tls_dir`` the certificates.
    """
    options = resolve_job_options(kind, profile, overrides)
    cls, job_cls = _cluster_classes(kind)
    try:  # a bad option fails here, before any certificate is written
        job_cls(scheduler="tls://127.0.0.1:1", name="check", **{
            key: value for key, value in options.items() if key not in ("scheduler_options", "shared_temp_directory")})
    except (TypeError, ValueError) as error:
        raise ClusterError(f"{kind} job options: {error}") from error
    scheduler_options = dict(options.pop("scheduler_options", None) or {})
    scheduler_options["dashboard_address"] = (dashboard_address or scheduler_options.get("dashboard_address")
                                              or DEFAULT_DASHBOARD)
    tls_base = options.pop("shared_temp_directory", None)
    tls_base = tls_dir or tls_base
    with ExitStack() as stack:
        if security is True:
            try:
                security = Security.temporary()
            except ImportError as error:  # pragma: no cover - cryptography is a dependency
                raise ClusterError("temporary TLS certificates need the 'cryptography' package") from error
        security = security or None
        private = None
        if security is not None and _inline_credentials(security):
            private = private_directory(tls_base)
            stack.callback(shutil.rmtree, private, ignore_errors=True)
        cluster = cls(job_cls=job_cls, security=security, shared_temp_directory=str(private) if private else None,
                      scheduler_options=scheduler_options, **options)
        cluster.private_tls_dir = private
        cluster.dashboard_bind_address = scheduler_options["dashboard_address"]
        stack.callback(_close_jobqueue_cluster, cluster)
        stack.enter_context(_sigterm_as_exit())
        _replace_lost_jobs(cluster, parse_timedelta(replace_interval))
        yield cluster


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While a cluster is open, SIGTERM (``qdel``/``scancel`` of the driver's job, ``kill``) exits cleanly.

    Python's default for SIGTERM skips ``finally`` blocks: the worker jobs would stay queued or idle until their
    death timeout, and the certificate folder would stay on disk.
    """
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@functools.cache
def _cluster_classes(kind: str) -> tuple[type, type]:
    """dask-jobqueue's cluster class for ``kind`` and its job class, whose ``close()`` also marks the job closed.

    dask-jobqueue's ``Job.close()`` cancels the job but leaves its status ``running``; SpecCluster's ``close()``
    asserts that every job it still knows of is closed, so a cancelled job that is not yet garbage-collected
    (a reference cycle, a replaced job) would make closing the cluster fail.
    """
    from dask_jobqueue import PBSCluster, SLURMCluster
    from distributed.core import Status

    cls = {"pbs": PBSCluster, "slurm": SLURMCluster}[kind]

    async def close(self) -> None:
        await cls.job_cls.close(self)
        self.status = Status.closed

    job_cls = type(cls.job_cls.__name__, (cls.job_cls,), {"close": close, "__module__": __name__})
    return cls, job_cls


def _close_jobqueue_cluster(cluster) -> None:
    """Close the cluster (cancels its jobs) and delete the workers' certificate files it wrote."""
    from distributed.core import Status

    for job in list(getattr(cluster, "_created", ())):
        if job.status == Status.created:  # its submission failed: nothing to cancel (and close() would trip on it)
            job.status = Status.failed
    try:
        cluster.close()
    finally:
        for key in ("ca_file", "cert", "key"):  # dask-jobqueue keeps them open as NamedTemporaryFile objects
            handle = getattr(cluster, f"_job_{key}", None)
            if handle is not None:
                with suppress(OSError):
                    handle.close()


def _replace_lost_jobs(cluster, interval_s: float) -> None:
    """Submit a new job for each one that ended while still wanted (walltime, lifetime, preemption, cancel).

    SpecCluster forgets a one-worker job whose worker left (after ``distributed.deploy.lost-worker-timeout``) but
    keeps it in its plan and only resubmits when scaled; a job of several worker processes it does not forget at
    all.  A periodic check on the cluster's event loop does both: a job none of whose workers has been connected
    for longer than that timeout (it must have connected once: queued jobs are left alone) is dropped and the
    cluster scaled back to its plan.  Adaptive scaling removes jobs from the plan itself; those are not replaced.
    """
    import asyncio
    import time

    from distributed.core import Status
    from tornado.ioloop import PeriodicCallback

    # Longer than SpecCluster's own wait, so that its delayed clean-up never meets a replacement job.
    grace = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) + 2 * interval_s
    seen: set = set()
    missing_since: dict = {}

    def check() -> None:
        if cluster.status != Status.running:
            return
        connected = {str(worker["name"]) for worker in cluster.scheduler_info.get("workers", {}).values()}
        lost = []
        for name, spec in cluster.worker_spec.items():
            if {f"{name}{suffix}" for suffix in spec.get("group", [""])} & connected:
                seen.add(name)
                missing_since.pop(name, None)
            elif name in seen and time.monotonic() - missing_since.setdefault(name, time.monotonic()) > grace:
                lost.append(name)
        if not lost:
            return
        logger.warning("worker job(s) %s ended; submitting replacements", ", ".join(map(str, lost)))
        for name in lost:
            seen.discard(name)
            missing_since.pop(name, None)
            job = cluster.workers.pop(name, None)
            if job is not None:  # cancel it in case it still sits in the queue without workers
                cluster._futures.add(asyncio.ensure_future(job.close()))
        cluster.scale(jobs=len(cluster.worker_spec))

    callback = PeriodicCallback(check, interval_s * 1000)
    cluster.periodic_callbacks["wsi-lymph-replace-lost-jobs"] = callback  # stopped by cluster.close()
    cluster.loop.add_callback(callback.start)


# ------------------------------------------------------------------------------------------ dashboard
def dashboard_link(client: Client, dashboard_address: str | None = None) -> str:
    """The dashboard's URL as ``distributed.dashboard.link`` formats it, with the host the dashboard binds to."""
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    if not port:
        return client.dashboard_link or ""
    host = ""
    if dashboard_address:
        host = dashboard_address.rpartition(":")[0] if ":" in dashboard_address else dashboard_address
        host = host.split("://")[-1].strip("[]")
    if host in ("", "0.0.0.0", "::"):  # every interface: the scheduler's own host is one of them
        host = get_address_host(client.scheduler.address)
    return format_dashboard_link(host, port)


@contextmanager
def dask_config_file(path: str | os.PathLike | None) -> Iterator[None]:
    """Set the keys of a Dask YAML config file (e.g. ``cluster/jobqueue.yaml``) for the block's duration."""
    if not path:
        yield
        return
    import dask_jobqueue  # noqa: F401  (defaults first: a file's keys are restored on exit, the defaults must stay)
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ClusterError(f"cannot read the Dask config file {path}: {error}") from error
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:  # leaf keys: a file sets keys, it does not replace sections
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", data)
    with dask.config.set(flat):
        yield


# ------------------------------------------------------------------------------------------ the factory
@contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    cluster: str | None = None,
    jobs: int | None = None,
    default_jobs: int = 1,
    adaptive: bool = False,
    profile: str | None = None,
    config_file: str | os.PathLike | None = None,
    job_options: Mapping[str, Any] | None = None,
    tls_ca_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_dir: str | os.PathLike | None = None,
    secure: bool = True,
    dashboard_address: str | None = None,
    memory_limit: str | float = "auto",
    resources: dict[str, float] | None = None,
    quiet: bool = False,
) -> Iterator[Client]:
    """Connect to a cluster for the duration of a ``with`` block.

    Parameters
    ----------
    workers : int, optional
        Worker processes of the local cluster (default: :func:`default_workers`).
    scheduler : str, optional
        Address of a running scheduler (same as ``cluster=ADDRESS``); no cluster is started then.
    cluster : str, optional
        ``local``, ``pbs``, ``slurm`` or a scheduler address (default: ``wsi-lymph.cluster.kind``, else local).
    jobs : int, optional
        Worker jobs of a PBS/Slurm cluster (default: ``wsi-lymph.cluster.jobs``, else ``default_jobs``).
    default_jobs : int
        Jobs when neither ``jobs`` nor the config say (``cv``: one per fold).
    adaptive : bool
        Scale between 1 and ``jobs`` jobs with the work instead of keeping ``jobs`` jobs.
    profile : str, optional
        Section ``jobqueue.<profile>`` layered over ``jobqueue.<kind>`` (default: ``wsi-lymph.cluster.profile``).
    config_file : path-like, optional
        A Dask YAML file (e.g. ``cluster/jobqueue.yaml``) whose keys are set while the cluster runs.
    job_options : mapping, optional
        Flag overrides of the job options: see :func:`resolve_job_options`.
    tls_ca_file, tls_cert, tls_key : str, optional
        The user's certificates (PBS/Slurm clusters and ``tls://`` addresses); default for PBS/Slurm:
        temporary ones.
    tls_dir : path-like, optional
        Base of the private directory for the workers' copies of temporary certificates.
    secure : bool
        False: PBS/Slurm clusters talk plain TCP.
    dashboard_address : str, optional
        Where the dashboard of a cluster started here listens (``":0"`` = any free port on every interface);
        default ``localhost:8787`` (PBS/Slurm: the profile's ``scheduler-options`` may say otherwise).
    memory_limit : str or float
        Per-worker memory limit of the local cluster.
    resources : dict, optional
        Abstract resources each local worker advertises (e.g. ``{"GPU": 1}``).
    quiet : bool
        Do not print the scheduler address and the dashboard link.

    Yields
    ------
    distributed.Client
        Connected; a PBS/Slurm cluster has at least one worker.

    Raises
    ------
    ClusterError
        Unknown kind or profile, bad job options, missing certificates, or the job scheduler refused the jobs.
    """
    with dask_config_file(config_file):
        address = scheduler or cluster or dask.config.get("wsi-lymph.cluster.kind", None) or "local"
        kind = cluster_kind(address)
        say = (lambda *_: None) if quiet else (lambda text: print(text, flush=True))
        if kind == "address":
            security = user_security(tls_ca_file, tls_cert, tls_key)
            if address.startswith("tls://") and security is None:
                raise ClusterError(f"{address} talks TLS: pass --tls-ca-file, --tls-cert and --tls-key")
            client = Client(address, security=security)
            with _closing(client):
                say(f"Dask scheduler: {address}")
                say(f"Dask dashboard: {client.dashboard_link}")
                yield client
            return
        if kind == "local":
            with (LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                               dashboard_address=dashboard_address or DEFAULT_DASHBOARD,
                               memory_limit=memory_limit, resources=resources) as local,
                  _closing(Client(local)) as client):
                say(f"Dask dashboard: {dashboard_link(client, dashboard_address or DEFAULT_DASHBOARD)}")
                yield client
            return
        profile = profile or dask.config.get("wsi-lymph.cluster.profile", None)
        jobs = int(jobs or dask.config.get("wsi-lymph.cluster.jobs", None) or default_jobs)
        security = (user_security(tls_ca_file, tls_cert, tls_key) or True) if secure else False
        with (jobqueue_cluster(kind, profile=profile, overrides=job_options, security=security,
                               dashboard_address=dashboard_address, tls_dir=tls_dir) as jq,
              _closing(Client(jq)) as client):
            _report_jobqueue(say, kind, jq, client, jobs, adaptive)

            async def submit() -> None:
                # Scale and wait for the submissions on the cluster's loop, so that a refused job (bad queue or
                # account) raises here with qsub's/sbatch's message instead of only being logged.
                while len(jq.worker_spec) < (1 if adaptive else jobs):  # what scale() does, minus its callback
                    jq.worker_spec.update(jq.new_worker_spec())
                await jq._correct_state()

            try:
                jq.sync(submit)
            except RuntimeError as error:
                raise ClusterError(f"submitting the {kind} worker jobs failed: {error}") from error
            if adaptive:  # at least one job stays: the driver always has a worker, the rest follow the work
                jq.adapt(minimum_jobs=1, maximum_jobs=jobs)
            say(f"waiting for the first worker job to start ({'squeue' if kind == 'slurm' else 'qstat'} shows "
                f"jobs named {jq.job_name})")
            _wait_for_a_worker(client, jq, kind)
            yield client


#: Slurm job states of a job that will not run (any more).
_SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}


def _wait_for_a_worker(client: Client, cluster, kind: str, poll_s: float = 5.0) -> None:
    """Wait (as long as the queue takes) for a worker; fail when every job ended without one joining.

    A job whose prologue fails (a ``module load``, the environment's path) or whose worker cannot reach the
    scheduler ends without a worker ever joining; nothing would replace it, so waiting would never end.
    """
    while True:
        try:
            client.wait_for_workers(1, timeout=poll_s)
            return
        except TimeoutError:
            pass
        ids = [str(job.job_id) for job in list(cluster.workers.values()) if getattr(job, "job_id", None)]
        active = _active_jobs(kind, ids) if ids else None
        if active is not None and not active and not client.scheduler_info(n_workers=1).get("workers"):
            logs = cluster._dummy_job.log_directory or "the folder the jobs were submitted from"
            raise ClusterError(f"the {kind} worker jobs {', '.join(ids)} ended without a worker joining the "
                               f"scheduler; see their logs in {logs} (a failed job-script-prologue line, or nodes "
                               "that cannot reach the driver: set the profile's interface)")


def _active_jobs(kind: str, ids: list[str]) -> set[str] | None:
    """Which of the job ids are still queued or running (None: the scheduler's tools cannot say)."""
    import subprocess

    command = ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)] if kind == "slurm" else ["qstat", *ids]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split() for line in result.stdout.splitlines() if line.split()]
    if kind == "slurm":
        if result.returncode != 0:  # all ids unknown: they ended (and left squeue), else squeue cannot say
            return set() if "Invalid job id" in result.stderr else None
        return {row[0] for row in rows if len(row) > 1 and row[1] not in _SLURM_ENDED}
    # qstat: one row per job it still knows, state in the 5th column (F = finished, with history); unknown ids
    # are reported on stderr.
    short = {i.split(".")[0]: i for i in ids}
    active = {short[row[0].split(".")[0]] for row in rows
              if row[0].split(".")[0] in short and not (len(row) > 4 and row[4] == "F")}
    if result.returncode != 0 and not active and not re.search(r"Unknown Job Id|Job has finished", result.stderr):
        return None
    return active


@contextmanager
def _closing(client: Client) -> Iterator[Client]:
    try:
        yield client
    finally:
        client.close()


def _report_jobqueue(say: Callable[[str], None], kind: str, cluster, client: Client, jobs: int,
                     adaptive: bool) -> None:
    """Print the scheduler, the jobs' shape, the dashboard link and how to tunnel to it."""
    import socket

    job = cluster._dummy_job
    gpus = re.search(r"GPU=(\d+)", job._command_template)
    shape = f"{job.worker_cores} cores, {job.worker_memory / 2**30:.1f} GiB"
    shape += f", {gpus.group(1)} GPU" if gpus else ""
    if not cluster.scheduler_address.startswith("tls://"):
        security = "plain TCP: anyone who reaches the port can use the cluster"
    elif cluster.private_tls_dir:
        security = f"TLS, temporary certificates, the workers' copies in {cluster.private_tls_dir}"
    else:
        security = "TLS, your certificates"
    say(f"Dask scheduler: {cluster.scheduler_address} ({security})")
    say(f"{kind}: {'up to ' if adaptive else ''}{jobs} job{'s' if jobs > 1 else ''} of {shape}")
    say(f"Dask dashboard: {dashboard_link(client, cluster.dashboard_bind_address)}")
    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    if port:
        say(f"  from your computer: ssh -N -L {port}:localhost:{port} {os.environ.get('USER', 'you')}@"
            f"{socket.gethostname()} (add -J <login node> when this runs in a job), then open "
            f"http://localhost:{port}/status")


def jobqueue_job_script(kind: str, *, profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                        config_file: str | os.PathLike | None = None, security: bool = True) -> str:
    """The job script a PBS/Slurm cluster would submit for ``kind``/``profile``/flags (no job is submitted)."""
    with dask_config_file(config_file), jobqueue_cluster(kind, profile=profile, overrides=overrides,
                                                          security=security, dashboard_address=":0") as cluster:
        return cluster.job_script()

