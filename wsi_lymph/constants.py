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
