"""The per-user cache folder and verified downloads into it.

The paper's released models (:mod:`wsi_lymph.models.registry`) and the demo
slide (:mod:`wsi_lymph.slides.sample`) are fetched from a source given as an
``https://`` URL, a ``file://`` URI or a plain local folder (machines without
internet access), checked against a known sha256 and kept in :func:`cache_dir`.
:func:`pooch.retrieve` does the work: it downloads into a temporary file beside
the destination, verifies the hash, renames the file into place (so no partial
or unverified file is ever left) and skips files already cached with the right
hash.  Only the ``file://`` transfer is ours, because pooch has no downloader
for local files.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pooch

CACHE_ENV = "WSI_LYMPH_CACHE"
#: Seconds a connection or a read may stall before a download fails.
DOWNLOAD_TIMEOUT_S = 60.0

# pooch logs each download at INFO level on its own stderr handler; the commands print their own progress lines.
pooch.get_logger().setLevel("WARNING")


def cache_dir() -> Path:
    """Root of the per-user cache: ``$WSI_LYMPH_CACHE`` or ``~/.cache/wsi-lymph``.

    Not :func:`pooch.os_cache`, which follows each platform's convention
    (``$XDG_CACHE_HOME``, ``~/Library/Caches`` on macOS): the documented place
    is ``~/.cache/wsi-lymph`` everywhere.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsi-lymph"


def source_url(source: str | None, *, env_var: str, default: str) -> str:
    """Base URL of a download source, without a trailing slash.

    Parameters
    ----------
    source : str or None
        URL or local folder given by the caller; wins over ``$env_var``.
    env_var : str
        Environment variable consulted when ``source`` is not given.
    default : str
        URL used when neither is set.

    Returns
    -------
    str
        The chosen URL; a plain local folder path becomes a ``file://`` URI.
    """
    chosen = source or os.environ.get(env_var) or default
    # A scheme needs "://" here, so Windows drive letters ("C:\\...") stay paths.
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", chosen):
        return chosen.rstrip("/")
    return Path(chosen).expanduser().absolute().as_uri()


def local_path(url: str) -> Path | None:
    """The local path a ``file://`` URL names, or None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else None


class _TransferError(Exception):
    """The transfer itself failed (as opposed to pooch's sha256 check after it); the cause says why."""


def _downloader(progress: Callable[[str], None] | None, timeout_s: float) -> Callable[[str, str, Any], None]:
    """A pooch ``downloader=`` for ``file://`` (a copy) and http(s) URLs (pooch's own, with a timeout)."""

    def download(url: str, output_file: str, pup: Any) -> None:
        if progress is not None:
            progress(f"downloading {url}")
        path = local_path(url)
        try:
            if path is not None:
                shutil.copyfile(path, output_file)
            elif urllib.parse.urlsplit(url).scheme in ("http", "https"):
                pooch.HTTPDownloader(timeout=timeout_s)(url, output_file, pup)
            else:  # ftp, sftp: pooch's downloader for the protocol (ValueError for an unknown one)
                pooch.choose_downloader(url)(url, output_file, pup)
        except (OSError, ValueError) as exc:  # requests' errors and timeouts are OSErrors too
            raise _TransferError(url) from exc

    return download


def fetch_verified(
    url: str,
    dest: Path,
    sha256: str,
    *,
    hint: str,
    error: type[Exception],
    progress: Callable[[str], None] | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right sha256 is already there.

    Parameters
    ----------
    url : str
        ``https://``, ``http://`` or ``file://`` URL of the file.
    dest : Path
        Where the verified file is kept; parent folders are created.  A file
        there with another hash is replaced.
    sha256 : str
        Known hex sha256 of the file.
    hint : str
        Appended to a download failure, e.g. how to use a local mirror.
    error : type of Exception
        Raised on failure, e.g. ``ModelError`` or ``DataError``.
    progress : callable, optional
        Called with ``"downloading <url>"`` before an actual transfer.
    timeout_s : float
        Seconds a connection or a read may stall (http and https).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    error
        The transfer failed (message: the URL, the reason, ``hint``) or the
        file's sha256 differs (message: the URL and both hashes; the download
        is deleted).
    """
    try:
        pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}",
            fname=dest.name,
            path=dest.parent,
            downloader=_downloader(progress, timeout_s),
        )
    except _TransferError as exc:
        raise error(f"could not download {url}: {exc.__cause__}. {hint}") from exc.__cause__
    except ValueError as exc:  # pooch's hash check, which has already deleted the download
        raise error(f"{url}: {exc}") from exc
    return dest
