"""Model names, fetching and caching of the released weights, and loading.

Names understood by :func:`resolve_model` / :func:`load_model`:

- ``wsi-lymph-student`` (the default): the fast sub-pixel student distilled from the
  paper's ensemble (``wsi-lymph distill``), shipped inside the package: no fetch;
- ``janowczyk2016``: the paper's five cross-validation models, used as an
  ensemble (probabilities averaged over the folds);
- ``janowczyk2016/fold1`` ... ``janowczyk2016/fold5``: one fold's model;
- anything else: the path of a checkpoint file (``.pt``) written by
  :func:`wsi_lymph.models.caffe.import_caffe` or by training.

The released Caffe files are not redistributed: they are downloaded from the
authors' public repository (or a mirror given with ``source`` /
``WSI_LYMPH_MODEL_SOURCE``), checked against known sha256 hashes (by pooch,
see :mod:`wsi_lymph.cache`) and converted once into
``<cache>/models/janowczyk2016/fold{k}.pt``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pooch
import torch
from torch import nn

from wsi_lymph.cache import cache_dir, fetch_verified, source_url
from wsi_lymph.constants import DEFAULT_MODEL
from wsi_lymph.models.caffe import import_caffe
from wsi_lymph.models.checkpoints import ModelError, load_checkpoint_members

JANOWCZYK2016 = "janowczyk2016"
FOLDS = (1, 2, 3, 4, 5)
#: Every name resolve_model knows besides checkpoint paths.
MODEL_NAMES = (DEFAULT_MODEL, JANOWCZYK2016, *(f"{JANOWCZYK2016}/fold{k}" for k in FOLDS))
#: The shipped student's weights and their sha256 (checked at every load: a damaged install is refused).
SHIPPED_MODELS = {DEFAULT_MODEL: Path(__file__).parent / "weights" / f"{DEFAULT_MODEL}.pt"}
SHIPPED_SHA256 = {DEFAULT_MODEL: "884856af1f8f9c4598c52c3c73783bf9e28246928ff8f2ab50df7a25e8359785"}

DEFAULT_SOURCE = (
    "https://raw.githubusercontent.com/choosehappy/public/master/DL%20tutorial%20Code/4-lymphocyte/models"
)
SOURCE_ENV = "WSI_LYMPH_MODEL_SOURCE"

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


def caffemodel_filename(fold: int) -> str:
    """Released weight file of ``fold`` (1-5)."""
    return f"{fold}_caffenet_train_w32_iter_600000.caffemodel"


def mean_filename(fold: int) -> str:
    """Released mean-image file of ``fold`` (1-5)."""
    return f"DB_train_w32_{fold}.binaryproto"


def janowczyk2016_checkpoint(fold: int) -> Path:
    """Where the converted checkpoint of ``fold`` lives in the cache."""
    return cache_dir() / "models" / JANOWCZYK2016 / f"fold{fold}.pt"


def resolve_source(source: str | None = None) -> str:
    """Base URL to download the released files from.

    ``source`` wins over ``$WSI_LYMPH_MODEL_SOURCE``, which wins over
    :data:`DEFAULT_SOURCE`.  A plain local folder path becomes a ``file://``
    URL.
    """
    return source_url(source, env_var=SOURCE_ENV, default=DEFAULT_SOURCE)


def _air_gap_hint() -> str:
    return (
        f"On a machine without internet access, copy the released files ({caffemodel_filename(1)}, "
        f"{mean_filename(1)}, ... for folds 1-5) into a folder and name it with --model-source (or the {SOURCE_ENV} "
        "environment variable; `wsi-lymph models fetch janowczyk2016 --source FOLDER` caches them once)."
    )


def _fetch_released(base: str, filename: str, *, force: bool, progress: Callable[[str], None] | None) -> Path:
    """One released file, verified, in ``<cache>/downloads/janowczyk2016``."""
    dest = cache_dir() / "downloads" / JANOWCZYK2016 / filename
    if force:
        dest.unlink(missing_ok=True)  # pooch keeps a cached file whose hash matches; force means fetch again
    url = f"{base}/{urllib.parse.quote(filename)}"
    return fetch_verified(
        url, dest, JANOWCZYK2016_SHA256[filename], hint=_air_gap_hint(), error=ModelError, progress=progress
    )


def fetch_janowczyk2016(
    source: str | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    folds: Iterable[int] = FOLDS,
) -> list[Path]:
    """Download, verify and convert the paper's released models into the cache.

    A released file already downloaded with the right sha256 (e.g. before an
    interrupted conversion) is not fetched again.

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
    paths = []
    for k in folds:
        ckpt = janowczyk2016_checkpoint(k)
        paths.append(ckpt)
        if ckpt.is_file() and not force:
            continue
        base = base or resolve_source(source)
        weights, mean = (
            _fetch_released(base, name, force=force, progress=progress)
            for name in (caffemodel_filename(k), mean_filename(k))
        )
        if progress is not None:
            progress(f"converting fold {k} -> {ckpt}")
        import_caffe(weights, mean, ckpt, name=f"{JANOWCZYK2016}/fold{k}", fold=k)
    return paths


def _folds_of(name: str) -> list[int] | None:
    if name == JANOWCZYK2016:
        return list(FOLDS)
    m = re.fullmatch(rf"{JANOWCZYK2016}/fold(\d+)", name)
    if m and int(m.group(1)) in FOLDS:
        return [int(m.group(1))]
    return None


class UnknownModelError(ModelError):
    """A model name that is neither registered nor an existing checkpoint file: a mistake in the command line."""


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` unless ``name`` is one of :data:`MODEL_NAMES` or an existing file.

    Fetches and loads nothing, so commands call it before any work starts.
    """
    if name in SHIPPED_MODELS or _folds_of(name) is not None or Path(name).expanduser().is_file():
        return
    raise UnknownModelError(
        f"unknown model {name!r}: not one of {', '.join(MODEL_NAMES)} and not an existing checkpoint file"
    )


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
    check_model_name(name)
    if name in SHIPPED_MODELS:
        return [_shipped(name)]
    folds = _folds_of(name)
    if folds is None:
        return [Path(name).expanduser()]
    paths = [janowczyk2016_checkpoint(k) for k in folds]
    missing = [k for k, p in zip(folds, paths, strict=True) if not p.is_file()]
    if missing:
        if not fetch_missing:
            raise ModelError(
                f"model {name!r} is not in the cache ({cache_dir()}); fetch it first "
                "(wsi-lymph models fetch janowczyk2016) or allow fetching"
            )
        fetch_janowczyk2016(source, folds=missing)
    return paths


@dataclass(frozen=True)
class ModelEntry:
    """One name of :data:`MODEL_NAMES`, as this installation has it (:func:`model_inventory`).

    Attributes
    ----------
    name : str
        The name ``--model`` takes.
    summary : str
        What it is, in a few words.
    default : bool
        The model of ``detect``, ``probmap`` and ``demo`` when no ``--model`` is given.
    where : str
        ``"shipped"`` (in the package), ``"cached"`` (fetched into the cache) or ``"not fetched"``.
    threshold : float or None
        Its peak threshold on the smoothed map; None while not fetched.
    stain_norm : str or None
        What ``--stain-norm auto`` applies with it (``"reinhard"`` or ``"none"``); None while not fetched.
    """

    name: str
    summary: str
    default: bool
    where: str
    threshold: float | None
    stain_norm: str | None


def model_inventory() -> list[ModelEntry]:
    """Every model name, what it is, and whether it works offline here; nothing is fetched.

    A shipped model is checked (sha256) and loaded like any other, so a damaged installation raises
    :class:`ModelError` here too.
    """
    entries = []
    # The ensemble's metadata is its first member's (load_model), so each checkpoint file is read once.
    meta_of_file: dict[Path, tuple[int, dict[str, Any]]] = {}
    for name in MODEL_NAMES:
        folds = _folds_of(name) or []
        where = ("shipped" if name in SHIPPED_MODELS
                 else "cached" if all(janowczyk2016_checkpoint(k).is_file() for k in folds) else "not fetched")
        meta: dict[str, Any] = {}
        networks = None
        if where != "not fetched":
            paths = resolve_model(name, fetch_missing=False)
            for path in paths:  # every member is loaded, so a damaged file is reported here too
                if path not in meta_of_file:
                    members, file_meta = load_checkpoint_members(path)
                    meta_of_file[path] = (len(members), file_meta)
            meta = meta_of_file[paths[0]][1]
            networks = sum(meta_of_file[path][0] for path in paths)
        if name in SHIPPED_MODELS:
            averaged = f"{networks} networks averaged, " if networks and networks > 1 else ""
            summary = f"the distilled student ({averaged}fast; 0.5 µm/px input, 4x4 model-frame px out)"
        else:
            summary = (f"the paper's {len(folds)}-fold ensemble (exact patches, the networks averaged)"
                       if len(folds) > 1 else f"the paper's network of fold {folds[0]} alone")
        entries.append(ModelEntry(name=name, summary=summary, default=name == DEFAULT_MODEL, where=where,
                                  threshold=meta.get("threshold"),
                                  stain_norm=(meta.get("stain_norm") or "none") if meta else None))
    return entries


def _shipped(name: str) -> Path:
    """The file of a model shipped in the package, after checking its sha256."""
    path = SHIPPED_MODELS[name]
    if not path.is_file():
        raise ModelError(f"model {name!r}: {path} is missing from this installation; reinstall wsi-lymph")
    digest = pooch.file_hash(str(path))
    if digest != SHIPPED_SHA256[name]:
        raise ModelError(f"model {name!r}: {path} has sha256 {digest}, expected {SHIPPED_SHA256[name]}; "
                         "the installation is damaged, reinstall wsi-lymph")
    return path


@dataclass(frozen=True, eq=False)  # eq on tensors is meaningless; keep identity hashing
class LoadedModel:
    """Networks ready for inference, with the metadata needed to use them.

    Attributes
    ----------
    name : str
        Model name (or checkpoint path) it was loaded from.
    members : list of (torch.nn.Module, torch.Tensor)
        Per ensemble member (one per file, or several in one file): the network in eval mode on the requested device
        and its (3, 32, 32) float32 BGR 0-255 mean image on the CPU (constant
        per channel for a DensePatchNet).  Members share one architecture.
    meta : dict
        Metadata of the first member, plus ``member_sha256`` (sha256 of each
        checkpoint file), ``member_names`` and ``model_id`` (name plus a
        digest of the exact weights, for provenance).
    """

    name: str
    members: list[tuple[nn.Module, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_mpp(self) -> float:
        """Resolution the network expects, in micrometres per pixel."""
        return float(self.meta["model_mpp"])

    @property
    def threshold(self) -> float:
        """Default peak-detection threshold on the smoothed probability map, in [0, 1]."""
        return float(self.meta["threshold"])


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
    # One file per member (the paper's folds), or several members in one file (a student of several seeds).
    loaded = [load_checkpoint_members(p, device) for p in paths]
    first = loaded[0][1]
    for p, (_, meta) in zip(paths[1:], loaded[1:], strict=True):
        for key in _ENSEMBLE_INVARIANTS:
            if meta.get(key) != first.get(key):
                raise ModelError(
                    f"ensemble members disagree on {key!r}: {paths[0]} has {first.get(key)!r}, "
                    f"{p} has {meta.get(key)!r}"
                )
    hashes = [pooch.file_hash(str(p)) for p in paths]
    name = name_or_path if _folds_of(name_or_path) is not None else str(first.get("name") or Path(name_or_path).stem)
    meta = dict(first)
    meta["member_names"] = [m.get("name") for _, m in loaded]
    if len(loaded) > 1:
        meta["name"] = name
        meta["fold"] = None  # an ensemble is not a single fold's model
    meta["member_sha256"] = hashes
    meta["model_id"] = f"{name}@{hashlib.sha256(''.join(hashes).encode()).hexdigest()[:12]}"
    return LoadedModel(name=name, members=[member for members, _ in loaded for member in members], meta=meta)


@functools.lru_cache(maxsize=8)
def cached_model(name_or_path: str, device: str = "cpu", source: str | None = None) -> LoadedModel:
    """:func:`load_model`, memoised per process (each Dask worker loads weights once).

    The cache key is the arguments as given; the returned networks are shared,
    so callers must not modify them.
    """
    return load_model(name_or_path, device, source=source)
