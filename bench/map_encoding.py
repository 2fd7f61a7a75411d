"""What writing one student block of the map costs: float16 conversion and Blosc settings, in one run.

A 2,048² model-frame block of CMU-1 is computed once by the student; then, alternating over ``--repeats``:
the float32 -> float16 conversion by NumPy's ``astype`` and by ``probmap_store.encode`` (torch), and
``probmap_store.write_block`` into a fresh Zarr map per layout (:data:`LAYOUTS`): 512² chunks (the paper's
networks' default) with LZ4 byte-shuffle, LZ4 bit-shuffle (the engine's codec), no compression, the engine's codec
under Zarr settings that might cut its cost per chunk, and one 2,048² shard of 512² chunks; 1,024² chunks (the
student's default) with the engine's codec and with other codecs.  As references for Zarr's own share of a
write: Blosc alone on the 16 512² chunks of the block (``numcodecs``, the engine's settings) and writing those 16
compressed chunks as plain files into a fresh folder.  Run it under ``taskset -c 0`` to see the costs on one
core, as a worker has it.  Printed: median and range of each (first repeat excluded), bytes per block, and
whether both conversions give the same bits.

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
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Layout:
    """How a map is stored: chunk edge (px), Blosc codec (None: no compression), shard edge, Zarr settings."""

    chunk_px: int
    codec: tuple[str, int, str] | None = ("lz4", 5, "bitshuffle")  # (cname, clevel, shuffle): the engine's
    shard_px: int | None = None
    zarr_config: dict = field(default_factory=dict)


#: Written layouts, by name.
LAYOUTS = {
    "512² chunks, lz4 byte-shuffle": Layout(512, ("lz4", 5, "shuffle")),
    "512² chunks, the engine's codec (lz4 bit-shuffle)": Layout(512),
    "512² chunks, uncompressed": Layout(512, None),
    "512² chunks, async.concurrency 1 + threading.max_workers 1": Layout(
        512, zarr_config={"async.concurrency": 1, "threading.max_workers": 1}),
    "512² chunks, codec_pipeline.batch_size 16": Layout(512, zarr_config={"codec_pipeline.batch_size": 16}),
    "512² chunks in one 2,048² shard": Layout(512, shard_px=2048),
    "1,024² chunks, the engine's codec (the student's)": Layout(1024),
    "1,024² chunks, lz4 level 1 bit-shuffle": Layout(1024, ("lz4", 1, "bitshuffle")),
    "1,024² chunks, zstd level 1 bit-shuffle": Layout(1024, ("zstd", 1, "bitshuffle")),
    "1,024² chunks, blosclz level 5 bit-shuffle": Layout(1024, ("blosclz", 5, "bitshuffle")),
}

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
            for name, layout in LAYOUTS.items():
                store = Path(tmp) / "map.zarr"
                compressors = None if layout.codec is None else [BloscCodec(
                    cname=layout.codec[0], clevel=layout.codec[1], shuffle=layout.codec[2], typesize=2)]
                zarr.create_array(str(store), shape=(2048, 2048), chunks=(layout.chunk_px, layout.chunk_px),
                                  shards=layout.shard_px and (layout.shard_px, layout.shard_px), dtype="float16",
                                  compressors=compressors, fill_value=0)
                with zarr.config.set(layout.zarr_config):
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
            folder = Path(tmp) / "plain"
            folder.mkdir()
            start = time.perf_counter()
            for k, data in enumerate(compressed):
                (folder / f"chunk-{k}").write_bytes(data)
            times.setdefault("reference: 16 plain file writes", []).append(time.perf_counter() - start)
            shutil.rmtree(folder)
    same = np.array_equal(prob.astype("float16").view(np.uint16), encode(prob, "float16").view(np.uint16))
    report = {name: {"median_ms": round(1000 * statistics.median(t[1:]), 1),
                     "range_ms": [round(1000 * min(t[1:]), 1), round(1000 * max(t[1:]), 1)],
                     **({"mb": round(sizes[name], 2)} if name in sizes else {})} for name, t in times.items()}
    print(json.dumps({"same_bits": bool(same), **report}, indent=2))


if __name__ == "__main__":
    main()
