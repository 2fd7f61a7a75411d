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

The job schedulers are the rows of one table, :data:`CLUSTER_KINDS`: a :class:`ClusterKind` holds everything that
differs between PBS and Slurm, so adding LSF or SGE is one more entry there.  What dask-jobqueue and distributed do
not offer publicly is worked around in :mod:`wsi_lymph.engine.jobqueue_compat`, nowhere else.

The dashboard binds where ``dashboard_address`` says (default: localhost of the machine running the driver;
reach it through an SSH tunnel), and the printed link follows ``distributed.dashboard.link``.

Dask config keys of wsi-lymph (e.g. in ``~/.config/dask/wsi-lymph.yaml``): ``wsi-lymph.cluster.kind`` (default of
``--cluster``), ``wsi-lymph.cluster.profile``, ``wsi-lymph.cluster.jobs``, ``wsi-lymph.cluster.tls-dir``,
``wsi-lymph.cluster.interface`` (default of ``--interface``: the network interface scheduler and workers bind to,
e.g. ``lo`` to keep a test's traffic on loopback) and ``wsi-lymph.cluster.status-interval`` (how often the status
tool is asked about jobs that never got a worker, default 30 s).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import yaml
from dask.utils import parse_bytes, parse_timedelta

# Importing dask_jobqueue also adds its jobqueue.* defaults to the Dask config, which the job options start from.
from dask_jobqueue import JobQueueCluster, PBSCluster, SLURMCluster
from dask_jobqueue.pbs import pbs_format_bytes_ceil
from distributed import Client, LocalCluster
from distributed.comm import get_address_host
from distributed.security import Security
from distributed.utils import format_dashboard_link, get_ip_interface

from wsi_lymph.cache import cache_dir
from wsi_lymph.engine.jobqueue_compat import close_cluster, closing_job_class, replace_lost_jobs, submit_jobs
from wsi_lymph.models.device import WORKER_MALLOC_ENVIRON

#: Where the dashboard listens unless told: the driver machine's loopback, reached through an SSH tunnel.
DEFAULT_DASHBOARD = "localhost:8787"
#: How often, by default, the status tool (qstat, squeue) is asked whether jobs that never got a worker still exist.
DEFAULT_STATUS_INTERVAL = "30s"
#: Flags that override a profile's job options (``--gpus`` rewrites several options at once).
JOB_OPTION_FLAGS = ("queue", "account", "walltime", "cores", "memory", "gpus")


class ClusterError(RuntimeError):
    """A cluster cannot be built from the options given (unknown kind or profile, missing certificates, …)."""


# ------------------------------------------------------------------------------------------ the job schedulers
@dataclass(frozen=True)
class ClusterKind:
    """One job scheduler reached through dask-jobqueue: all that wsi-lymph does differently per scheduler.

    Attributes
    ----------
    name : str
        The ``--cluster`` value; the Dask config section ``jobqueue.<name>`` holds its job defaults.
    cluster_class : type
        dask-jobqueue's cluster class (``PBSCluster``, ``SLURMCluster``; ``LSFCluster``, ``SGECluster``, …).
    walltime_units_s : tuple of tuples of int
        Seconds per field of a walltime ``A``, ``A:B``, ``A:B:C``, by its number of fields (PBS
        ``[[H:]M:]S``; Slurm the same, but a bare number counts minutes).  ``D-…`` forms (days first) are Slurm's
        and read alike everywhere: ``D-H``, ``D-H:M``, ``D-H:M:S``.
    gpu_directive : str or None
        The ``job_extra_directives`` line that asks for ``{gpus}`` GPUs (Slurm: ``--gres=gpu:{gpus}``); None where
        the GPUs go into ``resource_spec`` instead.
    gpu_directive_pattern : str or None
        Regular expression of directives already asking for GPUs, which ``--gpus`` replaces.
    resource_spec : callable or None
        ``(options, flags, gpus) -> str``: the scheduler's resource statement with the flags' cores, memory and
        GPUs put in (PBS: the ``select`` statement); None where there is none to rewrite.
    status_tool : str
        The command that lists jobs (``qstat``, ``squeue``), also named in messages.
    status_args : callable
        ``ids -> list[str]``: its arguments that list these job ids, one row per job, the id first.
    state_column : int
        Column (0-based, whitespace-separated) of the job's state in those rows.
    ended_states : frozenset of str
        States of a job that will not run (any more).
    unknown_job_pattern : str
        Regular expression of the error text for ids the tool no longer knows (those jobs ended).
    unknown_job_exit_codes : frozenset of int
        Exit statuses of the tool that mean "none of these ids is known" even without that text (PBS: 153, the low
        byte of ``PBSE_UNKJOBID``; Slurm's ``qstat`` wrapper exits so, silently, when no id matches).

    Examples
    --------
    LSF would be one more entry of :data:`CLUSTER_KINDS` (a sketch, untested; ``from dask_jobqueue import
    LSFCluster``)::

        "lsf": ClusterKind(name="lsf", cluster_class=LSFCluster, walltime_units_s=((60,), (3600, 60)),
                           gpu_directive='-gpu "num={gpus}"', gpu_directive_pattern=r"-gpu\\b", resource_spec=None,
                           status_tool="bjobs", status_args=lambda ids: ["-noheader", "-o", "jobid stat", *ids],
                           state_column=1, ended_states=frozenset({"DONE", "EXIT"}),
                           unknown_job_pattern=r"is not found"),
    """

    name: str
    cluster_class: type[JobQueueCluster]
    walltime_units_s: tuple[tuple[int, ...], ...]
    gpu_directive: str | None
    gpu_directive_pattern: str | None
    resource_spec: Callable[[Mapping[str, Any], Mapping[str, Any], int | None], str] | None
    status_tool: str
    status_args: Callable[[Sequence[str]], list[str]]
    state_column: int
    ended_states: frozenset[str]
    unknown_job_pattern: str
    unknown_job_exit_codes: frozenset[int] = frozenset()

    def active_jobs(self, ids: Sequence[str]) -> set[str] | None:
        """Which of the job ids are still queued or running (None: the status tool cannot say)."""
        try:
            result = subprocess.run([self.status_tool, *self.status_args(ids)], capture_output=True, text=True,
                                    timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return self.parse_status(ids, result)

    def parse_status(self, ids: Sequence[str], result: subprocess.CompletedProcess) -> set[str] | None:
        """Which of ``ids`` the status tool's ``result`` lists as queued or running (None: it cannot say).

        A row's id may carry a server suffix (PBS ``123.server``); rows of other jobs or headers are ignored.
        Ids the tool does not list at all have ended; a failure that names no id (server unreachable) is None.
        """
        short = {i.split(".")[0]: i for i in ids}
        active = set()
        for row in (line.split() for line in result.stdout.splitlines()):
            job = row[0].split(".")[0] if row else None
            if job in short and not (len(row) > self.state_column and row[self.state_column] in self.ended_states):
                active.add(short[job])
        unknown = (result.returncode in self.unknown_job_exit_codes
                   or re.search(self.unknown_job_pattern, result.stderr))
        if result.returncode != 0 and not active and not unknown:
            return None
        return active


def _pbs_select(options: Mapping[str, Any], flags: Mapping[str, Any], gpus: int | None) -> str:
    """PBS ``select`` statement with the flags' cores, memory and GPUs put in (its other fields kept)."""

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


#: The job schedulers ``--cluster`` reaches, by name.  Adding LSF or SGE is one more entry (see ClusterKind).
CLUSTER_KINDS: dict[str, ClusterKind] = {
    "pbs": ClusterKind(
        name="pbs", cluster_class=PBSCluster, walltime_units_s=((1,), (60, 1), (3600, 60, 1)),
        gpu_directive=None, gpu_directive_pattern=None, resource_spec=_pbs_select,
        # qstat: one row per job it still knows, state in the 5th column. Ended: PBS Pro's F (finished, listed
        # with history) and X (finished subjob), Torque's C (completed), which Slurm's qstat wrapper (Debian's
        # slurm-wlm-torque) prints for a job Slurm still lists as completed, cancelled or failed. PBS Pro names
        # unknown ids on stderr and exits 153; the wrapper prints nothing for them and exits 153 when no id matched.
        status_tool="qstat", status_args=list, state_column=4, ended_states=frozenset({"F", "X", "C"}),
        unknown_job_pattern=r"Unknown Job Id|Job has finished", unknown_job_exit_codes=frozenset({153})),
    "slurm": ClusterKind(
        name="slurm", cluster_class=SLURMCluster, walltime_units_s=((60,), (60, 1), (3600, 60, 1)),
        gpu_directive="--gres=gpu:{gpus}", gpu_directive_pattern=r"--(gres[= ]gpu|gpus)", resource_spec=None,
        # squeue lists queued, running and just-ended jobs; once all ids have left it, it fails with this message.
        status_tool="squeue", status_args=lambda ids: ["-h", "-o", "%i %T", "-j", ",".join(ids)], state_column=1,
        ended_states=frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}),
        unknown_job_pattern=r"Invalid job id"),
}


def _job_scheduler(kind: str) -> ClusterKind:
    """The :data:`CLUSTER_KINDS` entry of ``kind``."""
    try:
        return CLUSTER_KINDS[kind]
    except KeyError:
        raise ClusterError(f"no job scheduler {kind!r}; known: {', '.join(CLUSTER_KINDS)}") from None


# ------------------------------------------------------------------------------------------ small helpers
def default_workers() -> int:
    """Worker processes for a local cluster: one per core, each running torch on one thread; one per two cores
    on a machine with CUDA, where every worker holds its own CUDA context on the shared GPU.

    One process per core, rather than one multi-threaded process per two: only inference uses several threads,
    while the stain map, the peak blocks, the pyramid and the outputs are single-threaded tasks.  Measured on 2
    cores (BENCHMARKS.md, whole slides of growing size): ``detect`` on a 10,000² px slide 86 s against 135 s, on
    a 20,000² px slide 454 s against 602 s.
    """
    import torch

    cores = os.cpu_count() or 1
    return max(1, cores // 2) if torch.cuda.is_available() else cores


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
    """``"local"``, a job scheduler (``"pbs"``, ``"slurm"``) or ``"address"`` for a ``--cluster`` value.

    None: the Dask config's ``wsi-lymph.cluster.kind``, else ``"local"``.
    """
    target = target or dask.config.get("wsi-lymph.cluster.kind", None) or "local"
    if target == "local" or target in CLUSTER_KINDS:
        return target
    if "://" in target or re.fullmatch(r"[\w.\-\[\]:]+:\d+", target):
        return "address"
    raise ClusterError(f"--cluster wants local, {', '.join(CLUSTER_KINDS)} or a scheduler address "
                       f"(tcp://host:8786), got {target!r}")


def interface_address(interface: str) -> str:
    """The IPv4 address of this machine's network interface ``interface`` (``lo``: 127.0.0.1).

    Raises
    ------
    ClusterError
        The machine has no such interface, or it has no IPv4 address.
    """
    try:
        return get_ip_interface(interface)
    except ValueError:
        import psutil  # a dependency of distributed

        raise ClusterError(f"--interface {interface!r}: this machine has no network interface of that name with an "
                           f"IPv4 address; it has {', '.join(sorted(psutil.net_if_addrs()))}") from None


def _default_interface(interface: str | None) -> str | None:
    """``--interface``, else the Dask config's ``wsi-lymph.cluster.interface``, else None (dask's own choice)."""
    return interface or dask.config.get("wsi-lymph.cluster.interface", None) or None


def _dashboard_on(dashboard_address: str, host: str | None) -> str:
    """A dashboard address without a host (``:0``, ``:8787``) bound to ``host`` instead of every interface."""
    if host is None or ":" not in dashboard_address or dashboard_address.rpartition(":")[0]:
        return dashboard_address
    return f"{host}{dashboard_address}"


# ------------------------------------------------------------------------------------------ job options
def resolve_job_options(kind: str, profile: str | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's cluster class: the kind's section, a profile over it, flags over both.

    Parameters
    ----------
    kind : str
        A job scheduler of :data:`CLUSTER_KINDS` (``"pbs"``, ``"slurm"``); its section ``jobqueue.<kind>`` of the
        Dask config holds the defaults.
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

    Raises
    ------
    ClusterError
        An unknown kind or profile, or no ``cores`` / ``memory`` from any of the three.
    """
    scheduler = _job_scheduler(kind)
    options = _section(kind)
    if profile and profile != kind:
        options.update(_profile_section(profile))
    flags = _flag_overrides(overrides)
    gpus = flags.pop("gpus", None)
    options.update(flags)
    missing = [f"--{key}" for key in ("cores", "memory") if options.get(key) is None]
    if missing:  # dask-jobqueue's own message for this spans lines and names values the user never gave
        raise ClusterError(f"{kind} jobs need {' and '.join(missing)}: pass them, or a --profile / --cluster-config "
                           f"whose jobqueue section sets them (see cluster/jobqueue.yaml)")
    for key in ("worker_extra_args", "job_extra_directives", "job_script_prologue"):
        options[key] = list(options.get(key) or [])
    # First, so a site's own prologue can still change them (models/device.py says why).
    options["job_script_prologue"][:0] = [f"export {key}={value}" for key, value in WORKER_MALLOC_ENVIRON.items()]
    if scheduler.resource_spec is not None and ({"cores", "memory"} & set(flags) or gpus is not None):
        options["resource_spec"] = scheduler.resource_spec(options, flags, gpus)
    if gpus is not None:
        _set_gpus(scheduler, options, int(gpus))
    _fit_lifetime(scheduler, options)
    return {key: value for key, value in options.items() if value is not None}


def _normalise(section: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys as keyword arguments; the section's ``name`` is the job name (a cluster's ``name`` is not)."""
    options = {str(key).replace("-", "_"): value for key, value in section.items()}
    if "name" in options:
        options["job_name"] = options.pop("name")
    return options


def _section(kind: str) -> dict[str, Any]:
    section = dask.config.get(f"jobqueue.{kind}", default=None)
    if not isinstance(section, Mapping):  # dask-jobqueue ships defaults for its kinds: reaching here means no jobqueue
        raise ClusterError(f"no Dask config section jobqueue.{kind}; is dask-jobqueue installed?")
    return _normalise(section)


def _profile_section(profile: str) -> dict[str, Any]:
    section = dask.config.get(f"jobqueue.{profile}", default=None)
    if not isinstance(section, Mapping):
        raise ClusterError(f"no profile {profile!r}: add a section jobqueue.{profile} to your Dask config (e.g. "
                           "~/.config/dask/jobqueue.yaml, see cluster/jobqueue.yaml) or pass --cluster-config")
    return _normalise(section)


def _flag_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The flags given (not None), checked against :data:`JOB_OPTION_FLAGS`."""
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(flags) - set(JOB_OPTION_FLAGS)
    if unknown:
        raise ClusterError(f"unknown job options {sorted(unknown)}; known: {', '.join(JOB_OPTION_FLAGS)}")
    return flags


def _set_gpus(scheduler: ClusterKind, options: dict[str, Any], gpus: int) -> None:
    """Worker resource ``GPU=N`` and the scheduler's GPU directive; GPU jobs run one worker process."""
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
    if scheduler.gpu_directive is not None:
        pattern = scheduler.gpu_directive_pattern
        directives = [d for d in options["job_extra_directives"] if not (pattern and re.match(pattern, str(d)))]
        options["job_extra_directives"] = directives + ([scheduler.gpu_directive.format(gpus=gpus)] if gpus else [])
    if gpus:
        # Each process of a job would advertise the job's GPUs: Dask would count processes x GPUs.
        options["processes"] = 1


#: Seconds per field after ``D-`` (Slurm's ``D-H``, ``D-H:M``, ``D-H:M:S``).
_DAY_FORM_UNITS_S = ((3600,), (3600, 60), (3600, 60, 1))


def walltime_seconds(walltime: str | int | None, kind: str) -> int | None:
    """Seconds of a job scheduler's walltime: ``[D-]HH:MM:SS``, ``MM:SS``, ``D-HH`` or a bare number.

    The fields count as the kind's :attr:`ClusterKind.walltime_units_s` say (a bare number: Slurm minutes, PBS
    seconds).  None when the text is none of these.
    """
    units = _job_scheduler(kind).walltime_units_s
    if walltime is None:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(walltime).strip())
    if not match:
        return None
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days:
        units = _DAY_FORM_UNITS_S
    if len(numbers) > len(units):
        return None
    seconds = sum(number * unit for number, unit in zip(numbers, units[len(numbers) - 1], strict=True))
    return seconds + int(days or 0) * 86400


def _fit_lifetime(scheduler: ClusterKind, options: dict[str, Any]) -> None:
    """Make workers retire before their job's walltime kills them: ``--lifetime`` (± stagger) inside the walltime.

    A retiring worker hands its tasks back to the scheduler (they do not count as failures) and its job ends; the
    cluster submits a replacement.  Values from the profile are kept when they fit.
    """
    walltime = walltime_seconds(options.get("walltime"), scheduler.name)
    if not walltime:
        return
    args = options["worker_extra_args"]
    lifetime, stagger = _arg_seconds(args, "--lifetime"), _arg_seconds(args, "--lifetime-stagger") or 0
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


def _arg_seconds(args: Sequence[Any], flag: str) -> float | None:
    """Seconds of a duration flag in worker arguments (``--flag 5m`` or ``--flag=5m``); None if absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return parse_timedelta(str(args[i + 1]))
        if str(arg).startswith(flag + "="):
            return parse_timedelta(str(arg).split("=", 1)[1])
    return None


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
    base = Path(os.path.expandvars(str(base or dask.config.get("wsi-lymph.cluster.tls-dir", None)
                                       or cache_dir() / "tls"))).expanduser()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix="tls-", dir=base))  # mkdtemp: mode 0700 whatever the umask
    path.chmod(0o700)
    return path


def _inline_credentials(security: Security) -> bool:
    """Whether the workers' TLS credentials are in memory (``Security.temporary()``) and must go to files."""
    return any(value is not None and "\n" in value for value in security.get_tls_config_for_role("worker").values())


def _worker_security(security: Security | bool | None, tls_base: str | os.PathLike | None,
                     stack: ExitStack) -> tuple[Security | None, Path | None]:
    """The cluster's security and the private folder for the workers' certificate copies (removed by ``stack``).

    True: temporary certificates, whose worker copies need the private folder; a ``Security``: as it is (a folder
    only if its credentials are in memory); False/None: plain TCP.
    """
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
    return security, private


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
    interface: str | None = None,
    replace_interval: str | float = "2s",
) -> Iterator[JobQueueCluster]:
    """A dask-jobqueue cluster (no jobs yet) for the duration of a ``with`` block.

    Parameters
    ----------
    kind : str
        A job scheduler of :data:`CLUSTER_KINDS` (``"pbs"``, ``"slurm"``).
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
    interface : str, optional
        Network interface the scheduler and the workers bind to (``lo``, ``ib0``), over the profile's
        ``interface`` (default: ``wsi-lymph.cluster.interface``, else the profile's).  Unless the profile's
        ``scheduler-options`` name a host, this machine must have it; a dashboard address without a host then binds
        to it too.
    replace_interval : str or float
        How often to look for jobs that ended and submit replacements; jobs that never got a worker are looked up
        with the status tool every ``wsi-lymph.cluster.status-interval`` (default 30 s).

    Yields
    ------
    dask_jobqueue.JobQueueCluster
        The kind's cluster class (``PBSCluster``, ``SLURMCluster``).  ``cluster.job_script()`` shows the script each
        job runs; wsi-lymph adds ``cluster.private_tls_dir`` (the certificates' folder or None),
        ``cluster.dashboard_bind_address`` and ``cluster.job_options`` (from :func:`resolve_job_options`).
    """
    scheduler = _job_scheduler(kind)
    options = resolve_job_options(kind, profile, overrides)
    job_cls = closing_job_class(scheduler.cluster_class)
    _check_job_options(kind, job_cls, options)
    scheduler_options = dict(options.pop("scheduler_options", None) or {})
    scheduler_options["dashboard_address"] = (dashboard_address or scheduler_options.get("dashboard_address")
                                              or DEFAULT_DASHBOARD)
    interface = _default_interface(interface) or options.get("interface")
    if interface:
        options["interface"] = interface
    if interface and not {"host", "interface"} & set(scheduler_options):
        # dask-jobqueue binds the scheduler to the workers' interface too: it must exist here, and a dashboard
        # bound to "every interface" would leave the loopback (or the fabric) the user asked for.
        scheduler_options["dashboard_address"] = _dashboard_on(scheduler_options["dashboard_address"],
                                                               interface_address(interface))
    tls_base = options.pop("shared_temp_directory", None)
    tls_base = tls_dir or tls_base
    status_interval = dask.config.get("wsi-lymph.cluster.status-interval", None) or DEFAULT_STATUS_INTERVAL
    try:
        status_interval_s = parse_timedelta(status_interval)
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"wsi-lymph.cluster.status-interval wants a duration such as 30s, got {status_interval!r}"
                           ) from None
    with ExitStack() as stack:
        security, private = _worker_security(security, tls_base, stack)
        cluster = scheduler.cluster_class(job_cls=job_cls, security=security,
                                          shared_temp_directory=str(private) if private else None,
                                          scheduler_options=scheduler_options, **options)
        cluster.private_tls_dir = private
        cluster.dashboard_bind_address = scheduler_options["dashboard_address"]
        cluster.job_options = options
        stack.callback(close_cluster, cluster)
        stack.enter_context(_sigterm_as_exit())
        replace_lost_jobs(cluster, parse_timedelta(replace_interval), job_status=scheduler.active_jobs,
                          status_interval_s=status_interval_s)
        yield cluster


def _check_job_options(kind: str, job_cls: type, options: Mapping[str, Any]) -> None:
    """Build one job object from the options, so that a bad option fails before any certificate is written."""
    try:
        job_cls(scheduler="tls://127.0.0.1:1", name="check", **{
            key: value for key, value in options.items() if key not in ("scheduler_options", "shared_temp_directory")})
    except (TypeError, ValueError) as error:
        raise ClusterError(f"{kind} job options: {' '.join(str(error).split())}") from error  # one line


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While a cluster is open, SIGTERM (``qdel``/``scancel`` of the driver's job, ``kill``) exits cleanly.

    Python's default for SIGTERM skips ``finally`` blocks: the worker jobs would stay queued or idle until their
    death timeout, and the certificate folder would stay on disk.
    """
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


def jobqueue_job_script(kind: str, *, profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                        config_file: str | os.PathLike | None = None, security: bool = True) -> str:
    """The job script a PBS/Slurm cluster would submit for ``kind``/``profile``/flags (no job is submitted)."""
    with dask_config_file(config_file), jobqueue_cluster(kind, profile=profile, overrides=overrides,
                                                          security=security, dashboard_address=":0") as cluster:
        return cluster.job_script()


# ------------------------------------------------------------------------------------------ dashboard, config
def dashboard_link(client: Client, dashboard_address: str | None = None) -> str:
    """The dashboard's URL as ``distributed.dashboard.link`` formats it, with the host the dashboard binds to."""
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
    """Set the keys of a Dask YAML config file (e.g. ``cluster/jobqueue.yaml``) for the block's duration.

    The file sets leaf keys, it does not replace sections: dask-jobqueue's defaults (loaded when this module
    imported it) stay under the keys the file leaves out, and come back on exit.
    """
    if not path:
        yield
        return
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ClusterError(f"cannot read the Dask config file {path}: {error}") from error
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
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
    interface: str | None = None,
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
    interface : str, optional
        Network interface the scheduler and the workers of a cluster started here bind to (``lo``: loopback only;
        ``ib0``: InfiniBand), and a dashboard address without a host; default ``wsi-lymph.cluster.interface``, else
        local clusters bind to 127.0.0.1 and PBS/Slurm clusters to the profile's ``interface``.
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
        Unknown kind or profile, bad job options, missing certificates, the job scheduler refused the jobs, or a
        running scheduler asked for cannot be reached.
    """
    with dask_config_file(config_file):
        address = scheduler or cluster or dask.config.get("wsi-lymph.cluster.kind", None) or "local"
        kind = cluster_kind(address)
        say = _printer(quiet)
        session: AbstractContextManager[Client]
        if kind == "address":
            session = _scheduler_client(address, user_security(tls_ca_file, tls_cert, tls_key), say)
        elif kind == "local":
            session = _local_client(workers or default_workers(), dashboard_address or DEFAULT_DASHBOARD,
                                    _default_interface(interface), memory_limit, resources, say)
        else:
            profile = profile or dask.config.get("wsi-lymph.cluster.profile", None)
            jobs = int(jobs or dask.config.get("wsi-lymph.cluster.jobs", None) or default_jobs)
            security = (user_security(tls_ca_file, tls_cert, tls_key) or True) if secure else False
            session = _jobqueue_client(CLUSTER_KINDS[kind], jobs=jobs, adaptive=adaptive, profile=profile,
                                       job_options=job_options, security=security,
                                       dashboard_address=dashboard_address, tls_dir=tls_dir, interface=interface,
                                       say=say)
        with session as client:
            yield client


def _printer(quiet: bool) -> Callable[[str], None]:
    """Where the factory's messages go: stdout, flushed at once (the driver's log), or nowhere."""
    if quiet:
        return lambda _text: None
    return lambda text: print(text, flush=True)


@contextmanager
def _scheduler_client(address: str, security: Security | None, say: Callable[[str], None]) -> Iterator[Client]:
    """A client of a running scheduler at ``address``."""
    if address.startswith("tls://") and security is None:
        raise ClusterError(f"{address} talks TLS: pass --tls-ca-file, --tls-cert and --tls-key")
    try:
        client = Client(address, security=security)
    except OSError as error:  # distributed's "Timed out trying to connect" (after its connect timeout), refused, …
        raise ClusterError(f"cannot reach the scheduler at {address}: {error}") from None
    with _closing(client):
        say(f"Dask scheduler: {address}")
        say(f"Dask dashboard: {client.dashboard_link}")
        yield client


@contextmanager
def _local_client(workers: int, dashboard_address: str, interface: str | None, memory_limit: str | float,
                  resources: dict[str, float] | None, say: Callable[[str], None]) -> Iterator[Client]:
    """A client of a new local cluster: ``workers`` processes of one task thread each.

    Scheduler and workers bind to ``interface`` (default: 127.0.0.1, LocalCluster's own default).
    """
    host = interface_address(interface) if interface else None  # checked before any process starts
    dashboard_address = _dashboard_on(dashboard_address, host)
    # Nannies read the environment of the worker processes they (re)start when they are created.
    environ = {f"distributed.nanny.pre-spawn-environ.{key}": value for key, value in WORKER_MALLOC_ENVIRON.items()}
    with (dask.config.set(environ),
          LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=dashboard_address,
                       host=host, memory_limit=memory_limit, resources=resources) as local,
          _closing(Client(local)) as client):
        say(f"Dask dashboard: {dashboard_link(client, dashboard_address)}")
        yield client


@contextmanager
def _jobqueue_client(scheduler: ClusterKind, *, jobs: int, adaptive: bool, profile: str | None,
                     job_options: Mapping[str, Any] | None, security: Security | bool,
                     dashboard_address: str | None, tls_dir: str | os.PathLike | None, interface: str | None,
                     say: Callable[[str], None]) -> Iterator[Client]:
    """A client of a new PBS/Slurm cluster, once its first worker job has joined."""
    with (jobqueue_cluster(scheduler.name, profile=profile, overrides=job_options, security=security,
                           dashboard_address=dashboard_address, tls_dir=tls_dir, interface=interface) as jq,
          _closing(Client(jq)) as client):
        _report_jobqueue(say, scheduler, jq, client, jobs, adaptive)
        _start_jobs(jq, scheduler, jobs, adaptive)
        say(f"waiting for the first worker job to start ({scheduler.status_tool} shows jobs named {jq.job_name})")
        _wait_for_a_worker(client, jq, scheduler)
        yield client


@contextmanager
def _closing(client: Client) -> Iterator[Client]:
    try:
        yield client
    finally:
        client.close()


def _job_option(scheduler: ClusterKind, cluster: JobQueueCluster, key: str) -> Any:
    """A job option as the job class reads it: the resolved options, else the kind's Dask config section."""
    value = cluster.job_options.get(key)
    return value if value is not None else dask.config.get(f"jobqueue.{scheduler.name}.{key.replace('_', '-')}", None)


def _report_jobqueue(say: Callable[[str], None], scheduler: ClusterKind, cluster: JobQueueCluster, client: Client,
                     jobs: int, adaptive: bool) -> None:
    """Print the scheduler, the jobs' shape, the dashboard link and how to tunnel to it."""
    gpus = re.search(r"GPU=(\d+)", " ".join(map(str, cluster.job_options.get("worker_extra_args", []))))
    memory = parse_bytes(_job_option(scheduler, cluster, "memory"))
    shape = f"{_job_option(scheduler, cluster, 'cores')} cores, {memory / 2**30:.1f} GiB"
    shape += f", {gpus.group(1)} GPU" if gpus else ""
    if not cluster.scheduler_address.startswith("tls://"):
        security = "plain TCP: anyone who reaches the port can use the cluster"
    elif cluster.private_tls_dir:
        security = f"TLS, temporary certificates, the workers' copies in {cluster.private_tls_dir}"
    else:
        security = "TLS, your certificates"
    say(f"Dask scheduler: {cluster.scheduler_address} ({security})")
    say(f"{scheduler.name}: {'up to ' if adaptive else ''}{jobs} job{'s' if jobs > 1 else ''} of {shape}")
    say(f"Dask dashboard: {dashboard_link(client, cluster.dashboard_bind_address)}")
    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    if port:
        say(f"  from your computer: ssh -N -L {port}:localhost:{port} {os.environ.get('USER', 'you')}@"
            f"{socket.gethostname()} (add -J <login node> when this runs in a job), then open "
            f"http://localhost:{port}/status")


def _start_jobs(cluster: JobQueueCluster, scheduler: ClusterKind, jobs: int, adaptive: bool) -> None:
    """Submit the jobs (adaptive: the first one, the rest follow the work); a refused submission is an error."""
    try:
        submit_jobs(cluster, 1 if adaptive else jobs)
    except RuntimeError as error:
        raise ClusterError(f"submitting the {scheduler.name} worker jobs failed: {error}") from error
    if adaptive:  # at least one job stays: the driver always has a worker, the rest follow the work
        cluster.adapt(minimum_jobs=1, maximum_jobs=jobs)


def _wait_for_a_worker(client: Client, cluster: JobQueueCluster, scheduler: ClusterKind,
                       poll_s: float = 5.0) -> None:
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
        active = scheduler.active_jobs(ids) if ids else None
        if active is not None and not active and not client.scheduler_info(n_workers=1).get("workers"):
            logs = _job_option(scheduler, cluster, "log_directory") or "the folder the jobs were submitted from"
            raise ClusterError(f"the {scheduler.name} worker jobs {', '.join(ids)} ended without a worker joining "
                               f"the scheduler; see their logs in {logs} (a failed job-script-prologue line, or "
                               "nodes that cannot reach the driver: set the profile's interface)")
