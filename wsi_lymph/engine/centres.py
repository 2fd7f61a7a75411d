"""The peak stage on a stored map: plan the ``peaks`` tasks, the tasks themselves, the join.

Two rounds of tasks.  ``peaks`` tasks (:func:`peak_block_of_store`) summarise one
block each: the centres of the components inside it, and the bounding box of each
component that crosses its border.  Once all are in, the driver joins those
components (:func:`plan_border`) and ``peaks-border`` tasks
(:func:`peak_border_of_store`) solve them from windows read again from the map.

One code path: the batch (:mod:`wsi_lymph.engine.batch`) and :func:`find_centres`
both plan with :func:`plan_peaks` and :func:`plan_border`, submit with
:func:`submit_peak_blocks` and :func:`submit_border_solves` and join with
:func:`join_peaks`; the batch collects the results as they arrive,
:func:`find_centres` waits for them.

Radii follow the map's frame: the paper's 6 px (smoothing) and 28 px (clearing)
are model-frame pixels at 0.125 µm/px, and maps are stored in the model frame,
so they apply unchanged.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import zarr
from dask.array.core import normalize_chunks
from distributed import Client, Future

from wsi_lymph.constants import CLEAR_RADIUS_PX, SMOOTH_RADIUS_PX
from wsi_lymph.detection.peaks import (
    PEAK_BLOCK_PX,
    PeakGraph,
    border_components,
    border_windows,
    group_border_windows,
    merge_centres,
    merge_windows,
    peak_blocks,
    read_with_halo,
    solve_border_components,
    summarise_peak_block,
)
from wsi_lymph.io.outputs import centres_table
from wsi_lymph.io.probmap_store import computed_boxes
from wsi_lymph.slides.frame import ModelFrame


@dataclass
class PeakStage:
    """The peak stage of one stored map: its plan and the block summaries received so far.

    Attributes
    ----------
    store : str
        Path of the map's Zarr array.
    graph : PeakGraph
        The peak blocks to compute.
    attrs : dict
        The map's ``wsi_lymph`` attributes, plus ``threshold_used``.
    shape_rc : (int, int)
        The map's rows and columns (model-frame px).
    summaries : dict
        :func:`wsi_lymph.detection.peaks.summarise_peak_block` of each finished block, by block index.
    border_windows, border_seeds, border_window_of : np.ndarray or None
        Once every block is in (:func:`plan_border`): the windows to label, (w, 4) map pixels, and one seed
        of each component that crosses block borders, (m, 2) map pixels, with the window that holds it, (m,).
    border_groups : list of np.ndarray or None
        Indices into ``border_windows`` of each ``peaks-border`` task.
    solved : dict
        (centres, scores) of each finished ``peaks-border`` task, by task number.
    """

    store: str
    graph: PeakGraph
    attrs: dict
    shape_rc: tuple[int, int]
    summaries: dict[tuple[int, int], dict] = field(default_factory=dict)
    border_windows: np.ndarray | None = None
    border_seeds: np.ndarray | None = None
    border_window_of: np.ndarray | None = None
    border_groups: list[np.ndarray] | None = None
    solved: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.attrs["threshold_used"]

    @property
    def blocks_done(self) -> bool:
        """Every planned block has its summary."""
        return len(self.summaries) == len(self.graph.blocks)

    @property
    def complete(self) -> bool:
        """Every block has its summary and every component across borders is solved."""
        return self.border_groups is not None and len(self.solved) == len(self.border_groups)

    @property
    def tasks_done(self) -> int:
        return len(self.summaries) + len(self.solved)

    @property
    def tasks_total(self) -> int:
        """Tasks of both rounds, as far as they are known (the second round is planned after the first)."""
        return len(self.graph.blocks) + len(self.border_groups or ())


def new_task_token() -> str:
    """A key part unique to one map in flight: a hex word with a digit, so the dashboard's prefix is the stage."""
    return "0" + uuid.uuid4().hex[:15]


def plan_peaks(prob_store: str | os.PathLike, threshold: float | None = None, peak_block_px: int = PEAK_BLOCK_PX
               ) -> PeakStage:
    """The peak blocks to compute for one stored map.

    Peak blocks are whole groups of the map's chunks, about ``peak_block_px`` on a side
    (at least one chunk), and only those near classified blocks are computed (see
    :func:`wsi_lymph.detection.peaks.peak_blocks`).

    Parameters
    ----------
    prob_store : path-like
        A map's Zarr array (``OUT/<slide>/prob.zarr``).
    threshold : float, optional
        Threshold on smoothed P; None = the model's, from the map's attributes.
    peak_block_px : int
        Edge of one ``peaks`` task in map pixels, rounded down to whole chunks.
    """
    array = zarr.open_array(str(prob_store), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    attrs["threshold_used"] = attrs["model"]["threshold"] if threshold is None else threshold
    block_shape = tuple(max(1, peak_block_px // chunk) * chunk for chunk in array.chunks)
    chunks = normalize_chunks(block_shape, shape=array.shape)
    graph = peak_blocks(chunks, attrs["threshold_used"], SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX,
                        nonzero_boxes=computed_boxes(attrs))
    return PeakStage(str(prob_store), graph, attrs, tuple(array.shape))


def peak_block_of_store(prob_store: str, box: tuple[int, int, int, int], halo_px: int, threshold: float) -> dict:
    """One ``peaks`` task: read a block of a stored map with its halo and summarise it.

    See :func:`wsi_lymph.detection.peaks.summarise_peak_block`; values are decoded exactly as
    :func:`wsi_lymph.io.probmap_store.open_probmap` does (float32 times the stored scale).
    """
    array = zarr.open_array(prob_store, mode="r")
    scale = np.float32(dict(array.attrs)["wsi_lymph"]["value_scale"])
    padded = read_with_halo(array, box, halo_px).astype(np.float32) * scale
    return summarise_peak_block(padded, box, array.shape, halo_px, threshold, SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX)


def submit_peak_blocks(client: Client, stage: PeakStage, token: str) -> list[tuple[tuple[int, int], Future]]:
    """Submit one ``peaks-<token>`` task per planned block; returns (block index, future) pairs."""
    return [
        (index, client.submit(peak_block_of_store, stage.store, box, stage.graph.halo_px, stage.threshold,
                              key=(f"peaks-{token}", *index), pure=False))
        for index, box in zip(stage.graph.blocks, stage.graph.boxes, strict=True)
    ]


def plan_border(stage: PeakStage) -> None:
    """Join the components that cross block borders and plan the ``peaks-border`` tasks that solve them."""
    boxes, stage.border_seeds = border_components(stage.graph, stage.summaries)
    cores = border_windows(boxes, stage.shape_rc, CLEAR_RADIUS_PX)
    stage.border_windows, stage.border_window_of = merge_windows(cores)
    stage.border_groups = group_border_windows(stage.border_windows, stage.graph.chunks)


def peak_border_of_store(prob_store: str, windows: np.ndarray, seeds: np.ndarray, window_of: np.ndarray,
                         halo_px: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One ``peaks-border`` task: read ``windows`` and solve the components in each.

    See :func:`wsi_lymph.detection.peaks.solve_border_components`; ``window_of`` gives each seed's window.
    Values are decoded as in :func:`peak_block_of_store`.  The box around all windows is read once (many small
    windows share the map's chunks) unless it is more than twice their area; then each is read on its own, so
    a task never holds much more than its windows.
    """
    array = zarr.open_array(prob_store, mode="r")
    scale = np.float32(dict(array.attrs)["wsi_lymph"]["value_scale"])
    top, left = int(windows[:, 0].min()), int(windows[:, 2].min())
    whole = (top, int(windows[:, 1].max()), left, int(windows[:, 3].max()))
    areas = (windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2])
    padded = None
    if (whole[1] - whole[0]) * (whole[3] - whole[2]) <= 2 * areas.sum():
        padded = read_with_halo(array, whole, halo_px).astype(np.float32) * scale
    found = []
    for k, (r0, r1, c0, c1) in enumerate(windows):
        if padded is None:
            part = read_with_halo(array, (r0, r1, c0, c1), halo_px).astype(np.float32) * scale
        else:
            part = padded[r0 - top: r1 - top + 2 * halo_px, c0 - left: c1 - left + 2 * halo_px]
        found.append(solve_border_components(part, (r0, r1, c0, c1), array.shape, halo_px, seeds[window_of == k],
                                             threshold, SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX))
    return np.concatenate([c for c, _ in found]), np.concatenate([s for _, s in found])


def submit_border_solves(client: Client, stage: PeakStage, token: str) -> list[tuple[int, Future]]:
    """Submit one ``peaks-border-<token>`` task per planned group; returns (task number, future) pairs."""
    submitted = []
    for number, group in enumerate(stage.border_groups):
        in_group = np.isin(stage.border_window_of, group)
        # Seeds point at their window's place in this task's own list.
        window_of = np.searchsorted(group, stage.border_window_of[in_group])
        submitted.append((number, client.submit(
            peak_border_of_store, stage.store, stage.border_windows[group], stage.border_seeds[in_group], window_of,
            stage.graph.halo_px, stage.threshold, key=(f"peaks-border-{token}", number), pure=False)))
    return submitted


def join_peaks(stage: PeakStage) -> tuple[np.ndarray, np.ndarray]:
    """Centres of a complete stage: (n, 2) int64 (row, col) map pixels in row-major order, (n,) smoothed P."""
    return merge_centres(stage.summaries, list(stage.solved.values()))


def centres_of_stage(stage: PeakStage) -> dict:
    """Centre table (see :func:`wsi_lymph.io.outputs.centres_table`) of a complete stage, in level-0 pixels."""
    attrs = stage.attrs
    frame = ModelFrame(**{k: tuple(v) if isinstance(v, list) else v for k, v in attrs["frame"].items()})
    return centres_table(*join_peaks(stage), frame, attrs["origin_rc"], attrs["mpp"])


def find_centres(client: Client, prob_store: str | os.PathLike, threshold: float | None = None,
                 peak_block_px: int = PEAK_BLOCK_PX) -> tuple[np.ndarray, np.ndarray]:
    """The batch's peak stage on one stored map, waiting for it: centres equal to one global greedy pass.

    Parameters
    ----------
    client : distributed.Client
        Cluster to run the ``peaks`` tasks on.
    prob_store, threshold, peak_block_px
        As for :func:`plan_peaks`.

    Returns
    -------
    centres : np.ndarray
        (n, 2) int64 (row, col) map pixels, in row-major order.
    scores : np.ndarray
        (n,) float64 smoothed P at the centres.
    """
    stage = plan_peaks(prob_store, threshold, peak_block_px)
    token = new_task_token()
    submitted = submit_peak_blocks(client, stage, token)
    summaries = client.gather([future for _, future in submitted])
    stage.summaries.update(zip([index for index, _ in submitted], summaries, strict=True))
    plan_border(stage)
    solves = submit_border_solves(client, stage, token)
    stage.solved.update(zip([number for number, _ in solves], client.gather([f for _, f in solves]), strict=True))
    return join_peaks(stage)
