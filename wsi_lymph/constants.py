"""The method's numbers, in one place (Janowczyk & Madabhushi 2016, use case 4; see ``docs/method.md``).

Every module takes these from here; none repeats a literal.  Lengths named ``*_px``
are model-frame pixels unless the name says otherwise.
"""

from __future__ import annotations

#: µm per pixel of the images the paper's networks were trained on (20x scans).
SOURCE_SCAN_MPP = 0.5
#: The paper upscaled its 20x images 4x before cutting patches.
FRAME_SCALE = 4.0
#: µm per model-frame pixel: the resolution the paper's networks see (0.5 / 4).
MODEL_FRAME_MPP = SOURCE_SCAN_MPP / FRAME_SCALE

#: Edge of the square patch the paper's network classifies, in model-frame pixels.
PATCH_PX = 32
#: Index of the classified pixel inside its patch (rows r-16 ... r+15).
PATCH_CENTER_PX = 16

#: Peak threshold on the disk-smoothed probability map, as reported in the manuscript.
PAPER_THRESHOLD = 0.7706
#: Radius of the disk (MATLAB ``fspecial('disk', 6)``) that smooths the map before peak picking.
SMOOTH_RADIUS_PX = 6
#: Radius cleared around each accepted centre by the greedy peak picking.
CLEAR_RADIUS_PX = 28

#: Matching tolerance between a detection and an annotated centre (about one lymphocyte radius), in µm.
DEFAULT_TOLERANCE_UM = 3.0

#: Stain domain of the paper's data set: CIE L*a*b* mean and standard deviation over the tissue of the three
#: annotated crops (``shared/data/lymph-centers``), the reference of Reinhard normalisation for the paper's models
#: (measured with :func:`wsi_lymph.training.distill.reference_statistics`; a test recomputes it).
PAPER_STAIN_REFERENCE = {"mean": [53.0270, 29.0621, -29.1875], "std": [15.8731, 7.2158, 11.6958]}

#: The default model of ``detect``, ``probmap`` and ``demo``: the fast student shipped in the package.
DEFAULT_MODEL = "wsi-lymph-student"
#: Default edge of the map's Zarr chunks (model-frame px) for the paper's patch networks: one chunk is one task.
MAP_CHUNK_PX = 512
#: Default chunk edge (model-frame px) for fully convolutional models: at the student's speed Zarr's fixed cost per
#: chunk written is a visible share of each task (~1 ms per chunk), and a slide's map is a quarter as many files
#: (BENCHMARKS.md, "Map chunks for the student").  Peak blocks stay 2 x 2 chunks; the peak stage is no slower.
FAST_CHUNK_PX = 1024
#: Default edge of one inference task (model-frame px) for fully convolutional models: large enough that a task's
#: fixed cost stays a few percent of its work at the student's speed (see BENCHMARKS.md, task granularity).
FAST_BLOCK_PX = 2048

#: Area of the hotspot field, mm² (``--hotspot-mm2``): the densest circle of this area is reported per slide.
HOTSPOT_FIELD_MM2 = 1.0
#: Edge of a ``density.png`` bin, µm (``--density-bin-um``): 0.01 mm², about ten lymphocytes per bin at a
#: moderate 1,000 per mm², finer than lymphoid aggregates (a few hundred µm) and ~200 bins across a 2 cm slide.
DENSITY_BIN_UM = 100.0
