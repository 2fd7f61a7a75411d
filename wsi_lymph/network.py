"""The paper's 32x32 patch network and exact patch-by-patch evaluation.

The network is the Caffe "CIFAR10 quick" variant used by Janowczyk & Madabhushi
(2016): three 5x5 convolutions with max/avg/avg pooling (Caffe rounds pooled
sizes up, hence ``ceil_mode=True``) and two fully connected layers.  Inputs are
BGR pixel values on a 0-255 scale minus the fold's 3x32x32 mean image; output
class 1 is "lymphocyte center".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PATCH_PX = 32
#: Index of the classified pixel inside its patch (rows r-16 ... r+15).
PATCH_CENTER_PX = 16
#: Multiply-adds x 2 for one 32x32 patch (conv1 4.9M, conv2 13.1M, conv3 6.6M, ip 0.1M).
FLOPS_PER_PATCH = 24.7e6


class PatchNet(nn.Module):
    """Janowczyk & Madabhushi (2016) lymphocyte patch classifier.

    Input: float tensor (N, 3, 32, 32), BGR, 0-255 minus the mean image.
    Output: logits (N, 2); softmax column 1 is P(lymphocyte center).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1 = nn.Linear(64 * 4 * 4, 64)
        self.ip2 = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe order: conv1 -> pool1(max) -> relu1; conv2 -> relu2 -> pool2(avg); ...
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        # No nonlinearity after ip1 in the original prototxt.
        return self.ip2(self.ip1(torch.flatten(x, 1)))


def patch_probabilities(
    net: PatchNet,
    patches_bgr: torch.Tensor,
    mean_bgr: torch.Tensor,
    *,
    mirror: bool = False,
) -> torch.Tensor:
    """P(lymphocyte) for a batch of patches.

    Parameters
    ----------
    net : PatchNet
        Network in eval mode, on the device of ``patches_bgr``.
    patches_bgr : torch.Tensor
        (N, 3, 32, 32) float32, BGR, 0-255 (mean not yet subtracted).
    mean_bgr : torch.Tensor
        (3, 32, 32) float32 mean image of the fold.
    mirror : bool
        Average with the horizontally mirrored patch, as Caffe's
        ``Classifier.predict(oversample=True)`` did for 32x32 inputs.

    Returns
    -------
    torch.Tensor
        (N,) float32 probabilities.
    """
    prob = torch.softmax(net(patches_bgr - mean_bgr), dim=1)[:, 1]
    if mirror:
        # Caffe mirrors the raw crop, then subtracts the (unmirrored) mean image.
        mirrored = torch.flip(patches_bgr, dims=[3]) - mean_bgr
        prob = 0.5 * (prob + torch.softmax(net(mirrored), dim=1)[:, 1])
    return prob


def patch_grid_probabilities(
    members: list[tuple[PatchNet, torch.Tensor]],
    padded_bgr: np.ndarray,
    *,
    stride_px: int = 1,
    mirror: bool = False,
    batch_size: int = 1024,
    device: str = "cpu",
) -> np.ndarray:
    """Classify the 32x32 patch around every ``stride_px``-th pixel of a window.

    Parameters
    ----------
    members : list of (PatchNet, mean image)
        One entry per fold; probabilities are averaged over members.
    padded_bgr : np.ndarray
        (rows, cols, 3) float32 BGR 0-255 image already padded so that the
        patch of grid point (i, j) is ``padded_bgr[i*s : i*s+32, j*s : j*s+32]``.
    stride_px : int
        Step between classified pixels, in pixels of ``padded_bgr``.
    mirror, batch_size, device
        See :func:`patch_probabilities`; ``device`` is a torch device string.

    Returns
    -------
    np.ndarray
        (n_rows, n_cols) float32 probabilities with
        ``n = (size - 32) // stride_px + 1`` along each axis.
    """
    # A strided view: (n_rows, n_cols, 3, 32, 32) without copying.
    windows = np.lib.stride_tricks.sliding_window_view(
        padded_bgr, (PATCH_PX, PATCH_PX), axis=(0, 1)
    )[::stride_px, ::stride_px]
    n_rows, n_cols = windows.shape[:2]
    n_patches = n_rows * n_cols
    out = np.empty(n_patches, dtype=np.float32)
    means = [mean.to(device) for _, mean in members]
    with torch.inference_mode():
        for start in range(0, n_patches, batch_size):
            # Only one batch of patches is ever materialised (fancy indexing copies).
            stop = min(start + batch_size, n_patches)
            rows, cols = np.divmod(np.arange(start, stop), n_cols)
            patches = windows[rows, cols]
            if len(patches) < batch_size:
                # Every pass gets the same batch size: CPU kernels may pick another
                # algorithm for other sizes, and the map must not depend on block layout.
                padding = np.zeros((batch_size - len(patches), *patches.shape[1:]), patches.dtype)
                patches = np.concatenate([patches, padding])
            # NHWC is ~1.8x faster than NCHW for these small convolutions on CPU (bench/).
            batch = torch.from_numpy(patches).to(device).contiguous(memory_format=torch.channels_last)
            total = sum(
                patch_probabilities(net, batch, mean, mirror=mirror)
                for (net, _), mean in zip(members, means, strict=True)
            )
            out[start:stop] = (total / len(members))[: stop - start].cpu().numpy()
    return out.reshape(n_rows, n_cols)
