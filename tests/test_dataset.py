"""Annotated data-set readers: the paper's layout, seed images (the real crops, read in place), CSV point lists."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from conftest import CROPS
from PIL import Image

from wsi_lymph.training.dataset import (
    AnnotatedImage,
    DatasetError,
    center_mask,
    check_dataset,
    read_dataset,
    write_paper_image,
)

SEED_COUNTS = {"example_1": 22, "example_2": 24, "example_3": 29}  # non-zero pixels of each real seed image


def _rgb(rng: np.random.Generator, shape_hw=(40, 50)) -> np.ndarray:
    return rng.integers(0, 256, size=(*shape_hw, 3), dtype=np.uint8)


def _write_csv(path, rows: list[str], header: str = "x,y") -> None:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def test_paper_layout_round_trip_in_natural_order(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for image_id in ("10", "2", "1"):
        rgb = _rgb(rng)
        centers = np.array([[0, 0], [39, 49], [12, 30], [5, 7]])
        written[image_id] = (rgb, centers, *write_paper_image(tmp_path, image_id, rgb, centers))

    image_path, mask_path = written["2"][2:]
    assert (image_path.name, mask_path.name) == ("im2.tif", "2m.tif")
    mask = tifffile.imread(mask_path)
    assert mask.shape == (40, 50, 4) and mask.dtype == np.uint8
    assert not mask[..., :3].any() and sorted(np.unique(mask[..., 3])) == [0, 255]
    assert [tuple(rc) for rc in np.argwhere(mask[..., 3])] == [(0, 0), (5, 7), (12, 30), (39, 49)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"

    images = read_dataset(tmp_path)
    assert [image.image_id for image in images] == ["1", "2", "10"]
    for image in images:
        rgb, centers, image_path, mask_path = written[image.image_id]
        assert isinstance(image, AnnotatedImage) and image.layout == "paper"
        assert (image.image_path, image.annotation_path) == (image_path, mask_path)
        assert image.rgb.dtype == np.uint8 and np.array_equal(image.rgb, rgb)
        assert image.centers_rc.dtype == np.int64
        np.testing.assert_array_equal(image.centers_rc, centers[np.lexsort((centers[:, 1], centers[:, 0]))])
        np.testing.assert_array_equal(image.mask(), center_mask((40, 50), centers))


@pytest.mark.shared_data
def test_seed_layout_on_the_real_crops_in_place():
    images = read_dataset(CROPS)
    assert [image.image_id for image in images] == ["example_1", "example_2", "example_3"]
    for image in images:
        seed = tifffile.imread(CROPS / f"{image.image_id}_seed.tif")
        assert image.layout == "seed" and image.annotation_path.name == f"{image.image_id}_seed.tif"
        assert len(image.centers_rc) == SEED_COUNTS[image.image_id] == np.count_nonzero(seed)
        np.testing.assert_array_equal(image.centers_rc, np.argwhere(seed > 0))
        np.testing.assert_array_equal(image.rgb, tifffile.imread(image.image_path))
    report = check_dataset(CROPS)
    assert report.ok and (report.images, report.centers) == (3, sum(SEED_COUNTS.values()))


@pytest.mark.shared_data
def test_real_crops_written_in_the_paper_layout_read_back_identically(tmp_path):
    """The fixture docs/method.md asks for: the real seeds converted to the paper's RGBA masks."""
    crops = read_dataset(CROPS)
    for number, crop in enumerate(crops, start=1):
        write_paper_image(tmp_path, str(number), crop.rgb, crop.centers_rc)
    again = read_dataset(tmp_path)
    assert [image.image_id for image in again] == ["1", "2", "3"]
    for crop, image in zip(crops, again, strict=True):
        np.testing.assert_array_equal(image.rgb, crop.rgb)
        np.testing.assert_array_equal(image.centers_rc, crop.centers_rc)


def test_csv_layout_rounds_to_the_nearest_pixel(tmp_path):
    rgb = _rgb(np.random.default_rng(1), (30, 20))
    Image.fromarray(rgb).save(tmp_path / "crop.png")
    # x = column, y = row; other columns are ignored; spreadsheets write a BOM and may pad names with spaces.
    (tmp_path / "crop.csv").write_text("\ufeff x ,y,probability\n10.4,20.6,0.9\n0,0,0.8\n19.49,29.2,0.7\n\n",
                                       encoding="utf-8")
    Image.fromarray(rgb).save(tmp_path / "empty.png")
    _write_csv(tmp_path / "empty.csv", [])
    (tmp_path / "notes.txt").write_text("not part of the data set")

    crop, empty = read_dataset(tmp_path)
    assert (crop.image_id, crop.layout, empty.image_id) == ("crop", "csv", "empty")
    np.testing.assert_array_equal(crop.rgb, rgb)
    np.testing.assert_array_equal(crop.centers_rc, [[0, 0], [21, 10], [29, 19]])
    assert empty.centers_rc.shape == (0, 2) and empty.centers_rc.dtype == np.int64


def _missing_annotation(folder):
    tifffile.imwrite(folder / "im3.tif", _rgb(np.random.default_rng(0)), photometric="rgb")
    return "im3.tif", "missing_annotation"


def _size_mismatch(folder):
    write_paper_image(folder, "3", _rgb(np.random.default_rng(0)), np.array([[1, 1]]))
    tifffile.imwrite(folder / "3m.tif", np.zeros((40, 49, 4), np.uint8), photometric="rgb")
    return "3m.tif", "size_mismatch"


def _unreadable_image(folder):
    write_paper_image(folder, "3", _rgb(np.random.default_rng(0)), np.array([[1, 1]]))
    (folder / "im3.tif").write_bytes(b"not a TIFF at all")
    return "im3.tif", "unreadable"


def _unreadable_seed(folder):
    Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / "a.png")
    (folder / "a_seed.tif").write_bytes(b"II*\x00garbage")
    return "a_seed.tif", "unreadable"


def _csv_without_xy(folder):
    Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / "a.png")
    _write_csv(folder / "a.csv", ["1,2"], header="row,col")
    return "a.csv", "invalid"


def _csv_not_numbers(folder):
    Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / "a.png")
    _write_csv(folder / "a.csv", ["1,2", "three,4"])
    return "a.csv", "invalid"


def _centre_outside(folder):
    Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / "a.png")  # 40 rows x 50 cols
    _write_csv(folder / "a.csv", ["1,2", "49.6,3"])  # x = 49.6 rounds to column 50
    return "a.csv", "invalid"


def _greyscale_image(folder):
    tifffile.imwrite(folder / "a.tif", np.zeros((40, 50), np.uint8))
    tifffile.imwrite(folder / "a_seed.tif", np.zeros((40, 50), np.uint8))
    return "a.tif", "invalid"


def _mask_without_image(folder):
    write_paper_image(folder, "3", _rgb(np.random.default_rng(0)), np.array([[1, 1]]))
    tifffile.imwrite(folder / "5m.tif", np.zeros((40, 50, 4), np.uint8), photometric="rgb")
    return "5m.tif", "missing_image"


def _two_annotations(folder):
    Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / "a.png")
    tifffile.imwrite(folder / "a_seed.tif", np.zeros((40, 50), np.uint8))
    _write_csv(folder / "a.csv", ["1,2"])
    return "a.png", "ambiguous"


def _two_images_one_id(folder):
    for suffix in (".png", ".jpg"):
        Image.fromarray(_rgb(np.random.default_rng(0))).save(folder / f"a{suffix}")
    _write_csv(folder / "a.csv", ["1,2"])
    return "a.jpg", "ambiguous"


BROKEN = [_missing_annotation, _size_mismatch, _unreadable_image, _unreadable_seed, _csv_without_xy, _csv_not_numbers,
          _centre_outside, _greyscale_image, _mask_without_image, _two_annotations, _two_images_one_id]


@pytest.mark.parametrize("make", BROKEN, ids=lambda make: make.__name__.lstrip("_"))
def test_each_problem_raises_naming_the_file(tmp_path, make):
    name, kind = make(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(name)) as caught:
        read_dataset(tmp_path)
    assert caught.value.kind == kind and caught.value.path.name == name
    assert isinstance(caught.value, ValueError)


def test_folder_problems_raise(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        read_dataset(tmp_path / "nowhere")


def test_check_collects_every_problem_without_raising(tmp_path):
    # One folder per broken case would hide interactions; all in one folder, with distinct names, is the real use.
    rng = np.random.default_rng(3)
    write_paper_image(tmp_path, "1", _rgb(rng), np.array([[1, 2], [3, 4]]))  # good
    write_paper_image(tmp_path, "2", _rgb(rng), np.zeros((0, 2), np.int64))  # empty: a warning
    tifffile.imwrite(tmp_path / "im3.tif", _rgb(rng), photometric="rgb")  # no mask
    write_paper_image(tmp_path, "4", _rgb(rng), np.array([[1, 1]]))
    tifffile.imwrite(tmp_path / "4m.tif", np.zeros((41, 50, 4), np.uint8), photometric="rgb")  # other size
    write_paper_image(tmp_path, "5", _rgb(rng), np.array([[1, 1]]))
    (tmp_path / "im5.tif").write_bytes(b"truncated")  # unreadable
    tifffile.imwrite(tmp_path / "6m.tif", np.zeros((40, 50, 4), np.uint8), photometric="rgb")  # no image
    Image.fromarray(_rgb(rng)).save(tmp_path / "b.png")
    _write_csv(tmp_path / "b.csv", ["1,2"], header="col,row")  # no x/y

    report = check_dataset(tmp_path)
    found = {kind: [issue.path.name for issue in getattr(report, kind)] for kind in
             ("missing_annotation", "size_mismatch", "unreadable", "missing_image", "invalid", "empty_annotation")}
    assert found == {"missing_annotation": ["im3.tif"], "size_mismatch": ["4m.tif"], "unreadable": ["im5.tif"],
                     "missing_image": ["6m.tif"], "invalid": ["b.csv"], "empty_annotation": ["2m.tif"]}
    assert not report.ok and len(report.errors) == 5 and len(report.warnings) == 1
    assert report.images == 6 and report.centers == 2  # im1..im5 and b.png; centres of the readable ones
    text = report.format()
    assert text.splitlines()[0].endswith("6 image(s), 2 centre(s); 5 error(s), 1 warning(s)")
    for name in ("im3.tif", "4m.tif", "im5.tif", "6m.tif", "b.csv", "2m.tif"):
        assert name in text
    assert "warning [empty_annotation]" in text and "error [size_mismatch]" in text

    # Only the warning left: the folder reads, and the check says so.
    for name in ("im3.tif", "4m.tif", "im4.tif", "im5.tif", "5m.tif", "6m.tif", "b.png", "b.csv"):
        (tmp_path / name).unlink()
    report = check_dataset(tmp_path)
    assert report.ok and report.warnings and (report.images, report.centers) == (2, 2)
    assert [len(image.centers_rc) for image in read_dataset(tmp_path)] == [2, 0]

    assert not check_dataset(tmp_path / "nowhere").ok
    assert check_dataset(tmp_path / "nowhere").unreadable


def test_center_mask_and_write_arguments(tmp_path):
    mask = center_mask((3, 4), np.array([[0, 3], [2, 0]]))
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert not center_mask((3, 4), np.zeros((0, 2))).any()
    np.testing.assert_array_equal(center_mask((3, 4), np.array([[1.0, 2.0]])), center_mask((3, 4), [[1, 2]]))
    for bad in ([[3, 0]], [[0, -1]], [[0.5, 1]], [[1, 2, 3]]):
        with pytest.raises(ValueError):
            center_mask((3, 4), np.array(bad))
    rgb = np.zeros((3, 4, 3), np.uint8)
    for image_id in ("", "a/b", "1.5", 7):
        with pytest.raises(ValueError, match="image id"):
            write_paper_image(tmp_path, image_id, rgb, [[0, 0]])
    with pytest.raises(ValueError, match="uint8"):
        write_paper_image(tmp_path, "1", rgb.astype(np.float32), [[0, 0]])
    with pytest.raises(ValueError, match="outside"):
        write_paper_image(tmp_path, "1", rgb, [[3, 0]])
    assert not list(tmp_path.iterdir()), "a refused write must leave nothing behind"


@pytest.mark.shared_data
def test_evaluate_read_points_agrees_on_the_real_seeds():
    """``wsi_lymph.detection.evaluate.read_points`` gives (x, y); the data set (row, col) of the same pixels."""
    from wsi_lymph.detection.evaluate import read_points

    for image in read_dataset(CROPS):
        np.testing.assert_array_equal(read_points(image.annotation_path), image.centers_rc[:, ::-1].astype(float))
