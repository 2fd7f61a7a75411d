"""Slide reading: the real slides, resolution rules, generated TIFF pyramids, lazy tiles."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import CROPS, DATA, SLIDES

from wsi_lymph.slides.frame import choose_frame
from wsi_lymph.slides.reader import SlideError, SlideInfo, find_slides, open_slide, read_region, slide_to_dask


@pytest.mark.shared_data
def test_cmu_small_region():
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    assert info.reader == "openslide"
    assert info.level_sizes_xy == ((2220, 2967),)
    assert info.mpp == pytest.approx(0.499)
    frame = choose_frame(info)
    assert (frame.level, frame.frame_scale) == (0, 4.0)  # 20x -> 4x
    assert frame.shape_rc == (2967 * 4, 2220 * 4)


@pytest.mark.shared_data
def test_tcga_has_no_resolution_and_works_with_mpp():
    path = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
    info = open_slide(path)
    assert info.level_sizes_xy == ((4443, 3567), (2221, 1783))
    assert info.mpp is None
    with pytest.raises(SlideError) as error:
        choose_frame(info)
    assert str(path) in str(error.value) and "--mpp" in str(error.value)
    frame = choose_frame(open_slide(path, mpp=0.5))
    assert (frame.level, frame.frame_scale, frame.mpp) == (0, 4.0, 0.125)


@pytest.mark.shared_data
def test_small_pyramid_levels_and_screen_resolution_is_not_a_scan_resolution():
    info = open_slide(SLIDES / "small-he-levels.tiff")
    assert info.level_sizes_xy == ((300, 250), (150, 125), (75, 62), (37, 31))
    # The file says 28.3 px/cm (72 dpi): a writer's default, not a microscope's resolution.
    assert info.mpp is None and "not a scan resolution" in info.mpp_source
    assert read_region(info, 3, 0, 0, 37, 31).shape == (31, 37, 3)


@pytest.mark.shared_data
def test_plain_tiff_crop_and_jpeg_need_mpp():
    crop = open_slide(CROPS / "example_1.tif")
    assert (crop.reader, crop.level_sizes_xy, crop.mpp) == ("tifffile", ((100, 100),), None)
    np.testing.assert_array_equal(read_region(crop, 0, 0, 0, 100, 100), tifffile.imread(CROPS / "example_1.tif"))
    jpeg = open_slide(DATA / "images" / "stardist-histo.jpg")
    assert (jpeg.reader, jpeg.level_sizes_xy, jpeg.mpp) == ("pillow", ((500, 300),), None)


def test_generated_ome_pyramid_at_40x(tmp_path):
    """A pyramidal OME-TIFF (SubIFDs) written with tifffile: 0.25 µm/px from its OME metadata."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1024, 768, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(base, subifds=2, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        tif.write(base[::2, ::2], subfiletype=1, **options)
        tif.write(base[::4, ::4], subfiletype=1, **options)
    info = open_slide(path)
    assert info.mpp == pytest.approx(0.25)
    assert info.level_sizes_xy[0] == (768, 1024)
    assert info.level_sizes_xy == ((768, 1024), (384, 512), (192, 256))
    frame = choose_frame(info)  # 40x with a 20x level: read the 20x level, upscale 4x
    assert (frame.level, frame.frame_scale, frame.level0_per_frame_px) == (1, 4.0, 0.5)
    np.testing.assert_array_equal(read_region(info, 0, 100, 200, 50, 40), base[200:240, 100:150])
    np.testing.assert_array_equal(read_region(info, 1, 10, 20, 30, 40), base[::2, ::2][20:60, 10:40])


def test_level_choice_prefers_a_20x_level_of_a_40x_slide():
    info = SlideInfo("x.svs", "openslide", ((40000, 30000), (20000, 15000), (5000, 3750)), (1.0, 2.0, 8.0), 0.25, "t")
    frame = choose_frame(info)
    assert (frame.level, frame.frame_scale) == (1, 4.0)
    only_40x = SlideInfo("y.svs", "openslide", ((40000, 30000), (10000, 7500)), (1.0, 4.0), 0.25, "t")
    assert (choose_frame(only_40x).level, choose_frame(only_40x).frame_scale) == (0, 2.0)


@pytest.mark.shared_data
def test_lazy_dask_tiles_equal_direct_reads():
    info = open_slide(SLIDES / "cmu-1-small-region.svs")
    array = slide_to_dask(info, 0, tile_px=512)
    assert array.shape == (2967, 2220, 3) and array.chunks[0][0] == 512
    assert len(array.dask) == array.npartitions  # nothing but one read task per tile
    np.testing.assert_array_equal(array[500:530, 1000:1040].compute(), read_region(info, 0, 1000, 500, 40, 30))


@pytest.mark.shared_data
def test_not_a_slide_names_the_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(SlideError, match="notes.txt.*not a readable slide"):
        open_slide(bad)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="--mpp must be a positive"):
        open_slide(SLIDES / "cmu-1-small-region.svs", mpp=-1)


def test_find_slides_lists_folders_and_files(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    assert [p.name for p in find_slides([tmp_path])] == ["a.svs"]  # b.txt is no slide (rules: test_inputs.py)
    assert find_slides([tmp_path / "b.txt"]) == [tmp_path / "b.txt"]  # named explicitly: taken, fails later
