"""Settings of a batch run and the outcome of each slide."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from wsi_lymph.constants import FAST_BLOCK_PX, FAST_CHUNK_PX, HOTSPOT_FIELD_MM2, MAP_CHUNK_PX
from wsi_lymph.detection.hematoxylin import DEFAULT_MARGIN_UM, DEFAULT_MASK_MPP, DEFAULT_THRESHOLD_OD
from wsi_lymph.detection.peaks import PEAK_BLOCK_PX
from wsi_lymph.detection.stain import STAIN_NORMS
from wsi_lymph.io.probmap_store import STORE_DTYPES
from wsi_lymph.models.architectures import PATCHES, SUBPIXEL

#: Bumped whenever a change of wsi-lymph changes the values of maps or centres (not for speed, messages or new
#: outputs).  Maps record it; a finished slide made under another number is not taken over, so an upgrade never
#: mixes old and new results in one output folder.  Maps from before it was recorded count as unknown.
RESULTS_VERSION = 1


@dataclass(frozen=True)
class ProbmapParams:
    """How a probability map is computed and stored.

    Attributes
    ----------
    stride_px : int
        Classify every ``stride_px``-th model-frame pixel along each axis and
        interpolate bilinearly in between (1 = every pixel, exact).
    mirror : bool
        Average each patch with its horizontal mirror (the original's oversampling).
    chunk_px : int or None
        Zarr chunk edge in model-frame pixels.  None: the model's default (:func:`default_chunk_px`), chosen
        when the batch starts.
    block_px : int or None
        Edge of one inference task in model-frame pixels; a multiple of ``chunk_px``.  None: the model's
        default (:func:`default_block_px`), chosen when the batch starts.
    dtype : str
        ``"float16"`` (default), ``"float32"`` or ``"uint8"`` (P x 255, rounded).
    batch_size : int
        Patches per forward pass.  Every pass has exactly this many patches
        (the last one is padded) so results never depend on the block layout.
    skip_hematoxylin : bool
        Leave blocks without hematoxylin at P = 0 without running the network.
    hematoxylin_threshold_od, mask_mpp, margin_um : float
        See :mod:`wsi_lymph.detection.hematoxylin`.
    region_level0 : (x, y, width, height) or None
        Analyse only this level-0 rectangle (pixels); patches at its border
        still see the real neighbouring tissue.
    device : str or None
        Torch device for inference; None = CUDA when the worker has it, else CPU.
    torch_threads : int or None
        Intra-op threads per inference task (None = torch default).
    stain_norm : str
        ``"auto"`` (the model's own: Reinhard for the student, none for the paper's
        networks), ``"none"`` or ``"reinhard"`` (to the model's reference domain).
    """

    stride_px: int = 1
    mirror: bool = False
    chunk_px: int | None = None
    block_px: int | None = None
    dtype: str = "float16"
    batch_size: int = 512
    skip_hematoxylin: bool = True
    hematoxylin_threshold_od: float = DEFAULT_THRESHOLD_OD
    mask_mpp: float = DEFAULT_MASK_MPP
    margin_um: float = DEFAULT_MARGIN_UM
    region_level0: tuple[int, int, int, int] | None = None
    device: str | None = None
    torch_threads: int | None = None
    stain_norm: str = "auto"

    def __post_init__(self) -> None:
        if self.stride_px < 1:
            raise ValueError(f"stride must be >= 1 model-frame pixel, got {self.stride_px}")
        if self.chunk_px is not None and self.chunk_px < 1:
            raise ValueError(f"chunk_px must be >= 1 model-frame pixel, got {self.chunk_px}")
        if self.block_px is not None and (self.block_px < 1 or self.block_px % (self.chunk_px or MAP_CHUNK_PX)):
            raise ValueError(f"block_px ({self.block_px}) must be a positive multiple of chunk_px "
                             f"({self.chunk_px or f'{MAP_CHUNK_PX} when it is chosen by the model'})")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {self.dtype!r}")
        if self.stain_norm not in ("auto", *STAIN_NORMS):
            raise ValueError(f"stain_norm must be one of {('auto', *STAIN_NORMS)}, got {self.stain_norm!r}")

    def for_model(self, evaluation: str) -> ProbmapParams:
        """These settings with ``chunk_px`` and ``block_px`` chosen for the model where they are None.

        ``evaluation`` is how the model is evaluated (``PATCHES``, ``SUBPIXEL``... in
        :mod:`wsi_lymph.models.architectures`).
        """
        chunk_px = self.chunk_px or default_chunk_px(evaluation, self.block_px)
        return replace(self, chunk_px=chunk_px, block_px=self.block_px or default_block_px(evaluation, chunk_px))

    def stain_norm_for(self, model: dict) -> str:
        """The normalisation actually applied with ``model`` (:func:`~wsi_lymph.engine.batch.model_description`)."""
        return model["stain_norm"] if self.stain_norm == "auto" else self.stain_norm


def default_chunk_px(evaluation: str, block_px: int | None = None) -> int:
    """Edge of the map's Zarr chunks (model-frame px) when none is asked for.

    :data:`~wsi_lymph.constants.MAP_CHUNK_PX` for the paper's patch networks;
    :data:`~wsi_lymph.constants.FAST_CHUNK_PX` for fully convolutional models, whose tasks are so quick that
    Zarr's fixed cost per chunk written shows (BENCHMARKS.md, "Map chunks for the student").  With a ``block_px``
    asked for, the largest chunk of those two that divides it (a block is written in whole chunks), which is
    :data:`~wsi_lymph.constants.MAP_CHUNK_PX` at least for any block it divides.
    """
    preferred = MAP_CHUNK_PX if evaluation == PATCHES else FAST_CHUNK_PX
    return preferred if block_px is None else math.gcd(preferred, block_px)


def default_block_px(evaluation: str, chunk_px: int) -> int:
    """Edge of one inference task (model-frame px) when none is asked for.

    One chunk for the paper's patch networks (a 512² px block is already ~10 s of work for them), and about
    :data:`~wsi_lymph.constants.FAST_BLOCK_PX`, in whole chunks, for fully convolutional models, ~2,000x cheaper
    per pixel: smaller blocks leave the scheduler's per-task cost a large share of the work (BENCHMARKS.md, task
    granularity).
    """
    if evaluation == PATCHES:
        return chunk_px
    return max(chunk_px, FAST_BLOCK_PX // chunk_px * chunk_px)


@dataclass
class SlideResult:
    """Outcome of one slide of a batch."""

    path: str
    name: str
    status: str = "pending"  # "done" or "failed"
    reason: str = ""
    output: str = ""
    blocks_total: int = 0
    blocks_skipped: int = 0
    patches: int = 0
    hematoxylin_mm2: float = 0.0  # analysed area with hematoxylin (cells above the threshold)
    tissue_mm2: float = 0.0  # analysed area that is tissue rather than glass
    seconds: dict = field(default_factory=dict)
    blocks_resumed: int = 0  # finished before an interruption, not recomputed
    reused: bool = False  # the map was already complete in the output folder
    # Why the input or the results look doubtful (a stain unlike H&E, an impossible density, a lattice of
    # centres); the slide is analysed, and summary.json, batch.json and the console say so.
    flags: list[str] = field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        return self.blocks_skipped / self.blocks_total if self.blocks_total else 0.0


@dataclass(frozen=True)
class PeakOptions:
    """Peak detection after the map (``wsi-lymph detect``); None in a batch means maps only.

    Attributes
    ----------
    threshold : float or None
        Threshold on smoothed P; None = the model's own (0.7706 for the paper's).
    peak_block_px : int
        Edge of one ``peaks`` task in model-frame pixels (rounded to whole map chunks).
    hotspot_mm2 : float
        Area of the hotspot field, mm² (:mod:`wsi_lymph.detection.hotspot`).
    density_bin_um : float or None
        Bin edge of ``density.png``, µm; None = :func:`wsi_lymph.io.pictures.density_bin_um`'s choice.
    """

    threshold: float | None = None
    peak_block_px: int = PEAK_BLOCK_PX
    hotspot_mm2: float = HOTSPOT_FIELD_MM2
    density_bin_um: float | None = None


# ------------------------------------------------------------------ what a finished slide was made with
def map_settings(attrs: dict, shape_rc: tuple[int, int]) -> dict[str, tuple[object, str]]:
    """The settings that decide a map's values, read from its ``wsi_lymph`` attributes.

    The batch compares those of a map on disk with those of the map it is asked for
    (both from :func:`wsi_lymph.engine.batch.map_attributes`): a finished slide is taken
    over only when they are equal.  Settings that do not change the values are left out
    (block and chunk sizes, batch size, device, threads: maps are identical for any of
    them, see docs/architecture.md), and so are those a model's evaluation ignores (the
    stride for fully convolutional models, mirroring for the sub-pixel student).

    Parameters
    ----------
    attrs : dict
        A map's ``wsi_lymph`` attributes.
    shape_rc : (int, int)
        The map's shape (model-frame pixels).

    Returns
    -------
    dict
        ``{option: (value compared, value as the user would write it)}``.
    """
    params, model = attrs["params"], attrs["model"]
    evaluation = model.get("evaluation", PATCHES)
    region = params.get("region_level0")
    norm = params.get("stain_norm", "auto")
    settings: dict[str, tuple[object, str]] = {
        "--model": (tuple(model["sha256"]), f"--model {model['name']}"),
        "slide": ((tuple(attrs["level0_size_xy"]), attrs.get("slide_fingerprint")),
                  "a {} x {} px slide".format(*attrs["level0_size_xy"])
                  + (f" (file fingerprint {attrs['slide_fingerprint']})" if attrs.get("slide_fingerprint")
                     else " (file not fingerprinted)")),
        "--mpp": (attrs["mpp"], f"--mpp {attrs['mpp']:g}"),
        "--region": ((tuple(attrs["origin_rc"]), tuple(shape_rc)),
                     "--region " + ",".join(map(str, region)) if region else "the whole slide"),
        "--stain-norm": (model.get("stain_norm", "none") if norm == "auto" else norm,
                         f"--stain-norm {model.get('stain_norm', 'none') if norm == 'auto' else norm}"),
        "--dtype": (params["dtype"], f"--dtype {params['dtype']}"),
        "--no-skip": ((params["skip_hematoxylin"], params["hematoxylin_threshold_od"], params["mask_mpp"],
                       params["margin_um"]) if params["skip_hematoxylin"] else False,
                      "no --no-skip" if params["skip_hematoxylin"] else "--no-skip"),
        "results version": (attrs.get("results_version"),
                            f"wsi-lymph {attrs.get('version', '?')} (results version "
                            f"{attrs.get('results_version', 'not recorded')})"),
    }
    if evaluation == PATCHES:
        settings["--stride"] = (params["stride_px"], f"--stride {params['stride_px']}")
    if evaluation != SUBPIXEL:
        settings["--mirror"] = (params["mirror"], "--mirror" if params["mirror"] else "no --mirror")
    return settings


def settings_difference(finished: dict[str, tuple[object, str]], asked: dict[str, tuple[object, str]]
                        ) -> tuple[str, str] | None:
    """What differs between two :func:`map_settings`, as (finished, asked) phrases; None if nothing does."""
    differing = [key for key in asked if finished.get(key, (None,))[0] != asked[key][0]]
    if not differing:
        return None
    old = [finished[key][1] if key in finished else f"{key} unknown" for key in differing]
    new = [asked[key][1] for key in differing]
    if "--model" in differing and finished["--model"][1] == asked["--model"][1]:  # same name, other files
        old[differing.index("--model")] += f" (sha256 {finished['--model'][0][0][:12]})"
        new[differing.index("--model")] += f" (sha256 {asked['--model'][0][0][:12]})"
    return ", ".join(old), ", ".join(new)
