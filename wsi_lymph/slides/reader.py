"""Open whole-slide images lazily and read regions from them.

Three readers, tried in this order:

* OpenSlide (``openslide-python`` + ``openslide-bin``): Aperio SVS, Hamamatsu,
  MIRAX, generic tiled TIFF, ...;
* tifffile: plain, OME and pyramidal TIFF, also when OpenSlide refuses them;
* Pillow: PNG, JPEG and other small single-resolution images.

Coordinates are ``(x, y)`` = (column, row) in pixels of the named level, with
level 0 the full-resolution image, like OpenSlide.  Arrays are ``(rows, cols, 3)``
RGB ``uint8``.  Resolution (µm per pixel) is taken from the file; a value the
caller passes overrides it; a file without one is an error, never a default.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask.array as da
import numpy as np
import openslide
import tifffile
import zarr
from dask.array.core import normalize_chunks
from dask.base import tokenize
from PIL import Image

#: Microscopy resolutions outside this range (µm/px) are screen/print defaults
#: (72 dpi = 352.8 µm/px) written by image libraries, not scanner metadata.
PLAUSIBLE_MPP_RANGE = (0.02, 50.0)

#: Smallest analysable image or region edge, µm: 32 px at 20x (0.5 µm/px), about two lymphocyte diameters
#: (~7 µm each).  A smaller picture cannot hold a lymphocyte together with the surroundings the networks were
#: trained to look at (the paper's annotated crops are 50 µm on a side), so its "detections" would mean nothing.
MIN_SIDE_UM = 16.0

#: Pillow modes without colour.  One rule for every format: a greyscale picture is refused (a TIFF, a PNG or a
#: JPEG alike), because lymphocytes are found from the haematoxylin and eosin colours (the networks were trained
#: on them and the stain check reads them); copying one grey channel into R, G and B would feed the networks an
#: input they were never trained on and give numbers that look like results.
GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

#: Suffixes taken for slides or images when a folder is scanned (OpenSlide's formats, TIFF, and the image formats
#: Pillow reads for small crops).  DICOM is left out: a DICOM slide is a folder of many ``.dcm`` files.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi",
                  ".png", ".jpg", ".jpeg")

#: Annotation files that sit beside images in the layouts wsi-lymph reads (README, "Scoring against annotations"):
#: seed images ``<name>_seed.<ext>``, the paper's masks ``<N>m.tif``, point lists and QuPath GeoJSON.
ANNOTATION_PATTERNS = ("*_seed.*", "<N>m.tif", "*.csv", "*.geojson")
_PAPER_MASK = re.compile(r"\d+m\.tiff?", re.IGNORECASE)


class SlideError(ValueError):
    """A slide cannot be opened or used; the message names the file and the problem."""


def greyscale_message(path: str, detail: str) -> str:
    """The one message for a greyscale picture, whatever its format (see :data:`GREYSCALE_MODES`)."""
    return (f"{path}: greyscale image ({detail}); lymphocytes are found from the H&E colours, "
            "so a colour (RGB) image of the H&E slide is needed")


@dataclass(frozen=True)
class SlideInfo:
    """What is known about a slide without reading its pixels.

    Attributes
    ----------
    path : str
        Absolute path of the file.
    reader : str
        ``"openslide"``, ``"tifffile"`` or ``"pillow"``.
    level_sizes_xy : tuple of (int, int)
        ``(width, height)`` of each pyramid level in pixels, level 0 first.
    level_downsamples : tuple of float
        Level-0 pixels per level pixel along x, for each level.
    mpp : float or None
        Level-0 resolution in µm per pixel (x; pixels are assumed square).
    mpp_source : str
        Where ``mpp`` came from (metadata key, ``"--mpp"``) or why it is missing.
    vendor : str
        Format as reported by the reader.
    content_fingerprint : str
        :func:`file_fingerprint` of the file, where it was asked for (``open_slide(..., fingerprint=True)``, as
        the batch driver does); "" elsewhere: it costs a read on every open, and only the driver compares it.
    """
    path: str
    reader: str
    level_sizes_xy: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    vendor: str = ""
    content_fingerprint: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def level_count(self) -> int:
        return len(self.level_sizes_xy)

    def level_mpp(self, level: int) -> float:
        """µm per pixel of ``level``; raises :class:`SlideError` if the slide has no resolution."""
        return self.require_mpp() * self.level_downsamples[level]

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: no resolution (µm per pixel) in the file ({self.mpp_source}); "
                "pass it explicitly with --mpp UM_PER_PX (e.g. --mpp 0.5 for a 20x scan, 0.25 for 40x)"
            )
        return self.mpp


#: Bytes read from each end of a slide file for its fingerprint.
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def file_fingerprint(path: str | os.PathLike, sample_bytes: int = FINGERPRINT_SAMPLE_BYTES) -> str:
    """A cheap identity of a file's content: sha256 of its size and its first and last ``sample_bytes`` (16 hex).

    A slide written again under the same name (a re-scan, another export) changes it: a scanner's file begins
    with its header (scan time, tile offsets) and ends with tiles and their index.  Copying the file does not
    change it, unlike its modification time.  Formats of several files are fingerprinted by the file named
    (e.g. an ``.mrxs`` index, not its data folder).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(sample_bytes))
        if size > sample_bytes:
            handle.seek(max(sample_bytes, size - sample_bytes))
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:16]


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    low, high = PLAUSIBLE_MPP_RANGE
    return mpp if low <= mpp <= high else None


def _openslide_info(path: str) -> SlideInfo:

    with openslide.OpenSlide(path) as slide:
        props = slide.properties
        raw = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp = _plausible(float(raw)) if raw else None
        if mpp is not None:
            source = openslide.PROPERTY_NAME_MPP_X
        elif raw:
            source = f"{openslide.PROPERTY_NAME_MPP_X}={raw} µm/px is a screen/print default, not a scan resolution"
        else:
            source = "the file records no µm/px"
        return SlideInfo(
            path=path,
            reader="openslide",
            level_sizes_xy=tuple(tuple(map(int, d)) for d in slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in slide.level_downsamples),
            mpp=mpp,
            mpp_source=source,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR, ""),
        )


def _tiff_mpp(page) -> tuple[float | None, str]:

    tags = page.tags
    unit = tags.get("ResolutionUnit")
    xres = tags.get("XResolution")
    if xres is None or unit is None or unit.value == tifffile.RESUNIT.NONE:
        return None, "the TIFF has no XResolution with a physical unit"
    num, den = xres.value
    if not num or not den:
        return None, "the TIFF XResolution is zero"
    px_per_unit = num / den
    um_per_unit = {tifffile.RESUNIT.INCH: 25400.0, tifffile.RESUNIT.CENTIMETER: 10000.0}.get(unit.value)
    if um_per_unit is None:  # MILLIMETER / MICROMETER exist in some writers
        um_per_unit = {4: 1000.0, 5: 1.0}.get(int(unit.value))
    if um_per_unit is None:
        return None, f"the TIFF resolution unit {unit.value!r} is unknown"
    mpp = um_per_unit / px_per_unit
    if _plausible(mpp) is None:
        return None, f"the TIFF resolution ({mpp:.4g} µm/px) is a screen/print default, not a scan resolution"
    return mpp, "TIFF XResolution"


def _tifffile_info(path: str) -> SlideInfo:

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = series.levels
        sizes = []
        for level in levels:
            axes = level.axes
            shape = dict(zip(axes, level.shape, strict=True))
            if "Y" not in shape or "X" not in shape:
                raise SlideError(f"{path}: TIFF series has axes {axes!r}, expected an image with Y and X")
            sizes.append((int(shape["X"]), int(shape["Y"])))
        samples = dict(zip(series.axes, series.shape, strict=True)).get("S", 1)
        if samples in (1, 2):
            raise SlideError(greyscale_message(path, f"TIFF, {samples} sample{'s' if samples > 1 else ''} per pixel"))
        if samples not in (3, 4):
            raise SlideError(f"{path}: TIFF series has axes {series.axes!r} with {samples} samples per pixel; "
                             "an RGB image is needed")
        mpp = None
        source = "the TIFF has no resolution"
        if tif.is_ome and tif.ome_metadata:
            mpp, source = _ome_mpp(tif.ome_metadata)
        if mpp is None:
            mpp, source = _tiff_mpp(levels[0].keyframe)
        downsamples = tuple(sizes[0][0] / w for w, _ in sizes)
        return SlideInfo(path, "tifffile", tuple(sizes), downsamples, mpp, source, "tiff")


def _ome_mpp(ome_xml: str) -> tuple[float | None, str]:

    root = ET.fromstring(ome_xml)
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
            if scale is not None:
                mpp = _plausible(float(element.attrib["PhysicalSizeX"]) * scale)
                if mpp is not None:
                    return mpp, "OME PhysicalSizeX"
    return None, "OME metadata has no usable PhysicalSizeX"


def _pillow_info(path: str) -> SlideInfo:

    with Image.open(path) as image:
        width, height = image.size
        dpi = image.info.get("dpi")
        mode = image.mode
    if mode in GREYSCALE_MODES:
        raise SlideError(greyscale_message(path, f"{Path(path).suffix.lstrip('.').upper() or 'image'} mode {mode}"))
    mpp = _plausible(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
    source = "image DPI" if mpp else "the image records no µm/px"
    return SlideInfo(path, "pillow", ((width, height),), (1.0,), mpp, source, "image")


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, fingerprint: bool = False) -> SlideInfo:
    """Read a slide's geometry and resolution (no pixels).

    Parameters
    ----------
    path : path-like
        Slide file.
    mpp : float, optional
        Level-0 µm per pixel; overrides the file's value (``--mpp``).
    fingerprint : bool
        Also fill :attr:`SlideInfo.content_fingerprint` (reads 2 MiB; the batch driver does, to tell finished
        results of this content from those of another file of the same name).

    Returns
    -------
    SlideInfo

    Raises
    ------
    SlideError
        The file is missing, unreadable, or no reader understands it; it is greyscale
        (:data:`GREYSCALE_MODES`); with a resolution, it is smaller than :data:`MIN_SIDE_UM`.
    """
    path = os.path.abspath(path)  # keep the user's path (no symlink resolution) for messages
    if not os.path.isfile(path):
        raise SlideError(f"{path}: no such file")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(f"{path}: --mpp must be a positive number of µm per pixel, got {mpp!r}")
    reasons = []
    info = None
    for reader in (_openslide_info, _tifffile_info, _pillow_info):
        try:
            info = reader(path)
        except SlideError:
            raise
        except Exception as error:  # each library raises its own types for "not mine"
            reasons.append(f"{reader.__name__.strip('_').split('_')[0]}: {type(error).__name__}: {error}")
            continue
        if info.vendor == "generic-tiff":
            # OpenSlide sees plain TIFF structure only; tifffile also reads OME
            # metadata and SubIFD pyramids, so it describes such files better.
            try:
                info = _tifffile_info(path)
            except Exception as error:
                reasons.append(f"tifffile: {type(error).__name__}: {error}")
        break
    if info is None:
        raise SlideError(f"{path}: not a readable slide or image ({'; '.join(reasons)})")
    if mpp is not None:
        info = replace(info, mpp=float(mpp), mpp_source="--mpp")
    if info.mpp is not None:
        check_min_size(info, info.level_sizes_xy[0], "the image")
    if fingerprint:
        info = replace(info, content_fingerprint=file_fingerprint(path))
    return info


def check_min_size(info: SlideInfo, size_xy: tuple[float, float], what: str) -> None:
    """Refuse an image or region narrower than :data:`MIN_SIDE_UM` (``size_xy`` in level-0 pixels).

    Raises
    ------
    SlideError
        Naming the file, the size in pixels and µm, and the minimum.
    """
    width, height = size_xy
    mpp = info.require_mpp()
    if min(width, height) * mpp < MIN_SIDE_UM:
        raise SlideError(
            f"{info.path}: {what} is {width:g} x {height:g} px ({width * mpp:.3g} x {height * mpp:.3g} µm at "
            f"{mpp:g} µm/px), too small to hold a lymphocyte with its surroundings; at least {MIN_SIDE_UM:g} µm "
            f"({MIN_SIDE_UM / mpp:.0f} px) on each side is needed"
        )


@dataclass
class SlideSearch:
    """Files found by :func:`scan_slides`, and those a folder held that are not analysed.

    Attributes
    ----------
    slides : list of Path
        Files to analyse, in the order given (each folder's sorted by name).
    skipped : dict of str to list of str
        Names of the files left out of folders, by reason: ``"annotations"``, ``"hidden"``,
        ``"parts of a .vms slide"``, ``"not a slide or image"``, ``"not matching --glob"``.
    empty : list of Path
        Folders that gave nothing to analyse.
    repeated : list of Path
        Files reached a second time by the same path (named twice, or named and in a folder given too): each
        is analysed once, where it came first.
    """

    slides: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    empty: list[Path] = field(default_factory=list)
    repeated: list[Path] = field(default_factory=list)

    def skipped_line(self, shown: int = 4) -> str | None:
        """One line listing the skipped files by reason (None when none were skipped)."""
        if not self.skipped:
            return None
        total = sum(map(len, self.skipped.values()))
        parts = [f"{reason}: {_listed(self.skipped[reason], shown)}"
                 for reason in sorted(self.skipped, key=_SKIP_ORDER.index)]
        return f"skipped {total} file{'s' if total > 1 else ''} in the folders (--glob PATTERN chooses files) - " + \
            "; ".join(parts)

    def repeated_line(self, shown: int = 4) -> str | None:
        """One line naming the files given more than once (None when there are none)."""
        if not self.repeated:
            return None
        return f"given more than once, analysed once: {_listed(list(map(str, self.repeated)), shown)}"


def _listed(names: list[str], shown: int) -> str:
    """``a, b, c and 2 more``: the first ``shown`` names and how many are left out."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


_SKIP_ORDER = ["annotations", "parts of a .vms slide", "not a slide or image", "not matching --glob", "hidden"]


def _vms_parts(files: list[Path]) -> set[str]:
    """Names of the image files that the Hamamatsu ``.vms`` slides among ``files`` are made of.

    A ``.vms`` file is a small key=value index; its ``ImageFile``, ``ImageFile(x,y)``, ``MapFile`` and
    ``OptimisationFile`` entries name the JPEG files beside it, which are parts of that slide, not slides.
    """
    parts: set[str] = set()
    for vms in (p for p in files if p.suffix.lower() == ".vms"):
        try:
            text = vms.read_text(errors="replace")
        except OSError:
            continue  # an unreadable index fails later as a slide, with its reason
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().lower().startswith(("imagefile", "mapfile", "optimisationfile")):
                parts.add(Path(value.strip()).name)
    return parts


def _folder_rule(name: str, pattern: str | None) -> str | None:
    """Why a file of a scanned folder is not a slide (None: it is one)."""
    if name.startswith("."):
        return "hidden"
    if pattern is not None:
        # --glob chooses the files itself: the user's pattern, not the suffix lists, says what a slide is.
        return None if fnmatch.fnmatchcase(name, pattern) else "not matching --glob"
    lower = name.lower()
    if fnmatch.fnmatchcase(lower, "*_seed.*") or _PAPER_MASK.fullmatch(lower) or lower.endswith((".csv", ".geojson")):
        return "annotations"
    if not lower.endswith(SLIDE_SUFFIXES):
        return "not a slide or image"
    return None


def scan_slides(paths: list[str | os.PathLike], pattern: str | None = None) -> SlideSearch:
    """Expand files and folders into the files to analyse, by rules a user can predict.

    * A file named explicitly is always taken, whatever its name (it fails later, with a
      reason, if it is not a slide).
    * A folder is searched non-recursively and gives its files with a slide or image suffix
      (:data:`SLIDE_SUFFIXES`), leaving out hidden files and the annotation files of the
      layouts wsi-lymph reads (:data:`ANNOTATION_PATTERNS`) and the JPEG parts of Hamamatsu ``.vms`` slides
      (the ``.vms`` itself is the slide); ``pattern`` (``--glob``, a
      shell pattern matched case-sensitively against file names, e.g. ``"*.svs"``) replaces
      those rules: a folder then gives its non-hidden files whose name matches.
    * A path that does not exist is kept, so that it is reported as missing.
    * A file reached again by the same path (named twice, or named and inside a folder given too; paths
      compared absolute, ``..`` folded) is taken once, where it came first; the others are listed in
      ``repeated``.  Links are not followed for this: a link under another name is the user's second name
      for a slide (a cohort folder of links, say) and is analysed under that name too.

    Parameters
    ----------
    paths : list of path-like
        Files and folders, as given on the command line.
    pattern : str, optional
        ``--glob`` pattern for the files of folders.

    Returns
    -------
    SlideSearch
    """
    search = SlideSearch()
    taken: set[str] = set()

    def take(path: Path) -> None:
        # Two runs of one path would write two result folders (case, case-2) of the same slide.
        absolute = os.path.abspath(path)
        if absolute in taken:
            search.repeated.append(path)
        else:
            taken.add(absolute)
            search.slides.append(path)

    for entry in map(Path, paths):
        if not entry.is_dir():
            take(entry)
            continue
        found = []
        files = sorted(p for p in entry.iterdir() if p.is_file())
        parts = _vms_parts(files)
        for path in files:
            reason = "parts of a .vms slide" if path.name in parts else _folder_rule(path.name, pattern)
            if reason is None:
                found.append(path)
            else:
                search.skipped.setdefault(reason, []).append(path.name)
        for path in found:
            take(path)
        if not found:
            search.empty.append(entry)
    return search


def find_slides(paths: list[str | os.PathLike], pattern: str | None = None) -> list[Path]:
    """The files to analyse among ``paths`` (see :func:`scan_slides` for the rules)."""
    return scan_slides(paths, pattern).slides


# ---------------------------------------------------------------- pixel access
@functools.lru_cache(maxsize=16)
def _handle(path: str, reader: str):
    """One open handle per process and file (workers open slides themselves)."""
    if reader == "openslide":
        return openslide.OpenSlide(path)
    if reader == "tifffile":
        store = tifffile.imread(path, aszarr=True, series=0)
        group = zarr.open(store, mode="r")
        if isinstance(group, zarr.Array):
            return [group]
        return [group[str(i)] for i in range(len(list(group.array_keys())))]

    with Image.open(path) as image:
        if image.mode == "RGB":
            return np.asarray(image)
        # Transparency (RGBA, LA, or a palette with a transparent colour) as white glass: convert("RGB") alone
        # would turn transparent pixels, often stored as (0, 0, 0, 0), into black "tissue".
        rgba = np.asarray(image.convert("RGBA"))
        return on_white(rgba[..., :3], rgba[..., 3])


def read_region(info: SlideInfo, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Read an RGB region of one level.

    Parameters
    ----------
    info : SlideInfo
        The slide (only its path and reader are used to open it in this process).
    level : int
        Pyramid level.
    x, y : int
        Top-left corner in pixels of ``level`` (column, row); must lie inside the level.
    width, height : int
        Region size in pixels of ``level``.

    Returns
    -------
    np.ndarray
        (height, width, 3) uint8 RGB.  Transparent (unscanned) areas are white.
    """
    level_w, level_h = info.level_sizes_xy[level]
    if x < 0 or y < 0 or x + width > level_w or y + height > level_h or width <= 0 or height <= 0:
        raise ValueError(
            f"{info.path}: region x={x} y={y} {width}x{height} outside level {level} ({level_w}x{level_h})"
        )
    handle = _handle(info.path, info.reader)
    if info.reader == "openslide":
        scale = info.level_downsamples[level]
        rgba = np.asarray(
            handle.read_region((round(x * scale), round(y * scale)), level, (width, height))
        )
        # OpenSlide returns premultiplied RGBA with alpha 0 outside the scanned area.
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb
    if info.reader == "tifffile":
        array = np.asarray(handle[level][y : y + height, x : x + width])
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        array = _to_uint8_rgb(array, info.path)
        if array.shape[-1] == 4:  # RGB + alpha: transparent areas are glass, as OpenSlide's are
            return on_white(array[..., :3], array[..., 3])
        return array[..., :3]
    return handle[y : y + height, x : x + width]


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite RGB with its (unassociated) alpha onto white.

    Parameters
    ----------
    rgb : np.ndarray
        (rows, cols, 3) uint8.
    alpha : np.ndarray
        (rows, cols) uint8 opacity, 0 transparent to 255 opaque.

    Returns
    -------
    np.ndarray
        (rows, cols, 3) uint8: ``rgb`` where opaque, white where transparent, blended between.
    """
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    opacity = alpha[..., None].astype(np.float32) / 255.0
    return np.rint(rgb * opacity + 255.0 * (1.0 - opacity)).astype(np.uint8)


def _to_uint8_rgb(array: np.ndarray, path: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    raise SlideError(f"{path}: pixel type {array.dtype} is not supported (8- or 16-bit RGB expected)")


def slide_to_dask(info: SlideInfo, level: int = 0, tile_px: int = 1024, name: str = "read") -> da.Array:
    """A level as a lazy Dask array of tiles; nothing is read until computed.

    Parameters
    ----------
    info : SlideInfo
    level : int
    tile_px : int
        Chunk edge in pixels of ``level``.
    name : str
        Task-name prefix shown in the Dask dashboard.

    Returns
    -------
    dask.array.Array
        (height, width, 3) uint8 RGB with chunks ``(tile_px, tile_px, 3)``.
    """
    width, height = info.level_sizes_xy[level]
    chunks = normalize_chunks((tile_px, tile_px, 3), shape=(height, width, 3))

    def read_tile(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return read_region(info, level, x0, y0, x1 - x0, y1 - y0)

    return da.map_blocks(read_tile, chunks=chunks, dtype=np.uint8, name=f"{name}-{_token(info, level)}")


def _token(info: SlideInfo, level: int) -> str:

    return tokenize(info, level)
