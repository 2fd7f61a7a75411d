"""CUDA against the CPU, and the speed of the GPU path, in one short run on a GPU machine.

Checks, each printed as one JSON line and collected in ``--out/gpu_check.json``:

1. ``patch``: exact patchwise P of the paper's fold-1 model on a real crop, CUDA vs CPU
   (max abs difference) and patches/s of each (ratio GPU/CPU), at several batch sizes on the GPU;
2. ``dense``: the dense-exact network (random weights, per-channel mean) fully convolutionally
   on CUDA vs patchwise on CUDA and vs dense on the CPU, and pixels/s (ratio dense/patchwise);
3. ``detect``: ``run_detect`` with the paper's fold 1 on a region of the CMU-1 sample slide on a
   1-worker LocalCluster whose worker advertises ``GPU=1`` (tasks then ask for it), vs the same on
   a CPU worker: the same centres, max abs map difference, warm wall times and their ratio;
4. ``train``: training iterations/s of the paper recipe on CUDA vs CPU (same seed), and that
   both losses fall;
5. ``student``: the default model (the shipped student) on the whole CMU-1 sample slide: its map on
   CUDA vs the CPU (max abs difference, 20x px/s at several tile sizes), then ``detect`` with
   defaults on one GPU worker against the default local cluster (on a CUDA machine its workers use the
   GPU too): the same centres, max abs map difference, wall times and their ratio.

Usage (the device machine has torch with CUDA; dask, zarr and openslide travel as wheels)::

    bash bench/gpu_check.sh            # wraps: python bench/gpu_check.py --data .device --out $OUT

``--device cpu`` runs the same sections with the CPU in the GPU's place (a dry run of the script).
Timings exclude a first, cold call and give the spread of the repeated ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS: dict = {}
WARM_RUNS = 3  # detect runs after the cold one, per kind of cluster (median and min-max reported)


def report(section: str, **values) -> None:
    RESULTS[section] = values
    print(json.dumps({section: values}), flush=True)


def timed(fn, repeat: int = 3):
    """Best and worst wall time of ``repeat`` calls (after one warm-up call, left out) and the last result."""
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return min(seconds), max(seconds), result


def rate_min_max(count: int, best_s: float, worst_s: float) -> list[int]:
    """Items per second of the slowest and the fastest timed call."""
    return [round(count / worst_s), round(count / best_s)]


def repeated_detect(client, slide: Path, out_dir: Path, **detect_options) -> dict:
    """``run_detect`` on one slide, once cold and :data:`WARM_RUNS` times warm, each into a fresh folder.

    The cold run (imports, model load, CUDA context) is left out of the timing; a fresh folder per run means
    none is skipped as already done.  Returns the warm runs' median and min-max wall time, the cold one, and
    the last run's result, map and centres.
    """
    import zarr

    from wsi_lymph.engine.batch import run_detect

    walls = []
    for run in range(1 + WARM_RUNS):
        start = time.perf_counter()
        [result] = run_detect(client, [slide], out_dir / f"run-{run}", keep_map=True, progress=False,
                              log=lambda _: None, **detect_options)
        walls.append(time.perf_counter() - start)
        assert result.status == "done", result.reason
    folder = out_dir / f"run-{run}" / result.name
    warm = sorted(walls[1:])
    return dict(wall=float(np.median(warm)), spread=(round(warm[0], 1), round(warm[-1], 1)), cold=walls[0],
                result=result, prob=zarr.open_array(str(folder / "prob.zarr"), mode="r")[:].astype(np.float32),
                centres=np.loadtxt(folder / "centers.csv", delimiter=",", skiprows=1, ndmin=2))


def crop_window(data: Path, size: int) -> np.ndarray:
    """A (size+31)² BGR 0-255 model-frame window of the first annotated crop (20x, upscaled 4x)."""
    from wsi_lymph.slides.frame import choose_frame, patch_rows, read_frame_window, stride_grid
    from wsi_lymph.slides.reader import open_slide

    info = open_slide(data / "lymph-centers" / "example_1.tif", mpp=0.5)
    frame = choose_frame(info)
    grid = stride_grid(0, size, 1)
    return read_frame_window(info, frame, patch_rows(grid), patch_rows(grid))


def check_patch(data: Path, device: str) -> None:
    from wsi_lymph.models.networks import patch_grid_probabilities
    from wsi_lymph.models.registry import load_model

    window = crop_window(data, 96)
    members = {dev: load_model("janowczyk2016/fold1", dev).members for dev in ("cpu", device)}
    for dev in members:
        members[dev] = [(net.to(memory_format=torch.channels_last), mean) for net, mean in members[dev]]
    cpu_s, cpu_worst_s, cpu = timed(
        lambda: patch_grid_probabilities(members["cpu"], window, batch_size=512, device="cpu"), 2)
    rates = {}
    for batch in (512, 4096, 16384):
        gpu_s, gpu_worst_s, gpu = timed(lambda b=batch: patch_grid_probabilities(members[device], window, batch_size=b,
                                                                                 device=device))
        rates[batch] = rate_min_max(cpu.size, gpu_s, gpu_worst_s)
    diff = float(np.abs(gpu - cpu).max())
    report("patch", patches=int(cpu.size), max_abs_diff_gpu_cpu=diff,
           cpu_patches_per_s_min_max=rate_min_max(cpu.size, cpu_s, cpu_worst_s),
           gpu_patches_per_s_min_max_by_batch={str(k): v for k, v in rates.items()},
           ratio_gpu_cpu=round(max(v[1] for v in rates.values()) / (cpu.size / cpu_s), 1), ok=diff < 1e-4)


def check_dense(data: Path, device: str) -> None:
    from wsi_lymph.models.networks import DensePatchNet, dense_probabilities, patch_grid_probabilities

    torch.manual_seed(0)
    net = DensePatchNet((40.0, 45.0, 35.0))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mean = torch.tensor([180.0, 120.0, 170.0]).view(3, 1, 1).expand(3, 32, 32).contiguous()
    window = crop_window(data, 256)
    cuda = [(net.to(device).eval(), mean)]
    dense_s, _, dense = timed(lambda: dense_probabilities(cuda, window, device=device, tile_px=256))
    patch_s, _, patch = timed(lambda: patch_grid_probabilities(cuda, window, batch_size=8192, device=device), 1)
    cpu_net = [(DensePatchNet((40.0, 45.0, 35.0)).eval(), mean)]
    cpu_net[0][0].load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    cpu_s, _, cpu = timed(lambda: dense_probabilities(cpu_net, window, device="cpu"), 1)
    big = crop_window(data, 384)
    big_s, _, _ = timed(lambda: dense_probabilities(cuda, big, device=device, tile_px=512))
    report("dense", pixels=int(dense.size), max_abs_diff_dense_vs_patch_gpu=float(np.abs(dense - patch).max()),
           max_abs_diff_dense_gpu_vs_cpu=float(np.abs(dense - cpu).max()),
           gpu_dense_pixels_per_s=round(dense.size / dense_s), gpu_patch_pixels_per_s=round(patch.size / patch_s),
           cpu_dense_pixels_per_s=round(cpu.size / cpu_s), gpu_dense_tile512_pixels_per_s=round(384**2 / big_s),
           ratio_dense_over_patch_gpu=round(patch_s / dense_s, 1),
           ok=float(np.abs(dense - patch).max()) < 1e-5 and float(np.abs(dense - cpu).max()) < 1e-5)


def check_detect(data: Path, work: Path, device: str) -> None:
    from distributed import Client, LocalCluster

    from wsi_lymph.engine.params import ProbmapParams

    # The CPU side ran at ~2,100 patches/s on the H200 machine's 16 threads (2,900 on this VM's 2 cores):
    # 160² level-0 px at stride 2 is 0.11 M patches, ~50 s a run.
    region = (650, 950, 160, 160)
    outcome = {}
    for on_device in (False, True):  # a CPU worker, then one advertising GPU=1 (in a dry run: the CPU again)
        params = ProbmapParams(stride_px=2, region_level0=region, device=device if on_device else "cpu",
                               batch_size=4096 if on_device else 512, torch_threads=None)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          resources={"GPU": 1} if on_device else None) as cluster, Client(cluster) as client:
            outcome[on_device] = repeated_detect(client, data / "cmu-1-small-region.svs", work / f"detect-{on_device}",
                                                 model="janowczyk2016/fold1", params=params)
            outcome[on_device]["prefixes"] = client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    cpu, gpu = outcome[False], outcome[True]
    same = cpu["centres"].shape == gpu["centres"].shape and np.allclose(cpu["centres"][:, :2], gpu["centres"][:, :2])
    report("detect", region_level0=",".join(map(str, region)), stride=2, patches=cpu["result"].patches,
           warm_runs=WARM_RUNS, centres_cpu=len(cpu["centres"]), centres_gpu=len(gpu["centres"]),
           same_centres=bool(same), max_abs_map_diff=float(np.abs(cpu["prob"] - gpu["prob"]).max()),
           wall_cpu_s=round(cpu["wall"], 1), wall_cpu_min_max_s=cpu["spread"], wall_gpu_s=round(gpu["wall"], 1),
           wall_gpu_min_max_s=gpu["spread"], ratio_cpu_over_gpu=round(cpu["wall"] / gpu["wall"], 1),
           gpu_task_prefixes=gpu["prefixes"], ok=bool(same))


def check_train(work: Path, device: str) -> None:
    import zarr

    from wsi_lymph.training.train import train_model

    # A separable toy set: a dark disk at the patch centre (1) or off-centre (0), with noise.
    rng = np.random.default_rng(0)
    n = 4096
    yy, xx = np.mgrid[:32, :32]
    labels = rng.integers(0, 2, n).astype(np.uint8)
    patches = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        dr, dc = (0, 0) if labels[i] else rng.choice([-9, 9], 2)
        disk = (yy - 16 - dr) ** 2 + (xx - 16 - dc) ** 2 <= 25
        image = rng.normal(200, 12, (32, 32, 3))
        image[disk] = rng.normal(70, 12, (int(disk.sum()), 3))
        patches[i] = np.clip(image, 0, 255)
    store = work / "toy.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.create_array("patches", data=patches, chunks=(1024, 32, 32, 3))
    group.create_array("label", data=labels, chunks=(4096,))
    split = np.arange(n)
    out = {}
    for on_device in (False, True):  # in a dry run the CPU twice
        folder = work / f"train-{on_device}"
        start = time.perf_counter()
        train_model(store, split[:3584], split[3584:], folder, recipe="paper", arch="paper", iterations=600,
                    checkpoint_every=300, eval_every=300, seed=0, device=device if on_device else "cpu",
                    log=lambda _: None)
        seconds = time.perf_counter() - start
        rows = json.loads((folder / "metrics.json").read_text())["rows"]
        out[on_device] = dict(it_per_s=600 / seconds, first=rows[0], last=rows[-1])
    cpu, gpu = out[False], out[True]
    report("train", iterations=600, cpu_it_per_s=round(cpu["it_per_s"], 1), gpu_it_per_s=round(gpu["it_per_s"], 1),
           ratio_gpu_cpu=round(gpu["it_per_s"] / cpu["it_per_s"], 1), cpu_last=cpu["last"], gpu_last=gpu["last"],
           ok=gpu["last"]["val_accuracy"] > 0.9)


def check_student(data: Path, work: Path, device: str) -> None:

    from wsi_lymph.constants import DEFAULT_MODEL
    from wsi_lymph.engine.cluster import dask_client, default_workers
    from wsi_lymph.engine.params import ProbmapParams
    from wsi_lymph.models.networks import STUDENT_UPSCALE, subpixel_probabilities
    from wsi_lymph.models.registry import load_model
    from wsi_lymph.slides.frame import choose_frame, coarser_frame, read_frame_window
    from wsi_lymph.slides.reader import open_slide

    slide = data / "cmu-1-small-region.svs"
    info = open_slide(slide)
    frame = coarser_frame(choose_frame(info), STUDENT_UPSCALE)
    members = {dev: [(net.to(memory_format=torch.channels_last), mean) for net, mean in
                     load_model(DEFAULT_MODEL, dev).members] for dev in ("cpu", device)}
    halo = members["cpu"][0][0].halo_px
    window = read_frame_window(info, frame, np.arange(-halo, frame.shape_rc[0] + halo),
                               np.arange(-halo, frame.shape_rc[1] + halo))
    px = frame.shape_rc[0] * frame.shape_rc[1]
    cpu_s, cpu_worst_s, cpu = timed(lambda: subpixel_probabilities(members["cpu"], window, device="cpu"), 2)
    rates = {}
    for tile in (512, 1024, 2048):
        gpu_s, gpu_worst_s, gpu = timed(
            lambda t=tile: subpixel_probabilities(members[device], window, device=device, tile_px=t))
        rates[tile] = rate_min_max(px, gpu_s, gpu_worst_s)
    map_diff = float(np.abs(gpu - cpu).max())

    # detect with defaults (the local cluster: on a CUDA machine cores // 2 workers, each running its blocks on
    # the GPU) against one worker advertising GPU=1 (inference tasks ask for it; the other stages queue behind).
    outcome = {}
    for one_gpu_worker in (False, True):  # in a dry run the second is one worker with GPU=1 on the CPU
        session = (dask_client(1, dashboard_address=None, quiet=True, resources={"GPU": 1}) if one_gpu_worker
                   else dask_client(default_workers(), dashboard_address=None, quiet=True))
        with session as client:
            outcome[one_gpu_worker] = repeated_detect(client, slide, work / f"student-{one_gpu_worker}",
                                                      params=ProbmapParams(device=device if one_gpu_worker else None))
    first, second = outcome[False], outcome[True]
    same = first["centres"].shape == second["centres"].shape and np.allclose(first["centres"][:, :2],
                                                                              second["centres"][:, :2])
    report("student", slide_px=px, max_abs_map_diff_gpu_cpu=map_diff,
           cpu_px_per_s_min_max=rate_min_max(px, cpu_s, cpu_worst_s),
           gpu_px_per_s_min_max_by_tile={str(k): v for k, v in rates.items()},
           ratio_gpu_cpu=round(max(v[1] for v in rates.values()) / (px / cpu_s), 1),
           detect_warm_runs=WARM_RUNS, detect_wall_default_cluster_s=round(first["wall"], 1),
           detect_wall_default_cluster_min_max_s=first["spread"],
           detect_wall_default_cluster_cold_s=round(first["cold"], 1),
           detect_wall_one_gpu_worker_s=round(second["wall"], 1), detect_wall_one_gpu_worker_min_max_s=second["spread"],
           detect_wall_one_gpu_worker_cold_s=round(second["cold"], 1),
           detect_ratio_default_over_one_gpu_worker=round(first["wall"] / second["wall"], 2),
           detect_stages_one_gpu_worker_s=second["result"].seconds, centres_default_cluster=len(first["centres"]),
           centres_one_gpu_worker=len(second["centres"]), same_centres=bool(same),
           detect_max_abs_map_diff=float(np.abs(first["prob"] - second["prob"]).max()),
           ok=bool(same) and map_diff < 1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with lymph-centers/, the CMU-1 slide, models")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=["student", "patch", "dense", "detect", "train"])
    parser.add_argument("--device", default="cuda", help="the accelerator (cpu: a dry run of every section, smaller)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WSI_LYMPH_CACHE", tempfile.mkdtemp(prefix="wl-cache-"))
    os.environ["WSI_LYMPH_MODEL_SOURCE"] = str((args.data / "janowczyk2016-lymphocyte").resolve())
    report("device", cuda=torch.cuda.is_available(),
           name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           torch=torch.__version__, cpu_threads=torch.get_num_threads())
    from wsi_lymph.models.device import exact_cuda_numerics

    # As the engine's workers do: with torch's default TF32 convolutions the bare CUDA maps differed
    # from the CPU's by up to 3.2e-3 (student) and 5.7e-4 (fold 1) on an H200 (BENCHMARKS.md).
    exact_cuda_numerics(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.only:
            start = time.perf_counter()
            try:
                if section == "patch":
                    check_patch(args.data, args.device)
                elif section == "dense":
                    check_dense(args.data, args.device)
                elif section == "detect":
                    check_detect(args.data, Path(tmp), args.device)
                elif section == "train":
                    check_train(Path(tmp), args.device)
                elif section == "student":
                    check_student(args.data, Path(tmp), args.device)
            except Exception:
                report(section, error=traceback.format_exc(limit=6), ok=False)
            print(f"# {section}: {time.perf_counter() - start:.1f} s", flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
