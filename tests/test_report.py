"""OUT/report.html in a real headless Chromium: it loads without errors, offline, one row per slide (failed and
flagged first), every picture resolves, and the table sorts numbers as numbers."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from wsi_lymph.io.batch_table import COLUMN_NAMES, FLAG_SEPARATOR
from wsi_lymph.io.report import read_batch_rows, write_report

SLIDES = [  # in batch order; the report puts gamma (failed) first, then beta (flagged), then alpha
    {"name": "alpha", "path": "/slides/alpha.svs", "status": "done", "reason": "", "count": "1200",
     "density_per_mm2_tissue": "812.5", "flags": ""},
    {"name": "beta x&y", "path": "/slides/beta x&y.svs", "status": "done", "reason": "", "count": "95",
     "density_per_mm2_tissue": "40.1",
     "flags": FLAG_SEPARATOR.join(["stain partly unlike H&E", "centres on a regular lattice; may be unreliable"])},
    {"name": "gamma", "path": "/slides/gamma.svs", "status": "failed", "reason": "gamma.svs: no such file",
     "count": "", "density_per_mm2_tissue": "", "flags": ""},
]

# Run before the page's own script: records uncaught errors and resources that fail to load.
CAPTURE = """<script>window.__errors = [];
addEventListener("error", function (e) { __errors.push(String(e.message || (e.target && e.target.src))); }, true);
</script>"""
# Run after it, once the page has loaded: the rows, every picture's decoded width, the order after clicks on
# the "count" header; written into the DOM that --dump-dom prints.
CHECK = """<script>
addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img) { img.loading = "eager"; });
  Promise.all(images.map(function (img) { return img.decode().catch(function () {}); })).then(function () {
    var order = function () {
      return Array.prototype.map.call(document.querySelectorAll("table.slides tbody tr"),
                                      function (row) { return row.getAttribute("data-slide"); });
    };
    var result = {rows: order(), classes: Array.prototype.map.call(document.querySelectorAll("tbody tr"),
                                                                   function (row) { return row.className; }),
                  images: images.map(function (img) { return [img.getAttribute("src"), img.naturalWidth]; })};
    var header = Array.prototype.filter.call(document.querySelectorAll("th"),
                                             function (th) { return th.textContent === "count"; })[0];
    header.click();
    result.ascending = order();
    header.click();
    result.descending = order();
    result.errors = window.__errors;
    var pre = document.createElement("pre");
    pre.id = "check";
    pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  });
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("needs a headless Chromium (apt-get install chromium)")


def _batch(out: Path) -> None:
    """A batch folder as detect leaves it: batch.csv, two finished slides with pictures, one failed slide."""
    out.mkdir()
    with open(out / "batch.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMN_NAMES, restval="")  # the columns of the real batch table
        writer.writeheader()
        writer.writerows(SLIDES)
    for slide, size in ((SLIDES[0], (64, 48)), (SLIDES[1], (50, 70))):
        folder = out / slide["name"]
        folder.mkdir()
        Image.new("RGB", size, (200, 120, 160)).save(folder / "overlay.png")
        Image.new("RGB", (size[0] + 1, size[1]), (20, 20, 20)).save(folder / "density.png")
        for name in ("summary.json", "centers.csv", "centers.geojson"):
            (folder / name).write_text("{}")
        (folder / "prob.ome.zarr").mkdir()


def test_report_in_headless_chromium(tmp_path):
    chromium = _chromium()
    out = tmp_path / "out"
    _batch(out)
    page = write_report(out)
    text = page.read_text()
    # Works offline: nothing fetched from elsewhere, no external script or style.
    assert not re.search(r"(src|href)=\"(https?:)?//", text) and "<link" not in text and "<script src" not in text

    checked = out / "report-check.html"  # beside the report, so every relative link resolves the same way
    checked.write_text(text.replace("<head>", "<head>" + CAPTURE, 1).replace("</body>", CHECK + "</body>", 1))
    run = subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--window-size=1200,900",
         "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console  # nothing logged by the page: no error, no warning
    found = re.search(r'<pre id="check">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stdout[-2000:]
    result = json.loads(html.unescape(found.group(1)))

    assert result["errors"] == []
    assert result["rows"] == ["gamma", "beta x&y", "alpha"]  # one row per slide: failed, flagged, then done
    assert result["classes"] == ["failed", "flagged", "done"]
    widths = {src: width for src, width in result["images"]}
    assert widths == {"beta%20x%26y/overlay.png": 50, "beta%20x%26y/density.png": 51,
                      "alpha/overlay.png": 64, "alpha/density.png": 65}  # every picture loaded and decoded
    # Numbers sort as numbers (95 < 1200, as text "1200" < "95"), the empty cell last; a second click reverses.
    assert result["ascending"] == ["beta x&y", "alpha", "gamma"]
    assert result["descending"] == ["alpha", "beta x&y", "gamma"]
    # Every link of the page points at a file or folder of the batch.
    for link in re.findall(r'(?:href|src)="([^"#]+)"', text):
        assert (out / Path(*[part.replace("%20", " ").replace("%26", "&") for part in link.split("/")])).exists(), link
    assert "gamma.svs: no such file" in text
    assert "flag: stain partly unlike H&amp;E</div>" in text and "flag: centres on a regular lattice" in text
    assert text.count("<th scope=") == len(COLUMN_NAMES) + 1  # slide, pictures and every other column


def test_report_rows_without_batch_csv_come_from_the_reports(tmp_path):
    """Before (or without) batch.csv: batch.json gives status, reason and flags, summary.json the results."""
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "summary.json").write_text(json.dumps({"count": 7, "tissue_area_mm2": 0.5, "mpp": 0.25,
                                                        "flags": ["lattice"]}))
    (out / "batch.json").write_text(json.dumps({"slides": [
        {"name": "a", "path": "/s/a.svs", "status": "done", "reason": "", "flags": ["lattice"]},
        {"name": "b", "path": "/s/b.svs", "status": "failed", "reason": "unreadable", "flags": []}]}))
    rows = read_batch_rows(out)
    assert [(r["name"], r["status"], r["count"], r["flags"]) for r in rows] == [
        ("a", "done", 7, "lattice"), ("b", "failed", "", "")]
    text = write_report(out).read_text()
    assert text.index('data-slide="b"') < text.index('data-slide="a"') and '<tr class="flagged" data-slide="a">' in text
