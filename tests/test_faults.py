"""Faults stop cleanly, through the real CLI and its real LocalCluster.

A full disk (a small tmpfs mounted by the test; CI runs as root) stops the slide that hit it at once, in one
line, while the batch's other slide finishes; ``batch.json`` that cannot be written is one line and exit 1, and
leaves the earlier one whole.  The dashboard's ``/wsi-lymph`` page shows the batch's own counts and every task
under its stage's name, read from the scheduler during the run.  (A killed worker and a SIGKILLed CLI, each
resumed to byte-identical outputs, are in ``test_resume.py``.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import CROPS, SLIDES

from wsi_lymph.engine.batch import STAGES, TASK_RETRIES

SLIDE = SLIDES / "cmu-1-small-region.svs"  # 28 blocks of 2,048 model-frame px with hematoxylin
GOOD = CROPS / "example_1.tif"  # one block: done in seconds
NOISE = ("Traceback", "Compute Failed", "CancelledError", "Exception:", "Task was destroyed")


def _can_mount() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root to mount a small tmpfs for the disk-full tests")
        pytest.skip("mounting a tmpfs for a full disk needs root (CI runs as root)")


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    """A file system of ``size`` (e.g. ``3m``) mounted on ``folder`` for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class _Run:
    """A CLI run whose output is read as it comes; once the dashboard link is printed, its page is polled."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "wsi_lymph.cli", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=os.environ.copy())
        self.out: list[str] = []
        self.err: list[str] = []
        self.pages: list[dict] = []  # /wsi-lymph.json, as polled
        self.html_status: set[int] = set()
        self.page_url: str | None = None
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        self.poller = threading.Thread(target=self._poll, daemon=True)
        for thread in [*self.readers, self.poller]:
            thread.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            found = re.search(r"dashboard: (https?://\S+)", line)
            if found and self.page_url is None:
                parts = urllib.parse.urlsplit(found.group(1))
                self.page_url = f"{parts.scheme}://{parts.netloc}/wsi-lymph"

    def _poll(self) -> None:
        while self.process.poll() is None:
            if self.page_url:
                with contextlib.suppress(OSError, ValueError):
                    with urllib.request.urlopen(self.page_url + ".json", timeout=5) as response:
                        self.pages.append(json.loads(response.read()))
                    if len(self.pages) % 10 == 1:
                        with urllib.request.urlopen(self.page_url, timeout=5) as response:
                            self.html_status.add(response.status)
            time.sleep(0.2)

    def wait(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        for thread in [*self.readers, self.poller]:
            thread.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _slide_rows(pages: list[dict], name: str) -> list[dict]:
    return [row for page in pages for row in page.get("slides", []) if row["name"] == name]


@pytest.mark.shared_data
def test_disk_full_stops_the_slide_at_once_and_the_batch_goes_on(tmp_path):
    _can_mount()
    out = tmp_path / "out"
    # Only the first slide's folder is full (3 MB, less than one block of its map): the other slide's is not.
    with _tmpfs(out / SLIDE.stem, "3m"):
        run = _Run("detect", str(SLIDE), str(GOOD), "--mpp", "0.5", "--out", str(out), "--workers", "1",
                   "--dashboard", "127.0.0.1:0")
        code = run.wait()
        leftovers = _files(out / SLIDE.stem)
    text = run.text
    assert code == 1, text
    for noise in NOISE:
        assert noise not in text, text
    failed = [line for line in run.out if line.startswith(f"{SLIDE.stem}: FAILED")]
    assert len(failed) == 1, text
    assert "no space left on device" in failed[0] and "run the same command again" in failed[0], failed
    assert sum("no space left on device" in line for line in run.out) == 1, text

    batch = json.loads((out / "batch.json").read_text())
    assert [s["status"] for s in batch["slides"]] == ["failed", "done"], batch
    assert "no space left on device" in batch["slides"][0]["reason"]
    assert json.loads((out / GOOD.stem / "summary.json").read_text())["count"] > 0
    assert ".prob.zarr.partial/zarr.json" in leftovers  # kept for a resume once there is space

    # The slide stopped at once: its other blocks were cancelled, not computed (and failed) one by one.
    # The scheduler's counts, read from the dashboard page during the run, say how many blocks ran.
    rows = _slide_rows(run.pages, SLIDE.stem)
    assert any(row["stage"] == "infer" and row["total"] >= 20 for row in rows), rows
    ran = max(page["tasks"].get("infer", {}).get("memory", 0) + page["tasks"].get("infer", {}).get("erred", 0)
              for page in run.pages)
    assert ran <= 6, f"{ran} infer tasks ran to the end after the first block found the disk full"


@pytest.mark.shared_data
def test_batch_json_on_a_full_disk_is_one_line_and_the_earlier_one_stays(tmp_path):
    _can_mount()
    args = ("detect", str(GOOD), "--mpp", "0.5", "--workers", "1", "--dashboard", "127.0.0.1:0")
    with _tmpfs(tmp_path / "out", "4m") as out:
        first = _Run(*args, "--out", str(out))
        assert first.wait() == 0, first.text
        before = _files(out)
        assert json.loads((out / "batch.json").read_text())["done"] == 1
        # Fill the disk to the last byte: the slide is already done (nothing to write), batch.json is.
        # Unbuffered: a buffered file would still hold the bytes that did not fit, and its close would raise.
        with open(out / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
        again = _Run(*args, "--out", str(out))
        code = again.wait()
        after = _files(out)
    text = again.text
    assert code == 1, text
    for noise in NOISE:
        assert noise not in text, text
    report = [line for line in again.err if "batch.json" in line]
    assert len(report) == 1 and "no space left on device" in report[0], text
    assert "already done" in text  # the slide itself is fine
    after.pop("filler")
    for log in ("wsi-lymph.log",):  # each run appends to the log (when it can)
        before.pop(log, None), after.pop(log, None)
    assert after == before  # nothing finished earlier is lost or changed, batch.json included


@pytest.mark.shared_data
def test_dashboard_page_shows_the_batchs_counts_and_each_task_by_its_stage(tmp_path):
    """16 blocks of 512 px: the page's infer total is the console's, and no task has a generic name."""
    out = tmp_path / "out"
    run = _Run("detect", str(SLIDE), "--region", "700,1000,512,512", "--block", "512", "--chunk", "512",
               "--out", str(out), "--workers", "1", "--dashboard", "127.0.0.1:0")
    assert run.wait() == 0, run.text
    assert run.pages, f"the page {run.page_url}.json never answered: {run.text}"
    assert run.html_status == {200}
    report = json.loads((out / SLIDE.stem / "probmap.json").read_text())
    to_infer = report["blocks_total"] - report["blocks_skipped"]
    assert report["blocks_total"] == 16 and "map done, 16 blocks" in run.text

    rows = _slide_rows(run.pages, SLIDE.stem)
    infer = [row for row in rows if row["stage"] == "infer"]
    assert infer and all(row["total"] == to_infer for row in infer), rows
    done = [row["done"] for row in infer]
    assert done == sorted(done) and done[-1] <= to_infer
    stages = [row["stage"] for row in rows]
    assert stages.index("infer") > stages.index("stain map") if "stain map" in stages else True
    # Until the batch publishes its first counts the page says none has started; once it has, it always shows them.
    started = [i for i, page in enumerate(run.pages) if page["batch"] is not None]
    assert started and started == list(range(started[0], len(run.pages))), [p["batch"] for p in run.pages]
    assert all(run.pages[i]["batch"]["slides"] == 1 for i in started)

    prefixes = set().union(*(page["tasks"] for page in run.pages))
    assert prefixes <= set(STAGES), prefixes - set(STAGES)  # no sum, getitem, gt, finalize-hlg
    assert {"read", "hematoxylin", "hematoxylin-cells", "infer"} <= prefixes, prefixes
    sent = max(page["tasks"]["infer"]["processing"] for page in run.pages if "infer" in page["tasks"])
    assert sent <= to_infer


def _fails(counter: str, code: int, failures: int) -> int:
    """A task that raises ``OSError(code)`` its first ``failures`` times; returns the attempt that succeeded."""
    path = Path(counter)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt <= failures:
        raise OSError(code, os.strerror(code))
    return attempt


def test_a_task_is_tried_again_after_an_io_hiccup_but_not_after_a_full_disk(tmp_path):
    from distributed import Client, LocalCluster

    from wsi_lymph.engine.batch import _TaskStream

    cases = {"hiccup": (errno.EIO, TASK_RETRIES), "full": (errno.ENOSPC, 1), "broken": (errno.EIO, TASK_RETRIES + 1)}
    seen = {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        stream = _TaskStream(client, on_error=lambda future, error: seen.setdefault("driver", error))
        for name, (code, failures) in cases.items():
            future = client.submit(_fails, str(tmp_path / name), code, failures, key=name, pure=False)
            stream.watch(future, lambda f, n=name: seen.setdefault(n, (f.status, f.exception() or f.result())))
        for handler, future in stream:
            handler(future)
    attempts = {name: int((tmp_path / name).read_text()) for name in cases}
    assert seen["hiccup"] == ("finished", TASK_RETRIES + 1) and attempts["hiccup"] == TASK_RETRIES + 1
    assert seen["full"][0] == "error" and seen["full"][1].errno == errno.ENOSPC and attempts["full"] == 1
    assert seen["broken"][0] == "error" and attempts["broken"] == TASK_RETRIES + 1
    assert "driver" not in seen
