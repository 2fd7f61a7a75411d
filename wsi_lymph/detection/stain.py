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
scikit-image's.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from skimage.color import lab2rgb, rgb2lab

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

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> LabStatistics:
        return cls(tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]))


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


@dataclass(frozen=True)
class ReinhardTransform:
    """The per-pixel map from a slide's colour statistics to a reference's (apply with ``transform(rgb)``)."""

    source: LabStatistics
    reference: LabStatistics

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalised uint8 RGB of uint8 RGB pixels (any leading shape, last axis 3).

        Computed in float32 (scikit-image keeps it): half the time of float64 on every pixel the
        student reads; the rounded result differs from float64's in ~3 of 100,000 values, by 1.
        """
        lab = rgb2lab(np.asarray(rgb, dtype=np.float32) / np.float32(255.0))
        src_mean = np.asarray(self.source.mean, dtype=np.float32)
        ref_mean = np.asarray(self.reference.mean, dtype=np.float32)
        gain = (np.asarray(self.reference.std) / np.maximum(np.asarray(self.source.std), _MIN_STD)).astype(np.float32)
        with warnings.catch_warnings():
            # Out-of-gamut colours are clipped by lab2rgb, which says so each time; clipping is what we want.
            warnings.simplefilter("ignore", UserWarning)
            out = lab2rgb((lab - src_mean) * gain + ref_mean)
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)

    def as_dict(self) -> dict:
        return {"method": "reinhard", **{k: LabStatistics(**v).as_dict() for k, v in asdict(self).items()}}
