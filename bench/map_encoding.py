"""What writing one student block of the map costs: float16 conversion and Blosc settings, in one run.

A 2,048² model-frame block of CMU-1 is computed once by the student; then, alternating over ``--repeats``:
the float32 -> float16 conversion by NumPy's ``astype`` and by ``probmap_store.encode`` (torch), and
``probmap_store.write_block`` into a fresh Zarr map of 512² chunks (the paper's networks' default) with LZ4
byte-shuffle, LZ4 bit-shuffle (the engine's codec) and no compression, and of 1,024² chunks (the student's
default) with LZ4 bit-shuffle; and, as references for Zarr's own share of a write, Blosc alone on the 16
512² chunks of the block (``numcodecs``, the engine's settings) and writing those 16 compressed chunks as plain
files.  Run it under ``taskset -c 0`` to see the costs on one core, as a worker has it.  Printed: median and
range of each (first repeat excluded), bytes per block, and whether both conversions give the same bits.

Usage::

    .venv/bin/python bench/map_encoding.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from wsi_lymph.constants import DEFAULT_MODEL
from wsi_lymph.detection.inference import block_probabilities
from wsi_lymph.engine.batch import model_description
from wsi_lymph.io.probmap_store import encode, write_block
from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import open_slide

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
#: Written layouts: name -> (Blosc shuffle or None for no compression, chunk edge in px).
LAYOUTS = {"lz4 byte-shuffle": ("shuffle", 512), "lz4 bit-shuffle (the engine's codec)": ("bitshuffle", 512),
           "uncompressed": (None, 512), "lz4 bit-shuffle, 1,024² chunks (the student's)": ("bitshuffle", 1024)}

#: The engine's codec (``probmap_store.map_compressor``) as numcodecs has it, for the reference without Zarr.
BLOSC = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = open_slide(SLIDE)
    prob, _ = block_probabilities(info, choose_frame(info), (4096, 6144, 4096, 6144),
                                  tuple(model_description(DEFAULT_MODEL)["members"]))
    times: dict[str, list[float]] = {}
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, convert in (("numpy astype", lambda: prob.astype("float16")),
                                  ("encode (torch)", lambda: encode(prob, "float16"))):
                start = time.perf_counter()
                convert()
                times.setdefault(name, []).append(time.perf_counter() - start)
            for name, (shuffle, chunk_px) in LAYOUTS.items():
                store = Path(tmp) / "map.zarr"
                compressors = None if shuffle is None else [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle,
                                                                       typesize=2)]
                zarr.create_array(str(store), shape=(2048, 2048), chunks=(chunk_px, chunk_px), dtype="float16",
                                  compressors=compressors, fill_value=0)
                start = time.perf_counter()
                write_block(store, (0, 2048, 0, 2048), (0, 0), prob, "float16")
                times.setdefault(name, []).append(time.perf_counter() - start)
                sizes[name] = sum(f.stat().st_size for f in store.rglob("c/*/*")) / 1e6
                shutil.rmtree(store)
            chunks = [np.ascontiguousarray(block) for rows in np.split(encode(prob, "float16"), 4)
                      for block in np.split(rows, 4, axis=1)]
            start = time.perf_counter()
            compressed = [BLOSC.encode(chunk) for chunk in chunks]
            times.setdefault("reference: Blosc alone, 16 chunks", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            for k, data in enumerate(compressed):
                (Path(tmp) / f"chunk-{k}").write_bytes(data)
            times.setdefault("reference: 16 plain file writes", []).append(time.perf_counter() - start)
    same = np.array_equal(prob.astype("float16").view(np.uint16), encode(prob, "float16").view(np.uint16))
    report = {name: {"median_ms": round(1000 * statistics.median(t[1:]), 1),
                     "range_ms": [round(1000 * min(t[1:]), 1), round(1000 * max(t[1:]), 1)],
                     **({"mb": round(sizes[name], 2)} if name in sizes else {})} for name, t in times.items()}
    print(json.dumps({"same_bits": bool(same), **report}, indent=2))


if __name__ == "__main__":
    main()
