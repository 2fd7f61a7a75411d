"""The map's OME-Zarr pyramid (prob.ome.zarr): exact levels, NGFF 0.4 metadata a reader accepts, µm that put a
centre of centers.csv on the slide pixel that holds it, and the working map deleted only once a slide is done."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pydantic
import pytest
import zarr
from conftest import SLIDES
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v04.image import Image

from wsi_lymph.engine.batch import run_detect
from wsi_lymph.engine.params import ProbmapParams
from wsi_lymph.io.ome_zarr import PYRAMID_NAME, THUMBNAIL_PX, build_pyramid, plan_pyramid, pyramid_graph
from wsi_lymph.io.probmap_store import computed_blocks_attr, create_partial_store, write_block
from wsi_lymph.slides.frame import ModelFrame, frame_to_level0

SLIDE = SLIDES / "cmu-1-small-region.svs"
REGION = (700, 1000, 600, 520)  # level-0 x, y, width, height: a 300 x 260 µm piece of tissue with lymphocytes


def _read_ngff(path):
    """The image as napari's OME-Zarr plugin gets it: ``ome-zarr``'s reader, levels and per-level transforms."""
    [node] = list(Reader(parse_url(str(path)))())
    transforms = [{t["type"]: t[t["type"]] for t in level} for level in node.metadata["coordinateTransformations"]]
    return [np.asarray(level) for level in node.data], transforms, node.metadata


def _cell_sums_sat(values: np.ndarray, factor: int) -> np.ndarray:
    """Integer sums over factor x factor cells (the last ones partial), from a summed-area table."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.int64)
    table[1:, 1:] = values.cumsum(0).cumsum(1)
    rows, cols = (np.array([*range(0, n, factor), n]) for n in values.shape)  # cell edges
    return (table[rows[1:, None], cols[1:]] - table[rows[:-1, None], cols[1:]] - table[rows[1:, None], cols[:-1]]
            + table[rows[:-1, None], cols[:-1]])


def _assert_rounded(level: np.ndarray, exact: np.ndarray) -> None:
    """``level`` = round(exact); at an exact .5 either neighbour (float sums may fall on either side)."""
    tie = exact % 1 == 0.5
    np.testing.assert_array_equal(level[~tie], np.rint(exact[~tie]))
    assert np.isin(level[tie] - np.floor(exact[tie]), (0, 1)).all()


def test_pyramid_levels_are_exact_means_with_ngff_metadata_that_validates(tmp_path):
    """A uint8 --region map off the cell grid, of a shape no level divides: every level, its µm and the schema."""
    frame = ModelFrame(level=0, frame_scale=4.0, shape_rc=(4400, 2200), mpp=0.125, level0_per_frame_px=0.25,
                       level_shape_rc=(1100, 550))
    origin_rc, shape = (46, 77), (4300, 2113)
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 256, shape, dtype=np.uint8)
    attrs = {"wsi_lymph": {"value_scale": 1 / 255, "mpp": 0.5, "frame": frame.attrs(), "origin_rc": list(origin_rc)}}
    box = (origin_rc[0], origin_rc[0] + shape[0], origin_rc[1], origin_rc[1] + shape[1])
    create_partial_store(tmp_path / "prob.zarr", [box], origin_rc, 512, "uint8", attrs)
    write_block(tmp_path / "prob.zarr", box, origin_rc, stored / 255.0, "uint8")

    path = build_pyramid(tmp_path / "prob.zarr", tmp_path, "synthetic")
    levels, transforms, metadata = _read_ngff(path)

    # The levels span the whole slide (the frame), the map's values where it lies, 0 elsewhere.
    assert [level.shape for level in levels] == [(1100, 550), (550, 275), (275, 138)]
    assert max(levels[-1].shape) <= THUMBNAIL_PX < max(levels[-2].shape)  # down to one chunk, no further
    canvas, under = np.zeros(frame.shape_rc, np.int64), np.zeros(frame.shape_rc, np.int64)
    canvas[box[0] : box[1], box[2] : box[3]], under[box[0] : box[1], box[2] : box[3]] = stored, 1
    for level, factor in zip(levels, (4, 8, 16), strict=True):
        sums, counts = _cell_sums_sat(canvas, factor), _cell_sums_sat(under, factor)
        exact = np.divide(sums, counts, out=np.zeros(sums.shape), where=counts > 0)  # 255 x mean P
        _assert_rounded(level, exact)
    assert levels[0][:11].max() == levels[0][:, :19].max() == 0 and levels[0][11, 19] > 0  # from 46 // 4, 77 // 4

    # A pixel's µm position (NGFF: translation + index x scale) is the centre of the model-frame pixels it
    # averages, as centers.csv places them (frame_to_level0, times the slide's µm/px).
    assert metadata["axes"] == [{"name": "y", "type": "space", "unit": "micrometer"},
                                {"name": "x", "type": "space", "unit": "micrometer"}]
    assert transforms[0] == {"scale": [0.5, 0.5], "translation": [0.0, 0.0]}  # on the slide's level-0 pixels
    for (level, transform), factor in zip(zip(levels, transforms, strict=True), (4, 8, 16), strict=True):
        assert transform["scale"] == [factor * 0.125] * 2
        for i, j in [(0, 0), (5, 3), (level.shape[0] - 1, level.shape[1] - 1)]:
            rows, cols = np.arange(i * factor, (i + 1) * factor), np.arange(j * factor, (j + 1) * factor)
            xy_um = frame_to_level0(np.stack(np.meshgrid(rows, cols, indexing="ij"), -1), frame).mean((0, 1)) * 0.5
            expected = np.array(transform["translation"]) + np.array([i, j]) * transform["scale"]
            np.testing.assert_allclose(expected, xy_um[::-1], atol=1e-9)

    # The OME-NGFF 0.4 image schema (ome-zarr-models) accepts it, and it is no rubber stamp: a reordered
    # transform list is refused.
    image = Image.from_zarr(zarr.open_group(str(path), mode="r"))
    assert [d.path for d in image.attributes.multiscales[0].datasets] == ["0", "1", "2"]
    broken = tmp_path / "broken.ome.zarr"
    shutil.copytree(path, broken)
    group = zarr.open_group(str(broken), mode="r+")
    multiscales = group.attrs["multiscales"]
    multiscales[0]["datasets"][0]["coordinateTransformations"].reverse()
    group.attrs["multiscales"] = multiscales
    with pytest.raises(pydantic.ValidationError):
        Image.from_zarr(zarr.open_group(str(broken), mode="r"))


def test_glass_and_skipped_blocks_get_no_pyramid_tasks_and_the_levels_are_unchanged(tmp_path):
    # A whole-slide map of which only 2 of 5 x 4 blocks were classified (the rest glass or without hematoxylin,
    # P = 0): the pyramid's tasks cover those blocks only, and reads the same as one computed everywhere.
    frame = ModelFrame(level=0, frame_scale=4.0, shape_rc=(5 * 2048, 4 * 2048), mpp=0.125, level0_per_frame_px=0.25,
                       level_shape_rc=(5 * 512, 4 * 512))
    boxes = [(r, r + 2048, c, c + 2048) for r in range(0, 5 * 2048, 2048) for c in range(0, 4 * 2048, 2048)]
    keep = np.zeros(len(boxes), dtype=bool)
    keep[[5, 14]] = True
    folders = {}
    for name, attrs_extra in (("restricted", {"computed_blocks": computed_blocks_attr(boxes, keep, (0, 0), 2048)}),
                              ("everywhere", {})):
        folder = tmp_path / name
        folder.mkdir()
        attrs = {"wsi_lymph": {"value_scale": 1 / 255, "mpp": 0.5, "frame": frame.attrs(), "origin_rc": [0, 0],
                               **attrs_extra}}
        create_partial_store(folder / "prob.zarr", boxes, (0, 0), 512, "uint8", attrs)
        for k in np.flatnonzero(keep):
            write_block(folder / "prob.zarr", boxes[k], (0, 0),
                        np.random.default_rng(int(k)).random((2048, 2048)), "uint8")
        folders[name] = folder
    graphs = {name: pyramid_graph(folder / "prob.zarr", folder / "p.ome.zarr",
                                  plan_pyramid(dict(zarr.open_array(str(folder / "prob.zarr")).attrs)["wsi_lymph"],
                                               (5 * 2048, 4 * 2048)), "t")
              for name, folder in folders.items()}
    level0_tasks = {name: sum(1 for key in graph.dask if isinstance(key, tuple) and key[0] == "pyramid-t-sum0")
                    for name, graph in graphs.items()}
    assert level0_tasks == {"restricted": 2, "everywhere": 20}  # one 512-px level-0 chunk per 2,048-px block
    levels = {name: _read_ngff(build_pyramid(folder / "prob.zarr", folder, name))[0]
              for name, folder in folders.items()}
    assert all(level.any() for level in levels["restricted"])
    for restricted, everywhere in zip(levels["restricted"], levels["everywhere"], strict=True):
        np.testing.assert_array_equal(restricted, everywhere)


@pytest.fixture(scope="module")
def detected(client, tmp_path_factory):
    """detect with the default model on a region of CMU-1, its map kept."""
    out = tmp_path_factory.mktemp("pyramid") / "out"
    [result] = run_detect(client, [SLIDE], out, params=ProbmapParams(region_level0=REGION, torch_threads=1),
                          keep_map=True, progress=False)
    assert result.status == "done", result.reason
    return out / "cmu-1-small-region"


@pytest.mark.shared_data
def test_a_centre_of_centers_csv_lies_on_its_slide_pixel_in_the_pyramid(detected):
    levels, transforms, _ = _read_ngff(detected / PYRAMID_NAME)
    # Level 0 is the slide's level-0 grid, the whole slide (P = 0 outside the region), at the slide's µm/px.
    assert [level.shape for level in levels] == [(2967, 2220), (1484, 1110), (742, 555), (371, 278)]
    mpp = json.loads((detected / "summary.json").read_text())["mpp"]
    assert transforms[0] == {"scale": pytest.approx([mpp, mpp]), "translation": [0.0, 0.0]}
    assert transforms[1]["scale"] == pytest.approx([2 * mpp, 2 * mpp])
    x, y, width, height = REGION
    assert levels[0][y : y + height, x : x + width].any() and levels[0].sum() == levels[0][y : y + height,
                                                                                             x : x + width].sum()
    with open(detected / "centers.csv", newline="") as handle:
        centres = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    assert len(centres) > 20
    working = zarr.open_array(str(detected / "prob.zarr"), mode="r")[:].astype(np.float64)
    at_centres = []
    for centre in centres:
        # The pixel the NGFF µm put a centre in is the slide pixel that holds it (pixel centres at integer x, y) ...
        i, j = (round((centre[key] - t) / s) for key, t, s in zip(("y_um", "x_um"), transforms[0]["translation"],
                                                                  transforms[0]["scale"], strict=True))
        assert (i, j) == (round(centre["y"]), round(centre["x"]))
        # ... and holds the mean P of the 4 x 4 model-frame pixels of that slide pixel (the map starts at the
        # region's corner).
        r, c = 4 * (i - y), 4 * (j - x)
        assert levels[0][i, j] == np.rint(255 * working[r : r + 4, c : c + 4].mean())
        at_centres.append(levels[0][i, j])
    # Lymphocyte centres are where P is high: far above the region's mean.
    assert np.median(at_centres) > 4 * levels[0][y : y + height, x : x + width].mean()

    summary = json.loads((detected / "summary.json").read_text())
    assert {"prob.zarr", PYRAMID_NAME} <= set(summary["outputs"]) and "pyramid" in summary["timings_s"]
    report = (detected.parent / "report.html").read_text()
    assert report.count('<tr class="done" data-slide="cmu-1-small-region">') == 1


@pytest.mark.shared_data
def test_without_keep_map_the_working_map_goes_only_once_the_slide_is_done(client, detected, tmp_path):
    """Failed outputs keep the map for the next run; done, it is deleted; new centres then need --force.

    A map the user kept (``detected``) stays through the same failure and the rerun after it."""
    params = ProbmapParams(region_level0=REGION, torch_threads=1)
    kept_out = tmp_path / "kept"
    shutil.copytree(detected.parent, kept_out)
    for out in (kept_out, tmp_path / "out"):
        folder = out / "cmu-1-small-region"
        (folder / "centers.csv").unlink(missing_ok=True)
        (folder / "centers.csv").mkdir(parents=True)  # the outputs cannot be written: the slide fails
        [failed] = run_detect(client, [SLIDE], out, params=params, threshold=0.6, progress=False)
        assert failed.status == "failed" and "centers.csv" in failed.reason, failed.reason
        assert (folder / "prob.zarr" / "zarr.json").is_file()  # kept: the next run finds the centres from it
    (kept_out / "cmu-1-small-region" / "centers.csv").rmdir()
    [done] = run_detect(client, [SLIDE], kept_out, params=params, threshold=0.6, progress=False)
    assert done.status == "done", done.reason
    assert (kept_out / "cmu-1-small-region" / "prob.zarr" / "zarr.json").is_file()  # the user's, not this run's

    (folder / "centers.csv").rmdir()
    [done] = run_detect(client, [SLIDE], out, params=params, threshold=0.6, progress=False)
    assert done.status == "done", done.reason
    assert not (folder / "prob.zarr").exists() and not list(folder.glob(".prob.zarr*"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["threshold"] == 0.6 and "prob.zarr" not in summary["outputs"]
    assert all((folder / name).exists() for name in summary["outputs"])
    assert Image.from_zarr(zarr.open_group(str(folder / PYRAMID_NAME), mode="r"))

    # The same settings again: recognised from the pyramid's record of the map, skipped.
    [again] = run_detect(client, [SLIDE], out, params=params, threshold=0.6, progress=False)
    assert again.status == "done" and again.reused
    # Another threshold needs the full-resolution map: one line saying so and what to do; results untouched.
    before = (folder / "summary.json").read_bytes()
    [refused] = run_detect(client, [SLIDE], out, params=params, threshold=0.7, progress=False)
    assert refused.status == "failed"
    assert "--threshold 0.6 -> 0.7" in refused.reason and "--force" in refused.reason, refused.reason
    assert "--keep-map" in refused.reason and "\n" not in refused.reason
    assert (folder / "summary.json").read_bytes() == before
