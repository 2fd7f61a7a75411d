"""Stain normalisation to the training domain (Reinhard et al. 2001, colour transfer in CIE L*a*b*).

Scanners and labs stain differently; a network trained on one lab's H&E sees
another's as a shifted input.  Reinhard's transform moves each L*a*b* channel
of a slide to the mean and standard deviation of a reference domain:
``lab' = (lab - mean_slide) / std_slide * std_ref + mean_ref``.  The slide's
statistics are measured once, over its tissue on a low-resolution level
(:func:`slide_lab_statistics`); the transform then acts on each pixel alone, so
a map computed block by block still equals the whole-image map.  The reference
statistics are stored with a model (``meta["stain_reference"]``); for the
paper's networks they are those of the annotated crops of the paper's data set
(:func:`lab_statistics` over their tissue).  The colour conversions are
scikit-image's: its ``rgb2lab`` / ``lab2rgb`` define the transform
(:func:`reference_reinhard`), and the per-pixel path every block takes
(:class:`ReinhardTransform`) folds its constants into a few float32 operations.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from skimage.color import lab2rgb, rgb2lab
from skimage.color.colorconv import rgb_from_xyz, xyz_from_rgb, xyz_tristimulus_values

from wsi_lymph.detection.hematoxylin import TISSUE_OD, tissue_pixels
from wsi_lymph.slides.reader import SlideInfo, read_region

#: Stain normalisations ``--stain-norm`` offers.
STAIN_NORMS = ("none", "reinhard")
#: Coarsest µm/px a slide's statistics are measured at (the finest level not finer is read, then subsampled).
STATISTICS_MPP = 4.0
#: Pixels of tissue the statistics are taken from at most (evenly subsampled beyond).
STATISTICS_MAX_PX = 4_000_000
# Standard deviations below this (in L*a*b* units) are raised to it: a nearly uniform channel is not stretched.
_MIN_STD = 1.0


@dataclass(frozen=True)
class LabStatistics:
    """Mean and standard deviation of L*, a*, b* over tissue pixels (CIE L*a*b*, D65)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Tuples of floats whatever was given: the statistics are hashed (per-worker colour tables).
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> LabStatistics:
        return cls(values["mean"], values["std"])


def lab_statistics(rgb: np.ndarray, mask: np.ndarray | None = None) -> LabStatistics:
    """L*a*b* mean and standard deviation of the pixels of ``rgb`` (uint8 (rows, cols, 3)) where ``mask`` is True.

    Without a mask, the tissue pixels (:func:`wsi_lymph.detection.hematoxylin.tissue_pixels`) are used,
    or every pixel if there is no tissue.
    """
    if mask is None:
        mask = tissue_pixels(rgb, TISSUE_OD)
        if not mask.any():
            mask = np.ones(rgb.shape[:2], dtype=bool)
    lab = rgb2lab(rgb[mask][None]).reshape(-1, 3)
    return LabStatistics(tuple(map(float, lab.mean(axis=0))), tuple(map(float, lab.std(axis=0))))


def pooled_statistics(stats: list[LabStatistics], weights: list[float]) -> LabStatistics:
    """Statistics of the union of several pixel sets, each given by its statistics and pixel count."""
    w = np.asarray(weights, dtype=float)[:, None]
    means = np.array([s.mean for s in stats])
    second = np.array([s.std for s in stats]) ** 2 + means**2
    mean = (w * means).sum(0) / w.sum()
    std = np.sqrt(np.maximum((w * second).sum(0) / w.sum() - mean**2, 0.0))
    return LabStatistics(tuple(map(float, mean)), tuple(map(float, std)))


def slide_lab_statistics(info: SlideInfo, level_mpp: float = STATISTICS_MPP) -> LabStatistics:
    """A slide's L*a*b* statistics over its tissue, measured on a low-resolution level.

    The level read is the coarsest whose µm/px is not coarser than ``level_mpp``
    (level 0 for a single-level image); beyond :data:`STATISTICS_MAX_PX` pixels it
    is subsampled on a regular lattice.
    """
    levels = [lv for lv in range(info.level_count) if info.level_mpp(lv) <= level_mpp] or [0]
    level = max(levels, key=info.level_mpp)
    width, height = info.level_sizes_xy[level]
    rgb = read_region(info, level, 0, 0, width, height)
    step = max(1, int(np.ceil(np.sqrt(width * height / STATISTICS_MAX_PX))))
    return lab_statistics(rgb[::step, ::step])


def _reinhard_gain(source: LabStatistics, reference: LabStatistics) -> np.ndarray:
    """Per-channel gain std_reference / std_source (a nearly uniform source channel is not stretched)."""
    return np.asarray(reference.std) / np.maximum(np.asarray(source.std), _MIN_STD)


def _srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """sRGB companding undone (IEC 61966-2-1, as scikit-image's ``rgb2xyz``), values in [0, 1]."""
    return np.where(values > 0.04045, ((values + 0.055) / 1.055) ** 2.4, values / 12.92)


class _ReinhardTables:
    """The constants of one Reinhard transform, folded so that each pixel costs a few float32 operations.

    scikit-image's ``rgb2lab`` / ``lab2rgb`` (the definition the statistics and the tests use) took
    ~90 ms per block's 532² window on float32, a quarter of the student's forward pass over it.  The same chain is
    computed here with three shortcuts, none of which changes the arithmetic beyond float32
    rounding:

    * uint8 -> linear RGB is a 256-entry table;
    * L*a*b* is linear in f(X/Xn), f(Y/Yn), f(Z/Zn) (f: cube root or its linear foot), and Reinhard's
      transform is affine per L*a*b* channel, so lab -> Reinhard -> lab is one 3 x 3 affine map on
      those f values;
    * linear RGB -> sRGB -> ``rint(255 v)`` is monotonic, so the output level is found by comparing
      the linear value with the 255 level boundaries, located through a table of 8,192 bins of which
      none holds more than one boundary (the narrowest gap between boundaries is 1 / (255 x 12.92)
      ~ 3.0e-4 > 1 / 8,192).

    Each colour's result is then kept in a table of all 2^24 colours: an H&E slide holds about a million
    distinct colours (951,117 in CMU-1's 6.6 million pixels), so after the first blocks most of a block's pixels
    are looked up, not computed (``bench/worker_stages.py`` times the transform inside the workers).
    """

    BINS = 8192

    def __init__(self, source: LabStatistics, reference: LabStatistics) -> None:
        white = xyz_tristimulus_values(illuminant="D65", observer="2", dtype=np.float64)
        self.to_linear = _srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)
        self.rgb_to_xyz_white = (xyz_from_rgb / white[:, None]).T.astype(np.float32)  # rows: pixels
        # lab = lab_from_f @ f + lab_offset; Reinhard: lab' = gain (lab - mean_source) + mean_reference.
        lab_from_f = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
        lab_offset = np.array([-16.0, 0.0, 0.0])
        gain = np.diag(_reinhard_gain(source, reference))
        f_from_lab = np.linalg.inv(lab_from_f)
        self.f_matrix = (f_from_lab @ gain @ lab_from_f).T.astype(np.float32)
        self.f_offset = (f_from_lab @ (gain @ (lab_offset - np.asarray(source.mean)) + np.asarray(reference.mean)
                                       - lab_offset)).astype(np.float32)
        self.xyz_white_to_rgb = (rgb_from_xyz * white[None, :]).T.astype(np.float32)
        # Output level k of a linear value v: boundaries[k - 1] <= v < boundaries[k].
        boundaries = _srgb_to_linear((np.arange(255) + 0.5) / 255.0)
        edges = np.arange(self.BINS) / self.BINS
        first_above = np.searchsorted(boundaries, edges, side="right")
        self.level_at_edge = first_above.astype(np.uint8)
        inside = np.full(self.BINS, np.inf)
        has_next = first_above < boundaries.size
        inside[has_next] = boundaries[first_above[has_next]]
        inside[inside >= edges + 1.0 / self.BINS] = np.inf  # the next boundary lies beyond this bin
        self.boundary_in_bin = inside.astype(np.float32)
        # Every 24-bit colour's result once computed, as bytes (R', G', B', 1); 0 = not yet.  64 MiB of
        # address space, of which only the pages of colours met are ever touched (calloc'd lazily).
        self.known = np.zeros(1 << 24, dtype=np.uint32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalised uint8 RGB of uint8 RGB pixels (any leading shape, last axis 3), colours looked up first."""
        flat = rgb.reshape(-1, 3)
        key = colour_keys(flat)
        found = self.known[key]
        new = found == 0
        if new.any():
            key_new = key[new]
            entries = np.zeros((key_new.size, 4), dtype=np.uint8)
            entries[:, :3] = self.compute(flat[new])
            entries[:, 3] = 1  # never 0: marks the colour as known
            # Tasks of one worker may fill the table at once; each writes the same value for the same colour.
            self.known[key_new] = found[new] = entries.view(np.uint32)[:, 0]
        return np.ascontiguousarray(found.view(np.uint8).reshape(-1, 4)[:, :3]).reshape(rgb.shape)

    def compute(self, rgb: np.ndarray) -> np.ndarray:
        """The transform of (n, 3) uint8 RGB pixels, each computed."""
        lin = self.to_linear[rgb]
        t = lin @ self.rgb_to_xyz_white  # >= 0: linear RGB and the matrix are non-negative
        # Each piecewise function's second piece (near black) is rare in tissue: computed where needed only.
        f = np.power(t, np.float32(1.0 / 3.0))
        dark = t <= 0.008856
        f[dark] = t[dark] * np.float32(7.787) + np.float32(16 / 116)
        f = f @ self.f_matrix
        f += self.f_offset
        np.maximum(f[:, 2], 0.0, out=f[:, 2])  # as lab2rgb: a negative Z is clipped to 0
        t = f * f
        t *= f
        dark = f <= 0.2068966
        t[dark] = (f[dark] - np.float32(16 / 116)) / np.float32(7.787)
        lin = t @ self.xyz_white_to_rgb
        np.clip(lin, 0.0, np.float32(1.0 - 1e-7), out=lin)  # lab2rgb clips to [0, 1]; keep bins < BINS
        bins = (lin * np.float32(self.BINS)).astype(np.intp)
        levels = self.level_at_edge[bins] + (lin >= self.boundary_in_bin[bins])
        return levels.astype(np.uint8)


def colour_keys(rgb: np.ndarray) -> np.ndarray:
    """Each uint8 RGB pixel (last axis 3) as one uint32 ``0xRRGGBB``: the colour tables' index."""
    return (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]


@lru_cache(maxsize=2)
def _tables(source: LabStatistics, reference: LabStatistics) -> _ReinhardTables:
    # One per worker process and slide: tasks carry only the statistics, and the colour table fills up
    # as the worker's blocks go by.
    return _ReinhardTables(source, reference)


def forget_colour_tables() -> None:
    """Drop this process's colour tables, as if no slide had been normalised yet (benchmarks start runs so)."""
    _tables.cache_clear()


@dataclass(frozen=True)
class ReinhardTransform:
    """The per-pixel map from a slide's colour statistics to a reference's (apply with ``transform(rgb)``)."""

    source: LabStatistics
    reference: LabStatistics

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalised uint8 RGB of uint8 RGB pixels (any leading shape, last axis 3).

        scikit-image's colour conversions (:func:`reference_reinhard`) computed in float32 with the
        constants folded, each colour once per process (:class:`_ReinhardTables`): 27 ms for a new 532²
        window against 91 ms for scikit-image's own conversions on float32
        (``bench/student_block_profile.py``), less once its colours have been met.  The result differs
        from the float64 definition by 1 in ~1 of 1,000,000 slide values (~2 of 100,000 over arbitrary
        colours), where a value falls within float32 rounding of a level's boundary.
        """
        return _tables(self.source, self.reference)(np.asarray(rgb, dtype=np.uint8))

    def as_dict(self) -> dict:
        return {"method": "reinhard", **{k: LabStatistics(**v).as_dict() for k, v in asdict(self).items()}}


def reference_reinhard(rgb: np.ndarray, source: LabStatistics, reference: LabStatistics) -> np.ndarray:
    """Reinhard's transform by scikit-image's ``rgb2lab`` / ``lab2rgb`` in float64: the definition.

    :class:`ReinhardTransform` computes the same in a fraction of the time; the tests compare the two.
    """
    lab = rgb2lab(np.asarray(rgb, dtype=np.uint8))
    gain = _reinhard_gain(source, reference)
    with warnings.catch_warnings():
        # Out-of-gamut colours are clipped by lab2rgb, which says so each time; clipping is what we want.
        warnings.simplefilter("ignore", UserWarning)
        out = lab2rgb((lab - np.asarray(source.mean)) * gain + np.asarray(reference.mean))
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
