"""Per-slide outputs that pathologists' tools open: centres as CSV/Parquet/GeoJSON and a summary.

Coordinates are level-0 pixels of the slide, ``x`` = column, ``y`` = row,
pixel centres at integer values (OpenSlide/QuPath convention); ``x_um``/``y_um``
multiply them by the slide's level-0 µm/px.  Every file is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from wsi_lymph.slides.frame import ModelFrame, frame_to_level0

CENTRE_COLUMNS = ("x", "y", "x_um", "y_um", "probability")
LYMPHOCYTE_COLOUR_RGB = (0, 160, 255)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write a file through a hidden temporary file in the same folder and a rename.

    Parameters
    ----------
    path : path-like
        The file; readers see either its old content or the new one, never a part.
    data : bytes or callable
        The content, or a function that writes the file it is given (e.g. an image writer).
    fsync : bool
        Flush the file to disk before the rename (logs that must survive a machine crash).

    Raises
    ------
    OSError
        As the system raised it (a full disk: ``ENOSPC``), naming ``path``; the old content is left whole.
    """
    path = Path(path)
    # Hidden name in the same folder: os.replace is atomic within one file system, and folder
    # scans skip names starting with '.', so a crash leaves no half-written file under a real name.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno and error.filename == str(tmp):  # name the file asked for, not its hidden temporary
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def centres_table(centres_rc: np.ndarray, scores: np.ndarray, frame: ModelFrame, origin_rc, mpp: float) -> dict:
    """Columns of the centre table from model-frame (row, col) indices of a map with origin ``origin_rc``.

    Returns
    -------
    dict of np.ndarray
        ``x``, ``y`` (level-0 px), ``x_um``, ``y_um`` (µm from the slide's top-left corner), ``probability``
        (the smoothed P at the centre, the value the threshold was applied to).
    """
    rc = np.asarray(centres_rc, dtype=np.float64).reshape(-1, 2) + np.asarray(origin_rc, dtype=np.float64)
    xy = frame_to_level0(rc, frame)
    return {
        "x": np.round(xy[:, 0], 4), "y": np.round(xy[:, 1], 4),
        "x_um": np.round(xy[:, 0] * mpp, 4), "y_um": np.round(xy[:, 1] * mpp, 4),
        "probability": np.round(np.asarray(scores, dtype=np.float64), 4),
    }


def write_centres_csv(path: Path, table: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CENTRE_COLUMNS)
    writer.writerows(zip(*(table[name].tolist() for name in CENTRE_COLUMNS), strict=True))
    write_atomic(path, buffer.getvalue().encode())


def write_centres_parquet(path: Path, table: dict) -> None:
    """Parquet copy of the table (same columns as the CSV)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({name: table[name] for name in CENTRE_COLUMNS}), sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_centres_parquet(path: Path) -> dict:
    """The centre table as :func:`write_centres_parquet` wrote it (NumPy columns, same dtypes and order)."""
    table = pq.read_table(path, columns=list(CENTRE_COLUMNS))
    return {name: table.column(name).to_numpy() for name in CENTRE_COLUMNS}


def write_centres_geojson(path: Path, table: dict) -> None:
    """Point detections classified "Lymphocyte", as QuPath imports them (File > Import objects)."""
    features = [
        {
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{path.parent.name}:{x}:{y}")),
            "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "Lymphocyte", "color": list(LYMPHOCYTE_COLOUR_RGB)},
                "measurements": {"probability": p},
            },
        }
        for x, y, p in zip(table["x"].tolist(), table["y"].tolist(), table["probability"].tolist(), strict=True)
    ]
    write_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}).encode())


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def _png_bytes(rgb: np.ndarray) -> bytes:

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tutorial_pngs(folder: Path, name: str, prob: np.ndarray) -> None:
    """The tutorial's ``<name>_prob.png`` (red = 1 - P, green = P) and ``<name>_class.png`` (P > 0.5 white)."""
    p8 = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)
    rgb = np.stack([255 - p8, p8, np.zeros_like(p8)], axis=-1)
    write_atomic(folder / f"{name}_prob.png", _png_bytes(rgb))
    write_atomic(folder / f"{name}_class.png", _png_bytes(np.where(prob > 0.5, 255, 0).astype(np.uint8)))
