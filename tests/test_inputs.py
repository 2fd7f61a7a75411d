"""Inputs a user gets wrong, run as a user runs them: finished slides asked again with other settings, folders
holding more than slides, pictures that are not H&E, greyscale or too small.  Real CLI (subprocess), real
LocalCluster, real files; every case asserts the exit status, the message and that no traceback shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CROPS, DATA, SLIDES
from PIL import Image

from wsi_lymph.detection.sanity import check_stain, implausible_results, stain_profile
from wsi_lymph.engine.batch import SUPERSEDED_SUMMARY, map_attributes, model_description, run_detect, run_probmaps
from wsi_lymph.engine.params import ProbmapParams, map_settings, settings_difference
from wsi_lymph.slides.frame import choose_frame, frame_region
from wsi_lymph.slides.reader import SlideError, file_fingerprint, open_slide, read_region, scan_slides

FOLD = "janowczyk2016/fold1"
FAST = ["--workers", "1", "--dashboard", ":0"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "wsi_lymph.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy(), cwd=cwd)
    assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    return run


def _failed_lines(run: subprocess.CompletedProcess) -> dict[str, str]:
    """The final ``FAILED <path>: <reason>`` lines, by file name."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("FAILED ")]
    return {Path(line.split()[1].rstrip(":")).name: line for line in lines}


def _rectangles(shape=(240, 300)) -> np.ndarray:
    """Red, green and blue rectangles on white: the kind of picture ``small-he-levels.tiff`` is."""
    rgb = np.full((*shape, 3), 255, np.uint8)
    rgb[30:140, 30:180] = (255, 0, 0)
    rgb[90:220, 150:270] = (0, 255, 0)
    rgb[70:200, 60:200] = (0, 0, 255)
    return rgb


# ------------------------------------------------------------------ 1. finished slides asked again
@pytest.mark.shared_data
def test_changed_settings_are_refused_and_a_new_threshold_reuses_the_map(client, tmp_path):
    out, slide = tmp_path / "out", CROPS / "example_1.tif"
    common = [slide, "--mpp", "0.5", "--model", FOLD, "--stride", "8", "--keep-map", *FAST]
    first = _cli("detect", *common, "--out", out)
    assert first.returncode == 0, first.stderr
    folder = out / "example_1"
    kept = {name: (folder / name).read_bytes() for name in ("centers.csv", "summary.json", "probmap.json")}
    map_written = (folder / "prob.zarr" / "zarr.json").stat().st_mtime_ns

    # Another stride and mirroring: refused, one line naming the differences; the old results stay as they were.
    run = _cli("detect", *common, "--stride", "2", "--mirror", "--out", out)
    assert run.returncode == 1, run.stdout + run.stderr
    [line] = _failed_lines(run).values()
    assert (f"finished in {folder} with --stride 8, no --mirror, asked --stride 2, --mirror; pass --force to "
            "recompute it (replacing those results) or choose another --out") in line, line
    assert "already done" not in run.stdout + run.stderr
    assert {name: (folder / name).read_bytes() for name in kept} == kept
    assert (folder / "prob.zarr" / "zarr.json").stat().st_mtime_ns == map_written

    # Only the threshold changed: the centres are found again from the stored map, without inference ...
    lower = _cli("detect", *common, "--threshold", "0.5", "--out", out)
    assert lower.returncode == 0, lower.stderr
    said = lower.stdout + lower.stderr
    assert "--threshold 0.7706 -> 0.5: finding the centres again from the stored map (no inference)" in said, said
    assert "map done" not in said
    assert (folder / "prob.zarr" / "zarr.json").stat().st_mtime_ns == map_written
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["threshold"] == 0.5 and summary["count"] > json.loads(kept["summary.json"])["count"]
    # ... and they are exactly those of a fresh run at that threshold.
    [fresh] = run_detect(client, [slide], tmp_path / "fresh", model=FOLD, mpp=0.5, threshold=0.5,
                         params=ProbmapParams(stride_px=8, torch_threads=1), progress=False)
    assert fresh.status == "done" and not fresh.reused, fresh.reason
    assert (folder / "centers.csv").read_text() == (tmp_path / "fresh" / "example_1" / "centers.csv").read_text()
    # Asked again with the same settings: skipped.
    again = _cli("detect", *common, "--threshold", "0.5", "--out", out)
    assert again.returncode == 0 and "already done" in again.stdout + again.stderr
    # Another threshold without --keep-map: the map kept earlier is not this run's to delete.
    without = [arg for arg in common if arg != "--keep-map"]
    higher = _cli("detect", *without, "--threshold", "0.9", "--out", out)
    assert higher.returncode == 0 and "finding the centres again" in higher.stdout + higher.stderr, higher.stderr
    assert (folder / "prob.zarr" / "zarr.json").stat().st_mtime_ns == map_written
    assert "prob.zarr" in json.loads((folder / "summary.json").read_text())["outputs"]
    # The state a rerun leaves when it is interrupted after setting summary.json aside, before writing its own:
    # the next rerun without --keep-map still knows that the map was kept.
    (folder / "summary.json").replace(folder / SUPERSEDED_SUMMARY)
    resumed = _cli("detect", *without, "--threshold", "0.9", "--out", out)
    assert resumed.returncode == 0 and "finding centres" in resumed.stdout + resumed.stderr, resumed.stderr
    assert (folder / "prob.zarr" / "zarr.json").stat().st_mtime_ns == map_written
    assert json.loads((folder / "summary.json").read_text())["params"]["keep_map"] is True
    assert not (folder / SUPERSEDED_SUMMARY).exists()


@pytest.mark.shared_data
def test_a_new_hotspot_area_or_density_bin_rewrites_the_outputs_from_the_stored_centres(tmp_path):
    """Not "already done" with stale pictures, and no --force: the centres are read back, the map is not needed."""
    out, slide = tmp_path / "out", CROPS / "example_1.tif"
    common = [slide, "--mpp", "0.5", *FAST, "--out", out]  # the default model; its map is deleted when done
    assert _cli("detect", *common).returncode == 0
    folder = out / "example_1"
    assert not (folder / "prob.zarr").exists()
    first = json.loads((folder / "summary.json").read_text())
    centres = (folder / "centers.csv").read_bytes()
    density = (folder / "density.png").read_bytes()
    assert first["hotspot"]["area_mm2"] == 1.0 and first["density_png_bin_um"] == 25.0 and first["count"] > 10

    # --keep-map too: there is no map left to keep, and summary.json must not list one.
    changed = _cli("detect", *common, "--hotspot-mm2", "0.001", "--density-bin-um", "10", "--keep-map")
    said = changed.stdout + changed.stderr
    assert changed.returncode == 0, said
    assert ("--hotspot-mm2 1 -> 0.001, density bin 25.0 -> 10 µm: writing its outputs again from its centres "
            "(same centres, no inference)") in said, said
    assert "map done" not in said and "already done in" in said
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["hotspot"]["area_mm2"] == 0.001 and summary["density_png_bin_um"] == 10.0
    assert summary["hotspot"]["count"] < first["hotspot"]["count"]
    assert summary["count"] == first["count"] and (folder / "centers.csv").read_bytes() == centres
    assert (folder / "density.png").read_bytes() != density
    assert set(summary["outputs"]) == set(first["outputs"])  # the map's PNGs kept, listed again; no prob.zarr
    assert all((folder / name).exists() for name in summary["outputs"])

    again = _cli("detect", *common, "--hotspot-mm2", "0.001", "--density-bin-um", "10")
    assert again.returncode == 0 and "with the same settings, skipped" in again.stdout + again.stderr
    # Back to the defaults: the first outputs again, byte for byte where nothing records times.
    back = _cli("detect", *common)
    assert back.returncode == 0 and "writing its outputs again" in back.stdout + back.stderr
    final = json.loads((folder / "summary.json").read_text())
    assert final["hotspot"] == first["hotspot"] and final["density_png_bin_um"] == 25.0
    assert (folder / "density.png").read_bytes() == density


@pytest.mark.shared_data
def test_the_library_refuses_a_region_reaching_beyond_the_slide_as_the_cli_does(client, tmp_path):
    # Clipping would analyse less than asked while the outputs describe the request (cli/checks.py).
    params = ProbmapParams(region_level0=(2000, 2900, 300, 10), torch_threads=1)
    [result] = run_probmaps(client, [SLIDES / "cmu-1-small-region.svs"], tmp_path, params=params, progress=False,
                            log=lambda _: None)
    assert result.status == "failed", result
    assert "region 2000,2900,300,10" in result.reason and "reaches beyond the slide (2220 x 2967" in result.reason
    assert not list(tmp_path.rglob("prob.zarr"))


@pytest.mark.shared_data
def test_a_slide_written_again_under_its_name_is_not_already_done(client, tmp_path):
    """A re-scan saved over the old file (same name, size and µm/px) was skipped as done, with the old results."""
    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    pixels = tifffile.imread(CROPS / "example_1.tif")
    tifffile.imwrite(slide, pixels)
    original = file_fingerprint(slide)
    params = ProbmapParams(torch_threads=1)
    [first] = run_detect(client, [slide], out, mpp=0.5, params=params, progress=False)
    assert first.status == "done", first.reason
    kept = (out / "slide" / "centers.csv").read_bytes()
    tifffile.imwrite(slide, np.ascontiguousarray(pixels[::-1]))  # the same size, other content
    [again] = run_detect(client, [slide], out, mpp=0.5, params=params, progress=False)
    assert again.status == "failed" and "finished in" in again.reason, again
    assert json.loads((out / "slide" / "summary.json").read_text())["slide_fingerprint"] == original
    before, asked = (f"a 100 x 100 px slide (file fingerprint {fingerprint})"
                     for fingerprint in (original, file_fingerprint(slide)))
    assert f"with {before}, asked {asked}; pass --force" in again.reason, again.reason
    assert (out / "slide" / "centers.csv").read_bytes() == kept  # refused, not replaced unasked
    # A copy of the original content (new modification time, same bytes) is the same slide: skipped.
    tifffile.imwrite(tmp_path / "copy.tif", pixels)
    (tmp_path / "copy.tif").replace(slide)
    [third] = run_detect(client, [slide], out, mpp=0.5, params=params, progress=False)
    assert third.status == "done" and third.reused, third


def test_every_setting_that_changes_a_map_is_named(model_cache):
    """The comparison behind the refusals: each map-changing option is named as the user writes it."""
    model = model_description(FOLD)
    info = open_slide(CROPS / "example_1.tif", mpp=0.5, fingerprint=True)
    frame = choose_frame(info, model["model_mpp"], model["source_scan_mpp"])

    def settings(params=None, model=model, info=info, region=None):
        params = params or ProbmapParams(stride_px=8)
        box = frame_region(frame, region)
        attrs = map_attributes(info, frame, (box[0], box[2]), model, replace(params, region_level0=region))
        return map_settings(attrs["wsi_lymph"], (box[1] - box[0], box[3] - box[2]))

    finished = settings()
    student = model_description("wsi-lymph-student")
    cases = [
        # The student normalises stains by default (auto): that is named too, since it changes the map.
        (settings(model=student), f"--model {FOLD}, --stain-norm none", "--model wsi-lymph-student, --stain-norm "
                                                                          "reinhard"),
        (settings(ProbmapParams(stride_px=8, dtype="uint8")), "--dtype float16", "--dtype uint8"),
        (settings(ProbmapParams(stride_px=8, stain_norm="reinhard")), "--stain-norm none", "--stain-norm reinhard"),
        (settings(ProbmapParams(stride_px=8, skip_hematoxylin=False)), "no --no-skip", "--no-skip"),
        (settings(region=(0, 0, 50, 50)), "the whole slide", "--region 0,0,50,50"),
        (settings(info=replace(info, mpp=0.25)), "--mpp 0.5", "--mpp 0.25"),
        (settings(info=replace(info, content_fingerprint="0123456789abcdef")),
         f"a 100 x 100 px slide (file fingerprint {info.content_fingerprint})",
         "a 100 x 100 px slide (file fingerprint 0123456789abcdef)"),
    ]
    for asked, old, new in cases:
        assert settings_difference(finished, asked) == (old, new)
    # Not compared: what leaves the values alone (layout, batch size, device), and the same region written out.
    same = settings(ProbmapParams(stride_px=8, chunk_px=128, block_px=256, batch_size=7, device="cpu"),
                    region=(0, 0, 100, 100))
    assert settings_difference(finished, same) is None
    older = {key: value for key, value in finished.items()} | {"results version": (None, "wsi-lymph 0.1.0 (results "
                                                                                       "version not recorded)")}
    assert settings_difference(older, finished) == ("wsi-lymph 0.1.0 (results version not recorded)",
                                                    "wsi-lymph 0.1.0 (results version 1)")


# ------------------------------------------------------------------ 2. folders
def test_folder_rules_are_predictable(tmp_path):
    names = ["a.svs", "B.TIF", "im3.tif", "c.png", "d.jpeg", "a_seed.tif", "3m.tif", "12m.tiff", "points.csv",
             "cells.geojson", "readme.txt", "probmap.json", ".hidden.svs", ".DS_Store"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    search = scan_slides([tmp_path])
    assert [p.name for p in search.slides] == ["B.TIF", "a.svs", "c.png", "d.jpeg", "im3.tif"]
    assert search.skipped == {"hidden": [".DS_Store", ".hidden.svs"],
                              "annotations": ["12m.tiff", "3m.tif", "a_seed.tif", "cells.geojson", "points.csv"],
                              "not a slide or image": ["probmap.json", "readme.txt"]}
    assert search.skipped_line() == (
        "skipped 9 files in the folders (--glob PATTERN chooses files) - annotations: 12m.tiff, 3m.tif, a_seed.tif, "
        "cells.geojson and 1 more; not a slide or image: probmap.json, readme.txt; hidden: .DS_Store, .hidden.svs")
    assert [p.name for p in scan_slides([tmp_path], "*_seed.tif").slides] == ["a_seed.tif"]  # --glob chooses
    assert scan_slides([tmp_path], "*.ndpi").empty == [tmp_path]
    # A file named explicitly is taken whatever its name.
    assert scan_slides([tmp_path / "readme.txt"]).slides == [tmp_path / "readme.txt"]


def test_a_file_given_more_than_once_is_analysed_once_under_its_first_name(tmp_path):
    # Overlapping shell globs, a folder and a file in it: two runs would write "a" and "a-2" of one slide.
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.svs", "b.svs"):
        (folder / name).write_bytes(name.encode())
    (tmp_path / "link.svs").symlink_to(folder / "b.svs")  # a second name the user gave it: analysed under it too
    (tmp_path / "c.svs").write_bytes(b"b.svs")  # the same bytes in another file: another slide, kept
    given = [folder / "b.svs", folder, folder / "b.svs", tmp_path / "link.svs", tmp_path / "c.svs",
             tmp_path / "slides" / ".." / "slides" / "a.svs"]
    search = scan_slides(given)
    assert search.slides == [folder / "b.svs", folder / "a.svs", tmp_path / "link.svs", tmp_path / "c.svs"]
    assert search.repeated == [folder / "b.svs", folder / "b.svs", given[-1]]
    assert search.repeated_line(shown=2) == f"given more than once, analysed once: {folder / 'b.svs'}, " \
                                            f"{folder / 'b.svs'} and 1 more"
    assert scan_slides([folder]).repeated == [] and scan_slides([folder]).repeated_line() is None


def test_the_jpeg_parts_of_a_vms_slide_are_not_taken_as_slides(tmp_path):
    # A Hamamatsu .vms slide is an index naming the JPEG files beside it: the folder holds one slide, not four.
    (tmp_path / "case7.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=case7.jpg\n"
                                        "ImageFile(1,0)=case7_x1.jpg\nMapFile=case7_map.jpg\n")
    for name in ("case7.jpg", "case7_x1.jpg", "case7_map.jpg", "other.jpg"):
        (tmp_path / name).write_bytes(b"")
    search = scan_slides([tmp_path])
    assert [p.name for p in search.slides] == ["case7.vms", "other.jpg"]
    assert search.skipped == {"parts of a .vms slide": ["case7.jpg", "case7_map.jpg", "case7_x1.jpg"]}


def test_transparent_pixels_read_as_white_glass_not_black_tissue(tmp_path):
    # A crop exported with a transparent background (often stored as RGBA 0, 0, 0, 0): Pillow's convert("RGB") alone
    # would make it black, which the stain map and the network would take for dense tissue.
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, 32:] = (150, 60, 160, 255)  # opaque purple on the right
    rgba[:, 16:32] = (150, 60, 160, 128)  # half-transparent purple
    expected = np.empty((64, 64, 3), np.uint8)
    expected[:, :16] = 255
    expected[:, 16:32] = np.rint(np.array([150, 60, 160]) * 128 / 255 + 255 * (1 - 128 / 255))
    expected[:, 32:] = (150, 60, 160)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the black of the left columns
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 0)))
    for name in ("rgba.png", "rgba.tif"):
        info = open_slide(tmp_path / name, mpp=0.5)
        np.testing.assert_array_equal(read_region(info, 0, 0, 0, 64, 64), expected, err_msg=name)
    info = open_slide(tmp_path / "palette.png", mpp=0.5)
    assert (read_region(info, 0, 0, 0, 16, 64) == 255).all()  # the palette's transparent colour


@pytest.mark.shared_data
def test_the_readme_scoring_recipe_on_a_mixed_folder(model_cache, tmp_path):
    """The annotated crops' folder, plus a readme and a hidden file: the 3 crops are analysed, the rest listed."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for path in CROPS.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "readme.txt").write_text("where these crops come from\n")
    (folder / ".~lock.readme.txt#").write_text("")
    out = tmp_path / "pred"
    run = _cli("detect", folder, "--mpp", "0.5", "--threshold", "0.5", "--out", out, *FAST)
    assert run.returncode == 0, run.stderr
    assert ("skipped 5 files in the folders (--glob PATTERN chooses files) - annotations: example_1_seed.tif, "
            "example_2_seed.tif, example_3_seed.tif; not a slide or image: readme.txt; hidden: .~lock.readme.txt#\n"
            ) in run.stdout
    assert "3 of 3 slides done" in run.stdout
    batch = json.loads((out / "batch.json").read_text())
    assert [s["name"] for s in batch["slides"]] == ["example_1", "example_2", "example_3"]
    assert batch["flagged"] == 0 and all(s["flags"] == [] for s in batch["slides"])  # real H&E passes
    scored = _cli("evaluate", out, folder)
    assert scored.returncode == 0 and "pooled" in scored.stdout


def test_a_folder_with_nothing_to_analyse_is_a_usage_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = _cli("detect", empty, "--out", tmp_path / "out")
    assert run.returncode == 2
    assert run.stderr.startswith(f"wsi-lymph detect: nothing to analyse in {empty}: no slide or image file (.svs")
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "a_seed.tif").write_bytes(b"")
    run = _cli("probmap", annotations, "--out", tmp_path / "out", "--glob", "*.svs")
    assert run.returncode == 2
    assert "nothing to analyse" in run.stderr and "no file matching --glob '*.svs'" in run.stderr
    assert "Dask dashboard" not in run.stdout  # found before any cluster started
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 3. input sanity
@pytest.mark.shared_data
def test_stain_check_passes_real_h_and_e_and_refuses_coloured_rectangles():
    real = [*SLIDES.glob("*.svs"), *CROPS.glob("example_?.tif"), *(DATA / "he-unlabeled").rglob("*.*"),
            DATA / "images" / "stardist-histo.jpg"]
    assert len(real) >= 15
    for path in real:
        check = check_stain(open_slide(path, mpp=0.5))
        assert check.verdict == "h&e" and check.he_fraction > 0.9, (path, check)
    check = check_stain(open_slide(SLIDES / "small-he-levels.tiff", mpp=0.5))
    assert check.verdict == "not h&e" and check.he_fraction < 0.05, check
    assert stain_profile(_rectangles()).verdict == "not h&e"
    grey = np.repeat(np.asarray(Image.open(CROPS / "example_1.tif").convert("L"))[..., None], 3, axis=2)
    check = stain_profile(grey)
    assert check.verdict == "not h&e" and "no colour (greyscale)" in check.message()


def test_greyscale_is_refused_in_every_format_and_tiny_images_too(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).save(tmp_path / "grey.jpg")
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    for name in ("grey.png", "grey.jpg", "grey.tif"):
        with pytest.raises(SlideError, match="greyscale image .*a colour \\(RGB\\) image of the H&E slide is needed"):
            open_slide(tmp_path / name)
    Image.fromarray(_rectangles((10, 10))).save(tmp_path / "tiny.png")
    assert open_slide(tmp_path / "tiny.png").level_sizes_xy == ((10, 10),)  # without a resolution: no size yet
    with pytest.raises(SlideError, match=r"the image is 10 x 10 px \(5 x 5 µm at 0.5 µm/px\), too small .* at least "
                                         r"16 µm \(32 px\)"):
        open_slide(tmp_path / "tiny.png", mpp=0.5)


@pytest.mark.shared_data
def test_bad_pictures_are_refused_before_inference_and_the_rest_goes_on(model_cache, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    Image.fromarray(_rectangles()).save(folder / "rectangles.png")
    grey = np.asarray(Image.open(CROPS / "example_2.tif").convert("L"))
    Image.fromarray(grey).save(folder / "grey.png")
    tifffile.imwrite(folder / "grey.tif", grey)
    Image.fromarray(tifffile.imread(CROPS / "example_2.tif")[:10, :10]).save(folder / "tiny.png")
    (folder / "example_2.tif").symlink_to(CROPS / "example_2.tif")
    (folder / "small-he-levels.tiff").symlink_to(SLIDES / "small-he-levels.tiff")
    out = tmp_path / "out"
    # Relative paths, as typed in a shell: each one-line failure names its file once.
    run = _cli("detect", "slides", "--mpp", "0.5", "--out", "out", *FAST, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 of 6 slides done" in run.stdout
    failed = _failed_lines(run)
    assert sorted(failed) == ["grey.png", "grey.tif", "rectangles.png", "small-he-levels.tiff", "tiny.png"]
    for name, line in failed.items():
        assert line.count(name) == 1, line
        [said] = [said for said in run.stdout.splitlines() if ": FAILED: " in said and name in said]
        assert said.count(name) == 1, said
    for name in ("rectangles.png", "small-he-levels.tiff"):
        assert "does not look like H&E, refused before inference: only 0% of its tissue pixels have H&E colours" \
               in failed[name] and "--no-stain-check" in failed[name]
        assert not (out / Path(name).stem / "prob.zarr").exists()
    for name in ("grey.png", "grey.tif"):  # one rule, whatever the format
        assert "greyscale image" in failed[name] and "a colour (RGB) image of the H&E slide is needed" in failed[name]
    assert "too small to hold a lymphocyte" in failed["tiny.png"] and "at least 16 µm" in failed["tiny.png"]
    batch = json.loads((out / "batch.json").read_text())
    assert [s["status"] for s in batch["slides"] if s["name"] == "example_2"] == ["done"]


@pytest.mark.shared_data
def test_a_lattice_of_centres_is_flagged_everywhere(model_cache, tmp_path):
    """The paper's network on the coloured rectangles, stain check off: centres on a lattice, flagged, not hidden."""
    out = tmp_path / "out"
    run = _cli("detect", SLIDES / "small-he-levels.tiff", "--mpp", "0.5", "--model", FOLD, "--stride", "8",
               "--region", "80,80,64,64", "--no-stain-check", "--out", out, *FAST)  # inside the blue rectangle
    assert run.returncode == 0, run.stderr  # analysed as asked ...
    summary = json.loads((out / "small-he-levels" / "summary.json").read_text())
    batch = json.loads((out / "batch.json").read_text())
    assert summary["count"] >= 40
    flags = summary["flags"]
    assert any("centres per mm² of tissue, more than the 32075" in flag for flag in flags), flags
    assert any("have 4 neighbours at the clearing radius (3.5 µm): a lattice" in flag for flag in flags), flags
    assert batch["flagged"] == 1 and batch["slides"][0]["flags"] == flags  # ... and flagged in all three places
    for flag in flags:
        assert f"FLAGGED {SLIDES / 'small-he-levels.tiff'}: {flag}" in run.stderr


def test_implausible_results_spares_real_looking_centres():
    rng = np.random.default_rng(0)
    lattice = np.mgrid[0:40, 0:40].reshape(2, -1) * 3.625  # the greedy's spacing: clearing radius + 1 px
    assert len(implausible_results(*lattice, tissue_mm2=0.03, clear_radius_um=3.5)) == 2
    # 300 cells in 0.03 mm² (10 000 per mm²), at least a cell diameter apart: nothing to flag.
    cells = []
    while len(cells) < 300:
        point = rng.uniform(0, 173, 2)
        if all(np.hypot(*(point - other)) >= 7 for other in cells):
            cells.append(point)
    assert implausible_results(*np.array(cells).T, tissue_mm2=0.03, clear_radius_um=3.5) == []
