"""The block inference kernel: P(lymphocyte centre) for a box of the model frame.

A block is read with the halo its patches need, resampled to the model frame,
and every ``stride_px``-th pixel's 32x32 patch is classified exactly as the
paper did (pixels in between are interpolated); networks registered for
fully convolutional evaluation (:mod:`wsi_lymph.models.architectures`) compute
every pixel at once, the fast student from 0.5 µm/px input pixels.  Maps are identical
for any block layout.  :mod:`wsi_lymph.engine.batch` runs one ``infer`` task
per block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from wsi_lymph.models.architectures import EVERY_PIXEL, SUBPIXEL, architecture_of
from wsi_lymph.models.checkpoints import load_checkpoint_members
from wsi_lymph.models.device import exact_cuda_numerics, reuse_freed_memory, select_device
from wsi_lymph.models.networks import (
    STUDENT_UPSCALE,
    dense_probabilities,
    patch_grid_probabilities,
    subpixel_probabilities,
)
from wsi_lymph.slides.frame import (
    ModelFrame,
    coarser_frame,
    interpolate_grid,
    patch_rows,
    read_frame_window,
    stride_grid,
)
from wsi_lymph.slides.reader import SlideInfo
from wsi_lymph.slides.resample import resize_window, resized_length, symmetric_index


# ------------------------------------------------------------------ one block
@functools.lru_cache(maxsize=4)
def _members(checkpoints: tuple[str, ...], device: str):
    """Networks of a model, loaded once per worker process and device."""
    reuse_freed_memory()  # before the first forward pass: the process's batches then reuse one heap
    loaded = [load_checkpoint_members(path, device=device)[0] for path in checkpoints]
    return [(net.to(memory_format=torch.channels_last), mean) for members in loaded for net, mean in members]


#: ``read_window(rows, cols, coarsen)`` -> (len(rows), len(cols), 3) float32 BGR 0-255 pixels of the model frame
#: coarsened ``coarsen`` times (1: model-frame pixels; 4: the 0.5 µm/px input of a sub-pixel network), indices
#: outside the frame mirrored.
WindowReader = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def window_probabilities(
    read_window: WindowReader,
    box: tuple[int, int, int, int],
    members: list,
    *,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 512,
    device: str = "cpu",
) -> tuple[np.ndarray, int]:
    """P(lymphocyte center) for one model-frame box, as the model's networks give it.

    Parameters
    ----------
    read_window : WindowReader
        ``read_window(rows, cols, coarsen)``: see :data:`WindowReader`.
    box : (r0, r1, c0, c1)
        Model-frame rows ``r0:r1`` and columns ``c0:c1`` (global coordinates).
    members : list of (network, mean image)
        The model's members (probabilities are averaged); all of one architecture.  How
        the map is computed is the architecture's ``evaluation``
        (:mod:`wsi_lymph.models.architectures`): patch by patch (the paper's networks,
        exactly as the paper did), or fully convolutionally at every pixel (``stride_px``
        does not apply).
    stride_px : int
        Classify every ``stride_px``-th model-frame pixel along each axis and
        interpolate in between (1 = every pixel, exact).
    mirror : bool
        Average each patch with its horizontal mirror (the original's oversampling).
    batch_size : int
        Patches per forward pass (every pass is full, so results do not depend on the layout).
    device : str
        Torch device the members are on.

    Returns
    -------
    prob : np.ndarray
        (r1 - r0, c1 - c0) float32.
    patches : int
        Model-frame pixels classified (per member).
    """
    exact_cuda_numerics(device)
    evaluation = architecture_of(members[0][0]).evaluation
    if evaluation == SUBPIXEL:
        return _subpixel_box(read_window, box, members, device), (box[1] - box[0]) * (box[3] - box[2])
    r0, r1, c0, c1 = box
    if evaluation == EVERY_PIXEL:
        window = read_window(patch_rows(np.arange(r0, r1)), patch_rows(np.arange(c0, c1)), 1)
        prob = dense_probabilities(members, window, mirror=mirror, device=device)
        return prob, prob.size
    grid_r = stride_grid(r0, r1, stride_px)
    grid_c = stride_grid(c0, c1, stride_px)
    # The halo: 16 px before and 15 px after the first/last classified pixel.
    window = read_window(patch_rows(grid_r), patch_rows(grid_c), 1)
    grid_prob = patch_grid_probabilities(
        members, window, stride_px=stride_px, mirror=mirror, batch_size=batch_size, device=device
    )
    if stride_px == 1:
        return grid_prob, grid_prob.size
    return interpolate_grid(grid_prob, (grid_r, grid_c), box), grid_prob.size


def _subpixel_box(read_window: WindowReader, box: tuple[int, int, int, int], members: list, device: str) -> np.ndarray:
    """A sub-pixel network's map of ``box``: the input pixels covering it plus the halo, then the box cut out.

    Input pixel ``i`` holds model-frame pixels ``4 i ... 4 i + 3`` on the global grid, so every block
    computes each model-frame pixel from the same input pixels: blockwise maps equal the whole map.
    """
    up, halo = STUDENT_UPSCALE, max(net.halo_px for net, _ in members)
    r0, r1, c0, c1 = box
    i0, i1, j0, j1 = r0 // up, -(-r1 // up), c0 // up, -(-c1 // up)
    window = read_window(np.arange(i0 - halo, i1 + halo), np.arange(j0 - halo, j1 + halo), up)
    prob = subpixel_probabilities(members, window, device=device)
    return prob[r0 - i0 * up : r1 - i0 * up, c0 - j0 * up : c1 - j0 * up]


def slide_window_reader(info: SlideInfo, frame: ModelFrame,
                        pixel_transform: Callable[[np.ndarray], np.ndarray] | None = None) -> WindowReader:
    """The :data:`WindowReader` of a slide's model frame (see :func:`wsi_lymph.slides.frame.read_frame_window`)."""

    def read_window(rows: np.ndarray, cols: np.ndarray, coarsen: int) -> np.ndarray:
        read_frame = frame if coarsen == 1 else coarser_frame(frame, coarsen)
        return read_frame_window(info, read_frame, rows, cols, pixel_transform=pixel_transform)

    return read_window


def block_probabilities(
    info: SlideInfo,
    frame: ModelFrame,
    box: tuple[int, int, int, int],
    checkpoints: Sequence[str],
    *,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 512,
    device: str | None = None,
    torch_threads: int | None = None,
    pixel_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """:func:`window_probabilities` of one box of a slide's model frame, with a model given by its files.

    ``pixel_transform`` maps the slide's RGB pixels (uint8, (rows, cols, 3)) before they
    are resampled, e.g. a stain normalisation (:mod:`wsi_lymph.detection.stain`); it
    must act on each pixel alone so that blockwise maps still equal the whole map.
    """
    device = select_device(device)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return window_probabilities(
        slide_window_reader(info, frame, pixel_transform), box, _members(tuple(map(str, checkpoints)), device),
        stride_px=stride_px, mirror=mirror, batch_size=batch_size, device=device,
    )


def image_probabilities(
    rgb: np.ndarray,
    members: list,
    *,
    scale: float = 4.0,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """P(lymphocyte center) at every pixel of an in-memory image resized to the model frame.

    The same computation as a slide's map (:func:`window_probabilities`): MATLAB-style
    bicubic resize by ``scale`` (4 for a 20x image), symmetric mirroring at the border.

    Parameters
    ----------
    rgb : np.ndarray
        (rows, cols, 3) uint8 image at its scan resolution.
    members : list of (network, mean image)
        Networks in eval mode on ``device``.
    scale : float
        Model-frame pixels per image pixel.

    Returns
    -------
    np.ndarray
        (ceil(rows * scale), ceil(cols * scale)) float32 map; model-frame pixel (r, c)
        is image position ((r + 0.5) / scale - 0.5, (c + 0.5) / scale - 0.5).
    """
    shape = (resized_length(rgb.shape[0], scale), resized_length(rgb.shape[1], scale))

    def read_window(rows: np.ndarray, cols: np.ndarray, coarsen: int) -> np.ndarray:
        read_scale = scale / coarsen
        length = (resized_length(rgb.shape[0], read_scale), resized_length(rgb.shape[1], read_scale))
        rows, cols = symmetric_index(rows, length[0]), symmetric_index(cols, length[1])
        window = resize_window(rgb, (0, 0), rgb.shape[:2], rows, cols, read_scale)
        return np.ascontiguousarray(window[..., ::-1])  # RGB -> BGR, as the network expects

    prob, _ = window_probabilities(read_window, (0, shape[0], 0, shape[1]), members, stride_px=stride_px,
                                   mirror=mirror, batch_size=batch_size, device=device)
    return prob

