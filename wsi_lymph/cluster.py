"""The one place that builds Dask clusters for every command.

``dask_client(workers=N)`` starts an embedded ``distributed.LocalCluster``
(worker processes, one task thread each, torch using the remaining cores);
``dask_client(scheduler="tcp://host:8786")`` joins a running scheduler.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster


def default_workers() -> int:
    """Worker processes for a local cluster: one per two cores (inference is multi-threaded)."""
    return max(1, (os.cpu_count() or 1) // 2)


def torch_threads_per_worker(workers: int) -> int:
    """Intra-op torch threads so that ``workers`` local processes share the cores without oversubscription."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    dashboard_address: str = ":8787",
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
        Address of a running scheduler; no local cluster is started then.
    dashboard_address : str
        Where the local dashboard listens (``":0"`` = any free port).
    memory_limit : str or float
        Per-worker memory limit of the local cluster.
    resources : dict, optional
        Abstract resources each local worker advertises (e.g. ``{"GPU": 1}``).
    quiet : bool
        Do not print the dashboard link.
    """
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(
            n_workers=workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            resources=resources,
        )
        client = Client(cluster)
    try:
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
