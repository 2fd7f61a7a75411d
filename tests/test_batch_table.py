"""``OUT/batch.csv`` / ``batch.parquet``: one row per slide, equal to the per-slide files, through the real CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SLIDES

from wsi_lymph.detection.hotspot import count_in_circle, max_points_in_circle_all_sweeps
from wsi_lymph.engine.params import SlideResult
from wsi_lymph.io.batch_table import COLUMN_NAMES, FLAG_SEPARATOR, BatchTable, read_batch_table

TEXT = {"name", "path", "status", "reason", "flags", "model", "model_id", "model_sha256", "mpp_source",
        "wsi_lymph_version"}
INTEGER = {"count", "hotspot_count", "stride_px"}


def _from_summary(summary: dict) -> dict:
    """Each result column as the slide's summary.json holds it (written here independently of the table's code)."""
    hotspot = summary["hotspot"]
    return {
        "count": summary["count"], "analysed_area_mm2": summary["analysed_area_mm2"],
        "tissue_area_mm2": summary["tissue_area_mm2"], "hematoxylin_area_mm2": summary["hematoxylin_area_mm2"],
        "density_per_mm2_analysed": summary["density_per_mm2_analysed"],
        "density_per_mm2_tissue": summary["density_per_mm2_tissue"],
        "density_per_mm2_hematoxylin": summary["density_per_mm2_hematoxylin"],
        "hotspot_density_per_mm2": hotspot["density_per_mm2"], "hotspot_count": hotspot["count"],
        "hotspot_x_um": hotspot["x_um"], "hotspot_y_um": hotspot["y_um"], "hotspot_radius_um": hotspot["radius_um"],
        "hotspot_area_mm2": hotspot["area_mm2"],
        "hotspot_inside_analysed_fraction": hotspot["inside_analysed_fraction"], "model": summary["model"]["name"],
        "model_id": summary["model"]["model_id"], "model_sha256": ";".join(summary["model"]["sha256"]),
        "threshold": summary["threshold"], "stride_px": summary["params"]["stride_px"], "mpp": summary["mpp"],
        "mpp_source": summary["mpp_source"], "wsi_lymph_version": summary["versions"]["wsi_lymph"],
    }


def _typed(column: str, cell: str):
    if cell == "":
        return "" if column in TEXT else None
    if column in TEXT:
        return cell
    return int(cell) if column in INTEGER else float(cell)


def _read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [{column: _typed(column, cell) for column, cell in row.items()} for row in reader]
        return list(reader.fieldnames), rows


def _detect(*args) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", "detect", *map(str, args)], capture_output=True,
                         text=True, timeout=300, env=os.environ.copy())
    assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    return run


@pytest.mark.shared_data
def test_batch_csv_rows_equal_the_per_slide_files(tmp_path):
    """Two slides (one file under two names) and a broken one, default model, a 256-px region, one worker."""
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    for name in ("alpha.svs", "beta.svs"):
        os.symlink(SLIDES / "cmu-1-small-region.svs", folder / name)
    (folder / "gamma.svs").write_text("not a slide")
    command = (folder, "--out", out, "--region", "800,1100,256,256", "--hotspot-mm2", "0.01", "--workers", "1",
               "--dashboard", "127.0.0.1:0")
    run = _detect(*command)
    assert run.returncode == 1, run.stdout + run.stderr  # gamma failed, the others are done
    assert "2 of 3 slides done" in run.stdout

    columns, rows = _read_csv(out / "batch.csv")
    assert tuple(columns) == COLUMN_NAMES
    batch = json.loads((out / "batch.json").read_text())
    assert [row["name"] for row in rows] == [slide["name"] for slide in batch["slides"]] == ["alpha", "beta",
                                                                                              "gamma"]
    for row, slide in zip(rows, batch["slides"], strict=True):  # the batch's own columns, as batch.json has them
        assert (row["path"], row["status"], row["reason"]) == (slide["path"], slide["status"], slide["reason"])
        assert row["flags"] == FLAG_SEPARATOR.join(slide["flags"])

    for row in rows[:2]:
        summary = json.loads((out / row["name"] / "summary.json").read_text())
        expected = _from_summary(summary)
        assert {column: row[column] for column in expected} == expected, row["name"]
        assert row["status"] == "done" and row["wall_s"] > 0
        assert row["hotspot_area_mm2"] == 0.01 and row["hotspot_count"] <= row["count"]
        # The hotspot is the densest 0.01 mm² field of the centres in centers.csv, and holds what it says.
        with open(out / row["name"] / "centers.csv") as handle:
            centres = np.array([[float(r["x_um"]), float(r["y_um"])] for r in csv.DictReader(handle)])
        assert len(centres) == row["count"] > 5
        assert count_in_circle(centres, (row["hotspot_x_um"], row["hotspot_y_um"]),
                               row["hotspot_radius_um"] + 1e-4) == row["hotspot_count"]
        assert max_points_in_circle_all_sweeps(centres, row["hotspot_radius_um"])[0] == row["hotspot_count"]
        assert row["hotspot_density_per_mm2"] == pytest.approx(row["hotspot_count"] / 0.01)
        # A 0.01 mm² field (radius 56 µm) on a 128 x 128 µm region: partly outside it, and the table says so.
        assert 0.5 < row["hotspot_inside_analysed_fraction"] <= 1
        assert summary["density_png_bin_um"] == 25.0  # a 128-µm region: the finest automatic bin
    failed = rows[2]
    assert failed["status"] == "failed" and "gamma.svs" in failed["reason"]
    assert all(failed[column] is None for column in _from_summary(json.loads(
        (out / "alpha" / "summary.json").read_text())) if column not in TEXT)

    # The Parquet copy holds the same rows, with types.
    parquet = read_batch_table(out)
    assert [{column: ("" if value is None and column in TEXT else value) for column, value in row.items()}
            for row in parquet] == rows
    schema = pq.read_schema(out / "batch.parquet")
    assert str(schema.field("count").type) == "int64" and str(schema.field("wall_s").type) == "double"

    # Run again: the finished slides are skipped, and the table keeps the wall times of the run that made them.
    again = _detect(*command)
    assert again.returncode == 1 and "already done" in again.stdout, again.stdout + again.stderr
    assert _read_csv(out / "batch.csv")[1] == rows


def test_the_table_is_rewritten_when_a_slide_changes_status(tmp_path):
    table = BatchTable(tmp_path)
    slides = [SlideResult(path="/s/a.svs", name="a"), SlideResult(path="/s/b.svs", name="b")]
    assert table.update(slides) is True
    assert [row["status"] for row in read_batch_table(tmp_path)] == ["pending", "pending"]
    assert table.update(slides) is False  # nothing changed: not written again

    # b failed; a stale summary.json in its folder (an earlier run) is not taken for this run's results.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"count": 99, "hotspot": {"count": 9}}))
    slides[1].status, slides[1].reason = "failed", "b.svs: no such file"
    slides[0].flags = ["stain partly unlike H&E: ...; results may be unreliable", "centres on a lattice"]
    assert table.update(slides) is True
    a, b = read_batch_table(tmp_path)
    assert (b["status"], b["reason"], b["count"], b["hotspot_count"]) == ("failed", "b.svs: no such file", None, None)
    assert a["flags"].split(FLAG_SEPARATOR) == slides[0].flags
    _, rows = _read_csv(tmp_path / "batch.csv")
    assert [(row["name"], row["status"], row["count"]) for row in rows] == [("a", "pending", None),
                                                                           ("b", "failed", None)]

    # A table that cannot be written (here: its folder is missing) is logged by update, raised by write.
    blocked = BatchTable(tmp_path / "missing")
    assert blocked.update(slides) is False
    with pytest.raises(OSError):
        blocked.write(slides)
