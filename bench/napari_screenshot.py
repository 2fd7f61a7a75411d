"""The README's napari screenshot: a slide, its OME-Zarr pyramid of P over it and the centres of centers.csv.

napari is not a dependency of wsi-lymph: run this in an environment of its own, on a display or under Xvfb::

    python -m venv /tmp/napari-venv
    /tmp/napari-venv/bin/pip install "napari[pyqt5]" openslide-python openslide-bin zarr
    .venv/bin/wsi-lymph detect ../shared/data/slides/cmu-1-small-region.svs --out /tmp/cmu
    xvfb-run -a -s "-screen 0 1600x1000x24" /tmp/napari-venv/bin/python bench/napari_screenshot.py \\
        /tmp/cmu/cmu-1-small-region ../shared/data/slides/cmu-1-small-region.svs docs/napari-prob-ome-zarr.png

(The PNG in docs/ was then reduced to 128 colours with Pillow's ``quantize``.)
"""

import sys

import napari
import numpy as np
import openslide
import zarr

case, slide_path, out = sys.argv[1:4]
group = zarr.open_group(f"{case}/prob.ome.zarr", mode="r")
multiscale = group.attrs["multiscales"][0]
levels = [group[dataset["path"]] for dataset in multiscale["datasets"]]
scale, translation = multiscale["datasets"][0]["coordinateTransformations"]
centres_um = np.loadtxt(f"{case}/centers.csv", delimiter=",", skiprows=1, usecols=(3, 2), ndmin=2)  # y_um, x_um
slide = openslide.OpenSlide(slide_path)
mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))

viewer = napari.Viewer(show=True)
viewer.window.resize(1500, 950)
viewer.add_image(rgb, rgb=True, scale=(mpp, mpp), name="slide (level 0)", units="micrometer")
viewer.add_image(levels, multiscale=True, scale=scale["scale"], translate=translation["translation"],
                 colormap="magenta", contrast_limits=(0, 255), blending="additive", opacity=0.8, name="P x 255",
                 units="micrometer")
viewer.add_points(centres_um, size=7, face_color="transparent", border_color="cyan", border_width=0.15,
                  name="lymphocytes", units="micrometer")
viewer.scale_bar.visible = True
viewer.camera.center = (560.0, 520.0)  # µm: the dermis with lymphocytes
viewer.camera.zoom = 5.0
viewer.screenshot(out, canvas_only=False, flash=False)
print("saved", out, len(centres_um), "centres", [level.shape for level in levels])
