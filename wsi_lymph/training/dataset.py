"""Annotated data sets: H&E images with the pixel of each lymphocyte centre marked.

A data set is one folder (not searched recursively).  Each image's layout is
detected on its own, so one folder may mix them:

``paper``
    The layout of Janowczyk & Madabhushi (2016): image ``im<ID>.tif`` and mask
    ``<ID>m.tif`` of the same size, RGBA, whose alpha (4th) channel is non-zero
    at the single pixel of each centre.  ``image_id`` is ``<ID>`` (``"12"`` for
    ``im12.tif``).  A greyscale mask (non-zero = centre) is accepted too.
``seed``
    Image ``<name>.<ext>`` and an 8-bit greyscale seed image ``<name>_seed.tif``
    (or ``.tiff``/``.png``) of the same size, non-zero at each centre (the layout
    of ``shared/data/lymph-centers``).  ``image_id`` is ``<name>``.
``csv``
    Image ``<name>.<ext>`` and a point list ``<name>.csv`` with columns ``x`` and
    ``y`` (other columns are ignored): pixel coordinates with ``x`` = column and
    ``y`` = row, the centre of the top-left pixel at (0, 0) (the convention of
    wsi-lymph's own ``centers.csv``); each point is rounded to the nearest pixel.
    ``image_id`` is ``<name>``.

Images are ``.tif``/``.tiff``/``.png``/``.jpg``/``.jpeg``, RGB uint8 (an alpha
channel or a palette is dropped/expanded; greyscale and 16-bit images are
refused, the detector needs H&E colour).  Names starting with ``.`` are ignored
(temporary files of :func:`write_paper_image`), and so are other files.

The image id is also the patient id for cross-validation: the paper's data set
has one image per patient.  Centres are returned as (row, col) int64 pixel
indices, unique and sorted in row-major order (the order of ``np.argwhere`` on
the mask), whatever the layout, so one data set written in two layouts reads
back identically.

:func:`read_dataset` raises :class:`DatasetError` on the first problem (an image
without annotation, an annotation without image, an annotation of another size,
an unreadable file, a CSV without ``x``/``y``, a centre outside its image, two
annotations for one image, two images with one id); an empty annotation is
allowed (an image may hold no lymphocyte).  :func:`check_dataset` collects every
problem without raising.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_lymph.io.outputs import write_atomic

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
SEED_SUFFIXES = (".tif", ".tiff", ".png")
TIFF_SUFFIXES = (".tif", ".tiff")
# The paper names images ``im<ID>.tif`` and masks ``<ID>m.tif``; ids of masks found
# without their image are only recognised as masks when numeric, as in the paper,
# so that an image that happens to be called e.g. ``bottom.tif`` is not taken for one.
_PAPER_IMAGE = re.compile(r"^im(?P<id>[^.]+)\.tiff?$", re.IGNORECASE)
_PAPER_MASK_NUMERIC = re.compile(r"^(?P<id>\d+)m\.tiff?$", re.IGNORECASE)
_SEED = re.compile(r"^(?P<name>[^.]+)_seed\.(tiff?|png)$", re.IGNORECASE)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

#: Problem kinds, in the order a report lists them; ``empty_annotation`` is a warning, the rest are errors.
ERROR_KINDS = ("missing_annotation", "missing_image", "size_mismatch", "unreadable", "invalid", "ambiguous")
WARNING_KINDS = ("empty_annotation",)


class DatasetError(ValueError):
    """A data-set file is missing, unreadable or inconsistent.

    Parameters
    ----------
    path : str or os.PathLike
        The file at fault (or the folder, for problems of the whole data set).
    problem : str
        What is wrong, in words.
    kind : str
        One of :data:`ERROR_KINDS`; :func:`check_dataset` files the problem under it.

    The message is ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike, problem: str, kind: str = "invalid"):
        self.path = Path(path)
        self.problem = problem
        self.kind = kind
        super().__init__(f"{os.fspath(path)}: {problem}")


@dataclass(frozen=True, eq=False)
class AnnotatedImage:
    """One H&E image and its annotated lymphocyte centres.

    Attributes
    ----------
    image_id : str
        ``"12"`` for ``im12.tif``, the file stem in the other layouts; also the patient id for cross-validation.
    image_path : Path
        The image file.
    rgb : np.ndarray
        (H, W, 3) uint8 image, rows first.
    centers_rc : np.ndarray
        (n, 2) int64 (row, col) pixel indices of the annotated centres, unique, in row-major order; n may be 0.
    annotation_path : Path or None
        The mask, seed image or CSV the centres came from.
    layout : str
        ``"paper"``, ``"seed"`` or ``"csv"`` (see the module docstring); ``""`` when built in memory.
    """

    image_id: str
    image_path: Path
    rgb: np.ndarray
    centers_rc: np.ndarray
    annotation_path: Path | None = None
    layout: str = ""

    @property
    def shape_hw(self) -> tuple[int, int]:
        """(rows, cols) of the image in pixels."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def mask(self) -> np.ndarray:
        """(H, W) uint8 centre mask, 1 at each centre pixel (see :func:`center_mask`)."""
        return center_mask(self.shape_hw, self.centers_rc)


@dataclass(frozen=True)
class DatasetIssue:
    """One problem found by :func:`check_dataset`: the file at fault and what is wrong with it."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{os.fspath(self.path)}: {self.problem}"


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found in a data-set folder.

    Attributes
    ----------
    path : Path
        The folder checked.
    images : int
        Images found (with or without a usable annotation).
    centers : int
        Annotated centres over the images that could be read completely.
    missing_annotation, missing_image, size_mismatch, unreadable, invalid, ambiguous : list of DatasetIssue
        Errors: :func:`read_dataset` would refuse the folder because of any of them.  ``invalid`` holds bad
        contents (a CSV without ``x``/``y`` or with non-numbers, a centre outside its image, an image that is not
        RGB uint8, a mask of the wrong shape); ``ambiguous`` two annotations for one image or two images with one id.
    empty_annotation : list of DatasetIssue
        Warnings: images whose annotation marks no centre (allowed, but worth a look).
    """

    path: Path
    images: int = 0
    centers: int = 0
    missing_annotation: list[DatasetIssue] = field(default_factory=list)
    missing_image: list[DatasetIssue] = field(default_factory=list)
    size_mismatch: list[DatasetIssue] = field(default_factory=list)
    unreadable: list[DatasetIssue] = field(default_factory=list)
    invalid: list[DatasetIssue] = field(default_factory=list)
    ambiguous: list[DatasetIssue] = field(default_factory=list)
    empty_annotation: list[DatasetIssue] = field(default_factory=list)

    @property
    def errors(self) -> list[DatasetIssue]:
        """Every error, in the order of :data:`ERROR_KINDS`."""
        return [issue for kind in ERROR_KINDS for issue in getattr(self, kind)]

    @property
    def warnings(self) -> list[DatasetIssue]:
        """Every warning (empty annotations)."""
        return [issue for kind in WARNING_KINDS for issue in getattr(self, kind)]

    @property
    def ok(self) -> bool:
        """True when :func:`read_dataset` would read the folder (warnings allowed)."""
        return not self.errors

    def lines(self) -> list[str]:
        """The report as lines of text for people: a summary line, then one line per problem."""
        verdict = "OK" if self.ok else f"{len(self.errors)} error(s)"
        lines = [f"{os.fspath(self.path)}: {self.images} image(s), {self.centers} centre(s); {verdict}, "
                 f"{len(self.warnings)} warning(s)"]
        for kind in ERROR_KINDS + WARNING_KINDS:
            level = "warning" if kind in WARNING_KINDS else "error"
            lines.extend(f"  {level} [{kind}] {issue}" for issue in getattr(self, kind))
        return lines

    def format(self) -> str:
        """The report as one string (:meth:`lines` joined by newlines)."""
        return "\n".join(self.lines())

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class _Entry:
    """An image found by the folder scan and the annotation that goes with it."""

    image_id: str
    image_path: Path
    annotation_path: Path
    layout: str


def center_mask(shape_hw: tuple[int, int], centers_rc: np.ndarray) -> np.ndarray:
    """A mask with the pixel of each centre set.

    Parameters
    ----------
    shape_hw : (int, int)
        (rows, cols) of the image in pixels.
    centers_rc : np.ndarray
        (n, 2) integer (row, col) pixel indices.

    Returns
    -------
    np.ndarray
        (rows, cols) uint8, 1 at each centre and 0 elsewhere.

    Raises
    ------
    ValueError
        If a centre is not an integer pixel index inside the image.
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    centers = _integer_centers(centers_rc)
    _check_inside(centers, (height, width))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[centers[:, 0], centers[:, 1]] = 1
    return mask


def write_paper_image(directory: str | os.PathLike, image_id: str, rgb: np.ndarray,
                      centers_rc: np.ndarray) -> tuple[Path, Path]:
    """Write one image in the paper's layout: ``im<ID>.tif`` and its RGBA mask ``<ID>m.tif``.

    The mask has the image's size; its alpha channel is 255 at each centre pixel and 0 elsewhere, its RGB channels
    are 0.  Each file is written under a temporary hidden name and moved into place with :func:`os.replace`, so a
    reader never sees half a file; the mask is moved first, so an image never appears without its mask.

    Parameters
    ----------
    directory : str or os.PathLike
        Folder to write into (created if missing).
    image_id : str
        Letters, digits, ``_`` and ``-``, starting with a letter or digit; the paper's ids are numbers (``"12"``).
    rgb : np.ndarray
        (H, W, 3) uint8 image, rows first.
    centers_rc : np.ndarray
        (n, 2) integer (row, col) pixel indices of the centres.

    Returns
    -------
    (Path, Path)
        The image and the mask paths.
    """
    if not isinstance(image_id, str) or not _ID.match(image_id):
        raise ValueError(f"image id {image_id!r}: use letters, digits, '_' and '-' (the paper's ids are numbers)")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image {image_id}: expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    mask = center_mask(rgb.shape[:2], centers_rc)
    rgba = np.zeros(rgb.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., 3] = mask * np.uint8(255)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = directory / f"im{image_id}.tif", directory / f"{image_id}m.tif"
    for path, data in ((mask_path, rgba), (image_path, rgb)):
        write_atomic(path, lambda tmp, data=data: tifffile.imwrite(tmp, data, photometric="rgb"))
    return image_path, mask_path


def read_dataset(path: str | os.PathLike) -> list[AnnotatedImage]:
    """Every annotated image of a data-set folder (layouts: see the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The folder.

    Returns
    -------
    list of AnnotatedImage
        In natural order of image id (``"2"`` before ``"10"``).

    Raises
    ------
    DatasetError
        On the first problem found; its message names the file and the problem.  A folder without images is one.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(folder, "not a folder", kind="unreadable")
    entries, issues, _ = _scan(folder)
    if issues:
        raise issues[0]
    if not entries:
        raise DatasetError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) with annotations found",
                           kind="missing_image")
    return [_load(entry) for entry in entries]


def check_dataset(path: str | os.PathLike) -> DatasetReport:
    """Check a data-set folder and collect every problem instead of raising.

    Parameters
    ----------
    path : str or os.PathLike
        The folder.

    Returns
    -------
    DatasetReport
        Counts, errors (what :func:`read_dataset` would refuse) and warnings (empty annotations); print
        ``report.format()`` for people, test ``report.ok`` in programs.
    """
    folder = Path(path)
    report = DatasetReport(path=folder)
    if not folder.is_dir():
        report.unreadable.append(DatasetIssue(folder, "not a folder"))
        return report
    entries, issues, report.images = _scan(folder)
    for issue in issues:
        _file(report, issue)
        if issue.kind == "missing_annotation":  # an image without annotation may not even be readable: say so too
            try:
                _read_array(issue.path, rgb=True)
            except DatasetError as error:
                _file(report, error)
    if report.images == 0 and not issues:
        report.missing_image.append(DatasetIssue(folder, "no images found"))
    for entry in entries:
        try:
            image = _load(entry)
        except DatasetError as error:
            _file(report, error)
            continue
        report.centers += len(image.centers_rc)
        if len(image.centers_rc) == 0:
            report.empty_annotation.append(DatasetIssue(entry.annotation_path, "marks no centre"))
    return report


# --- internals ---------------------------------------------------------------------------------------------------


def _file(report: DatasetReport, error: DatasetError) -> None:
    kind = error.kind if error.kind in ERROR_KINDS else "invalid"
    getattr(report, kind).append(DatasetIssue(error.path, error.problem))


def _scan(folder: Path) -> tuple[list[_Entry], list[DatasetError], int]:
    """Pair the images of ``folder`` with their annotations.

    Returns the pairs (in natural id order), the problems of pairing (returned, not raised) and the number of
    images found, paired or not.  Names are taken in natural order (``tifffile.natural_sorted``: ``"im2"``
    before ``"im10"``).
    """
    files = {p.name: p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()}
    images = tifffile.natural_sorted(name for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    candidates = _annotation_candidates(images, files)
    claimed = {annotation for found in candidates.values() for _, annotation, _ in found}
    entries, issues, n_images = _pair(images, files, candidates, claimed)
    issues += _orphaned_annotations(files, candidates, claimed)
    by_id = {entry.image_id: entry for entry in entries}  # unique: _pair drops ids used twice
    return [by_id[image_id] for image_id in tifffile.natural_sorted(by_id)], issues, n_images


def _annotation_candidates(images: list[str], files: dict[str, Path]) -> dict[str, list[tuple[str, str, str]]]:
    """Per image name, the annotations found for it as (layout, annotation name, image id); names match any case."""
    lower = {name.lower(): name for name in files}

    def find(*names: str) -> list[str]:
        return [lower[n.lower()] for n in names if n.lower() in lower]

    candidates: dict[str, list[tuple[str, str, str]]] = {}
    for name in images:
        stem = name.rsplit(".", 1)[0]
        found: list[tuple[str, str, str]] = []
        paper = _PAPER_IMAGE.match(name)
        if paper:
            found += [("paper", m, paper["id"]) for m in find(f"{paper['id']}m.tif", f"{paper['id']}m.tiff")]
        found += [("seed", s, stem) for s in find(*(f"{stem}_seed{suffix}" for suffix in SEED_SUFFIXES))]
        found += [("csv", c, stem) for c in find(f"{stem}.csv")]
        candidates[name] = found
    return candidates


def _pair(images: list[str], files: dict[str, Path], candidates: dict[str, list[tuple[str, str, str]]],
          claimed: set[str]) -> tuple[list[_Entry], list[DatasetError], int]:
    """Images with exactly one annotation and an id of their own; the problems of the others; images counted."""
    by_id: dict[str, list[Path]] = {}
    entries: list[_Entry] = []
    issues: list[DatasetError] = []
    n_images = 0
    for name in images:
        if name in claimed:  # a mask or seed image, not an image of the data set
            continue
        found = candidates[name]
        if not found and (_SEED.match(name) or _PAPER_MASK_NUMERIC.match(name)):
            continue  # an annotation whose image is missing: reported by _orphaned_annotations, not as an image
        n_images += 1
        if not found:
            issues.append(DatasetError(files[name], "image without annotation (looked for "
                                       + _expected_annotations(name) + ")", kind="missing_annotation"))
            continue
        if len(found) > 1:
            issues.append(DatasetError(files[name], "more than one annotation: "
                                       + ", ".join(annotation for _, annotation, _ in found), kind="ambiguous"))
            continue
        layout, annotation, image_id = found[0]
        by_id.setdefault(image_id, []).append(files[name])
        entries.append(_Entry(image_id, files[name], files[annotation], layout))
    for image_id, paths in by_id.items():
        if len(paths) > 1:
            issues.append(DatasetError(paths[0], f"image id {image_id!r} also used by "
                                       + ", ".join(p.name for p in paths[1:]), kind="ambiguous"))
    return [entry for entry in entries if len(by_id[entry.image_id]) == 1], issues, n_images


def _orphaned_annotations(files: dict[str, Path], candidates: dict[str, list[tuple[str, str, str]]],
                          claimed: set[str]) -> list[DatasetError]:
    """Seed images and paper masks whose image is missing: the data set is incomplete.

    CSV files are left alone, they are too common (fold lists, results) to be taken for orphaned annotations.
    """
    issues = []
    for name in tifffile.natural_sorted(files):
        if name in claimed or candidates.get(name):
            continue
        seed, paper_mask = _SEED.match(name), _PAPER_MASK_NUMERIC.match(name)
        if seed:
            issues.append(DatasetError(files[name], f"seed image without its image {seed['name']}.<"
                                       + "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES) + ">", kind="missing_image"))
        elif paper_mask:
            issues.append(DatasetError(files[name], f"mask without its image im{paper_mask['id']}.tif",
                                       kind="missing_image"))
    return issues


def _expected_annotations(image_name: str) -> str:
    stem = image_name.rsplit(".", 1)[0]
    names = [f"{stem}_seed.tif", f"{stem}.csv"]
    paper = _PAPER_IMAGE.match(image_name)
    if paper:
        names.insert(0, f"{paper['id']}m.tif")
    return ", ".join(names)


def _load(entry: _Entry) -> AnnotatedImage:
    """Read one image and its annotation; every problem becomes a :class:`DatasetError`."""
    rgb = _as_rgb(_read_array(entry.image_path, rgb=True), entry.image_path)
    shape_hw = rgb.shape[:2]
    if entry.layout == "csv":
        centers = _read_csv_centers(entry.annotation_path, shape_hw)
    else:
        mask = _read_array(entry.annotation_path, rgb=False)
        mask = _mask_plane(mask, entry.annotation_path, entry.layout)
        if mask.shape != shape_hw:
            raise DatasetError(entry.annotation_path, f"annotation is {mask.shape[0]} x {mask.shape[1]} px (rows x "
                               f"cols) but its image {entry.image_path.name} is {shape_hw[0]} x {shape_hw[1]} px",
                               kind="size_mismatch")
        centers = np.argwhere(mask != 0).astype(np.int64).reshape(-1, 2)
    return AnnotatedImage(entry.image_id, entry.image_path, rgb, centers, entry.annotation_path, entry.layout)


def _read_array(path: Path, rgb: bool) -> np.ndarray:
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as image:
                # Palette images hold indices, not colours: expand them before anything looks at the values.
                if image.mode == "P":
                    image = image.convert("RGBA" if rgb else "L")
                array = np.asarray(image)
    except Exception as error:  # readers raise many types (OSError, ValueError, TiffFileError, PIL errors)
        raise _unreadable(path, error) from error
    if array.size == 0:  # tifffile returns an empty array, with a logged warning, for a TIFF without pages
        raise DatasetError(path, "cannot read the file (no image data in it)", kind="unreadable")
    return array


def _unreadable(path: Path, error: Exception) -> DatasetError:
    return DatasetError(path, f"cannot read the file ({type(error).__name__}: {error})", kind="unreadable")


def _as_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    # Some TIFF writers store planar (3, H, W) data; tifffile returns it as stored.
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise DatasetError(path, f"expected an RGB uint8 image, got shape {image.shape} {image.dtype}", kind="invalid")
    return np.ascontiguousarray(image[..., :3])


def _mask_plane(mask: np.ndarray, path: Path, layout: str) -> np.ndarray:
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if layout == "paper" and mask.ndim == 3 and mask.shape[2] == 4:
        return mask[..., 3]  # the paper's masks mark centres in the alpha channel
    if mask.ndim != 2:
        expected = "an RGBA mask (centres in alpha) or a greyscale one" if layout == "paper" else "greyscale"
        raise DatasetError(path, f"expected {expected}, got shape {mask.shape}", kind="invalid")
    return mask


def _read_csv_centers(path: Path, shape_hw: tuple[int, int]) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
            reader = csv.reader(handle)
            header = next(reader, None)
            columns = {name.strip().lower(): index for index, name in enumerate(header or [])}
            if "x" not in columns or "y" not in columns:
                raise DatasetError(path, f"a point list needs 'x' and 'y' columns, found {header or 'no header'}",
                                   kind="invalid")
            points = []
            for line, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                try:
                    x, y = float(row[columns["x"]]), float(row[columns["y"]])
                except (IndexError, ValueError):
                    problem = f"line {line}: x and y must be numbers, got {row}"
                    raise DatasetError(path, problem, kind="invalid") from None
                if not (math.isfinite(x) and math.isfinite(y)):
                    raise DatasetError(path, f"line {line}: x and y must be finite, got {row}", kind="invalid")
                points.append((y, x))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise _unreadable(path, error) from error
    # Round half up (floor(v + 0.5)), not numpy's half-to-even, so 2.5 and 3.5 both move the same way.
    centers = np.floor(np.asarray(points, dtype=float).reshape(-1, 2) + 0.5).astype(np.int64)
    outside = (centers < 0).any(axis=1) | (centers[:, 0] >= shape_hw[0]) | (centers[:, 1] >= shape_hw[1])
    if outside.any():
        y, x = np.asarray(points)[np.argmax(outside)]
        raise DatasetError(path, f"{int(outside.sum())} centre(s) outside the {shape_hw[0]} x {shape_hw[1]} px image, "
                           f"first at x={x:g}, y={y:g}", kind="invalid")
    # Unique and row-major, like np.argwhere on a mask, so every layout gives the same array for the same centres.
    return np.unique(centers, axis=0).reshape(-1, 2)


def _integer_centers(centers_rc: np.ndarray) -> np.ndarray:
    centers = np.asarray(centers_rc)
    if centers.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centres must be an (n, 2) array of (row, col), got shape {centers.shape}")
    integral = np.issubdtype(centers.dtype, np.integer) or (
        np.issubdtype(centers.dtype, np.floating) and np.all(np.isfinite(centers))
        and np.array_equal(centers, np.round(centers)))
    if not integral:
        raise ValueError("centres must be integer (row, col) pixel indices")
    return centers.astype(np.int64)


def _check_inside(centers: np.ndarray, shape_hw: tuple[int, int]) -> None:
    outside = (centers < 0).any(axis=1) | (centers[:, 0] >= shape_hw[0]) | (centers[:, 1] >= shape_hw[1])
    if outside.any():
        raise ValueError(f"{int(outside.sum())} centre(s) outside the {shape_hw[0]} x {shape_hw[1]} px image, "
                         f"first at (row, col) = {tuple(int(v) for v in centers[np.argmax(outside)])}")
