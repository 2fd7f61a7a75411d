"""Workarounds for gaps in dask-jobqueue and distributed: the only wsi-lymph code that touches their private parts.

Each function names the upstream gap it closes.  Tested with dask-jobqueue 0.9 and distributed 2026.8;
``pyproject.toml`` pins ``dask-jobqueue>=0.9,<0.10`` and ``distributed>=2024.8,<2027``.  A version outside that
range that renames one of the private names below breaks this module only; a gap closed upstream lets its function
go.  Everything else (:mod:`wsi_lymph.engine.cluster`) uses public API: ``JobQueueCluster.job_script()``,
``job_name``, ``adapt()``, ``scale()``, ``worker_spec``/``new_worker_spec()``, ``Client.wait_for_workers()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import dask
from dask.utils import parse_timedelta
from dask_jobqueue import JobQueueCluster
from distributed.core import Status
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)

#: Name of the periodic callback of :func:`replace_lost_jobs` in ``cluster.periodic_callbacks``.
REPLACE_CALLBACK = "wsi-lymph-replace-lost-jobs"


@functools.cache
def closing_job_class(cluster_class: type[JobQueueCluster]) -> type:
    """The job class of ``cluster_class`` with a ``close()`` that also marks the job closed.

    Gap: dask-jobqueue's ``Job.close()`` cancels the job (``qdel``/``scancel``) but, unlike distributed's
    ``ProcessInterface.close()`` which it overrides, leaves ``job.status`` at ``running``.  ``SpecCluster._close()``
    asserts that every job it created is closing, closed or failed, so closing a cluster that still knows a cancelled
    job (a replaced one, one kept alive by a reference cycle) fails with ``AssertionError: Status.running``.
    """
    base = cluster_class.job_cls

    async def close(self) -> None:
        await base.close(self)
        self.status = Status.closed  # forced: what ProcessInterface.close() would have set

    return type(base.__name__, (base,), {"close": close, "__module__": __name__})


def submit_jobs(cluster: JobQueueCluster, jobs: int) -> None:
    """Plan at least ``jobs`` jobs and submit them now: a refused submission raises ``RuntimeError`` here.

    Gap: ``JobQueueCluster.scale()`` only schedules ``SpecCluster._correct_state()`` on the cluster's event loop and
    returns.  When ``qsub``/``sbatch`` refuses a job (unknown queue or account, limits), its message is only logged
    ("Task exception was never retrieved", dask/dask-jobqueue#619; #142 asked for submission errors to raise) and
    the driver would wait for a worker forever.  This does what ``scale(jobs=n)`` does, minus that callback, and
    awaits the submission on the cluster's loop.
    """

    async def submit() -> None:
        while len(cluster.worker_spec) < jobs:
            cluster.worker_spec.update(cluster.new_worker_spec())
        await cluster._correct_state()  # private: the awaitable submission that scale() does not hand out

    cluster.sync(submit)


def replace_lost_jobs(cluster: JobQueueCluster, interval_s: float,
                      job_status: Callable[[Sequence[str]], set[str] | None] | None = None,
                      status_interval_s: float = 30.0) -> None:
    """Submit a new job for each one that ended while still wanted (walltime, lifetime, preemption, cancel).

    Gap: dask-jobqueue does not resubmit jobs that end (dask/dask-jobqueue#122, which only documents ``--lifetime``
    with ``adapt()``; #611; #691, open).  SpecCluster forgets a one-worker job whose worker left (after
    ``distributed.deploy.lost-worker-timeout``) but keeps it in its plan and resubmits only when scaled again; a job
    of several worker processes it does not forget at all.  A periodic check on the cluster's event loop does both:
    a job none of whose workers has been connected for longer than that timeout is dropped and the cluster scaled
    back to its plan.  Adaptive scaling removes jobs from the plan itself; those are not replaced.
    ``cluster.close()`` stops the check.

    A job whose worker never connected (still queued, or ended before its worker started: ``qdel``/``scancel`` of a
    queued job, a node that failed at start) gives no such sign.  Once a worker of the cluster has joined (so the job
    script works; before that :mod:`wsi_lymph.engine.cluster` reports jobs that end without a worker), such jobs are
    looked up every ``status_interval_s`` with ``job_status`` (ids -> the ones still queued or running, None when
    the status tool cannot say; :meth:`wsi_lymph.engine.cluster.ClusterKind.active_jobs`), off the event loop, and
    the ended ones replaced too.  Replacements that keep ending before their worker joins (twice the planned jobs in
    a row) stop being made, with a warning, until a worker joins again: a broken node must not cause a storm of jobs.
    """
    # Longer than SpecCluster's own wait, so that its delayed clean-up never meets a replacement job.
    grace = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) + 2 * interval_s
    seen: set = set()
    job_ids: dict = {}  # name -> the scheduler's job id, kept for messages after SpecCluster forgot the job
    missing_since: dict = {}
    # replaced: jobs replaced in a row that ended before their worker joined; joined: a worker has joined at all.
    unjoined = {"replaced": 0, "last_status": time.monotonic(), "stopped": False, "joined": False}

    def job_id(name: Any) -> str:
        return str(getattr(cluster.workers.get(name), "job_id", None) or job_ids.get(name) or name)

    def replace(names: list, why: str) -> None:
        logger.warning("worker job(s) %s %s; submitting replacements", ", ".join(map(job_id, names)), why)
        for name in names:
            seen.discard(name)
            job_ids.pop(name, None)
            missing_since.pop(name, None)
            job = cluster.workers.pop(name, None)  # SpecCluster's own bookkeeping, as its lost-worker clean-up does
            if job is not None:  # cancel it in case it still sits in the queue without workers
                # private: SpecCluster._close() awaits its _futures, so the cancel finishes before the cluster closes
                cluster._futures.add(asyncio.ensure_future(job.close()))
        cluster.scale(jobs=len(cluster.worker_spec))

    async def ended_before_joining() -> list:
        """Names of planned jobs without a worker so far that the status tool no longer lists as queued/running."""
        waiting = {name: cluster.workers[name] for name in cluster.worker_spec
                   if name not in seen and name in cluster.workers
                   and getattr(cluster.workers[name], "job_id", None) is not None}
        if not waiting:
            return []
        ids = {name: str(job.job_id) for name, job in waiting.items()}
        active = await asyncio.get_running_loop().run_in_executor(None, job_status, list(ids.values()))
        if active is None:  # the status tool cannot say (server unreachable): ask again next time
            return []
        # The plan may have changed while the tool ran (adapt(), a replacement): only jobs still planned as they were.
        return [name for name, job in waiting.items()
                if ids[name] not in active and cluster.workers.get(name) is job and name in cluster.worker_spec
                and name not in seen]

    async def check() -> None:
        if cluster.status != Status.running:
            return
        connected = {str(worker["name"]) for worker in cluster.scheduler_info.get("workers", {}).values()}
        lost = []
        for name, spec in cluster.worker_spec.items():
            if {f"{name}{suffix}" for suffix in spec.get("group", [""])} & connected:
                if name not in seen:  # a worker joined: the job script works (again)
                    unjoined.update(replaced=0, stopped=False, joined=True)
                seen.add(name)
                job_ids[name] = getattr(cluster.workers.get(name), "job_id", None) or job_ids.get(name)
                missing_since.pop(name, None)
            elif name in seen and time.monotonic() - missing_since.setdefault(name, time.monotonic()) > grace:
                lost.append(name)
        if lost:
            replace(lost, "ended")
        if (job_status is None or not unjoined["joined"] or unjoined["stopped"]
                or time.monotonic() - unjoined["last_status"] < status_interval_s):
            return
        unjoined["last_status"] = time.monotonic()
        ended = await ended_before_joining()
        if not ended or cluster.status != Status.running:
            return
        unjoined["replaced"] += len(ended)
        if unjoined["replaced"] > 2 * max(1, len(cluster.worker_spec)):
            unjoined["stopped"] = True
            logger.warning("worker jobs keep ending before their worker joins (%s); no more replacements until a "
                           "worker joins: see the jobs' logs", ", ".join(map(job_id, ended)))
            return
        replace(ended, "ended before their worker joined")

    callback = PeriodicCallback(check, interval_s * 1000)
    cluster.periodic_callbacks[REPLACE_CALLBACK] = callback  # stopped by cluster.close()
    cluster.loop.add_callback(callback.start)


def close_cluster(cluster: JobQueueCluster) -> None:
    """Close the cluster (cancels its jobs) and close the workers' certificate files dask-jobqueue wrote.

    Gaps: a job whose submission failed stays ``Status.created`` in ``SpecCluster._created``, and
    ``SpecCluster._close()`` asserts on it (the ``AssertionError: Status.created`` of dask/distributed#6183): it is
    marked failed first.  dask-jobqueue keeps the workers' copies of in-memory TLS credentials as open
    ``NamedTemporaryFile`` objects (``_job_ca_file``, ``_job_cert``, ``_job_key``) with no public way to close
    them; closed here, they do not wait for the garbage collector.
    """
    for job in list(getattr(cluster, "_created", ())):
        if job.status == Status.created:  # forced: nothing to cancel, and close() would trip on it
            job.status = Status.failed
    try:
        cluster.close()
    finally:
        for key in ("ca_file", "cert", "key"):
            handle = getattr(cluster, f"_job_{key}", None)
            if handle is not None:
                with suppress(OSError):
                    handle.close()
