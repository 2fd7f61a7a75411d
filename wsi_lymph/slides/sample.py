"""``wsi-lymph demo``: a public sample slide, the paper's models, and ``detect``, with nothing in hand."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path

from wsi_lymph.cache import cache_dir, fetch_verified, local_path, source_url

#: OpenSlide's public test slide (Aperio SVS, H&E skin, 20x, 2220 x 2967 px, 1 938 955 bytes).
DEMO_SLIDE = "CMU-1-Small-Region.svs"
DEMO_SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
DATA_SOURCE_ENV = "WSI_LYMPH_DATA_SOURCE"
DEFAULT_DATA_SOURCE = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio"
#: A 600 x 600 px (300 µm) region of the demo slide with epidermis, dermis and background.
DEMO_REGION_LEVEL0 = (650, 950, 600, 600)


class DataError(ValueError):
    """A sample file could not be fetched or verified."""


def _name_at(base: str) -> str:
    """The demo slide's file name at ``base``: in a local folder any case matches (mirrors often lower-case it)."""
    folder = local_path(base)
    if folder is not None and folder.is_dir():
        for path in folder.iterdir():
            if path.name.lower() == DEMO_SLIDE.lower():
                return path.name
    return DEMO_SLIDE


def fetch_demo_slide(source: str | None = None, progress: Callable[[str], None] | None = print) -> Path:
    """Download (once) and verify the demo slide.

    Parameters
    ----------
    source : str, optional
        Base URL (``https://``, ``file://``) or local folder holding
        ``CMU-1-Small-Region.svs`` (any case of the name); default
        ``$WSI_LYMPH_DATA_SOURCE``, else OpenSlide's test-data server.  A local
        folder serves air-gapped machines.
    progress : callable, optional
        Called with ``"downloading <url>"`` before an actual transfer.

    Returns
    -------
    Path
        ``<cache>/data/CMU-1-Small-Region.svs``, its sha256 checked.

    Raises
    ------
    DataError
        The download failed or the file's sha256 differs from the known hash.
    """
    base = source_url(source, env_var=DATA_SOURCE_ENV, default=DEFAULT_DATA_SOURCE)
    hint = f"Without internet access, put {DEMO_SLIDE} in a folder and pass it with --source or ${DATA_SOURCE_ENV}."
    return fetch_verified(
        f"{base}/{urllib.parse.quote(_name_at(base))}",
        cache_dir() / "data" / DEMO_SLIDE,
        DEMO_SLIDE_SHA256,
        hint=hint,
        error=DataError,
        progress=progress,
    )
