"""``OUT/batch.csv`` and ``OUT/batch.parquet``: one row per slide of a batch, to join with clinical data.

Each value has one home and the table copies it from there: the slide's status, reason, flags and wall time from
the batch (as ``batch.json`` records them), every result and setting from the slide's ``summary.json``.  A failed
or unfinished slide has empty result columns (``summary.json`` is written last: without it nothing is known).
Both files are written atomically and rewritten as slides finish, so a reader always sees a whole table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from wsi_lymph.io.outputs import write_atomic

logger = logging.getLogger(__name__)

#: Between two flags of a slide in the ``flags`` cell (a flag's own text may hold '; ').
FLAG_SEPARATOR = " | "


def _summary_value(*keys: str) -> Callable[[dict], object]:
    def get(summary: dict) -> object:
        value = summary
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get


#: The columns: name, Arrow type, where the value comes from (a summary.json path; None: from the batch).
COLUMNS: tuple[tuple[str, pa.DataType, Callable[[dict], object] | None], ...] = (
    ("name", pa.string(), None),  # the slide's output folder, OUT/<name>/
    ("path", pa.string(), None),
    ("status", pa.string(), None),  # done, failed, or pending (still running, or interrupted)
    ("reason", pa.string(), None),  # why it failed
    ("flags", pa.string(), None),  # why the input or its results look doubtful, joined by FLAG_SEPARATOR
    ("count", pa.int64(), _summary_value("count")),
    ("analysed_area_mm2", pa.float64(), _summary_value("analysed_area_mm2")),
    ("tissue_area_mm2", pa.float64(), _summary_value("tissue_area_mm2")),
    ("hematoxylin_area_mm2", pa.float64(), _summary_value("hematoxylin_area_mm2")),
    ("density_per_mm2_analysed", pa.float64(), _summary_value("density_per_mm2_analysed")),
    ("density_per_mm2_tissue", pa.float64(), _summary_value("density_per_mm2_tissue")),
    ("density_per_mm2_hematoxylin", pa.float64(), _summary_value("density_per_mm2_hematoxylin")),
    ("hotspot_density_per_mm2", pa.float64(), _summary_value("hotspot", "density_per_mm2")),
    ("hotspot_count", pa.int64(), _summary_value("hotspot", "count")),
    ("hotspot_x_um", pa.float64(), _summary_value("hotspot", "x_um")),  # µm from the level-0 top-left corner
    ("hotspot_y_um", pa.float64(), _summary_value("hotspot", "y_um")),
    ("hotspot_radius_um", pa.float64(), _summary_value("hotspot", "radius_um")),
    ("hotspot_area_mm2", pa.float64(), _summary_value("hotspot", "area_mm2")),
    # Below 1: the field reaches beyond the analysed region (a small --region), its density counts unanalysed area.
    ("hotspot_inside_analysed_fraction", pa.float64(), _summary_value("hotspot", "inside_analysed_fraction")),
    ("model", pa.string(), _summary_value("model", "name")),
    ("model_id", pa.string(), _summary_value("model", "model_id")),
    ("model_sha256", pa.string(), lambda s: _joined(_summary_value("model", "sha256")(s), ";")),  # one per member
    ("threshold", pa.float64(), _summary_value("threshold")),
    ("stride_px", pa.int64(), _summary_value("params", "stride_px")),  # model-frame px; patch models only
    ("mpp", pa.float64(), _summary_value("mpp")),  # level-0 µm/px
    ("mpp_source", pa.string(), _summary_value("mpp_source")),
    ("wall_s", pa.float64(), None),  # seconds from opening the slide to its outputs, in the run that made them
    ("wsi_lymph_version", pa.string(), _summary_value("versions", "wsi_lymph")),
)
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


class SlideStatus(Protocol):
    """What the table reads of a slide's outcome in the batch (:class:`wsi_lymph.engine.params.SlideResult`)."""

    name: str
    path: str
    status: str
    reason: str
    flags: list[str]
    seconds: dict
    reused: bool


def _joined(values, separator: str) -> str | None:
    if values is None:
        return None
    return separator.join(map(str, values)) if isinstance(values, list | tuple) else str(values)


class BatchTable:
    """The table of one output folder; :meth:`update` rewrites it when a slide's status changed.

    Rows of finished slides are kept, so a batch of n slides reads each ``summary.json`` once, not n times.

    Parameters
    ----------
    out_dir : path-like
        The batch's output folder (``OUT``).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._finished: dict[tuple[str, str, str], dict] = {}  # (name, path, status) -> row
        self._written: tuple | None = None
        self._earlier_wall = self._read_earlier_wall()

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "batch.csv"

    @property
    def parquet_path(self) -> Path:
        return self.out_dir / "batch.parquet"

    def rows(self, results: Sequence[SlideStatus]) -> list[dict]:
        """One row per slide, in batch order (values typed as :data:`COLUMNS` says, None where unknown)."""
        rows = []
        for result in results:
            key = (result.name, result.path, result.status)
            row = self._finished.get(key) or self._row(result)
            if result.status in ("done", "failed"):
                self._finished[key] = row
            rows.append(row)
        return rows

    def write(self, results: Sequence[SlideStatus]) -> None:
        """Write ``batch.csv`` and ``batch.parquet`` now (atomically).

        Raises
        ------
        OSError
            A file could not be written (the earlier one stays whole).
        """
        rows = self.rows(results)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMN_NAMES)
        writer.writerows([_csv_cell(row[name]) for name in COLUMN_NAMES] for row in rows)
        table = pa.table({name: pa.array([row[name] for row in rows], type=kind) for name, kind, _ in COLUMNS})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(self.parquet_path, sink.getvalue().to_pybytes())
        write_atomic(self.csv_path, buffer.getvalue().encode("utf-8"))
        self._written = self._state(results)

    def update(self, results: Sequence[SlideStatus]) -> bool:
        """Rewrite the table if a slide was added or changed status since the last write; True if written.

        A failure to write is logged and left for the batch's final :meth:`write` to report.
        """
        if self._state(results) == self._written:
            return False
        try:
            self.write(results)
        except OSError as error:
            logger.debug("batch table not updated", exc_info=error)
            return False
        return True

    # ------------------------------------------------------------------ one row
    def _row(self, result: SlideStatus) -> dict:
        summary = self._summary(result.name) if result.status == "done" else {}
        row = {name: (get(summary) if get is not None else None) for name, _, get in COLUMNS}
        row.update(name=result.name, path=result.path, status=result.status, reason=result.reason or "",
                   flags=FLAG_SEPARATOR.join(result.flags))
        wall = result.seconds.get("wall")
        if wall is None and result.status == "done":  # skipped as already done: the run that made it said
            wall = self._earlier_wall.get((result.name, result.path))
        row["wall_s"] = wall
        for name, kind, _ in COLUMNS:  # a summary from another version may hold a value of another kind
            row[name] = _typed(row[name], kind)
        return row

    def _summary(self, name: str) -> dict:
        try:
            return json.loads((self.out_dir / name / "summary.json").read_text())
        except (OSError, ValueError) as error:
            logger.debug("%s: no readable summary.json for the batch table", name, exc_info=error)
            return {}

    def _read_earlier_wall(self) -> dict[tuple[str, str], float]:
        """Wall times of the table an earlier run left: a slide it finished is skipped now, not timed again."""
        try:
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                return {(row["name"], row["path"]): float(row["wall_s"]) for row in csv.DictReader(handle)
                        if row.get("status") == "done" and row.get("wall_s")}
        except (OSError, ValueError, KeyError, csv.Error):
            return {}

    @staticmethod
    def _state(results: Sequence[SlideStatus]) -> tuple:
        return tuple((r.name, r.status) for r in results)


def read_batch_table(out_dir: str | Path) -> list[dict]:
    """The rows of ``OUT/batch.parquet`` with their types (None where empty)."""
    return pq.read_table(Path(out_dir) / "batch.parquet").to_pylist()


def _typed(value, kind: pa.DataType):
    if value is None or value == "":
        return None if kind != pa.string() else ("" if value == "" else None)
    try:
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_floating(kind):
            number = float(value)
            return number if math.isfinite(number) else None
    except (TypeError, ValueError):
        return None
    return str(value)


def _csv_cell(value) -> str:
    """A cell as text: empty for unknown, numbers as Python writes them (the same digits as summary.json)."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)
