"""``OUT/report.html``: a batch at a glance, one self-contained page that works offline from the output folder.

One row per slide with the batch table's columns (``OUT/batch.csv``), failed slides first, then flagged
ones (results that look implausible or a stain unlike H&E), then the others; each row shows the slide's
``overlay.png`` (centres on the tissue) and ``density.png`` and links to its files.  Clicking a column
header sorts by it (numbers as numbers).  Styles and the few lines of script are inline and every link
is relative, so the page needs no network and the folder can be moved or archived whole.
"""

from __future__ import annotations

import csv
import html
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from wsi_lymph.io.batch_table import FLAG_SEPARATOR
from wsi_lymph.io.outputs import write_atomic

REPORT_NAME = "report.html"
#: A slide's files linked from its row, in this order, where they exist.
LINKED_FILES = ("summary.json", "centers.csv", "centers.parquet", "centers.geojson", "overlay.png", "density.png",
                "prob.ome.zarr", "prob.zarr", "probmap.json")
PICTURES = ("overlay.png", "density.png")
THUMBNAIL_CSS_PX = 180

_STYLE = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .3em; }}
p.totals span {{ margin-right: 1.2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; text-align: left; }}
th {{ background: #f0f0f0; cursor: pointer; position: sticky; top: 0; white-space: nowrap; }}
th[aria-sort=ascending]::after {{ content: " \\25B2"; }}
th[aria-sort=descending]::after {{ content: " \\25BC"; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.long {{ min-width: 12em; max-width: 24em; overflow-wrap: anywhere; font-size: .85em; }}
tr.failed {{ background: #fde2e2; }}
tr.flagged {{ background: #fff4cc; }}
.status {{ font-weight: 600; }}
.files a {{ display: inline-block; margin-right: .5em; font-size: .85em; }}
img.thumb {{ max-width: {THUMBNAIL_CSS_PX}px; max-height: {THUMBNAIL_CSS_PX}px; display: block; margin-bottom: 4px; }}
.note {{ color: #555; font-size: .85em; }}
"""

# Sort on a click on a header: numbers numerically, text otherwise, empty cells last; a second click reverses.
_SCRIPT = """
var NUMBER = /^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?$/i;
document.querySelectorAll("table.slides th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var up = th.getAttribute("aria-sort") !== "ascending";
    th.parentNode.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    var key = function (row) {
      var cell = row.cells[column];
      var text = (cell.getAttribute("data-sort") || cell.textContent).trim();
      return {text: text, number: NUMBER.test(text) ? parseFloat(text) : null};
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if ((x.text === "") !== (y.text === "")) { return x.text === "" ? 1 : -1; }
      var order = x.number !== null && y.number !== null ? x.number - y.number : x.text.localeCompare(y.text);
      return up ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_report(out_dir: str | os.PathLike, rows: Sequence[dict] | None = None, *, title: str | None = None) -> Path:
    """Write ``OUT/report.html`` (atomically) and return its path.

    Parameters
    ----------
    out_dir : path-like
        The batch's output folder (``OUT``): slide folders ``OUT/<name>/`` beside the report.
    rows : sequence of dict, optional
        One dict per slide, the batch table's columns in order; needs ``name`` (the slide's folder) and
        ``status``; ``reason`` and ``flags`` are read where present.  Default: ``OUT/batch.csv``, or,
        without it, rows made from ``OUT/batch.json`` and each slide's ``summary.json``.
    title : str, optional
        Page heading (default: "wsi-lymph batch: <folder name>").
    """
    out_dir = Path(out_dir)
    rows = [dict(row) for row in (read_batch_rows(out_dir) if rows is None else rows)]
    page = render_report(out_dir, rows, title=title or f"wsi-lymph batch: {out_dir.resolve().name}")
    path = out_dir / REPORT_NAME
    write_atomic(path, page.encode("utf-8"))
    return path


def read_batch_rows(out_dir: Path) -> list[dict]:
    """The rows of ``OUT/batch.csv`` (strings, column order kept); from ``batch.json`` + summaries without it."""
    table = out_dir / "batch.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return _rows_from_reports(out_dir)


def _rows_from_reports(out_dir: Path) -> list[dict]:
    """Rows from ``batch.json`` (status, reason, flags) and each finished slide's ``summary.json``."""
    try:
        slides = json.loads((out_dir / "batch.json").read_text())["slides"]
    except (OSError, ValueError, KeyError):
        slides = [{"name": folder.name, "status": "done"} for folder in sorted(out_dir.iterdir())
                  if (folder / "summary.json").is_file()]
    rows = []
    for slide in slides:
        row = {"name": slide["name"], "path": slide.get("path", ""), "status": slide.get("status", ""),
               "reason": slide.get("reason", ""), "flags": FLAG_SEPARATOR.join(slide.get("flags", []))}
        summary = _summary(out_dir / slide["name"])
        for key in ("count", "analysed_area_mm2", "tissue_area_mm2", "density_per_mm2_tissue", "threshold", "mpp"):
            row[key] = summary.get(key, "")
        rows.append(row)
    return rows


def _summary(folder: Path) -> dict:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _flags(row: dict, folder: Path) -> list[str]:
    """Why a slide is flagged: the row's ``flags`` (text or list), else its summary's."""
    flags = row.get("flags")
    if isinstance(flags, list | tuple):
        return [str(flag) for flag in flags if flag]
    if flags:
        return [flag.strip() for flag in str(flags).split(FLAG_SEPARATOR) if flag.strip()]
    if "flags" in row:  # the table says: none
        return []
    return [str(flag) for flag in _summary(folder).get("flags", []) if flag]


def _kind(row: dict, flags: list[str]) -> str:
    """failed, flagged (done, with doubts), done, or pending (not finished yet: the report of a running batch)."""
    status = str(row.get("status") or "").lower()
    if status == "done":
        return "flagged" if flags else "done"
    return "pending" if status in ("pending", "running", "") else "failed"


#: Rows in this order; within a kind, in the batch's order.
ORDER = {"failed": 0, "flagged": 1, "done": 2, "pending": 3}


def render_report(out_dir: Path, rows: list[dict], *, title: str) -> str:
    """The page as a string; see :func:`write_report`."""
    entries = []
    for index, row in enumerate(rows):
        name = str(row.get("name", ""))
        folder = out_dir / name
        flags = _flags(row, folder)
        kind = _kind(row, flags)
        entries.append((ORDER[kind], index, kind, row, flags, folder))
    entries.sort(key=lambda entry: entry[:2])

    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns and key != "name"]
    counts = {kind: sum(entry[2] == kind for entry in entries) for kind in ORDER}
    head = "".join(f"<th scope=\"col\">{html.escape(column)}</th>" for column in ["slide", "pictures", *columns])
    body = "\n".join(_row_html(row, flags, folder, columns, kind) for _, _, kind, row, flags, folder in entries)
    totals = (f"<span>{len(rows)} slides</span><span>{counts['done'] + counts['flagged']} done</span>"
              f"<span>{counts['failed']} failed</span><span>{counts['flagged']} flagged</span>"
              + (f"<span>{counts['pending']} not finished</span>" if counts["pending"] else ""))
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="totals">{totals}</p>
<p class="note">Written {html.escape(when)}. Failed slides first, then flagged ones, then the rest; click a column
header to sort. Pictures: centres on the tissue (overlay) and lymphocytes per mm² (density); click one for full
size. Every link is relative to this folder.</p>
<table class="slides">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _href(*parts: str) -> str:
    return "/".join(quote(part) for part in parts)


def _row_html(row: dict, flags: list[str], folder: Path, columns: list[str], kind: str) -> str:
    name = str(row.get("name", ""))
    links = " ".join(f"<a href=\"{_href(name, file)}{'/' if (folder / file).is_dir() else ''}\">{html.escape(file)}</a>"
                     for file in LINKED_FILES if (folder / file).exists())
    slide = (f"<td data-sort=\"{html.escape(name)}\"><strong>{html.escape(name)}</strong>"
             f"<div class=\"files\">{links or '<span class=note>no files</span>'}</div>"
             + "".join(f"<div class=\"note\">flag: {html.escape(flag)}</div>" for flag in flags) + "</td>")
    pictures = "".join(
        f"<a href=\"{_href(name, picture)}\"><img class=\"thumb\" src=\"{_href(name, picture)}\" "
        f"alt=\"{html.escape(name)} {picture[:-4]}\" loading=\"lazy\"></a>"
        for picture in PICTURES if (folder / picture).is_file())
    cells = [slide, f"<td data-sort=\"{1 if pictures else 0}\">{pictures}</td>"]
    for column in columns:
        value = row.get(column, "")
        text = "" if value is None else str(value)
        numeric = _is_number(text)
        css = "num" if numeric else ("long" if len(text) > 40 else "")
        if column == "status":
            css = "status"
        cell = html.escape(text)
        cells.append(f"<td class=\"{css}\" data-sort=\"{html.escape(text)}\"" + (
            f" title=\"{html.escape(text)}\"" if css == "long" else "") + f">{cell}</td>")
    return f"<tr class=\"{kind}\" data-slide=\"{html.escape(name)}\">{''.join(cells)}</tr>"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")
