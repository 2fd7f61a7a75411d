"""Checks of the command line, made before any work starts (and before any cluster): a mistake is one line naming
the option and what it allows, and exit status 2.

The argparse types (:func:`integer`, :func:`number`, :func:`probability`, :func:`region`) reject a bad value while
the command line is parsed; the ``check_*`` functions look at the file system (an ``--out`` that is a file, a
missing input folder, a ``--region`` beyond a slide) and raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from wsi_lymph.constants import MAP_CHUNK_PX

#: µm per pixel a slide may have: 40x is about 0.25, 20x 0.5, 10x 1; a number above 10 is a magnification or a
#: typing slip (lymphocytes are about 7 µm across: they cannot be found at 10 µm/px).
MPP_RANGE_UM = (0.0, 10.0)
#: Model-frame pixels between classified pixels: beyond a patch (32 px) the map would miss cells between patches.
STRIDE_RANGE_PX = (1, 32)
#: Zarr chunk edge, model-frame px: below 32 the map is millions of files, above 8192 a chunk alone is 128 MiB+.
CHUNK_RANGE_PX = (32, 8192)
#: Inference task edge, model-frame px (a multiple of the chunk).
BLOCK_MAX_PX = 16384
#: Patches per forward pass.
BATCH_RANGE = (1, 65536)


class UsageError(Exception):
    """A mistake in the command line, found before any work: one line, exit status 2."""


# ------------------------------------------------------------------------------------------ argparse types
def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (either end open when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_range(low, high)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, unit: str = "", hint: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high`` (each end open or closed as told)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(
                f"must be a number {_range(low, high, low_open, high_open)}{unit}{hint}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        if low_open and high_open:
            return f"between {low:g} and {high:g} (both excluded)"
        if low_open:
            return f"> {low:g} and ≤ {high:g}"
        if high_open:
            return f"≥ {low:g} and < {high:g}"
        return f"from {low:g} to {high:g}"
    if low is not None:
        return f"> {low:g}" if low_open else f"≥ {low:g}"
    if high is not None:
        return f"< {high:g}" if high_open else f"≤ {high:g}"
    return ""


def probability() -> Callable[[str], float]:
    """An argparse type: a threshold on P, strictly between 0 and 1."""
    return number(0.0, 1.0, low_open=True, high_open=True)


def mpp() -> Callable[[str], float]:
    """An argparse type: µm per pixel of a scan, in :data:`MPP_RANGE_UM` (0 excluded)."""
    return number(*MPP_RANGE_UM, low_open=True, unit=" µm/px",
                  hint=" (e.g. 0.25 for a 40x scan, 0.5 for 20x)")


def region(text: str) -> tuple[int, int, int, int]:
    """An argparse type: ``X,Y,WIDTH,HEIGHT`` in level-0 pixels, X and Y ≥ 0, WIDTH and HEIGHT ≥ 1."""
    try:
        x, y, width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"wants X,Y,WIDTH,HEIGHT in level-0 pixels (four integers), got {text!r}") from None
    if x < 0 or y < 0 or width < 1 or height < 1:
        raise argparse.ArgumentTypeError(
            f"wants X,Y ≥ 0 and WIDTH,HEIGHT ≥ 1 (level-0 pixels), got {text!r}")
    return x, y, width, height


def listen_address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` or ``:PORT`` (any interface), PORT from 0 (any free port) to 65535.

    The host must resolve here: a name that does not would otherwise stop the cluster half started, after the
    slides were opened.
    """
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"wants HOST:PORT or :PORT with a port from 0 to 65535 (e.g. localhost:8787, :0), got {text!r}")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8787
    if host:
        try:
            socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            raise argparse.ArgumentTypeError(f"host {host!r} of {text!r} is not known on this machine") from None
    return text


def byte_size(text: str) -> str:
    """An argparse type: an amount of memory as Dask reads it (``32GB``, ``500MiB``, ``4e9``)."""
    from dask.utils import parse_bytes

    try:
        parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"wants an amount of memory such as 32GB or 500MiB, got {text!r}") from None
    return text


def walltime(text: str) -> str:
    """An argparse type: a job walltime, ``[D-]HH:MM:SS``, ``MM:SS``, ``D-HH`` or a bare number."""
    # The engine's own parser, so that what passes here is what the jobs get; imported only when the option is given.
    from wsi_lymph.engine.cluster import walltime_seconds

    if walltime_seconds(text, "slurm") is None:
        raise argparse.ArgumentTypeError(f"wants [D-]HH:MM:SS, MM:SS, D-HH or a number, e.g. 04:00:00, got {text!r}")
    return text


# ------------------------------------------------------------------------------------------ the file system
def check_out_folder(path: Path, option: str = "--out") -> None:
    """``path`` can be an output folder: a folder already, or creatable (its nearest existing parent is a
    writable folder)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is an existing file; {option} names a folder (created if missing)")
    _check_folder_can_be_made(path, option, named=path)


def check_out_file(path: Path, option: str = "--out") -> None:
    """``path`` can be an output file: not a folder, and its folder can be made."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; {option} names a file here")
    _check_folder_can_be_made(path.parent, option, named=path)


def _check_folder_can_be_made(folder: Path, option: str, named: Path) -> None:
    """``folder`` exists or can be made, and can be written in; errors name ``option`` and ``named``."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {named}: {existing} is a file, not a folder")
    # Try it rather than ask os.access: root passes every permission check, yet cannot write in /proc or on a
    # read-only mount.  The probe folder goes again at once.
    try:
        probe = tempfile.mkdtemp(prefix=".wsi-lymph-write-check-", dir=existing)
    except OSError as error:
        raise UsageError(f"{option} {named}: cannot write in {existing} ({error.strerror or error})") from None
    os.rmdir(probe)


def check_exists(path: Path, what: str, *, folder: bool | None = None) -> None:
    """``path`` exists (a folder if ``folder``, a file if ``folder`` is False)."""
    if not path.exists():
        raise UsageError(f"{what} {path}: not found")
    if folder is True and not path.is_dir():
        raise UsageError(f"{what} {path}: not a folder")
    if folder is False and path.is_dir():
        raise UsageError(f"{what} {path}: is a folder, a file is wanted here")


def check_model_name(name: str, option: str = "--model") -> None:
    """A model name that is neither registered nor an existing checkpoint file is a typo: exit 2 before any work."""
    from wsi_lymph.models.registry import UnknownModelError
    from wsi_lymph.models.registry import check_model_name as check_registered

    try:
        check_registered(name)
    except UnknownModelError as error:
        raise UsageError(f"{option}: {error}") from None


def check_block(block_px: int | None, chunk_px: int | None) -> None:
    """``--block`` is a multiple of ``--chunk`` (or, without it, of :data:`MAP_CHUNK_PX`) up to :data:`BLOCK_MAX_PX`.

    Without ``--chunk`` the model chooses the chunk, the largest of its default and
    :data:`MAP_CHUNK_PX` that divides the block (:func:`wsi_lymph.engine.params.default_chunk_px`).
    """
    if block_px is None:
        return
    chunk_option = f"--chunk ({chunk_px})" if chunk_px is not None else f"{MAP_CHUNK_PX} (without --chunk)"
    chunk_px = chunk_px or MAP_CHUNK_PX
    if block_px < chunk_px or block_px % chunk_px or block_px > BLOCK_MAX_PX:
        raise UsageError(f"--block must be a multiple of {chunk_option} from {chunk_px} to {BLOCK_MAX_PX} "
                         f"model-frame px, got {block_px}")


def check_region_inside(region_xywh: tuple[int, int, int, int] | None, slides: Iterable[str | os.PathLike],
                        mpp_um: float | None = None) -> None:
    """A ``--region`` lies wholly inside every slide it is asked of.

    Refused rather than clipped: a region is an explicit request, and one that reaches beyond the slide is most
    often a slip (x and y swapped, coordinates of another level); clipping it would analyse less than asked while
    the outputs and their densities quietly describe a smaller area.  Slides that cannot be opened are left to the
    run, which reports them one line each.
    """
    if region_xywh is None:
        return
    from wsi_lymph.slides.reader import SlideError, open_slide

    x, y, width, height = region_xywh
    for path in slides:
        try:
            info = open_slide(path, mpp=mpp_um)
        except (SlideError, OSError, ValueError):
            continue
        slide_width, slide_height = info.level_sizes_xy[0]
        if x + width > slide_width or y + height > slide_height:
            raise UsageError(
                f"--region {x},{y},{width},{height} reaches beyond {Path(path).name} ({slide_width} x {slide_height} "
                f"level-0 px): X + WIDTH must be ≤ {slide_width} and Y + HEIGHT ≤ {slide_height}")
