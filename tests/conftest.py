"""Shared fixtures: the real data in ../shared/data, converted models, a real 2-worker cluster."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The real slides, crops and released models, read in place (never copied into the repository).
DATA = Path(os.environ.get("WSI_LYMPH_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"
CROPS = DATA / "lymph-centers"
MODEL_MIRROR = DATA / "models" / "janowczyk2016-lymphocyte"


# Every test cluster binds its scheduler, workers and (host-less) dashboard to loopback: the default of --interface,
# for this process and, through the environment, for every CLI run as a subprocess and every PBS/Slurm worker job.
# No test sends traffic to another address (cluster_harness.SocketWatch checks it during runs).
os.environ["DASK_WSI_LYMPH__CLUSTER__INTERFACE"] = "lo"

# Session fixtures that read the shared data: a test using them needs it too.
_DATA_FIXTURES = {"model_cache", "client"}


def pytest_configure(config):
    import dask

    dask.config.set({"wsi-lymph.cluster.interface": "lo"})  # in case dask read the environment before this file
    if not DATA.is_dir() and os.environ.get("CI"):
        raise pytest.UsageError(f"the shared data folder {DATA} is missing; CI reads the real slides from it")


def pytest_collection_modifyitems(config, items):
    """Mark the tests that need ``../shared/data``; without the folder they are skipped, saying so."""
    missing = pytest.mark.skip(reason=f"needs the shared data folder {DATA}, which is missing")
    for item in items:
        if _DATA_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.shared_data)
        if not DATA.is_dir() and item.get_closest_marker("shared_data"):
            item.add_marker(missing)


def _semaphores_mapped() -> set[str]:
    """Names of the ``/dev/shm`` semaphores that some live process has open (a named semaphore is mapped)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            names.update(re.findall(r"/dev/shm/(sem\.mp-\S+)", maps.read_text()))
        except OSError:  # it ended while we looked, or is not ours to read
            continue
    return names


@pytest.fixture(scope="session", autouse=True)
def _unlink_semaphores_of_killed_runs():
    """Remove the named semaphores that runs killed by the tests left in ``/dev/shm``.

    A SIGKILL of a run's process group kills multiprocessing's resource tracker too, which would have unlinked the
    semaphores of the run's spawned workers; without this every suite would leave a few dozen behind.  Only those
    made during the session that no live process holds are removed.
    """
    shm = Path("/dev/shm")
    before = {path.name for path in shm.glob("sem.mp-*")}
    yield
    held = _semaphores_mapped()
    for path in shm.glob("sem.mp-*"):
        if path.name not in before and path.name not in held:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The paper's five folds, fetched from the local mirror and converted once per session."""
    from wsi_lymph.models.registry import fetch_janowczyk2016

    cache = tmp_path_factory.mktemp("wsi-lymph-cache")
    os.environ["WSI_LYMPH_CACHE"] = str(cache)
    os.environ["WSI_LYMPH_MODEL_SOURCE"] = MODEL_MIRROR.as_uri()
    fetch_janowczyk2016()
    return cache


@pytest.fixture(scope="session")
def client(model_cache):
    """A real distributed LocalCluster with 2 worker processes, on loopback like every test cluster."""
    from wsi_lymph.engine.cluster import dask_client

    with dask_client(2, dashboard_address=":0", quiet=True) as client:
        client.wait_for_workers(2)
        yield client


def crop_centers(index: int) -> np.ndarray:
    """Annotated centres of ``example_<index>`` as (row, col) level-0 pixels."""
    import tifffile

    return np.argwhere(tifffile.imread(CROPS / f"example_{index}_seed.tif") > 0).astype(float)


def level0_to_frame(rc: np.ndarray, scale: float = 4.0) -> np.ndarray:
    """Level-0 (row, col) pixel centres to model-frame (row, col) coordinates."""
    return (np.asarray(rc, dtype=float) + 0.5) * scale - 0.5


def write_crops_in_paper_layout(folder: Path) -> Path:
    """The three annotated crops as ``im<K>.tif`` + ``<K>m.tif`` (RGBA, centres in alpha) in ``folder``."""
    import tifffile

    from wsi_lymph.training.dataset import write_paper_image

    for k in (1, 2, 3):
        rgb = tifffile.imread(CROPS / f"example_{k}.tif")
        write_paper_image(folder, str(k), rgb, np.argwhere(tifffile.imread(CROPS / f"example_{k}_seed.tif") > 0))
    return folder
