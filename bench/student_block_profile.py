"""Where one student block's time goes: ``cProfile`` of ``infer_block`` on a 2,048-px block of CMU-1, one thread.

A warm-up block is computed first (model load, first-call set-up) and not profiled; the profiled block is the next
one, written into a fresh Zarr map, with the Reinhard transform of a synthetic slide's statistics applied.  Prints
the functions by internal time and the block's wall time.

Usage::

    .venv/bin/python bench/student_block_profile.py
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from wsi_lymph.constants import DEFAULT_MODEL, PAPER_STAIN_REFERENCE
from wsi_lymph.detection.stain import LabStatistics, ReinhardTransform
from wsi_lymph.engine.batch import infer_block
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.probmap_store import create_partial_store
from wsi_lymph.models.registry import resolve_model
from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import open_slide

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


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


if __name__ == "__main__":
    main()
