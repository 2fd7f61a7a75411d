"""Options shared by several commands: the cluster options of the one cluster factory, and ``--region``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_lymph.cli.checks import byte_size, integer, listen_address, region, walltime

#: ``--region``'s argparse type (X,Y ≥ 0, WIDTH,HEIGHT ≥ 1), kept under its old name.
region_type = region


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Options of the one cluster factory (:func:`wsi_lymph.engine.cluster.dask_client`), shared by every command."""
    group = parser.add_argument_group(
        "cluster", "a local cluster (default), worker jobs on PBS or Slurm (see cluster/README.md), or a running "
        "scheduler; Dask config keys wsi-lymph.cluster.kind/profile/jobs give defaults")
    group.add_argument("--cluster", default=None, metavar="local|pbs|slurm|ADDRESS",
                       help="where tasks run (default: local, or the config's wsi-lymph.cluster.kind)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS", help="same as --cluster ADDRESS")
    group.add_argument("--workers", type=integer(1), default=None, help="local worker processes (default: cores / 2)")
    group.add_argument("--jobs", type=integer(1), default=None, help="PBS/Slurm worker jobs (default 1; cv: one per "
                       "fold)")
    group.add_argument("--adaptive", action="store_true", help="scale between 1 and --jobs jobs with the work")
    group.add_argument("--profile", default=None, help="job profile: the section jobqueue.PROFILE of the Dask config, "
                       "over jobqueue.pbs / jobqueue.slurm")
    group.add_argument("--cluster-config", type=Path, default=None, metavar="FILE",
                       help="a Dask YAML config to use, e.g. cluster/jobqueue.yaml")
    group.add_argument("--queue", default=None, help="queue / partition of the worker jobs (default: the profile's)")
    group.add_argument("--account", default=None, help="account / project the jobs are charged to (default: the "
                       "profile's)")
    group.add_argument("--walltime", type=walltime, default=None, help="walltime of each job, e.g. 04:00:00 "
                       "(workers retire before; default: the profile's)")
    group.add_argument("--cores", type=integer(1), default=None, help="CPU cores per job (default: the profile's)")
    group.add_argument("--memory", type=byte_size, default=None, help="memory per job, e.g. 32GB (default: the "
                       "profile's)")
    group.add_argument("--gpus", type=integer(0), default=None, help="GPUs per job (0: CPU-only jobs; default: the "
                       "profile's)")
    group.add_argument("--tls-ca-file", default=None, help="your CA certificate (default: temporary certificates)")
    group.add_argument("--tls-cert", default=None, help="your certificate, signed by the CA")
    group.add_argument("--tls-key", default=None, help="its private key")
    group.add_argument("--tls-dir", default=None, help="base folder of the private (0700) folder for the workers' "
                       "copies of temporary certificates; compute nodes must see it (default ~/.cache/wsi-lymph/tls)")
    group.add_argument("--no-tls", action="store_true", help="PBS/Slurm clusters talk plain TCP (anyone who "
                       "reaches the scheduler's port can run code as you)")
    group.add_argument("--dashboard", type=listen_address, default=None, metavar="ADDRESS",
                       help="where the dashboard listens (default localhost:8787; :0 = any free port, all interfaces)")
    group.add_argument("--interface", default=None, metavar="IFACE", help="network interface the scheduler, the "
                       "workers and a host-less --dashboard bind to, e.g. lo or ib0 (default: the config's "
                       "wsi-lymph.cluster.interface, else 127.0.0.1 locally and the profile's interface on PBS/Slurm)")


def cluster_kwargs(args: argparse.Namespace, *, default_jobs: int = 1) -> dict:
    """Keyword arguments of :func:`wsi_lymph.engine.cluster.dask_client` from the cluster options."""
    # Imported here, not at the top: distributed takes a second to import, --help and usage errors answer at once.
    from wsi_lymph.engine.cluster import JOB_OPTION_FLAGS

    return dict(
        workers=args.workers, scheduler=args.scheduler, cluster=args.cluster, jobs=args.jobs,
        default_jobs=default_jobs, adaptive=args.adaptive, profile=args.profile, config_file=args.cluster_config,
        job_options={key: getattr(args, key) for key in JOB_OPTION_FLAGS}, tls_ca_file=args.tls_ca_file,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_dir=args.tls_dir, secure=not args.no_tls,
        dashboard_address=args.dashboard, interface=args.interface,
    )


def cluster_kind_of(args: argparse.Namespace) -> str:
    """local, pbs, slurm or address, as the cluster options (and a --cluster-config file) say."""
    from wsi_lymph.engine.cluster import cluster_kind, dask_config_file

    with dask_config_file(getattr(args, "cluster_config", None)):
        return cluster_kind(getattr(args, "scheduler", None) or getattr(args, "cluster", None))
