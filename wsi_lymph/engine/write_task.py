"""The ``write`` task of a slide: its hotspot from the centres, then every output file (``summary.json`` last).

The hotspot is found here, on a worker, rather than on the driver: for a dense slide it takes a second or more
(see BENCHMARKS.md), and the driver must keep reacting to the other slides' tasks meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wsi_lymph.constants import HOTSPOT_FIELD_MM2
from wsi_lymph.detection.hotspot import densest_field
from wsi_lymph.io.slide_outputs import write_slide_outputs


def write_slide(slide_dir: Path, name: str, slide_path: str, attrs: dict, shape_rc: tuple[int, int], table: dict,
                result: dict, params: dict, hotspot_mm2: float = HOTSPOT_FIELD_MM2,
                density_bin_um: float | None = None) -> tuple[int, float]:
    """Find the slide's densest field of ``hotspot_mm2`` mm², then write its outputs.

    Parameters are those of :func:`wsi_lymph.io.slide_outputs.write_slide_outputs`, plus the hotspot field's
    area (mm²) and the density picture's bin (µm; None = automatic).

    Returns
    -------
    (int, float)
        Number of centres and the analysed tissue area in mm².
    """
    started = time.perf_counter()
    hotspot = densest_field(np.stack([table["x_um"], table["y_um"]], axis=-1), hotspot_mm2)
    result = dict(result, seconds=dict(result["seconds"], hotspot=round(time.perf_counter() - started, 3)))
    return write_slide_outputs(slide_dir, name, slide_path, attrs, shape_rc, table, result, params,
                               hotspot=hotspot.as_dict(), density_bin_um=density_bin_um)
