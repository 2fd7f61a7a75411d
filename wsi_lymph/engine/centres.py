"""The peak stage on a stored map: plan the ``peaks`` tasks, the task itself, the join.

One code path: the batch (:mod:`wsi_lymph.engine.batch`) and :func:`find_centres`
both plan with :func:`plan_peaks`, submit :func:`peak_block_of_store` tasks with
:func:`submit_peak_blocks` and join them with :func:`join_peaks`; the batch
collects the summaries as they arrive, :func:`find_centres` waits for them.

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
    centres_from_summaries,
    peak_blocks,
    read_with_halo,
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
    """

    store: str
    graph: PeakGraph
    attrs: dict
    shape_rc: tuple[int, int]
    summaries: dict[tuple[int, int], dict] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.attrs["threshold_used"]

    @property
    def complete(self) -> bool:
        """Every planned block has its summary."""
        return len(self.summaries) == len(self.graph.blocks)


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
    return summarise_peak_block(padded, box, halo_px, threshold, SMOOTH_RADIUS_PX, CLEAR_RADIUS_PX)


def submit_peak_blocks(client: Client, stage: PeakStage, token: str) -> list[tuple[tuple[int, int], Future]]:
    """Submit one ``peaks-<token>`` task per planned block; returns (block index, future) pairs."""
    return [
        (index, client.submit(peak_block_of_store, stage.store, box, stage.graph.halo_px, stage.threshold,
                              key=(f"peaks-{token}", *index), pure=False))
        for index, box in zip(stage.graph.blocks, stage.graph.boxes, strict=True)
    ]


def join_peaks(stage: PeakStage) -> tuple[np.ndarray, np.ndarray]:
    """Centres of a complete stage: (n, 2) int64 (row, col) map pixels in row-major order, (n,) smoothed P."""
    return centres_from_summaries(stage.graph, stage.summaries, stage.threshold, CLEAR_RADIUS_PX)


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
    submitted = submit_peak_blocks(client, stage, new_task_token())
    summaries = client.gather([future for _, future in submitted])
    stage.summaries.update(zip([index for index, _ in submitted], summaries, strict=True))
    return join_peaks(stage)
