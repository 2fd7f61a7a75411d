"""Is this input H&E, and do these results look like lymphocytes?  Cheap checks before and after the work.

Before inference, :func:`check_stain` reads a low-resolution view of a slide (a level of
about 4 µm/px, or a grid of tiles when only a large level exists) and asks of its tissue
pixels whether their optical density (OD, ``-log10(I / 256)`` per channel) is what
haematoxylin and eosin absorb.  Bright-field H&E is a mixture of two stains, so the OD
vector of a tissue pixel is close to a non-negative combination of the haematoxylin and
eosin OD vectors (Ruifrok & Johnston 2001; scikit-image's ``rgb_from_hed``).  A pixel
counts as H&E when

* its OD direction lies within :data:`HE_CONE_DEG` of the cone spanned by the two stain
  vectors (drawn red, green or yellow, DAB brown, fluorescence are far outside it);
* it has colour: its R, G, B values spread by at least :data:`MIN_COLOUR_SPREAD` (grey
  pixels lie about 18° from the cone, as close as real stains from some labs, so colour is
  checked on its own);
* no channel is black (:data:`SATURATED_MAX`): bright-field stains let some light through in
  every channel, ink and drawn colours do not.

Measured on the real H&E in ``shared/data`` (slides, annotated crops, he-unlabeled,
images; tissue = mean OD above :data:`TISSUE_OD`), the H&E fraction of tissue pixels is
0.915 at the lowest (a tile with 4 % tissue) and 0.95 or more elsewhere; the TCGA frozen
section, whose stains lie ~18° off the reference vectors, is at 1.00.  The coloured
rectangles of ``slides/small-he-levels.tiff`` are at 0.00 (97 % of their pixels have a
black channel, the rest lie 37-48° off).  A slide below :data:`REFUSE_BELOW` is refused,
one below :data:`FLAG_BELOW` is analysed and flagged.

After the peaks, :func:`implausible_results` flags centres that no tissue can hold: a
density above close-packed lymphocytes, or most centres surrounded by neighbours at the
clearing radius, the lattice the greedy peak picking lays over a map that is high everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from skimage.color import rgb_from_hed

from wsi_lymph.slides.reader import SlideInfo, read_region

#: Mean OD over R, G, B above which a pixel is taken for tissue in the stain check.  Stricter than the
#: tissue area's 0.05 (:data:`wsi_lymph.detection.hematoxylin.TISSUE_OD`): at lower OD, 8-bit rounding
#: alone turns an OD direction by several degrees.
TISSUE_OD = 0.15
#: Largest angle between a pixel's OD direction and the haematoxylin-eosin cone that still counts as H&E, degrees.
HE_CONE_DEG = 30.0
#: Smallest spread of a pixel's R, G, B values (0-255) that counts as colour.
MIN_COLOUR_SPREAD = 16
#: A channel at or below this value (0-255) lets no light through: ink or drawn colour, not a bright-field stain.
SATURATED_MAX = 2
#: Fractions of tissue pixels with H&E colours below which a slide is refused / flagged.
REFUSE_BELOW = 0.5
FLAG_BELOW = 0.8
#: Fewer tissue pixels than this in the low-resolution view cannot be judged (the check passes, saying so).
MIN_TISSUE_PX = 200
#: The level read is the coarsest not coarser than this, µm/px.
CHECK_MPP = 4.0
#: At most this many pixels are judged (a fraction of a second); a larger level is sampled as an even grid of
#: 64 tiles: a slide's stain is the same all over it, and 262 144 pixels estimate a fraction to within 0.2 %.
MAX_READ_PX = 512 * 512
_TILE_PX = 64

#: Diameter of the smallest lymphocytes (µm; small lymphocytes are 6-7 µm) and the density of such discs packed
#: edge to edge (hexagonal packing), ~32 000 per mm²: no tissue holds more.  The densest real results measured
#: here are ~19 000 per mm² of tissue (the student at threshold 0.5 on the annotated crops of lymphocyte-rich
#: breast tissue); the paper's networks on the coloured rectangles of ``small-he-levels.tiff`` give ~65 000.
LYMPHOCYTE_DIAMETER_UM = 6.0
MAX_DENSITY_PER_MM2 = 2.0 / (math.sqrt(3.0) * (LYMPHOCYTE_DIAMETER_UM / 1000.0) ** 2)
#: A centre whose 4 nearest neighbours all lie within this factor of the clearing radius sits inside a lattice ...
LATTICE_FACTOR = 1.2
LATTICE_NEIGHBOURS = 4
#: ... and a result with more than this fraction of such centres is flagged.  Where the map is high all over a
#: region, the greedy peak picking lays a square lattice at the clearing radius over it (the coloured rectangles
#: of ``small-he-levels.tiff`` with the paper's networks: 95 % of 635 centres).  Real cells are not surrounded
#: that closely: at most 1 % of centres on CMU-1 and the TCGA section, even at threshold 0.5 where a third to
#: two thirds of centres have one neighbour at the clearing radius (two detections on one large nucleus).
LATTICE_FRACTION = 0.5
#: Fewer centres than this are not judged (too few for a density or a spacing statistic).
MIN_CENTRES = 20

_HE = rgb_from_hed[:2] / np.linalg.norm(rgb_from_hed[:2], axis=1, keepdims=True)  # unit OD of H, E (rows)


@dataclass(frozen=True)
class StainCheck:
    """The stain check of one slide.

    Attributes
    ----------
    verdict : str
        ``"h&e"``, ``"unclear"`` (analyse, flag), ``"not h&e"`` (refuse) or ``"no tissue"`` (too little to judge).
    tissue_px : int
        Tissue pixels in the low-resolution view.
    he_fraction : float
        Fraction of them with H&E colours.
    grey_fraction, saturated_fraction, off_stain_fraction : float
        Fractions of them without colour, with a black channel, and with an OD direction
        more than :data:`HE_CONE_DEG` from the H&E cone.
    level : int
        Level read.
    """

    verdict: str
    tissue_px: int
    he_fraction: float
    grey_fraction: float
    saturated_fraction: float
    off_stain_fraction: float
    level: int

    def reason(self) -> str:
        """What most of the non-H&E tissue pixels are, in words."""
        causes = [
            (self.grey_fraction, f"{self.grey_fraction:.0%} have no colour (greyscale)"),
            (self.saturated_fraction, f"{self.saturated_fraction:.0%} have a black channel (ink or drawn colour, "
                                      "not a bright-field stain)"),
            (self.off_stain_fraction, f"{self.off_stain_fraction:.0%} absorb light unlike haematoxylin and eosin "
                                      f"(optical density more than {HE_CONE_DEG:g}° from theirs)"),
        ]
        return max(causes)[1]

    def message(self) -> str:
        """One line for the console, the slide's reason or its flag."""
        return (f"only {self.he_fraction:.0%} of its tissue pixels have H&E colours ({self.reason()}; "
                f"level {self.level}, {self.tissue_px} tissue pixels)")


def cone_angle_deg(od_unit: np.ndarray) -> np.ndarray:
    """Angle (degrees) between unit OD vectors (n, 3) and the cone of non-negative H and E mixtures."""
    gram_inv = np.linalg.inv(_HE @ _HE.T)
    coefficients = od_unit @ _HE.T @ gram_inv  # least squares in the H-E plane, (n, 2)
    projection = coefficients @ _HE
    # Outside the cone (a negative amount of one stain), the nearest point is on the other stain's ray.
    for stain, other in ((0, 1), (1, 0)):
        ray = np.maximum(od_unit @ _HE[other], 0.0)[:, None] * _HE[other]
        projection = np.where((coefficients[:, stain] < 0)[:, None], ray, projection)
    residual = np.linalg.norm(od_unit - projection, axis=1)  # the projection onto a convex cone is orthogonal
    return np.degrees(np.arcsin(np.clip(residual, 0.0, 1.0)))


def stain_profile(rgb: np.ndarray, level: int = 0) -> StainCheck:
    """The stain check of RGB pixels (any leading shape, last axis 3, uint8); see the module docstring."""
    pixels = rgb.reshape(-1, 3)
    od = -np.log10((pixels.astype(np.float32) + 1.0) / 256.0)
    tissue = od.mean(axis=1) > TISSUE_OD
    count = int(tissue.sum())
    if count < MIN_TISSUE_PX:
        return StainCheck("no tissue", count, 1.0, 0.0, 0.0, 0.0, level)
    values, od = pixels[tissue], od[tissue]
    grey = (values.max(axis=1).astype(np.int16) - values.min(axis=1)) < MIN_COLOUR_SPREAD
    saturated = (values <= SATURATED_MAX).any(axis=1)
    off = cone_angle_deg(od / np.linalg.norm(od, axis=1, keepdims=True)) > HE_CONE_DEG
    he = float((~grey & ~saturated & ~off).mean())
    verdict = "not h&e" if he < REFUSE_BELOW else "unclear" if he < FLAG_BELOW else "h&e"
    return StainCheck(verdict, count, he, float(grey.mean()), float(saturated.mean()), float(off.mean()), level)


def low_resolution_pixels(info: SlideInfo, level_mpp: float = CHECK_MPP, max_px: int = MAX_READ_PX
                          ) -> tuple[np.ndarray, int]:
    """A cheap view of a slide: the coarsest level not coarser than ``level_mpp``, whole or as a grid of tiles.

    Returns
    -------
    (np.ndarray, int)
        (rows, cols, 3) uint8 RGB (tiles side by side when sampled) and the level read.
    """
    levels = [lv for lv in range(info.level_count) if info.level_mpp(lv) <= level_mpp] or [0]
    level = max(levels, key=info.level_mpp)
    width, height = info.level_sizes_xy[level]
    if width * height <= max_px:
        return read_region(info, level, 0, 0, width, height), level
    # A larger level: an even grid of small tiles over it, about max_px pixels in all (one read each).
    tile = min(_TILE_PX, width, height)
    per_side = max(1, math.isqrt(max_px // (tile * tile)))
    xs = np.linspace(0, width - tile, per_side).astype(int)
    ys = np.linspace(0, height - tile, per_side).astype(int)
    tiles = [read_region(info, level, int(x), int(y), tile, tile) for y in ys for x in xs]
    return np.concatenate(tiles, axis=1), level


def check_stain(info: SlideInfo) -> StainCheck:
    """The stain check of a slide on a low-resolution view (see the module docstring)."""
    rgb, level = low_resolution_pixels(info)
    return stain_profile(rgb, level)


def implausible_results(x_um: np.ndarray, y_um: np.ndarray, tissue_mm2: float, clear_radius_um: float) -> list[str]:
    """Reasons why detected centres do not look like lymphocytes in tissue (empty list: none found).

    Parameters
    ----------
    x_um, y_um : np.ndarray
        Centre coordinates, µm.
    tissue_mm2 : float
        Tissue area they were found in, mm².
    clear_radius_um : float
        The greedy peak picking's clearing radius, µm.
    """
    count = len(x_um)
    if count < MIN_CENTRES:
        return []
    flags = []
    if tissue_mm2 <= 0:
        flags.append(f"{count} centres found where the stain map saw no tissue")
    elif count / tissue_mm2 > MAX_DENSITY_PER_MM2:
        flags.append(f"{count / tissue_mm2:.0f} centres per mm² of tissue, more than the {MAX_DENSITY_PER_MM2:.0f} "
                     f"of {LYMPHOCYTE_DIAMETER_UM:g}-µm cells packed edge to edge")
    points = np.column_stack([x_um, y_um])
    distances, _ = cKDTree(points).query(points, k=LATTICE_NEIGHBOURS + 1)  # the first is the centre itself
    inside = float((distances[:, LATTICE_NEIGHBOURS] <= LATTICE_FACTOR * clear_radius_um).mean())
    if inside > LATTICE_FRACTION:
        flags.append(f"{inside:.0%} of the centres have {LATTICE_NEIGHBOURS} neighbours at the clearing radius "
                     f"({clear_radius_um:.2g} µm): a lattice laid over a map that is high everywhere, not cells")
    return flags
