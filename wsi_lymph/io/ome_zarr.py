"""The probability map as an OME-Zarr image pyramid that viewers open: ``OUT/<slide>/prob.ome.zarr``.

The working map (``prob.zarr``) holds P at the model frame, 0.125 µm/px: 16 times the pixels of a
20x slide, several GB per resection slide.  Viewers want the map at the slide's scale, with coarser
levels to zoom out.  After its centres are found, a slide's map is kept as this pyramid:

* **Format**: OME-NGFF 0.4 on Zarr v2 (``/`` chunk keys, 512-px chunks, Blosc-Zstd).  0.4 rather than 0.5 (Zarr v3):
  napari (through ``ome-zarr``/``napari-ome-zarr``) reads both, but the Java readers behind QuPath and
  Fiji (Bio-Formats' OMEZarrReader and the converters of the OME ecosystem) read and write 0.4 on Zarr v2.
* **Levels**: level 0 is the slide's level-0 grid (the map averaged over ``round(1 / level0_per_frame_px)``
  model-frame pixels: 4 x 4 for a 20x slide, 2 x 2 for a 40x one); each further level halves it, down to
  the first level that fits one 512-px chunk (a thumbnail).  The levels span the whole slide, also for a
  ``--region`` map (outside it P = 0, chunks that are all 0 are not stored).  Every pixel is the exact mean
  of P over the map pixels under it (at the map's edge: over those that exist).
* **Values**: ``uint8`` = round(255 * mean P).  Steps of 1/255 are finer than anything a viewer shows or
  the model's calibration supports; it takes half the bytes of float16, compresses better, and is a pixel
  type every reader has (Bio-Formats has no 16-bit float).  ``wsi_lymph.pyramid.value_scale`` turns it back.
* **Where it lies**: axes ``y``, ``x`` in micrometres; per level a ``scale`` (µm per pixel) and a
  ``translation`` (µm position of pixel (0, 0)'s centre) in the coordinates of ``centers.csv``
  (``x_um = x * mpp`` with level-0 pixel centres at integer ``x``).  Level 0 lies exactly on the slide's
  level-0 pixels (translation 0 for a 20x or 40x slide), so a reader that ignores translations (napari-ome-zarr
  0.10 does) still overlays it on the slide, and ``centers.geojson`` imports onto it as onto the slide.

It is built blockwise by Dask tasks (``pyramid-*``) that read the stored map, never the whole map in
memory, into a hidden ``.prob.ome.zarr.partial`` renamed into place when every level is written; so a
``prob.ome.zarr`` on disk is always complete.  Its attributes also keep the working map's own
(``wsi_lymph``: slide, frame, model, settings), so a finished slide whose working map was deleted is
still recognised, and refused or skipped, by a later run.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numcodecs
import numpy as np
import zarr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from wsi_lymph.io.probmap_store import computed_boxes, replace_dir

PYRAMID_NAME = "prob.ome.zarr"
WORKING_MAP_NAME = "prob.zarr"
NGFF_VERSION = "0.4"
PYRAMID_CHUNK_PX = 512
#: The coarsest level is the first whose longer side is at most this (one chunk).
THUMBNAIL_PX = 512
VALUE_SCALE = 1.0 / 255.0
#: Display colour of P in viewers (napari's ``magenta`` colormap: black -> magenta).
DISPLAY_COLOUR = "FF00FF"


@dataclass(frozen=True)
class PyramidPlan:
    """The levels of a map's pyramid, on the grid of the whole slide.

    Attributes
    ----------
    frame_shape_rc : (int, int)
        The whole slide in model-frame pixels (``frame.shape_rc``): the pyramid covers all of it, so its level 0
        is the slide's level-0 grid even for a ``--region`` map (whose outside stays 0 and is not stored).
    map_origin_rc, map_shape_rc : (int, int)
        Where the working map lies in the model frame, and its shape.
    factors : tuple of int
        Model-frame pixels per pyramid pixel along each axis, per level (finest first).
    nonzero_boxes : tuple of (r0, r1, c0, c1), optional
        Map-pixel boxes outside which P is 0 (the blocks that were classified); None: anywhere.
    """

    frame_shape_rc: tuple[int, int]
    map_origin_rc: tuple[int, int]
    map_shape_rc: tuple[int, int]
    factors: tuple[int, ...]
    nonzero_boxes: tuple[tuple[int, int, int, int], ...] | None = None

    @property
    def shapes_rc(self) -> tuple[tuple[int, int], ...]:
        """Shape of each level: ``ceil(frame_shape / factor)``."""
        return tuple(tuple(math.ceil(n / f) for n in self.frame_shape_rc) for f in self.factors)

    def covered(self, axis: int, factor: int, start: int, size: int) -> np.ndarray:
        """Map pixels under each of ``size`` cells of ``factor`` frame pixels from cell ``start``, along ``axis``."""
        lo = (start + np.arange(size)) * factor
        first, last = self.map_origin_rc[axis], self.map_origin_rc[axis] + self.map_shape_rc[axis]
        return np.clip(np.minimum(lo + factor, last) - np.maximum(lo, first), 0, factor)

    def level0_chunks_with_signal(self, grid: tuple[int, int]) -> np.ndarray:
        """Bool grid of level 0's chunks: True where a classified block lies under the chunk (elsewhere P is 0,
        the arrays' fill value, so the chunk needs no task: glass and skipped blocks cost nothing)."""
        if self.nonzero_boxes is None:
            return np.ones(grid, dtype=bool)
        span = PYRAMID_CHUNK_PX * self.factors[0]  # model-frame px per chunk
        origin_r, origin_c = self.map_origin_rc
        needed = np.zeros(grid, dtype=bool)
        for r0, r1, c0, c1 in self.nonzero_boxes:
            r1, c1 = min(r1, self.map_shape_rc[0]), min(c1, self.map_shape_rc[1])
            if r1 > r0 and c1 > c0:
                needed[(origin_r + r0) // span: (origin_r + r1 - 1) // span + 1,
                       (origin_c + c0) // span: (origin_c + c1 - 1) // span + 1] = True
        return needed


def plan_pyramid(map_attrs: dict, map_shape_rc: tuple[int, int], thumbnail_px: int = THUMBNAIL_PX) -> PyramidPlan:
    """Levels for a map: the slide's level-0 grid, then halving down to ``thumbnail_px``.

    Parameters
    ----------
    map_attrs : dict
        The working map's ``wsi_lymph`` attributes (:func:`wsi_lymph.engine.batch.map_attributes`).
    map_shape_rc : (int, int)
        The working map's shape.
    thumbnail_px : int
        The coarsest level is the first whose longer side is at most this.
    """
    frame = map_attrs["frame"]
    factor = max(1, round(1.0 / frame["level0_per_frame_px"]))  # frame px per level-0 px (4: a 20x slide, 2: 40x)
    factors = [factor]
    while max(math.ceil(n / factors[-1]) for n in frame["shape_rc"]) > thumbnail_px:
        factors.append(2 * factors[-1])
    boxes = computed_boxes(map_attrs)
    return PyramidPlan(tuple(int(n) for n in frame["shape_rc"]), tuple(int(n) for n in map_attrs["origin_rc"]),
                       tuple(int(n) for n in map_shape_rc), tuple(factors),
                       None if boxes is None else tuple(tuple(int(v) for v in box) for box in boxes))


def level_transform(map_attrs: dict, factor: int) -> tuple[list[float], list[float]]:
    """NGFF ``scale`` and ``translation`` (y, x; µm) of a level whose pixels average ``factor`` x ``factor``.

    A pyramid pixel ``j`` covers model-frame pixels ``j F ... (j + 1) F - 1``, whose joint centre lies at
    model-frame edge coordinate ``(j + 1/2) F``; a model-frame edge coordinate ``u`` is level-0 pixel-centre
    coordinate ``u * level0_per_frame_px - 1/2`` (:func:`wsi_lymph.slides.frame.frame_to_level0`), and µm are
    those times the slide's µm/px.  For a 20x or 40x slide level 0's translation is 0: it is the slide's grid.
    """
    mpp = map_attrs["mpp"]
    per = map_attrs["frame"]["level0_per_frame_px"]
    scale = factor * per * mpp
    translation = mpp * (factor / 2 * per - 0.5)
    return [scale, scale], [translation, translation]


def pyramid_attributes(map_attrs: dict, plan: PyramidPlan, name: str) -> dict:
    """The group attributes: NGFF 0.4 ``multiscales`` and ``omero``, and the map's own ``wsi_lymph``."""
    datasets = []
    for level, factor in enumerate(plan.factors):
        scale, translation = level_transform(map_attrs, factor)
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]})
    label = "P(lymphocyte centre) x 255"
    return {
        "multiscales": [{
            "version": NGFF_VERSION,
            "name": name,
            "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": datasets,
            "type": "mean",
            "metadata": {"description": "each level: the mean of P over the model-frame pixels a pixel covers, "
                                        "stored as round(255 * P)",
                         "factors_model_frame_px": list(plan.factors)},
        }],
        # Transitional in 0.4, but what napari and QuPath take the display range and colour from.
        "omero": {"name": name, "version": NGFF_VERSION, "rdefs": {"model": "color"}, "channels": [{
            "label": label, "color": DISPLAY_COLOUR, "active": True, "coefficient": 1.0, "family": "linear",
            "inverted": False, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}]},
        "wsi_lymph": map_attrs | {"pyramid": {
            "map_shape_rc": list(plan.map_shape_rc), "factors_model_frame_px": list(plan.factors),
            "grid": "the whole slide's model frame from (0, 0), in cells of each level's factor",
            "dtype": "uint8", "value_scale": VALUE_SCALE, "quantity": f"{label}, mean over each pixel's footprint",
            "working_map": WORKING_MAP_NAME}},
    }


def pyramid_compressor() -> numcodecs.Blosc:
    """Blosc-Zstd level 5, unshuffled: codecs every Zarr v2 reader has; on CMU-1's level 0 (2967 x 2220 uint8) it
    stores 1.40 MB against 1.55 MB bit-shuffled, 1.93 MB with LZ4 and 1.43 MB with zlib, in 86 ms (level 9:
    1.35 MB in 5 s)."""
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)


def create_pyramid(path: str | os.PathLike, map_path: str | os.PathLike, name: str,
                   thumbnail_px: int = THUMBNAIL_PX) -> PyramidPlan:
    """Create (overwrite) the empty pyramid of the map at ``map_path``: its group, attributes and arrays."""
    source = zarr.open_array(str(map_path), mode="r")
    map_attrs = dict(source.attrs)["wsi_lymph"]
    plan = plan_pyramid(map_attrs, source.shape, thumbnail_px)
    group = zarr.create_group(str(path), zarr_format=2, overwrite=True,
                              attributes=pyramid_attributes(map_attrs, plan, name))
    for level, shape in enumerate(plan.shapes_rc):
        chunk = min(PYRAMID_CHUNK_PX, max(shape))
        group.create_array(str(level), shape=shape, chunks=(chunk, chunk), dtype="uint8", fill_value=0,
                           compressors=pyramid_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"})
    return plan


# ------------------------------------------------------------------ the tasks
def _read_sums(map_path: str, plan: PyramidPlan, index: tuple[int, int]) -> np.ndarray:
    """Sums of P over the level-0 cells of one output chunk, from the part of the map under it (0 elsewhere)."""
    array = zarr.open_array(map_path, mode="r")
    value_scale = dict(array.attrs)["wsi_lymph"]["value_scale"]
    factor = plan.factors[0]
    cells = np.zeros([n * factor for n in _chunk_shape(plan.shapes_rc[0], index)], dtype=array.dtype)
    first = [i * PYRAMID_CHUNK_PX * factor for i in index]  # model-frame px of the chunk's first cell
    (r0, r1), (c0, c1) = [(max(first[axis], plan.map_origin_rc[axis]),  # the map's frame px under the chunk
                           min(first[axis] + cells.shape[axis], plan.map_origin_rc[axis] + plan.map_shape_rc[axis]))
                          for axis in (0, 1)]
    origin_r, origin_c = plan.map_origin_rc
    cells[r0 - first[0] : r1 - first[0], c0 - first[1] : c1 - first[1]] = \
        array[r0 - origin_r : r1 - origin_r, c0 - origin_c : c1 - origin_c]
    return _cell_sums(cells, factor) * value_scale  # stored values summed exactly, then scaled once


def _cell_sums(block: np.ndarray, factor: int) -> np.ndarray:
    """Sums (float64) over ``factor`` x ``factor`` cells; a partial cell at the end sums what there is."""
    rows, cols = (math.ceil(n / factor) for n in block.shape)
    if block.shape != (rows * factor, cols * factor):  # a finer level's last chunk: pad with zeros
        block = np.pad(block, ((0, rows * factor - block.shape[0]), (0, cols * factor - block.shape[1])))
    # A view, summed in float64 as it is read: no float64 copy of the (float16 or uint8) block.
    return block.reshape(rows, factor, cols, factor).sum(axis=(1, 3), dtype=np.float64)


def _chunk_shape(shape_rc: tuple[int, int], index: tuple[int, int]) -> tuple[int, int]:
    return tuple(min(PYRAMID_CHUNK_PX, n - i * PYRAMID_CHUNK_PX) for n, i in zip(shape_rc, index, strict=True))


def _sum_parts(parts: list[list[np.ndarray | None]], shapes: list[list[tuple[int, int]]]) -> np.ndarray:
    """Sums over 2 x 2 cells of up to 2 x 2 chunks of the finer level (None: a chunk with no map under it)."""
    return _cell_sums(np.block([[np.zeros(shape) if part is None else part for part, shape in zip(row, row_shapes,
                                                                                                 strict=True)]
                                for row, row_shapes in zip(parts, shapes, strict=True)]), 2)


def _write_means(sums: np.ndarray, level_path: str, plan: PyramidPlan, level: int, index: tuple[int, int]) -> None:
    """Store one chunk of a level: each pixel's sum / the number of map pixels under it, as round(255 mean)."""
    starts = [i * PYRAMID_CHUNK_PX for i in index]
    counts = [plan.covered(axis, plan.factors[level], starts[axis], sums.shape[axis]) for axis in (0, 1)]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.nan_to_num(sums / np.outer(counts[0], counts[1]))  # 0 where no map pixel lies under
    array = zarr.open_array(level_path, mode="r+")
    array[starts[0] : starts[0] + sums.shape[0], starts[1] : starts[1] + sums.shape[1]] = \
        np.clip(np.rint(means * 255.0), 0, 255).astype(np.uint8)


def pyramid_graph(map_path: str | os.PathLike, pyramid_path: str | os.PathLike, plan: PyramidPlan, token: str):
    """The Dask graph that fills a pyramid created by :func:`create_pyramid`: one Delayed, key ``pyramid-<token>``.

    Only the chunks with classified map pixels under them get tasks (the rest of the slide, glass and skipped
    blocks included, stays at the fill value 0 and is not stored).  Level 0's tasks read their own part of the map
    (``factor * 512`` pixels square) and sum it over cells; each further level's tasks sum 2 x 2 cells of the (up
    to) 2 x 2 chunks of the one before, so the map is read once and no task holds more than 2 x 2 chunks.  Sums,
    not means, go down the levels, so a pixel at the map's edge is the mean over the map pixels under it.  Every
    task is named ``pyramid-<token>-...``, as the dashboard shows it.
    """
    map_path, pyramid_path = str(map_path), str(pyramid_path)
    chunk = PYRAMID_CHUNK_PX
    graph: dict = {}
    writes = []
    finer: set[tuple[int, int]] = set()  # the chunks of the level before that have tasks
    finer_grid, finer_shape = (0, 0), (0, 0)  # ... its grid of chunks and its shape
    for level, shape in enumerate(plan.shapes_rc):
        grid = tuple(math.ceil(n / chunk) for n in shape)
        if level == 0:  # the chunks with map pixels under them: rows that have some x columns that have some
            under = [[i for i in range(grid[axis])
                      if plan.covered(axis, plan.factors[0], i * chunk, _chunk_shape(shape, (i, i))[axis]).any()]
                     for axis in (0, 1)]
            signal = plan.level0_chunks_with_signal(grid)
            chunks = [(i, j) for i in under[0] for j in under[1] if signal[i, j]]
        else:  # the parents of those of the level before
            chunks = sorted({(i // 2, j // 2) for i, j in finer})
        for index in chunks:
            key = (f"pyramid-{token}-sum{level}", *index)
            if level == 0:
                graph[key] = (_read_sums, map_path, plan, index)
            else:
                children = [[(2 * index[0] + a, 2 * index[1] + b) for b in (0, 1) if 2 * index[1] + b < finer_grid[1]]
                            for a in (0, 1) if 2 * index[0] + a < finer_grid[0]]
                parts = [[(f"pyramid-{token}-sum{level - 1}", *child) if child in finer else None for child in row]
                         for row in children]
                shapes = [[_chunk_shape(finer_shape, child) for child in row] for row in children]
                graph[key] = (_sum_parts, parts, shapes)
            write = (f"pyramid-{token}-write{level}", *index)
            graph[write] = (_write_means, key, f"{pyramid_path}/{level}", plan, level, index)
            writes.append(write)
        finer, finer_grid, finer_shape = set(chunks), grid, shape
    graph[f"pyramid-{token}"] = (len, writes)  # the one future the batch watches: done when every chunk is
    return Delayed(f"pyramid-{token}", HighLevelGraph.from_collections(f"pyramid-{token}", graph, dependencies=[]))


def build_pyramid(map_path: str | os.PathLike, slide_dir: str | os.PathLike, name: str, *, token: str = "local",
                  scheduler: str | None = "threads") -> Path:
    """Write ``<slide_dir>/prob.ome.zarr`` from a stored map in this process (the batch runs the same graph on
    its cluster: :func:`submit_pyramid`); returns its path."""
    partial = Path(slide_dir) / f".{PYRAMID_NAME}.partial"
    plan = create_pyramid(partial, map_path, name)
    pyramid_graph(map_path, partial, plan, token).compute(scheduler=scheduler)
    return publish_pyramid(slide_dir)


def submit_pyramid(client, map_path: str | os.PathLike, slide_dir: str | os.PathLike, name: str, token: str):
    """Create the slide's partial pyramid and send the tasks that fill it; returns their one future.

    When it has finished, :func:`publish_pyramid` moves the pyramid into place.
    """
    partial = Path(slide_dir) / f".{PYRAMID_NAME}.partial"
    plan = create_pyramid(partial, map_path, name)
    return client.compute(pyramid_graph(map_path, partial, plan, token))


def publish_pyramid(slide_dir: str | os.PathLike) -> Path:
    """Move a filled ``.prob.ome.zarr.partial`` into place as ``prob.ome.zarr``; returns its path."""
    final = Path(slide_dir) / PYRAMID_NAME
    replace_dir(Path(slide_dir) / f".{PYRAMID_NAME}.partial", final)
    return final


# ------------------------------------------------------------------ a finished slide's map
def remove_working_map(slide_dir: str | os.PathLike) -> bool:
    """Delete a finished slide's full-resolution ``prob.zarr`` (its pyramid stays); False if there was none.

    The folder is first renamed to a hidden name, so an interruption never leaves a ``prob.zarr``
    with chunks missing (that would read as P = 0 there), only a hidden folder a later call removes.
    """
    slide_dir = Path(slide_dir)
    for stale in slide_dir.glob(f".{WORKING_MAP_NAME}.removing-*"):
        shutil.rmtree(stale, ignore_errors=True)
    working = slide_dir / WORKING_MAP_NAME
    if not working.is_dir():
        return False
    doomed = slide_dir / f".{WORKING_MAP_NAME}.removing-{uuid.uuid4().hex[:8]}"
    working.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def finished_map_attributes(slide_dir: str | os.PathLike) -> tuple[dict, tuple[int, int], Path] | None:
    """The ``wsi_lymph`` attributes and shape of a slide's finished map, and where they were read.

    From the working map ``prob.zarr`` where it is kept, else from the pyramid (which records the working
    map's attributes and shape); None when there is neither.

    Raises
    ------
    KeyError, ValueError, OSError, zarr.errors.BaseZarrError
        A store that is there but cannot be read back.
    """
    slide_dir = Path(slide_dir)
    working, pyramid = slide_dir / WORKING_MAP_NAME, slide_dir / PYRAMID_NAME
    if working.is_dir():
        array = zarr.open_array(str(working), mode="r")
        return dict(array.attrs)["wsi_lymph"], tuple(array.shape), working
    if pyramid.is_dir():
        attrs = dict(zarr.open_group(str(pyramid), mode="r").attrs)["wsi_lymph"]
        return attrs, tuple(attrs["pyramid"]["map_shape_rc"]), pyramid
    return None


def open_pyramid(path: str | os.PathLike) -> tuple[list[da.Array], dict]:
    """A pyramid's levels as lazy Dask arrays of P (float32, finest first) and its group attributes."""
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    scale = np.float32(attrs["wsi_lymph"]["pyramid"]["value_scale"])
    levels = [da.from_zarr(group[d["path"]]).astype(np.float32) * scale for d in attrs["multiscales"][0]["datasets"]]
    return levels, attrs

