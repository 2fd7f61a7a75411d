"""Where one student block's time goes: ``cProfile`` of ``infer_block`` on a 2,048-px block of CMU-1, one thread.

A warm-up block is computed first (model load, first-call set-up) and not profiled; the profiled block is the next
one, written into a fresh Zarr map, with the Reinhard transform of a synthetic slide's statistics applied.  Prints
the functions by internal time and the block's wall time, then times the colour transform on the block's own
pixels four ways in this process, alternating (median and range of 15): the engine's path
(:class:`~wsi_lymph.detection.stain.ReinhardTransform`) once the block's colours are in the worker's table and
with each pixel computed (a block of colours not met before), the path it replaced (scikit-image's conversions on
float32) and the definition (:func:`~wsi_lymph.detection.stain.reference_reinhard`, float64).

Usage::

    .venv/bin/python bench/student_block_profile.py
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from skimage.color import lab2rgb, rgb2lab

from wsi_lymph.constants import DEFAULT_MODEL, PAPER_STAIN_REFERENCE
from wsi_lymph.detection.stain import (
    LabStatistics,
    ReinhardTransform,
    _reinhard_gain,
    _tables,
    colour_keys,
    reference_reinhard,
)
from wsi_lymph.engine.batch import infer_block
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.probmap_store import create_partial_store
from wsi_lymph.models.registry import resolve_model
from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import open_slide, read_region

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def _skimage_float32(transform: ReinhardTransform, rgb: np.ndarray) -> np.ndarray:
    """The engine's transform until 2026-12-02: scikit-image's round trip on float32 pixels."""
    lab = rgb2lab(rgb.astype(np.float32) / np.float32(255.0))
    gain = _reinhard_gain(transform.source, transform.reference)
    shifted = (lab - np.float32(transform.source.mean)) * gain.astype(np.float32) + np.float32(transform.reference.mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return np.clip(np.rint(lab2rgb(shifted) * 255.0), 0, 255).astype(np.uint8)


def main() -> None:
    torch.set_num_threads(1)
    info = open_slide(SLIDE)
    frame = choose_frame(info)
    transform = ReinhardTransform(LabStatistics(mean=(60.0, 20.0, -20.0), std=(15.0, 8.0, 10.0)),
                                  LabStatistics.from_dict(PAPER_STAIN_REFERENCE))
    checkpoints = [str(p) for p in resolve_model(DEFAULT_MODEL)]
    params = ProbmapParams(block_px=2048, torch_threads=1)
    boxes = [(0, 2048, 0, 2048), (2048, 4096, 0, 2048)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "prob.zarr"
        create_partial_store(store, boxes, (0, 0), 512, "float16", {})
        infer_block(info, frame, boxes[0], (0, 0), checkpoints, params, str(store), transform)  # warm-up
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        infer_block(info, frame, boxes[1], (0, 0), checkpoints, params, str(store), transform)
        profile.disable()
        print(f"block {boxes[1]}: {time.perf_counter() - start:.3f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(16)
    level = read_region(info, frame.level, 0, 0, *info.level_sizes_xy[frame.level])
    colours = colour_keys(level)
    print(f"{SLIDE.name} level {frame.level}: {np.unique(colours).size:,} distinct colours in {colours.size:,} px")
    rgb = read_region(info, frame.level, 0, 512, 532, 532)  # the level pixels of about one block and its halo
    tables = _tables(transform.source, transform.reference)
    ways = {"engine path, colours already in the worker's table": transform,
            "engine path, each pixel computed (a block of new colours)":
                lambda x: tables.compute(x.reshape(-1, 3)).reshape(x.shape),
            "scikit-image float32 (the engine's path before)": lambda x: _skimage_float32(transform, x),
            "scikit-image float64 (the definition)": lambda x: reference_reinhard(x, transform.source,
                                                                                  transform.reference)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(16):
        for name, apply in ways.items():
            start = time.perf_counter()
            apply(rgb)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        ms = [1000 * v for v in values[1:]]
        print(f"Reinhard on {rgb.shape[0]} x {rgb.shape[1]} px, {name}: {statistics.median(ms):.1f} ms "
              f"({min(ms):.1f}-{max(ms):.1f})")


if __name__ == "__main__":
    main()
