"""What a user sees when things go wrong: usage errors, failures inside a run, Ctrl-C, a redirected console, --help.

Usage errors are found before any work: exit status 2, one line naming the option and what it allows, no
traceback, no output folder and no cluster.  Most cases call ``main()`` in this process (the real parser and the
real checks, a few milliseconds each); a few run the installed command as a user does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CROPS, SLIDES

from wsi_lymph.cli.main import build_parser, main

SLIDE = SLIDES / "cmu-1-small-region.svs"  # 2220 x 2967 level-0 px
DISTILL_PLAN = Path(__file__).resolve().parents[1] / "docs" / "distill-plan.json"  # its images are in shared/data


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``wsi-lymph ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse ends the process on a bad option
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _cli(*args: str, env: dict | None = None, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "wsi_lymph.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy(),
                          **popen)


# ------------------------------------------------------------------------------------------ usage errors
def _usage_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, text the one line must hold) for every kind of bad option of every command."""
    out, slide, file_ = str(tmp / "out"), str(SLIDE), str(tmp / "a-file")
    missing = str(tmp / "missing")
    batch = [
        (["--stride", "0"], "--stride"), (["--stride", "33"], "--stride"), (["--chunk", "0"], "--chunk"),
        (["--chunk", "16"], "--chunk"), (["--block", "700"], "--block"), (["--block", "0"], "--block"),
        (["--batch-size", "0"], "--batch-size"), (["--mpp", "-1"], "--mpp"), (["--mpp", "0"], "--mpp"),
        (["--mpp", "40"], "--mpp"), (["--mpp", "nan"], "--mpp"), (["--region", "0,0,-5,10"], "--region"),
        (["--region", "-1,0,5,10"], "--region"), (["--region", "1,2,3"], "--region"),
        (["--region", "0,0,5000,10"], "--region 0,0,5000,10"), (["--region", "2000,2900,300,10"], "--region"),
        (["--dtype", "float8"], "--dtype"), (["--stain-norm", "macenko"], "--stain-norm"),
        (["--workers", "0"], "--workers"), (["--jobs", "0"], "--jobs"), (["--cores", "0"], "--cores"),
        (["--gpus", "-1"], "--gpus"),
        # A dashboard address that is not one: was "Cluster failed to start: Name or service not known" (exit 1).
        (["--dashboard", "none"], "--dashboard"), (["--dashboard", ":99999"], "--dashboard"),
        (["--dashboard", "nosuchhost.invalid:8787"], "--dashboard"),
        (["--memory", "lots"], "--memory"), (["--walltime", "abc"], "--walltime"),
    ]
    cases = [(["detect", slide, "--out", out, *extra], named) for extra, named in batch]
    cases += [(["probmap", slide, "--out", out, *extra], named) for extra, named in batch[:6]]
    cases += [
        (["detect", slide, "--out", out, "--threshold", "2"], "--threshold"),
        (["detect", slide, "--out", out, "--threshold", "0"], "--threshold"),
        (["detect", slide, "--out", file_], "--out"),
        (["detect", slide, "--out", str(tmp / "a-file" / "below")], "--out"),
        (["probmap", slide, "--out", file_], "--out"),
        # Root passes os.access everywhere, yet cannot make a folder in /proc: was exit 1 after the cluster started.
        (["detect", slide, "--out", "/proc/wsi-lymph-out"], "--out /proc/wsi-lymph-out: cannot write in /proc"),
        (["detect", slide], "--out"),
        (["demo", "--out", out, "--stride", "0"], "--stride"),
        (["demo", "--out", out, "--region", "0,0,-5,10"], "--region"),
        (["demo", "--out", out, "--workers", "0"], "--workers"),
        (["demo", "--out", file_], "--out"),
        (["detect", missing, "--out", out], f"{missing}: not found"),
        (["probmap", slide, missing, "--out", out], f"{missing}: not found"),  # refused whole, before any work
        (["evaluate", str(tmp), missing], "not found"),
        (["evaluate", missing, str(CROPS)], "not found"),
        (["evaluate", str(tmp), str(CROPS), "--tolerance-um", "0"], "--tolerance-um"),
        (["evaluate", str(tmp), str(CROPS), "--mpp", "0"], "--mpp"),
        (["evaluate", str(tmp), str(CROPS), "--json", str(tmp)], "--json"),
        (["evaluate", str(tmp), str(CROPS), "--json", "/proc/wsi-lymph-report.json"], "--json /proc/"),
        # Found while reading the inputs, before the table starts (the table's header was printed first).
        (["evaluate", str(tmp / "centers.csv"), str(tmp / "truth.csv")], "pass --mpp"),
        (["evaluate", str(tmp / "centers.csv"), str(tmp / "truth.csv"), "--mpp", "0.5", "--sweep"], "--sweep"),
        (["info", slide, "--mpp", "-1"], "--mpp"),
        (["info", str(tmp / "empty")], "no slides"),
        (["models", "fetch", "resnet"], "name"),
        (["models", "import-caffe", missing, missing, "--out", str(tmp / "x.pt")], "not found"),
        (["models", "import-caffe", file_, file_, "--out", str(tmp / "x.pt"), "--threshold", "1.5"], "--threshold"),
        (["models", "import-caffe", file_, file_, "--out", str(tmp / "x.pt"), "--fold", "0"], "--fold"),
        (["models", "import-caffe", file_, file_, "--out", str(tmp / "x.pt"), "--frame-scale", "0"], "--frame-scale"),
        (["models", "import-caffe", file_, file_, "--out", str(tmp), "--fold", "1"], "--out"),
        (["dataset", "check", missing], "not found"),
        (["synthetic", out, "--images", "0"], "--images"),
        (["synthetic", out, "--size", "8"], "--size"),
        (["synthetic", out, "--seed", "-1"], "--seed"),
        (["synthetic", str(tmp / "full")], "not empty"),
        (["synthetic", file_], "OUT"),
        (["patches", missing, "--out", out], "not found"),
        (["patches", str(tmp), "--out", out, "--max-positive", "0"], "--max-positive"),
        (["patches", str(tmp), "--out", out, "--seed", "-1"], "--seed"),
        (["patches", str(tmp), "--out", file_], "--out"),
        (["folds", missing, "--out", out], "not found"),
        (["folds", str(tmp), "--out", out, "--folds", "1"], "--folds"),
        (["folds", str(tmp), "--out", out, "--seed", "-1"], "--seed"),
        (["folds", str(tmp / "empty"), "--out", out], "not a patches.zarr"),
        (["train", "--fold", "0", "--patches", str(tmp), "--folds-dir", str(tmp), "--out", out], "--fold"),
        (["train", "--fold", "1", "--patches", str(tmp), "--folds-dir", str(tmp), "--out", out, "--iterations", "0"],
         "--iterations"),
        (["train", "--fold", "1", "--patches", str(tmp), "--folds-dir", str(tmp), "--out", out, "--batch-size", "0"],
         "--batch-size"),
        (["train", "--fold", "1", "--patches", str(tmp), "--folds-dir", str(tmp), "--out", out,
          "--validation-fraction", "1"], "--validation-fraction"),
        (["train", "--fold", "1", "--patches", missing, "--folds-dir", str(tmp), "--out", out], "--patches"),
        (["train", "--fold", "1", "--patches", str(tmp), "--folds-dir", str(tmp), "--out", file_], "--out"),
        (["cv", str(tmp), "--out", out, "--folds", "1"], "--folds"),
        (["cv", str(tmp), "--out", out, "--mpp", "0"], "--mpp"),
        (["cv", str(tmp), "--out", out, "--stride", "0"], "--stride"),
        (["cv", str(tmp), "--out", out, "--max-negative", "0"], "--max-negative"),
        (["cv", str(tmp), "--out", out, "--iterations", "0"], "--iterations"),
        (["cv", str(tmp), "--out", out, "--validation-fraction", "0"], "--validation-fraction"),
        (["cv", missing, "--out", out], "not found"),
        (["cv", str(tmp), "--out", file_], "--out"),
        (["distill", missing, "--crops", str(CROPS), "--out", out], "not found"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--teacher-stride", "0"], "--teacher-stride"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--iterations", "0"], "--iterations"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--checkpoint-every", "0"], "--checkpoint-every"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--batch-size", "0"], "--batch-size"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--seed", "-2"], "--seed"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--scale-jitter", "0.5"], "--scale-jitter"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--stain-jitter", "-0.1"], "--stain-jitter"),
        (["distill", file_, "--crops", str(CROPS), "--out", out, "--stain-copies", "-1"], "--stain-copies"),
        (["distill", file_, "--crops", missing, "--out", out], "--crops"),
        # Found by reading the inputs before the cluster starts (were exit 1, some after the cluster had started).
        (["patches", str(tmp / "empty"), "--out", out], "no images"),
        (["cv", str(tmp / "empty"), "--out", out], "no images"),
        (["distill", file_, "--crops", str(CROPS), "--out", out], "not a distillation plan"),
        (["distill", file_, "--crops", str(tmp / "empty"), "--out", out, "--teacher", "nope"], "--teacher"),
        (["distill", str(DISTILL_PLAN), "--crops", str(tmp / "empty"), "--out", out], "--crops"),
        (["detect", slide, "--out", out, "--model", "nope"], "--model"),
        (["probmap", slide, "--out", out, "--model", str(tmp / "no-such.pt")], "--model"),
        (["demo", "--out", out, "--model", "nope"], "--model"),
    ]
    return cases


@pytest.mark.shared_data
def test_every_bad_option_is_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "image.tif").write_text("taken\n")
    (tmp_path / "centers.csv").write_text("x,y\n10,10\n")  # no probability column, no summary.json beside it
    (tmp_path / "truth.csv").write_text("x,y\n10,11\n")
    cases = _usage_cases(tmp_path)
    assert len(cases) > 80
    for argv, named in cases:
        started = time.monotonic()
        status, out, err = _main(argv, capsys)
        seconds = time.monotonic() - started
        line = err.strip()
        assert status == 2, (argv, status, out, err)
        assert "\n" not in line and named in line, (argv, err)
        assert line.startswith("wsi-lymph"), (argv, err)
        assert "Traceback" not in out + err and out == "", (argv, out, err)
        assert not (tmp_path / "out").exists(), argv  # nothing was written: refused before any work
        assert seconds < 20, (argv, seconds)  # no cluster was started (that alone takes longer)


@pytest.mark.shared_data
def test_a_usage_error_as_a_user_sees_it(tmp_path):
    started = time.monotonic()
    for argv, named in (
        (["--stride", "0"], "argument --stride: must be an integer from 1 to 32, got '0'"),
        (["--threshold", "2"], "argument --threshold: must be a number between 0 and 1 (both excluded), got '2'"),
        (["--region", "0,0,5000,10"], "--region 0,0,5000,10 reaches beyond cmu-1-small-region.svs (2220 x 2967"),
    ):
        run = _cli("detect", str(SLIDE), "--out", str(tmp_path / "out"), *argv, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and named in run.stderr and run.stdout == "", run.stderr
    # An existing file as --out was a FileExistsError traceback.
    (tmp_path / "taken").write_text("a file\n")
    run = _cli("detect", str(SLIDE), "--out", str(tmp_path / "taken"), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr == (f"wsi-lymph detect: --out {tmp_path / 'taken'}: is an existing file; "
                                                  "--out names a folder (created if missing)\n")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("dask-*"))
    assert time.monotonic() - started < 60  # four commands, none of which started a cluster


# ------------------------------------------------------------------------------------------ messages
@pytest.mark.shared_data
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04\x95 not a checkpoint" * 40)
    run = _cli("detect", str(SLIDE), "--out", str(tmp_path / "out"), "--model", str(bad), cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert f"{bad}: not a wsi-lymph/torch checkpoint or corrupt" in run.stderr, run.stderr
    assert "weights_only" not in run.stderr and "file an issue" not in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_evaluate_a_missing_folder_says_not_found(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    status, _, err = _main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "missing")], capsys)
    assert status == 2 and err == f"wsi-lymph evaluate: annotations {tmp_path / 'missing'}: not found\n"


def test_dataset_check_reports_an_unreadable_image_as_unreadable(tmp_path, capsys):
    (tmp_path / "a.tif").write_bytes(os.urandom(500))
    status, out, _ = _main(["dataset", "check", str(tmp_path)], capsys)
    assert status == 1
    assert re.search(r"error \[unreadable\] .*a\.tif: cannot read the file", out), out


@pytest.mark.shared_data
def test_demo_without_models_names_model_source(tmp_path):
    from conftest import DATA

    env = os.environ.copy() | {
        "WSI_LYMPH_CACHE": str(tmp_path / "cache"),
        "WSI_LYMPH_DATA_SOURCE": (DATA / "slides").as_uri(),
        "WSI_LYMPH_MODEL_SOURCE": (tmp_path / "no-models").as_uri(),  # empty: nothing leaves this machine
    }
    run = _cli("demo", "--out", str(tmp_path / "demo"), "--model", "janowczyk2016", env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "--model-source" in run.stderr and "pass it with --source" not in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "demo").exists()


def test_an_error_inside_a_run_is_one_line_and_the_traceback_goes_to_the_log(tmp_path):
    """An error nobody foresaw (here: a report file name longer than the file system allows, in a folder that
    can be written) is one line naming the log file; --debug prints the traceback as well."""
    (tmp_path / "centers.csv").write_text("x,y\n10,10\n40,40\n")
    (tmp_path / "truth.csv").write_text("x,y\n10,11\n")
    env = os.environ.copy() | {"WSI_LYMPH_CACHE": str(tmp_path / "cache")}
    report = tmp_path / ("r" * 300 + ".json")  # NAME_MAX is 255 bytes
    argv = ["evaluate", str(tmp_path / "centers.csv"), str(tmp_path / "truth.csv"), "--mpp", "0.5",
            "--json", str(report)]
    run = _cli(*argv, env=env, cwd=tmp_path)
    log = tmp_path / "cache" / "logs" / "wsi-lymph.log"
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.stderr.startswith(f"wsi-lymph evaluate: {tmp_path}/") and f"traceback in {log}" in run.stderr
    assert "--debug prints it" in run.stderr
    assert "Traceback (most recent call last)" in log.read_text()

    debug = _cli(*argv, "--debug", env=env, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


# ------------------------------------------------------------------------------------------ --help
def _parsers(parser, prefix=()):
    """(command words, parser) of every command and sub-command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _parsers(sub, (*prefix, name))


def test_every_command_has_a_description_and_every_option_its_default(capsys):
    import argparse

    seen = set()
    for words, parser in _parsers(build_parser()):
        seen.add(" ".join(words))
        assert parser.description, words
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, (words, action.dest)
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                # Its help line says the default: "(default: 512)" appended, or "default" in the help itself.
                assert "default" in (action.help or "") or f"(default: {action.default})" in text, (words, action)
    assert {"detect", "probmap", "demo", "evaluate", "info", "models fetch", "models import-caffe", "dataset check",
            "synthetic", "patches", "folds", "train", "cv", "distill"} <= seen

    expected = {
        "detect": ["--stride STRIDE paper's networks", "(default 2; 1 = exact)", "(default: 512)",
                   "--batch-size BATCH_SIZE patches per forward pass, 1 to 65536 (default: 512)",
                   "rounded) (default: float16)", "--threshold THRESHOLD"],
        "demo": ["--stride STRIDE paper's networks: classify every S-th model-frame pixel, 1 to 32 (default: 4)"],
        "info": ["slides slide files and/or folders", "--mpp MPP level-0 µm per pixel"],
        "folds": ["--folds FOLDS number of folds, from 2 to the number of images (default: 5)"],
        "synthetic": ["--images IMAGES number of images, ≥ 1 (default: 10)", "(default: 100)"],
        "dataset check": ["dataset folder of annotated images"],
        "train": ["--fold FOLD the fold to train, ≥ 1"],
    }
    for command, phrases in expected.items():
        status, out, _ = _main([*command.split(), "--help"], capsys)
        assert status == 0
        flat = " ".join(out.split())
        for phrase in phrases:
            assert phrase in flat, (command, phrase, flat)


# ------------------------------------------------------------------------------------------ Ctrl-C and consoles
ARGS = ["--region", "700,1000,400,400", "--block", "512", "--keep-map", "--workers", "1", "--dashboard", ":0"]
PRODUCTS = ("centers.csv", "centers.geojson", "centers.parquet", "overlay.png", "density.png")
# Written per run: timings, how many blocks this run took over, where it wrote.
VOLATILE = {"summary.json": ("timings_s", "blocks_resumed"),
            "probmap.json": ("seconds", "blocks_resumed", "patches", "output")}


def _without(report: dict, keys) -> dict:
    return {key: value for key, value in report.items() if key not in keys}


def _detect(out: Path, *extra: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDE), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(command, text=True, **popen)


def _running_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies, ended but not yet reaped, do not count)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            running.append(int(stat.parent.name))
    return running


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_on_a_terminal(command_out: Path, env: dict) -> tuple[int, str]:
    """``detect`` with stdout and stderr on a pseudo-terminal: (exit status, everything it wrote)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows of 100 columns
    run = _detect(command_out, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = run.wait(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.shared_data
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes_to_identical_outputs(tmp_path):
    env = os.environ.copy() | {"WSI_LYMPH_PROGRESS_INTERVAL": "0"}  # a progress line at every step
    # Uninterrupted, output redirected to files: plain progress lines, no bar frames.  The dashboard's port is
    # taken: dask's "port already in use" warning stays in the log file, the link printed gives the port it got.
    reference = tmp_path / "reference"
    with (socket.create_server(("127.0.0.1", 0)) as taken, open(tmp_path / "stdout.txt", "w") as stdout,
          open(tmp_path / "stderr.txt", "w") as stderr):
        port = taken.getsockname()[1]
        run = _detect(reference, "--dashboard", f"127.0.0.1:{port}", stdout=stdout, stderr=stderr, env=env)
        assert run.wait(timeout=600) == 0
    logged = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
    assert "\x1b[" not in logged and "\r" not in logged, logged
    assert "already in use" not in logged and "warnings.warn" not in logged and "Dask dashboard: http" in logged
    assert f":{port}/" not in logged
    assert f"Port {port} is already in use" in (reference / "wsi-lymph.log").read_text()
    assert re.search(r"^progress: 0 of 1 slides finished; cmu-1-small-region infer \d+/\d+ blocks$", logged, re.M)
    assert "1 of 1 slides done" in logged and "Traceback" not in logged
    assert (reference / "wsi-lymph.log").is_file()

    # Ctrl-C in a terminal reaches the whole process group: the CLI and its local cluster's workers.
    out = tmp_path / "interrupted"
    run = _detect(out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    manifest = out / "cmu-1-small-region" / ".prob.zarr.partial.blocks"
    deadline = time.monotonic() + 300
    while not (manifest.is_file() and len(manifest.read_text().splitlines()) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "wsi-lymph detect: interrupted; run the same command again to resume"
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stdout + stderr
    assert not (out / "cmu-1-small-region" / "prob.zarr").exists() and manifest.is_file()
    deadline = time.monotonic() + 15  # the workers are gone too: nothing runs on in its process group
    while _running_in_group(run.pid):
        assert time.monotonic() < deadline, _running_in_group(run.pid)
        time.sleep(0.2)

    # The same command again, on a terminal this time: it resumes, and its log lines never tear the bars.
    status, screen = _run_on_a_terminal(out, os.environ.copy())
    assert status == 0, screen
    report = json.loads((out / "cmu-1-small-region" / "probmap.json").read_text())
    assert report["blocks_resumed"] >= 2
    assert "batch: 100%" in screen and "\x1b[A" in screen, screen  # the bars were drawn
    lines = list(re.finditer(r"cmu-1-small-region: (map done|\d+ lymphocytes)", screen))
    assert len(lines) == 2, screen
    for match in lines:  # each follows a cleared bar line (tqdm.write), never a bar frame it would tear
        assert re.search(r"\r +\r(\x1b\[A)*\Z", screen[:match.start()]), repr(screen[match.start() - 120:match.end()])
    resumed, uninterrupted = _files(out / "cmu-1-small-region"), _files(reference / "cmu-1-small-region")
    assert set(resumed) == set(uninterrupted) and set(PRODUCTS) <= set(resumed)
    for name in resumed:
        if name in VOLATILE:  # reports: equal but for timings, the resume count and where they were written
            ours, theirs = (json.loads(files[name]) for files in (resumed, uninterrupted))
            assert _without(ours, VOLATILE[name]) == _without(theirs, VOLATILE[name]), name
        else:
            assert resumed[name] == uninterrupted[name], name


def test_ctrl_c_landing_where_python_cannot_raise_it_still_stops_the_command(capsys):
    # Ctrl-C while the garbage collector runs a __del__ (an asyncio future's, in a real run): Python drops the
    # KeyboardInterrupt there with an "Exception ignored" traceback.  The command must stop anyway, silently.
    from wsi_lymph.cli import console

    class Finalised:
        def __del__(self):
            console._on_interrupt(signal.SIGINT, None)

    steps, deadline = 0, time.monotonic() + 60
    with console.session(), pytest.raises(KeyboardInterrupt):
        Finalised()  # dropped at once: its __del__ raises where nothing can catch it
        while time.monotonic() < deadline:  # ordinary lines: the interrupt, sent again, is raised in one of them
            steps += 1
    assert steps > 0 and time.monotonic() < deadline
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Exception ignored" not in captured.err


def test_library_noise_stays_in_the_log_file_and_other_warnings_show_once(tmp_path, capsys):
    import logging
    import warnings

    from wsi_lymph.cli import console

    with console.session():
        console.log_to(tmp_path)
        try:  # what tornado logs when bokeh's session fails as a dashboard tab closes
            raise AssertionError("_pending_writes should be non-None when we have a document lock")
        except AssertionError as error:
            logging.getLogger("tornado.application").error("Exception in callback", exc_info=error)
        logging.getLogger("bokeh.server.views.ws").error("Refusing websocket connection")
        warnings.warn("Port 8787 is already in use.\nPerhaps you already have a cluster running?\nHosting the HTTP "
                      "server on port 40000 instead", UserWarning, stacklevel=1)
        warnings.warn("Corrupt EXIF data.  Expecting to read 12 bytes but only got 2.", UserWarning, stacklevel=1)
        logging.getLogger("tifffile").warning("<tifffile.TiffTag 270 @42> invalid offset 123456")
        for _ in range(3):
            warnings.warn("a library changes its defaults", FutureWarning, stacklevel=1)
            logging.getLogger("distributed.nanny").error("Worker process died unexpectedly\nmore lines")
        console.say("slide-1: 12 lymphocytes")
    captured = capsys.readouterr()
    assert captured.out == "slide-1: 12 lymphocytes\n"
    assert captured.err.splitlines() == [
        "warning: a library changes its defaults",
        "distributed: Worker process died unexpectedly (details in the log file)",
    ]
    log = (tmp_path / "wsi-lymph.log").read_text()
    for kept in ("AssertionError: _pending_writes", "Refusing websocket", "Port 8787 is already in use",
                 "Corrupt EXIF", "invalid offset", "slide-1: 12 lymphocytes"):
        assert kept in log, kept


def test_without_a_terminal_progress_is_plain_lines_counting_failed_slides():
    """stderr is not a terminal here (pytest captures it): no bar frames, a plain line per step at interval 0,
    and the batch count includes the slides that failed."""
    from types import SimpleNamespace

    from wsi_lymph.engine.batch import _Bars
    from wsi_lymph.engine.params import SlideResult

    lines: list[str] = []
    bars = _Bars(True, max_slides=2, log=lines.append, interval_s=0)
    assert bars.lines and not bars.enabled
    bars.start(3)
    good, bad = (SimpleNamespace(name=name, bar=None) for name in ("good", "bad"))
    bars.open(good)
    bars.open(bad)
    bars.stage(good, "infer", blocks=4)
    bars.step(good)
    assert lines[-1] == "progress: 0 of 3 slides finished; good infer 1/4 blocks, bad opening"
    failed = SlideResult(path="bad.svs", name="bad", status="failed", reason="unreadable")
    bars.slide_ended(failed)
    bars.close(bad)
    assert lines[-1] == "progress: 1 of 3 slides finished (1 failed); good infer 1/4 blocks"
    bars.slide_ended(SlideResult(path="skipped.svs", name="skipped", status="done"))
    assert lines[-1] == "progress: 2 of 3 slides finished (1 failed); good infer 1/4 blocks"
    bars.finish()
    assert not any("\x1b[" in line or "\r" in line for line in lines)


def test_a_heartbeat_cut_by_the_schedulers_shutdown_shows_no_traceback():
    import logging

    from wsi_lymph.cli.workers import HeartbeatAtShutdown

    def record() -> logging.LogRecord:
        try:
            raise OSError("Stream is closed")
        except OSError:
            import sys

            exc_info = sys.exc_info()
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, HeartbeatAtShutdown.MESSAGE, None,
                                 exc_info)

    assert not HeartbeatAtShutdown(drop=True).filter(record())  # a local worker: the driver speaks for it
    kept = record()
    assert HeartbeatAtShutdown(drop=False).filter(kept)  # a batch job's worker: one line in its job log
    assert kept.levelno == logging.WARNING and kept.exc_info is None
    assert "Traceback" not in logging.Formatter().format(kept)
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, "something else", None, None)
    assert HeartbeatAtShutdown(drop=True).filter(other) and other.levelno == logging.ERROR


def test_ctrl_c_on_a_local_worker_silences_its_output_without_stopping_it():
    # A local cluster's worker shares the terminal: after Ctrl-C its running task goes on until the driver stops the
    # cluster, and what the task prints must not follow the driver's "interrupted" line.
    script = ("import os, signal\n"
              "from wsi_lymph.cli.workers import QuietLibraries\n"
              "QuietLibraries([], ignore_interrupts=True).setup(None)\n"
              "print('before', flush=True)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "print('after', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # not interrupted: the driver stops it in order
    assert run.stdout == "before\n", run.stdout


@pytest.mark.parametrize("quiet", [False, True])
def test_semaphores_left_by_an_interrupted_run_are_cleaned_up_without_a_warning(quiet):
    # A process that exits without releasing a multiprocessing semaphore, as an interrupted cluster's can: the
    # resource tracker (a separate process, holding stderr until it ends) unlinks it and, unless told, warns.
    quieted = "from wsi_lymph.cli.console import quiet_resource_tracker\nquiet_resource_tracker()\n"
    script = ("import multiprocessing, os\n" + (quieted if quiet else "")
              + "semaphore = multiprocessing.get_context('spawn').Semaphore()\n"
              "os._exit(0)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert ("leaked semaphore" in run.stderr) is not quiet, run.stderr  # the warning is there to be silenced
