"""``wsi-lymph demo``: a public sample slide, the paper's models, and ``detect``, with nothing in hand."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path

from .models import cache_dir, download_verified, resolve_source

#: OpenSlide's public test slide (Aperio SVS, H&E skin, 20x, 2220 x 2967 px).
DEMO_SLIDE = "CMU-1-Small-Region.svs"
DEMO_SLIDE_BYTES = 1_938_955
DEMO_SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
DATA_SOURCE_ENV = "WSI_LYMPH_DATA_SOURCE"
DEFAULT_DATA_SOURCE = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio"
#: A 600 x 600 px (300 µm) region of the demo slide with epidermis, dermis and background.
DEMO_REGION_LEVEL0 = (650, 950, 600, 600)


class DataError(ValueError):
    """A sample file could not be fetched or verified."""


def fetch_demo_slide(source: str | None = None, progress: Callable[[str], None] | None = print) -> Path:
    """Download (once) and verify the demo slide; returns its cached path.

    The source is ``source``, else ``$WSI_LYMPH_DATA_SOURCE``, else OpenSlide's
    test-data server; a local folder holding ``CMU-1-Small-Region.svs`` (any
    case of the name) works for air-gapped machines.
    """
    dest = cache_dir() / "data" / DEMO_SLIDE
    if dest.is_file() and dest.stat().st_size == DEMO_SLIDE_BYTES:
        return dest
    base = resolve_source(source, env_var=DATA_SOURCE_ENV, default=DEFAULT_DATA_SOURCE)
    name = DEMO_SLIDE
    if base.startswith("file://"):
        folder = Path(urllib.parse.unquote(urllib.parse.urlparse(base).path))
        matches = [p.name for p in folder.glob("*") if p.name.lower() == DEMO_SLIDE.lower()] if folder.is_dir() else []
        name = matches[0] if matches else DEMO_SLIDE
    hint = f"Without internet access, put {DEMO_SLIDE} in a folder and pass it with --source or ${DATA_SOURCE_ENV}."
    url = f"{base}/{urllib.parse.quote(name)}"
    download_verified(url, dest, DEMO_SLIDE_SHA256, progress, hint=hint, error=DataError)
    return dest



