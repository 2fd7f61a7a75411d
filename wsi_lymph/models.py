"""Model names, fetching and caching of the released weights, and loading.

Names understood by :func:`resolve_model` / :func:`load_model`:

- ``janowczyk2016``: the paper's five cross-validation models, used as an
  ensemble (probabilities averaged over the folds);
- ``janowczyk2016/fold1`` ... ``janowczyk2016/fold5``: one fold's model;
- anything else: the path of a checkpoint file (``.pt``) written by
  :func:`wsi_lymph.caffe.import_caffe` or by training.

The released Caffe files are not redistributed: they are downloaded from the
authors' public repository (or a mirror given with ``source`` /
``WSI_LYMPH_MODEL_SOURCE``), checked against known sha256 hashes and converted
once into ``<cache>/models/janowczyk2016/fold{k}.pt``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsi_lymph.caffe import ARCH, CHECKPOINT_FORMAT, MEAN_SHAPE, import_caffe
from wsi_lymph.network import DENSE_ARCH, DensePatchNet, PatchNet, channel_mean

JANOWCZYK2016 = "janowczyk2016"
FOLDS = (1, 2, 3, 4, 5)
#: Every name resolve_model knows besides checkpoint paths.
MODEL_NAMES = (JANOWCZYK2016, *(f"{JANOWCZYK2016}/fold{k}" for k in FOLDS))

DEFAULT_SOURCE = (
    "https://raw.githubusercontent.com/choosehappy/public/master/DL%20tutorial%20Code/4-lymphocyte/models"
)
SOURCE_ENV = "WSI_LYMPH_MODEL_SOURCE"
CACHE_ENV = "WSI_LYMPH_CACHE"

#: sha256 of the authors' released files, as listed in shared/data/README.md (sha256sum format).
_SHA256SUMS = """\
bcbe8d37b8779f6aebc8fbcc6d994b212f1d1c71b714a60147facca047f06cbc  1_caffenet_train_w32_iter_600000.caffemodel
1b1ff9a494304ae5b50f7dbc048858c4f92fab8ce4b4c2151863dbe9431e2f5b  2_caffenet_train_w32_iter_600000.caffemodel
93d488a6bd4b99e14d1d0824eab2753beb04c1a1649901df87e0d05b68fd4645  3_caffenet_train_w32_iter_600000.caffemodel
e84b2c24d08ffb4a4144f7106466b2ddbbfb2b3fadae7e1df2ef28362cffa6e2  4_caffenet_train_w32_iter_600000.caffemodel
a0b1ac1e2b848f2bfb1646047e100ceecf8072011192e7e965155406f11e3834  5_caffenet_train_w32_iter_600000.caffemodel
4d6420489ac2b769cc3c290785e7d5ecd9252e357561cfa47a57c11e93a71e31  DB_train_w32_1.binaryproto
2b426e7cf822987780d9b893f28e93a139d151ee0faac175106d1f1f3ce0f76b  DB_train_w32_2.binaryproto
2acd74c1190fc600e5591238fddc5fb04df0b016434fd8dfdf86fa4af8cc5452  DB_train_w32_3.binaryproto
d76b9ced3832da989d5414a958f22983874400b68791f7d5be2d69b4f30a53b6  DB_train_w32_4.binaryproto
5f841619ad0f167bb13ae1b7a504e879b0fd2ecf5252a87e160e4d70bee179bc  DB_train_w32_5.binaryproto
"""
JANOWCZYK2016_SHA256 = {name: digest for digest, name in (line.split() for line in _SHA256SUMS.splitlines())}
# Metadata the members of one ensemble must agree on to be averaged meaningfully.
_ENSEMBLE_INVARIANTS = ("arch", "channel_order", "input_range", "model_mpp", "class_index")
_DOWNLOAD_TIMEOUT_S = 60.0
#: Network class of each architecture string a checkpoint may name in ``meta["arch"]``.
ARCHITECTURES: dict[str, type[PatchNet] | type[DensePatchNet]] = {ARCH: PatchNet, DENSE_ARCH: DensePatchNet}


class ModelError(ValueError):
    """A model name cannot be resolved, fetched or loaded."""


def caffemodel_filename(fold: int) -> str:
    """Released weight file of ``fold`` (1-5)."""
    return f"{fold}_caffenet_train_w32_iter_600000.caffemodel"


def mean_filename(fold: int) -> str:
    """Released mean-image file of ``fold`` (1-5)."""
    return f"DB_train_w32_{fold}.binaryproto"


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Root of the per-user cache: ``$WSI_LYMPH_CACHE`` or ``~/.cache/wsi-lymph``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsi-lymph"


def janowczyk2016_checkpoint(fold: int) -> Path:
    """Where the converted checkpoint of ``fold`` lives in the cache."""
    return cache_dir() / "models" / JANOWCZYK2016 / f"fold{fold}.pt"


def resolve_source(source: str | None = None, *, env_var: str = SOURCE_ENV, default: str = DEFAULT_SOURCE) -> str:
    """Base URL to download the released files from.

    ``source`` wins over ``$WSI_LYMPH_MODEL_SOURCE``, which wins over
    :data:`DEFAULT_SOURCE`.  A plain local folder path becomes a ``file://``
    URL.
    """
    chosen = source or os.environ.get(env_var) or default
    # A scheme needs "://" here, so Windows drive letters ("C:\\...") stay paths.
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", chosen):
        return chosen.rstrip("/")
    return Path(chosen).expanduser().absolute().as_uri()


def _air_gap_hint() -> str:
    return (
        f"On a machine without internet access, copy the released files ({caffemodel_filename(1)}, "
        f"{mean_filename(1)}, ... for folds 1-5) into a folder and pass it with --source or "
        f"the {SOURCE_ENV} environment variable."
    )


def download_verified(
    url: str,
    dest: Path,
    expected_sha256: str,
    progress: Callable[[str], None] | None,
    *,
    hint: str | None = None,
    error: type[Exception] = ModelError,
) -> None:
    """Download ``url`` to ``dest`` via a temporary file, keeping it only if its sha256 matches.

    Failures raise ``error`` naming the URL and the reason, followed by ``hint``
    (default: how to point the model fetcher at a local mirror).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"downloading {url}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors
            reason = getattr(exc, "reason", None) or exc
            raise error(f"could not download {url}: {reason}. {hint or _air_gap_hint()}") from exc
        actual = h.hexdigest()
        if actual != expected_sha256:
            raise error(
                f"sha256 mismatch for {url}: expected {expected_sha256}, got {actual}; "
                "the file was deleted (wrong or corrupted mirror?)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_janowczyk2016(
    source: str | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    folds: Iterable[int] = FOLDS,
) -> list[Path]:
    """Download, verify and convert the paper's released models into the cache.

    Parameters
    ----------
    source : str, optional
        Base URL (``https://``, ``file://``) or local folder holding the
        released files; default ``$WSI_LYMPH_MODEL_SOURCE``, else the authors'
        repository.
    force : bool
        Download and convert again even when a checkpoint is already cached.
    progress : callable, optional
        Called with one human-readable line per step.
    folds : iterable of int
        Folds to fetch (default all five).

    Returns
    -------
    list of Path
        The checkpoint of each requested fold, in fold order.

    Raises
    ------
    ModelError
        A download failed or a file's sha256 differs from the known hash.
    """
    folds = list(folds)
    bad = [k for k in folds if k not in FOLDS]
    if bad:
        raise ModelError(f"janowczyk2016 has folds {list(FOLDS)}, not {bad}")
    base = None  # resolved lazily: a fully cached model needs no source at all
    downloads = cache_dir() / "downloads" / JANOWCZYK2016
    paths = []
    for k in folds:
        ckpt = janowczyk2016_checkpoint(k)
        paths.append(ckpt)
        if ckpt.is_file() and not force:
            continue
        if base is None:
            base = resolve_source(source)
        raw = []
        for filename in (caffemodel_filename(k), mean_filename(k)):
            dest = downloads / filename
            expected = JANOWCZYK2016_SHA256[filename]
            # A verified earlier download (e.g. an interrupted conversion) need not be fetched again.
            if force or not dest.is_file() or file_sha256(dest) != expected:
                download_verified(f"{base}/{urllib.parse.quote(filename)}", dest, expected, progress)
            raw.append(dest)
        if progress is not None:
            progress(f"converting fold {k} -> {ckpt}")
        import_caffe(raw[0], raw[1], ckpt, name=f"{JANOWCZYK2016}/fold{k}", fold=k)
    return paths


def _folds_of(name: str) -> list[int] | None:
    if name == JANOWCZYK2016:
        return list(FOLDS)
    m = re.fullmatch(rf"{JANOWCZYK2016}/fold(\d+)", name)
    if m and int(m.group(1)) in FOLDS:
        return [int(m.group(1))]
    return None


def resolve_model(name: str, *, fetch_missing: bool = True, source: str | None = None) -> list[Path]:
    """Checkpoint files behind a model name.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`, or the path of a checkpoint file.
    fetch_missing : bool
        Fetch the released models into the cache when they are not there yet.
    source : str, optional
        Download source for fetching; see :func:`fetch_janowczyk2016`.

    Returns
    -------
    list of Path
        One checkpoint per ensemble member.

    Raises
    ------
    ModelError
        Unknown name that is not an existing file, or a missing model when
        ``fetch_missing`` is false (or fetching failed).
    """
    folds = _folds_of(name)
    if folds is None:
        path = Path(name).expanduser()
        if path.is_file():
            return [path]
        raise ModelError(
            f"unknown model {name!r}: not one of {', '.join(MODEL_NAMES)} and not an existing checkpoint file"
        )
    paths = [janowczyk2016_checkpoint(k) for k in folds]
    missing = [k for k, p in zip(folds, paths, strict=True) if not p.is_file()]
    if missing:
        if not fetch_missing:
            raise ModelError(
                f"model {name!r} is not in the cache ({cache_dir()}); fetch it first "
                "(wsi_lymph.models.fetch_janowczyk2016) or allow fetching"
            )
        fetch_janowczyk2016(source, folds=missing)
    return paths


@dataclass(frozen=True, eq=False)  # eq on tensors is meaningless; keep identity hashing
class LoadedModel:
    """Networks ready for inference, with the metadata needed to use them.

    Attributes
    ----------
    name : str
        Model name (or checkpoint path) it was loaded from.
    members : list of (PatchNet or DensePatchNet, torch.Tensor)
        Per ensemble member: the network in eval mode on the requested device
        and its (3, 32, 32) float32 BGR 0-255 mean image on the CPU (constant
        per channel for a DensePatchNet).  Members share one architecture.
    meta : dict
        Metadata of the first member, plus ``member_sha256`` (sha256 of each
        checkpoint file), ``member_names`` and ``model_id`` (name plus a
        digest of the exact weights, for provenance).
    """

    name: str
    members: list[tuple[PatchNet | DensePatchNet, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_mpp(self) -> float:
        """Resolution the network expects, in micrometres per pixel."""
        return float(self.meta["model_mpp"])

    @property
    def threshold(self) -> float:
        """Default peak-detection threshold on the smoothed probability map, in [0, 1]."""
        return float(self.meta["threshold"])


def load_checkpoint(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[PatchNet | DensePatchNet, torch.Tensor, dict]:
    """Load one checkpoint written by :func:`wsi_lymph.caffe.import_caffe` (or training).

    Parameters
    ----------
    path : path-like
        Checkpoint file.
    device : str
        Torch device for the network, e.g. ``"cpu"`` or ``"cuda:0"``.

    Returns
    -------
    (PatchNet or DensePatchNet, torch.Tensor, dict)
        Network in eval mode on ``device`` (the class named by
        ``meta["arch"]``, see :data:`ARCHITECTURES`), (3, 32, 32) float32 mean
        image (BGR, 0-255) on the CPU, and the metadata dict.

    Raises
    ------
    ModelError
        The file is missing, unreadable, or not a checkpoint of this network.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: checkpoint file not found") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign/corrupt files
        raise ModelError(
            f"{path}: not a readable wsi-lymph checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(ckpt, dict) or not {"state_dict", "mean_bgr", "meta"} <= set(ckpt):
        raise ModelError(f"{path}: not a wsi-lymph checkpoint (expected keys state_dict, mean_bgr, meta)")
    meta = ckpt["meta"]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelError(f"{path}: checkpoint format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    arch = meta.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        known = " or ".join(repr(a) for a in ARCHITECTURES)
        raise ModelError(f"{path}: network architecture is {arch!r}, expected {known}")
    mean = ckpt["mean_bgr"]
    if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != MEAN_SHAPE:
        shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise ModelError(f"{path}: mean image has shape {shape}, expected {MEAN_SHAPE}")
    net = ARCHITECTURES[arch]()
    if isinstance(net, DensePatchNet):
        try:
            channel_mean(mean)
        except ValueError as exc:
            raise ModelError(f"{path}: {exc}") from exc
    try:
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: weights do not fit the {arch} network: {exc}") from exc
    net.to(device).eval()
    return net, mean.to(device="cpu", dtype=torch.float32), meta


def load_model(
    name_or_path: str, device: str = "cpu", *, fetch_missing: bool = True, source: str | None = None
) -> LoadedModel:
    """Resolve a model name and load all its members.

    Parameters
    ----------
    name_or_path : str
        See :func:`resolve_model`.
    device : str
        Torch device for the networks.
    fetch_missing, source
        See :func:`resolve_model`.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        Resolution or loading failed, or the members disagree on how they
        must be fed (architecture, channel order, value range, um/px, class).
    """
    paths = resolve_model(name_or_path, fetch_missing=fetch_missing, source=source)
    loaded = [load_checkpoint(p, device) for p in paths]
    first = loaded[0][2]
    for p, (_, _, meta) in zip(paths[1:], loaded[1:], strict=True):
        for key in _ENSEMBLE_INVARIANTS:
            if meta.get(key) != first.get(key):
                raise ModelError(
                    f"ensemble members disagree on {key!r}: {paths[0]} has {first.get(key)!r}, "
                    f"{p} has {meta.get(key)!r}"
                )
    hashes = [file_sha256(p) for p in paths]
    name = name_or_path if _folds_of(name_or_path) is not None else str(first.get("name") or Path(name_or_path).stem)
    meta = dict(first)
    meta["member_names"] = [m.get("name") for _, _, m in loaded]
    if len(loaded) > 1:
        meta["name"] = name
        meta["fold"] = None  # an ensemble is not a single fold's model
    meta["member_sha256"] = hashes
    meta["model_id"] = f"{name}@{hashlib.sha256(''.join(hashes).encode()).hexdigest()[:12]}"
    return LoadedModel(name=name, members=[(net, mean) for net, mean, _ in loaded], meta=meta)


@functools.lru_cache(maxsize=8)
def cached_model(name_or_path: str, device: str = "cpu", source: str | None = None) -> LoadedModel:
    """:func:`load_model`, memoised per process (each Dask worker loads weights once).

    The cache key is the arguments as given; the returned networks are shared,
    so callers must not modify them.
    """
    return load_model(name_or_path, device, source=source)
