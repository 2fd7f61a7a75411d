"""Whole-slide speed of the default student against the paper's default (5-fold ensemble, stride 2), in one run.

Five measurements, all on ``shared/data/slides/cmu-1-small-region.svs`` (2220 x 2967 px at 0.499 µm/px):

1. **Throughput ratio** (one LocalCluster, warm against warm: a warm-up run of each model comes first and
   is not counted, every run writes a fresh output folder): the teacher's ``detect`` on a region, the
   student's ``detect`` on the whole slide; 20x pixels of the analysed area per second, each repeated.
2. **End to end**: ``wsi-lymph detect SLIDE --out FRESH`` with every default, in a new process (cluster
   start included), with the peak resident memory of the whole process tree (CLI, scheduler, nannies,
   workers) sampled every 0.2 s.
3. **Task granularity**: the student's map stage at several block sizes (tasks per slide, map time), block
   sizes interleaved, each repeated on a fresh output.
4. **Engine against the bare network**: the student's rate in 20x px/s against its bare forward pass over the
   same input pixels in this process (same thread count as the cluster's workers together), twice: over the
   whole map stage (per-slide work included: stain check, stain map, colour statistics, publishing) and over
   the span of its ``infer`` tasks (the blocks themselves).
5. **Engine against the bare network on the same blocks** (the issue's ratio), interleaved: each round an
   engine map run on a fresh output, then the bare forward over exactly the windows its ``infer`` tasks read;
   the ratio of each round, then their median and range (:func:`engine_against_bare`).

Usage::

    .venv/bin/python bench/student_speed.py [--repeats 2] [--rounds 5] [--teacher-region 800,1100,64,64] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import get_task_stream
from process_tree import run_sampling_rss

from wsi_lymph.constants import DEFAULT_MODEL, FAST_BLOCK_PX
from wsi_lymph.engine.batch import run_detect, run_probmaps
from wsi_lymph.engine.cluster import dask_client, torch_threads_per_worker
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.probmap_store import computed_boxes, open_probmap
from wsi_lymph.models.networks import STUDENT_UPSCALE, subpixel_probabilities
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.frame import choose_frame, coarser_frame, read_frame_window
from wsi_lymph.slides.reader import open_slide

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SLIDE = SHARED / "slides" / "cmu-1-small-region.svs"


def _px_per_s(result, region_px: int, wall_s: float) -> float:
    assert result.status == "done", result.reason
    return region_px / wall_s


def throughput(client, workers: int, repeats: int, teacher_region: tuple[int, int, int, int], tmp: Path) -> dict:
    threads = torch_threads_per_worker(workers)
    student_params = ProbmapParams(torch_threads=threads)  # the model's default chunks and blocks
    teacher_params = ProbmapParams(stride_px=2, region_level0=teacher_region, torch_threads=threads)
    info = open_slide(SLIDE)
    slide_px = info.level_sizes_xy[0][0] * info.level_sizes_xy[0][1]
    region_px = teacher_region[2] * teacher_region[3]
    quiet = {"progress": False, "log": lambda _: None}
    # Warm-up (not counted): model loading, worker imports, allocator growth.
    warm = ProbmapParams(region_level0=(800, 1100, 32, 32), torch_threads=threads)
    run_detect(client, [SLIDE], tmp / "warm-student", params=ProbmapParams(
        region_level0=(800, 1100, 256, 256), block_px=2048, torch_threads=threads), **quiet)
    run_detect(client, [SLIDE], tmp / "warm-teacher", model="janowczyk2016", params=warm, **quiet)
    teacher, student = [], []
    for k in range(repeats):  # interleaved, each on a fresh output
        start = time.perf_counter()
        [result] = run_detect(client, [SLIDE], tmp / f"teacher-{k}", model="janowczyk2016", params=teacher_params,
                              **quiet)
        teacher.append(_px_per_s(result, region_px, time.perf_counter() - start))
        start = time.perf_counter()
        [result] = run_detect(client, [SLIDE], tmp / f"student-{k}", params=student_params, **quiet)
        student.append(_px_per_s(result, slide_px, time.perf_counter() - start))
        print(f"run {k + 1}: teacher {teacher[-1]:,.0f} 20x px/s on {region_px:,} px; student {student[-1]:,.0f} "
              f"20x px/s on the whole slide ({slide_px:,} px, {result.seconds})")
    return {"teacher_px_per_s": teacher, "student_px_per_s": student,
            "ratio_of_medians": statistics.median(student) / statistics.median(teacher),
            "ratio_range": [min(student) / max(teacher), max(student) / min(teacher)]}


def end_to_end(repeats: int, tmp: Path) -> list[dict]:
    runs = []
    for k in range(repeats):
        out = tmp / f"cli-{k}"
        command = [sys.executable, "-m", "wsi_lymph.cli", "detect", str(SLIDE), "--out", str(out), "--dashboard", ":0"]
        wall, peak, _ = run_sampling_rss(command)
        summary = json.loads((out / SLIDE.stem / "summary.json").read_text())
        runs.append({"wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2), "count": summary["count"],
                     "timings_s": summary["timings_s"], "blocks": summary["blocks_total"],
                     "skipped": summary["blocks_skipped"]})
        print(f"end to end {k + 1}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB, {summary['count']} lymphocytes")
    return runs


def new_slide() -> None:
    """On a worker: forget the colour tables, so that a run starts as a new slide does."""
    import wsi_lymph.detection.stain as stain

    getattr(stain, "forget_colour_tables", lambda: None)()  # libraries before the tables have none to forget


def map_run(client, workers: int, out: Path, block: int) -> dict:
    """One ``run_probmaps`` of the slide on a fresh output: its wall time and the span of its ``infer`` tasks.

    Two times: the whole ``run_probmaps`` (per-slide work included: opening the slide, the stain check and
    stain map, the colour statistics, publishing the map) and the span of its ``infer`` tasks alone (first
    start to last end, from the scheduler's task stream), the engine's time on the blocks themselves.
    """
    # The model's default chunk for each block (engine/params.py, default_chunk_px).
    params = ProbmapParams(block_px=block, torch_threads=torch_threads_per_worker(workers))
    client.run(new_slide)
    start = time.perf_counter()
    with get_task_stream(client) as stream:
        [result] = run_probmaps(client, [SLIDE], out, params=params, progress=False, log=lambda _: None)
    wall = time.perf_counter() - start
    spans = [(part["start"], part["stop"]) for task in stream.data
             if str(task["key"][0] if isinstance(task["key"], tuple) else task["key"]).startswith("infer")
             for part in task["startstops"] if part["action"] == "compute"]
    span = max(stop for _, stop in spans) - min(begin for begin, _ in spans)
    return {"map_wall_s": wall, "infer_span_s": span,
            # The share of the span the workers spent outside ``infer`` tasks (gaps between them, the last one's tail).
            "workers_idle_share": 1 - sum(stop - begin for begin, stop in spans) / (workers * span),
            "task_s_sum": result.seconds.get("infer_task_sum"), "tasks": result.blocks_total - result.blocks_skipped,
            "blocks_total": result.blocks_total, "map_path": out / SLIDE.stem / "prob.zarr"}


def granularity(client, workers: int, tmp: Path, repeats: int, blocks=(512, 1024, FAST_BLOCK_PX, 4096)) -> list[dict]:
    """The student's map stage at each block size (:func:`map_run`), block sizes interleaved, fresh outputs."""
    runs: dict[int, list[dict]] = {block: [] for block in blocks}
    for k in range(repeats):
        for block in blocks:
            runs[block].append(map_run(client, workers, tmp / f"grain-{block}-{k}", block))
            print(f"block {block} run {k + 1}: {runs[block][-1]['tasks']} infer tasks, map "
                  f"{runs[block][-1]['map_wall_s']:.1f} s, infer tasks {runs[block][-1]['infer_span_s']:.1f} s")
    rows = []
    for block, block_runs in runs.items():
        rows.append({"block_px": block, "tasks": block_runs[0]["tasks"], "blocks_total": block_runs[0]["blocks_total"],
                     "map_path": block_runs[0]["map_path"],
                     **{key: [round(run[key], 2) for run in block_runs]
                        for key in ("map_wall_s", "infer_span_s", "task_s_sum")}})
    return rows


def student_members() -> list:
    """The default student's members in eval mode, channels_last (as the engine runs them)."""
    return [(net.to(memory_format=torch.channels_last), mean) for net, mean in load_model(DEFAULT_MODEL).members]


def bare_forward(threads: int) -> dict:
    """The student's forward pass over every input pixel of the slide, in-process, input already in memory."""
    members = student_members()
    info = open_slide(SLIDE)
    frame = coarser_frame(choose_frame(info), 4)
    halo = members[0][0].halo_px
    window = read_frame_window(info, frame, np.arange(-halo, frame.shape_rc[0] + halo),
                               np.arange(-halo, frame.shape_rc[1] + halo))
    torch.set_num_threads(threads)
    subpixel_probabilities(members, window[:600, :600])  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subpixel_probabilities(members, window)
        times.append(time.perf_counter() - start)
    px = frame.shape_rc[0] * frame.shape_rc[1]
    return {"px": px, "seconds": times, "px_per_s": px / min(times)}


def block_windows(map_path: Path) -> tuple[list, list[np.ndarray]]:
    """The student's members and exactly the input windows a map's ``infer`` tasks read (each block and its halo)."""
    members = student_members()
    info = open_slide(SLIDE)
    frame = coarser_frame(choose_frame(info), STUDENT_UPSCALE)
    halo, up = members[0][0].halo_px, STUDENT_UPSCALE
    prob, attrs = open_probmap(map_path)
    windows = []
    for r0, r1, c0, c1 in computed_boxes(attrs):
        r1, c1 = min(r1, prob.shape[0]), min(c1, prob.shape[1])  # the last row and column of blocks are cut
        windows.append(read_frame_window(info, frame, np.arange(r0 // up - halo, -(-r1 // up) + halo),
                                         np.arange(c0 // up - halo, -(-c1 // up) + halo)))
    return members, windows


def bare_pass(members: list, windows: list[np.ndarray], threads: int) -> float:
    """Seconds of the student's bare forward over every window, ``threads`` threads in this process."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for window in windows:
        subpixel_probabilities(members, window)
    return time.perf_counter() - start


def engine_against_bare(client, workers: int, tmp: Path, rounds: int) -> dict:
    """The issue's ratio, interleaved: each round an engine map run, then the bare forward over the same blocks.

    The reference is "the bare student forward on the same blocks": the windows the map's ``infer`` tasks
    read, already in memory, ``workers`` threads in this process (the cores the workers use together); no
    colour transform, reading, resampling or writing.  This machine's speed drifts by tens of per cent within
    minutes, so each round's engine run is divided by the bare pass right after it, and the rounds' ratios are
    reported; a warm-up of each comes first and is not counted.
    """
    first = map_run(client, workers, tmp / "pair-warm", FAST_BLOCK_PX)
    members, windows = block_windows(first["map_path"])
    bare_pass(members, windows[:2], workers)  # warm-up
    rows = []
    for k in range(rounds):
        engine = map_run(client, workers, tmp / f"pair-{k}", FAST_BLOCK_PX)
        bare_s = bare_pass(members, windows, workers)
        rows.append({"infer_span_s": round(engine["infer_span_s"], 2), "map_wall_s": round(engine["map_wall_s"], 2),
                     "workers_idle_share": round(engine["workers_idle_share"], 3),
                     "bare_s": round(bare_s, 2), "ratio": round(bare_s / engine["infer_span_s"], 3)})
        print(f"round {k + 1}: infer tasks {engine['infer_span_s']:.2f} s (workers idle "
              f"{100 * engine['workers_idle_share']:.1f}% of it), bare forward on the same {len(windows)} blocks "
              f"{bare_s:.2f} s, engine / bare {rows[-1]['ratio']:.2f}")
    ratios = [row["ratio"] for row in rows]
    return {"blocks": len(windows), "rounds": rows, "median": statistics.median(ratios),
            "range": [min(ratios), max(ratios)]}


def main() -> None:
    from wsi_lymph.models.device import reuse_freed_memory

    reuse_freed_memory()  # the bare reference takes the fast allocator path the engine's workers take
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--teacher-region", default="800,1100,64,64")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["throughput", "end-to-end", "granularity", "bare", "same-blocks"])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of engine run + bare forward on its blocks")
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, FAST_BLOCK_PX, 4096],
                        help="block sizes of the granularity runs (model-frame px)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    region = tuple(int(v) for v in args.teacher_region.split(","))
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "end-to-end" not in args.skip:
            report["end_to_end"] = end_to_end(args.repeats, tmp)
        if "bare" not in args.skip:
            report["bare_forward"] = bare_forward(args.workers)
        with dask_client(args.workers, dashboard_address=":0", quiet=True) as client:
            client.wait_for_workers(args.workers)
            if "throughput" not in args.skip:
                report["throughput"] = throughput(client, args.workers, args.repeats, region, tmp)
            if "granularity" not in args.skip:
                report["granularity"] = granularity(client, args.workers, tmp, args.repeats, args.blocks)
            if "same-blocks" not in args.skip:
                report["engine_over_bare_same_blocks"] = engine_against_bare(client, args.workers, tmp, args.rounds)
    if "bare_forward" in report and "granularity" in report:
        bare_rate = report["bare_forward"]["px_per_s"]
        report["engine_over_bare"] = {}
        for row in report["granularity"]:
            classified_px = report["bare_forward"]["px"] * row["tasks"] / row["blocks_total"]
            report["engine_over_bare"][row["block_px"]] = {
                key: {"median": round(classified_px / statistics.median(row[key]) / bare_rate, 3),
                      "range": [round(classified_px / max(row[key]) / bare_rate, 3),
                                round(classified_px / min(row[key]) / bare_rate, 3)]}
                for key in ("map_wall_s", "infer_span_s")}
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
