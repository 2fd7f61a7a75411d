"""The Zarr store of a probability map: create it, write blocks, record which blocks were computed, open it.

A map is written to a temporary store and renamed into place when every block
has finished (:func:`replace_dir`), so a map on disk is always complete.  Values
are stored as float16 (default), float32 or uint8 (round(255 P)); the attribute
``wsi_lymph.value_scale`` turns stored values back into P.
"""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec

STORE_DTYPES = {"float32": 1.0, "float16": 1.0, "uint8": 1.0 / 255.0}


def map_compressor(dtype: str) -> BloscCodec:
    """Blosc LZ4 over bit-shuffled values: a third of the time of Zarr's default Zstd (level 3) per block.

    The map's low bits are noise, so bit-shuffling (each bit plane apart) compresses the high ones better than
    byte-shuffling.  Writing a 2,048² student block of CMU-1 (float16, 512² chunks; ``bench/map_encoding.py``,
    median of 5): 30 ms and 6.7 MB bit-shuffled, 34 ms and 7.2 MB byte-shuffled, 24 ms and 8.4 MB uncompressed.
    At the student's speed, writing the map is a visible share of each task
    (``bench/student_speed.py``).
    """
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize)


def encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] to the stored dtype (uint8 = round(255 P)).

    float32 to float16 goes through torch: the same round-to-nearest-even values as NumPy's
    ``astype``, ~20x faster (NumPy converts element by element in software): 1.6 ms instead of
    32 ms for a 2,048² block (``bench/map_encoding.py``), a tenth of the student's forward pass over it.
    """
    if dtype == "uint8":
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    if dtype == "float16" and prob.dtype == np.float32:
        import torch  # here, not at the top: reading a map needs no torch

        return torch.from_numpy(np.ascontiguousarray(prob)).to(torch.float16).numpy()
    return prob.astype(dtype)


def write_block(store_path: str | os.PathLike, box: tuple[int, int, int, int], origin_rc: tuple[int, int],
                prob: np.ndarray, dtype: str) -> None:
    """Write one block's P into its (whole) chunks of the map; ``box`` is in model-frame pixels."""
    r0, r1, c0, c1 = box
    # Zarr's default skips chunks equal to the fill value, comparing each chunk with it first (~0.8 ms per
    # float16 512² chunk, 16 per student block).  A block's chunks hold tissue: write them all.  The setting
    # must be applied to the opened array: ``open_array(config=...)`` passes it only to a *new* array.
    array = zarr.open_array(str(store_path), mode="r+").with_config({"write_empty_chunks": True})
    array[r0 - origin_rc[0] : r1 - origin_rc[0], c0 - origin_rc[1] : c1 - origin_rc[1]] = encode(prob, dtype)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an older version is removed only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def create_partial_store(path: Path, boxes: list, origin_rc: tuple[int, int], chunk_px: int, dtype: str,
                         attributes: dict) -> None:
    """Create (overwrite) the empty map a slide's blocks are written into; P = 0 where nothing is written."""
    (r0, c0), last = origin_rc, boxes[-1]
    zarr.create_array(
        store=str(path),
        shape=(last[1] - r0, last[3] - c0),
        chunks=(chunk_px, chunk_px),
        dtype=dtype,
        fill_value=0,
        compressors=map_compressor(dtype),
        attributes=attributes,
        overwrite=True,
    )


def computed_blocks_attr(boxes: list, keep: np.ndarray, origin_rc: tuple[int, int], block_px: int) -> dict:
    """The blocks that were classified, as a compact map attribute (everywhere else P = 0).

    Stored as a bit mask over the block grid (row-major, ``np.packbits``,
    base64) so that it stays small for any slide size.
    """
    rows = 1 + (boxes[-1][0] - origin_rc[0]) // block_px
    cols = 1 + (boxes[-1][2] - origin_rc[1]) // block_px
    mask = np.asarray(keep, dtype=bool).reshape(rows, cols)
    return {"block_px": block_px, "grid": [rows, cols], "bits": base64.b64encode(np.packbits(mask)).decode()}


def computed_boxes(attrs: dict) -> list[tuple[int, int, int, int]] | None:
    """Map-pixel boxes (r0, r1, c0, c1) outside which a stored map is 0; None if the map does not say."""
    info = attrs.get("computed_blocks")
    if info is None:
        return None
    rows, cols = info["grid"]
    size = info["block_px"]
    mask = np.unpackbits(np.frombuffer(base64.b64decode(info["bits"]), np.uint8), count=rows * cols)
    return [(i * size, (i + 1) * size, j * size, (j + 1) * size)
            for i, j in np.argwhere(mask.reshape(rows, cols).astype(bool))]


def open_probmap(path: str | os.PathLike):
    """Open a stored map lazily: returns (dask array of P as float32, attributes dict)."""
    array = zarr.open_array(str(path), mode="r")
    attrs = dict(array.attrs)["wsi_lymph"]
    prob = da.from_zarr(array).astype(np.float32) * np.float32(attrs["value_scale"])
    return prob, attrs

