"""Synthetic H&E-like images with known lymphocyte centres, for tests and training smoke runs.

The images mimic 100 x 100 px crops of breast cancer at 20x (~0.5 µm/px), like the paper's data set:

* a pink eosin background with smooth blotches, stromal fibres and, sometimes, white gaps (lumen, fat);
* large (12-19 px long), paler, elongated and irregular tumour nuclei with grainy chromatin, a darker rim and
  nucleoli, and thin dark spindle-shaped stromal nuclei: the hard negatives, not annotated;
* small (8-10 px across), dark, round lymphocytes with a pale halo: the annotated cells, their centre pixel is
  the annotation; no two overlap, and no other nucleus overlaps them.

Colours come from a Beer-Lambert model: each pixel holds hematoxylin and eosin concentrations (optical densities)
that absorb along the stain vectors of ``skimage.color`` (Ruifrok & Johnston), so colour deconvolution
(``skimage.color.rgb2hed``) recovers more hematoxylin on nuclei than on background.  Each image gets its own
stain vectors, stain strengths and illumination (stain variation between slides), then a mild blur and noise.

The cue that separates lymphocytes from other nuclei is real (size, roundness, density) but not a single
threshold: some tumour nuclei are as narrow as a lymphocyte, nucleoli and spindle nuclei are as dark.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.color import rgb_from_hed

from wsi_lymph.io.outputs import write_json
from wsi_lymph.training.dataset import AnnotatedImage, write_paper_image

#: µm per pixel of the synthetic images (20x).
MPP = 0.5
#: Range of lymphocyte radii in pixels (7.6-10.4 px, i.e. ~4-5 µm, across at 0.5 µm/px).
LYMPHOCYTE_RADIUS_PX = (3.8, 5.2)
#: Lymphocytes per 100 x 100 px (scaled with the area for other sizes).
LYMPHOCYTES_PER_100PX = (5, 25)
#: Gap in pixels kept between the edges of two lymphocytes (their centres are >= r1 + r2 + gap apart).
LYMPHOCYTE_GAP_PX = 1.0
GENERATOR = "wsi-lymph synthetic"


def synthetic_image(rng: np.random.Generator, size_px: int = 100, *, n_lymphocytes: int | None = None,
                    n_tumour_nuclei: int | None = None, n_stromal_nuclei: int | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E-like image and the centres of its lymphocytes.

    Parameters
    ----------
    rng : np.random.Generator
        Source of all randomness: the same generator state gives the same image.
    size_px : int
        Width and height of the (square) image in pixels, at :data:`MPP` µm/px.
    n_lymphocytes : int, optional
        Lymphocytes to place; default: uniform in :data:`LYMPHOCYTES_PER_100PX` scaled by the area.  Fewer are
        placed when no room is left (they never overlap).
    n_tumour_nuclei, n_stromal_nuclei : int, optional
        Other nuclei (not annotated); defaults scale with the area like the lymphocytes.

    Returns
    -------
    rgb : np.ndarray
        (size_px, size_px, 3) uint8.
    centers_rc : np.ndarray
        (n, 2) int64 (row, col) pixel indices of the lymphocyte centres, row-major order.
    """
    size = int(size_px)
    if size < 16:
        raise ValueError(f"size_px must be at least 16, got {size_px}")
    area = size * size / 100.0**2
    if n_lymphocytes is None:
        low, high = LYMPHOCYTES_PER_100PX
        n_lymphocytes = int(rng.integers(round(low * area), round(high * area) + 1))
    if n_tumour_nuclei is None:
        n_tumour_nuclei = int(rng.integers(round(8 * area), round(18 * area) + 1))
    if n_stromal_nuclei is None:
        n_stromal_nuclei = int(rng.integers(round(2 * area), round(7 * area) + 1))

    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    fibre_angle = rng.uniform(0, np.pi)
    hema, eosin = _background(rng, size, fibre_angle)

    # Lymphocytes first, so the other nuclei can be kept off them.
    lymphocytes = _place_lymphocytes(rng, size, n_lymphocytes)
    nuclei_h = np.zeros_like(hema)  # hematoxylin of the nuclei, composited by maximum (overlaps do not add up)
    nucleus_cover = np.zeros_like(hema)  # 0..1: how much of a pixel a nucleus covers (nuclei hold little eosin)
    clearing = np.zeros_like(hema)  # 0..1: stain missing from the halo around lymphocytes
    for row, col, radius, density in lymphocytes:
        _draw_lymphocyte(rng, rows, cols, row, col, radius, density, nuclei_h, nucleus_cover, clearing)
    for _ in range(n_tumour_nuclei):
        _draw_other_nucleus(rng, rows, cols, lymphocytes, "tumour", fibre_angle, nuclei_h, nucleus_cover)
    for _ in range(n_stromal_nuclei):
        _draw_other_nucleus(rng, rows, cols, lymphocytes, "stromal", fibre_angle, nuclei_h, nucleus_cover)
    hema = np.maximum(hema * (1.0 - clearing), nuclei_h)
    eosin = eosin * (1.0 - clearing) * (1.0 - 0.7 * nucleus_cover)

    rgb = _render(rng, hema, eosin)
    centers = np.array([(int(r), int(c)) for r, c, _, _ in lymphocytes], dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((centers[:, 1], centers[:, 0]))
    return rgb, centers[order]


def make_synthetic_dataset(directory: str | os.PathLike, n_images: int = 10, size_px: int = 100, seed: int = 0,
                           *, exist_ok: bool = False) -> list[AnnotatedImage]:
    """Write a synthetic data set in the paper's layout and return it.

    Image ``k`` (1-based id ``"k"``) is drawn from ``np.random.default_rng([seed, k])``, so it does not depend on
    ``n_images``.  Beside the images, ``dataset.json`` records ``generator``, ``seed``, ``n_images``, ``size_px``,
    ``mpp`` (µm/px) and ``centers`` (total).

    Parameters
    ----------
    directory : str or os.PathLike
        Folder to write (created if missing).
    n_images : int
        Images to write, ids ``"1"`` ... ``str(n_images)``.
    size_px : int
        Width and height of each image in pixels.
    seed : int
        Seed of the whole data set.
    exist_ok : bool
        Write into a folder that already holds files (same names are replaced, other files are left, and
        :func:`~wsi_lymph.training.dataset.read_dataset` will see them); by default such a folder is refused.

    Returns
    -------
    list of AnnotatedImage
        In id order, equal to what :func:`~wsi_lymph.training.dataset.read_dataset` reads back from ``directory``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    directory = Path(directory)
    if not exist_ok and directory.is_dir() and any(not p.name.startswith(".") for p in directory.iterdir()):
        raise FileExistsError(f"{directory}: not empty; pass exist_ok=True to write into it anyway")
    images = []
    for index in range(1, n_images + 1):
        rgb, centers = synthetic_image(np.random.default_rng([seed, index]), size_px)
        image_id = str(index)
        image_path, mask_path = write_paper_image(directory, image_id, rgb, centers)
        images.append(AnnotatedImage(image_id, image_path, rgb, centers, mask_path, "paper"))
    write_json(directory / "dataset.json", {
        "generator": GENERATOR, "seed": seed, "n_images": n_images, "size_px": size_px, "mpp": MPP,
        "centers": int(sum(len(image.centers_rc) for image in images)),
    })
    return images


# --- internals ---------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _background(rng: np.random.Generator, size: int, fibre_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities of the tissue between nuclei."""
    # Fibres: noise stretched along one axis on a larger canvas, rotated to the fibre direction, cropped.
    big = int(np.ceil(size * 1.5)) + 8
    fibres = ndimage.gaussian_filter(rng.standard_normal((big, big)), (0.8, 7.0), mode="wrap")
    fibres = ndimage.rotate(fibres, np.degrees(fibre_angle), reshape=False, order=1, mode="wrap")
    start = (big - size) // 2
    fibres = fibres[start:start + size, start:start + size]
    fibres /= fibres.std() + 1e-12
    blotches = _smooth_noise(rng, (size, size), 10.0)
    grain = _smooth_noise(rng, (size, size), 0.7)  # granular cytoplasm and stroma
    eosin = rng.uniform(0.32, 0.55) * (1 + 0.18 * blotches + 0.08 * grain) + rng.uniform(0.02, 0.06) * fibres
    # Cytoplasm and stroma take up some hematoxylin too: the real crops are purple-pink, not pure pink.
    hema = rng.uniform(0.30, 0.55) * (1 + 0.15 * _smooth_noise(rng, (size, size), 6.0)) + 0.02 * fibres
    if rng.random() < 0.3:  # a white gap (lumen, fat): nearly no stain
        gap = _smooth_noise(rng, (size, size), size / 6) > rng.uniform(1.3, 1.9)
        gap = ndimage.gaussian_filter(gap.astype(float), 1.0)
        eosin = eosin * (1 - 0.9 * gap)
        hema = hema * (1 - 0.9 * gap)
    return np.clip(hema, 0, None), np.clip(eosin, 0, None)


def _place_lymphocytes(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, float, float]]:
    """(row, col, radius px, hematoxylin OD) of non-overlapping lymphocytes, centres at least 1 px inside."""
    placed: list[tuple[int, int, float, float]] = []
    attempts = 0
    while len(placed) < count and attempts < 200 * max(count, 1):
        attempts += 1
        radius = rng.uniform(*LYMPHOCYTE_RADIUS_PX)
        row, col = (int(v) for v in rng.integers(1, size - 1, size=2))
        if all(np.hypot(row - r, col - c) >= radius + q + LYMPHOCYTE_GAP_PX for r, c, q, _ in placed):
            placed.append((row, col, radius, rng.uniform(1.7, 2.4)))
    return placed


def _soft_inside(distance_ratio: np.ndarray, radius: float, edge_px: float = 0.7) -> np.ndarray:
    """0..1 coverage of a shape whose boundary is at ``distance_ratio == 1``, blurred over ~``edge_px`` px."""
    return np.clip((1.0 - distance_ratio) * radius / edge_px + 0.5, 0.0, 1.0)


def _draw_lymphocyte(rng, rows, cols, row, col, radius, density, nuclei_h, cover, clearing) -> None:
    # Nearly round: a slight ellipse, so roundness is a cue but not an exact one.
    ratio = rng.uniform(0.85, 1.0)
    angle = rng.uniform(0, np.pi)
    dr, dc = rows - row, cols - col
    u = dr * np.cos(angle) + dc * np.sin(angle)
    v = -dr * np.sin(angle) + dc * np.cos(angle)
    rho = np.hypot(u / radius, v / (radius * ratio))
    inside = _soft_inside(rho, radius)
    # Dense chromatin, a little mottled, slightly darker towards the centre.
    texture = 1 + 0.08 * rng.standard_normal(rows.shape) - 0.1 * np.clip(rho, 0, 1) ** 2
    np.maximum(nuclei_h, inside * density * texture, out=nuclei_h)
    np.maximum(cover, inside, out=cover)
    # The pale "halo" of lymphocytes in H&E (retraction around the cell): less stain just outside the nucleus,
    # from faint to nearly white.
    halo = np.exp(-((rho - 1.0) * radius / rng.uniform(1.0, 1.8)) ** 2) * (rho > 1.0)
    np.maximum(clearing, rng.uniform(0.15, 0.8) * halo, out=clearing)


def _draw_other_nucleus(rng, rows, cols, lymphocytes, kind, fibre_angle, nuclei_h, cover) -> None:
    size = rows.shape[0]
    if kind == "tumour":  # large, oval, irregular, vesicular (pale with a darker rim and nucleoli)
        a = rng.uniform(6.0, 9.5)
        b = a * rng.uniform(0.5, 0.85)
        angle = rng.uniform(0, np.pi)
        density = rng.uniform(0.8, 1.35)
    else:  # stromal (fibroblast): thin, spindle-shaped, dark, along the fibres
        a = rng.uniform(5.5, 9.0)
        b = rng.uniform(1.6, 2.6)
        angle = fibre_angle + rng.normal(0, 0.2)
        density = rng.uniform(1.3, 2.0)
    # Centre anywhere, even just off the image (real crops cut nuclei), but never over a lymphocyte.
    for _ in range(100):
        row, col = rng.uniform(-a / 2, size - 1 + a / 2, size=2)
        if all(np.hypot(row - r, col - c) >= a + q + 0.5 for r, c, q, _ in lymphocytes):
            break
    else:
        return
    dr, dc = rows - row, cols - col
    # Rows run down, so an angle measured from the row axis: u along the long axis, v across it.
    u = dr * np.cos(angle) + dc * np.sin(angle)
    v = -dr * np.sin(angle) + dc * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0, 0.07) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    rho = np.hypot(u / a, v / b) / wobble
    inside = _soft_inside(rho, b)
    if kind == "tumour":
        grain = ndimage.gaussian_filter(rng.standard_normal(rows.shape), 0.9)
        grain /= grain.std() + 1e-12
        h = density * (1 + 0.18 * grain) + 0.35 * np.exp(-((rho - 0.9) / 0.12) ** 2)  # chromatin, membrane
        for _ in range(int(rng.integers(0, 3))):  # nucleoli: small dark dots, as dark as a lymphocyte
            t, s = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
            nr = row + s * a * np.cos(angle) * np.cos(t) - s * b * np.sin(angle) * np.sin(t)
            nc = col + s * a * np.sin(angle) * np.cos(t) + s * b * np.cos(angle) * np.sin(t)
            h = h + rng.uniform(0.6, 1.0) * np.exp(-((rows - nr) ** 2 + (cols - nc) ** 2) / (2 * 0.9**2))
    else:
        h = density * (1 + 0.06 * rng.standard_normal(rows.shape))
    np.maximum(nuclei_h, inside * h, out=nuclei_h)
    np.maximum(cover, inside, out=cover)


def _render(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Beer-Lambert: RGB = white * exp(-(H * h_vector + E * e_vector)), then blur, noise and 8-bit rounding."""
    # Stain variation between slides: perturbed stain directions, stain strengths and illumination.
    vectors = rgb_from_hed[:2] + rng.normal(0, 0.04, size=(2, 3))
    vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    strength = rng.uniform(0.8, 1.2, size=2)
    white = rng.uniform(232, 252) + rng.normal(0, 3, size=3)
    od = (hema * strength[0])[..., None] * vectors[0] + (eosin * strength[1])[..., None] * vectors[1]
    rgb = white * np.exp(-od)
    # Optics and scanner: a mild blur, then sensor noise.
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.5, 0.9),) * 2 + (0,), mode="reflect")
    rgb = rgb + rng.normal(0, rng.uniform(1.5, 3.5), size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
