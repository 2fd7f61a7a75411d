"""The paper's 32x32 patch network, exact patch-by-patch evaluation, and a dense-exact variant.

The network is the Caffe "CIFAR10 quick" variant used by Janowczyk & Madabhushi
(2016): three 5x5 convolutions with max/avg/avg pooling (Caffe rounds pooled
sizes up, hence ``ceil_mode=True``) and two fully connected layers.  Inputs are
BGR pixel values on a 0-255 scale minus the fold's 3x32x32 mean image; output
class 1 is "lymphocyte center".

:class:`DensePatchNet` is a sibling network without position-dependent parts
(per-channel normalisation, valid convolutions, pooling that tiles exactly), so
the probability of every pixel of a window can be computed fully
convolutionally (:func:`dense_probabilities`) with the same result as
classifying each pixel's patch, at ~1/148 of PatchNet's arithmetic.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wsi_lymph.constants import PATCH_PX

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
    net: PatchNet | DensePatchNet,
    patches_bgr: torch.Tensor,
    mean_bgr: torch.Tensor,
    *,
    mirror: bool = False,
) -> torch.Tensor:
    """P(lymphocyte) for a batch of patches.

    Parameters
    ----------
    net : PatchNet or DensePatchNet
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
    members: list[tuple[PatchNet | DensePatchNet, torch.Tensor]],
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
    members : list of (PatchNet or DensePatchNet, mean image)
        One entry per fold; probabilities are averaged over members.  A
        DensePatchNet is evaluated patch by patch here (see
        :func:`dense_probabilities` for its fast path).
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


# ---------------------------------------------------------------------------------------------- dense-exact network



# Per classified pixel, dense path (multiply-adds x 2, borders of the window not counted):
#   conv1 3->32 5x5:  2 * 3 * 32 * 25  =   4,800
#   conv2 32->32 5x5: 2 * 32 * 32 * 25 =  51,200
#   conv3 32->64 5x5: 2 * 32 * 64 * 25 = 102,400
#   ip1 64->64:       2 * 64 * 64      =   8,192
#   ip2 64->2:        2 * 64 * 2       =     256
#   (pooling: 3 compares + 3 adds per channel, ~200, ignored)
# Every layer runs once per output pixel (stride 1 everywhere), whereas PatchNet recomputes
# each 32x32 patch from scratch: the ratio FLOPS_PER_PATCH / DENSE_FLOPS_PER_PIXEL is ~148.
#: Floating-point operations per output pixel of :meth:`DensePatchNet.dense_logits`.
DENSE_FLOPS_PER_PIXEL = 166.8e3
# The same network evaluated one patch at a time (:meth:`DensePatchNet.forward`):
#   conv1 28x28 x 4,800 = 3.76M; conv2 10x10 x 51,200 = 5.12M; conv3 1 x 102,400; ip 8,448.
#: Floating-point operations per 32x32 patch of :meth:`DensePatchNet.forward`.
DENSE_FLOPS_PER_PATCH = 8.99e6


class DensePatchNet(nn.Module):
    """A 32x32 patch classifier whose every-pixel evaluation is exactly fully convolutional.

    Unlike :class:`PatchNet` nothing depends on the position inside the patch:
    the input is normalised per channel (no mean *image*), convolutions are
    "valid" (no zero padding inside the patch) and pooling windows tile the
    feature maps exactly, so a 32x32 patch yields exactly one output::

        conv1 5x5 valid 3->32   32 -> 28
        pool1 max 2x2/2         28 -> 14, relu
        conv2 5x5 valid 32->32  14 -> 10, relu
        pool2 avg 2x2/2         10 -> 5
        conv3 5x5 valid 32->64   5 -> 1, relu
        ip1 1x1 conv 64->64 (no nonlinearity, as in the paper's ip1)
        ip2 1x1 conv 64->2; softmax column 1 is P(lymphocyte center)

    Inputs of both :meth:`forward` and :meth:`dense_logits` are BGR 0-255
    minus the per-channel mean (the checkpoint's ``mean_bgr``, constant over
    the 32x32 plane); the division by the per-channel standard deviation
    (buffer ``input_std``, shape (3,)) happens inside the network.

    Parameters
    ----------
    input_std : sequence of 3 floats
        Per-channel (B, G, R) standard deviation of training pixels, 0-255 scale.
    """

    def __init__(self, input_std: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5)
        self.conv2 = nn.Conv2d(32, 32, 5)
        self.conv3 = nn.Conv2d(32, 64, 5)
        self.ip1 = nn.Conv2d(64, 64, 1)
        self.ip2 = nn.Conv2d(64, 2, 1)
        self.register_buffer("input_std", torch.as_tensor(input_std, dtype=torch.float32).reshape(3))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.input_std.view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 2) of (N, 3, 32, 32) patches (BGR 0-255 minus the channel mean)."""
        x = F.relu(F.max_pool2d(self.conv1(self._scale(x)), 2, 2))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.conv3(x))
        return torch.flatten(self.ip2(self.ip1(x)), 1)

    def dense_logits(self, window: torch.Tensor) -> torch.Tensor:
        """Logits of the patch at every position of a window, fully convolutionally.

        Parameters
        ----------
        window : torch.Tensor
            (N, 3, H + 31, W + 31) float32, BGR 0-255 minus the channel mean.

        Returns
        -------
        torch.Tensor
            (N, 2, H, W) logits; ``[:, :, r, c]`` equals ``forward(window[:, :,
            r:r+32, c:c+32])`` up to float rounding.  The pixel classified at
            (r, c) is therefore window pixel (r + 16, c + 16)
            (:data:`PATCH_CENTER_PX`).

        Notes
        -----
        "A trous" evaluation: each stride-2 pooling becomes a stride-1 pooling,
        and every later layer is dilated by the product of the strides skipped
        so far (2 after pool1, 4 after pool2), so every output position sees
        exactly the samples its own patch would.  Sizes: H+31 -conv1-> H+27
        -pool1-> H+26 -conv2(d2)-> H+18 -pool2(d2)-> H+16 -conv3(d4)-> H.
        """
        if window.shape[-2] < PATCH_PX or window.shape[-1] < PATCH_PX:
            raise ValueError(f"window must be at least {PATCH_PX}x{PATCH_PX}, got {tuple(window.shape[-2:])}")
        x = self.conv1(self._scale(window))
        x = F.relu(F.max_pool2d(x, 2, 1))
        x = F.relu(F.conv2d(x, self.conv2.weight, self.conv2.bias, dilation=2))
        # 2x2 average pooling with dilation 2 (avg_pool2d has no dilation argument).
        x = (x[..., :-2, :-2] + x[..., :-2, 2:] + x[..., 2:, :-2] + x[..., 2:, 2:]) * 0.25
        x = F.relu(F.conv2d(x, self.conv3.weight, self.conv3.bias, dilation=4))
        return self.ip2(self.ip1(x))


def channel_mean(mean_bgr: torch.Tensor, *, atol: float = 1e-4) -> torch.Tensor:
    """The per-channel value of a (3, 32, 32) mean image that is constant per channel.

    Raises
    ------
    ValueError
        The mean image varies inside a channel: dense evaluation would not be
        exact (a position-dependent mean image is a PatchNet feature).
    """
    flat = mean_bgr.reshape(3, -1).to(torch.float32)
    per_channel = flat[:, 0]
    if not torch.allclose(flat, per_channel[:, None].expand_as(flat), rtol=0.0, atol=atol):
        raise ValueError("dense evaluation needs a mean image that is constant per channel")
    return per_channel


def _tile_starts(length: int, tile: int) -> list[tuple[int, int]]:
    """(start, size) of tiles covering ``range(length)``; the last tile is moved back to keep the size."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # overlaps its neighbour: same shape, same kernels
    return [(s, tile) for s in starts]


def dense_probabilities(
    members: list[tuple[DensePatchNet, torch.Tensor]],
    padded_bgr: np.ndarray,
    *,
    mirror: bool = False,
    device: str = "cpu",
    tile_px: int = 256,
) -> np.ndarray:
    """P(lymphocyte) of the 32x32 patch at every position of a window, fully convolutionally.

    The result equals :func:`patch_grid_probabilities` with ``stride_px=1``
    for the same members (up to float rounding, < 1e-5) at ~1/148 of its
    arithmetic for the network (see :data:`DENSE_FLOPS_PER_PIXEL`).

    Parameters
    ----------
    members : list of (DensePatchNet, mean image)
        One entry per fold; the (3, 32, 32) mean image must be constant per
        channel.  Probabilities are averaged over members.  Networks in eval
        mode on ``device``.
    padded_bgr : np.ndarray
        (rows, cols, 3) float32 BGR 0-255, already padded so that the patch of
        output (i, j) is ``padded_bgr[i : i+32, j : j+32]`` (rows x cols).
    mirror : bool
        Average with the horizontally mirrored patch (Caffe's oversampling).
    device : str
        Torch device string.
    tile_px : int
        Output tile edge in pixels; bounds memory (about ``tile_px**2 * 1.1``
        kB per tile for the activations, x2 with ``mirror``).

    Returns
    -------
    np.ndarray
        (rows - 31, cols - 31) float32 probabilities.

    Notes
    -----
    Mirroring.  Flipping a tile of width ``w + 31`` maps column ``k`` to
    ``w + 30 - k``; the patch starting at column ``j`` (columns ``j ... j+31``)
    becomes columns ``w - 1 - j ... w + 30 - j``, i.e. the patch starting at
    ``w - 1 - j`` of the flipped tile, holding the mirrored patch.  So the
    dense output of the flipped tile, flipped back, is the mirrored-patch
    output at the *same* positions — no shift.  (A one-column shift would
    appear only if one flipped the unpadded image and padded it again with the
    asymmetric 16/15 convention: the classified pixel, index 16, sits at index
    15 of the mirrored patch.)  The mean is constant per channel, so mirroring
    before or after subtracting it is the same.

    On CUDA, torch's default TF32 convolutions (``torch.backends.cudnn.allow_tf32``)
    make both this and the patch-by-patch map differ from float32 by up to
    ~5e-3 in probability (measured on an H200); with TF32 off the two agree
    exactly there.
    """
    if padded_bgr.ndim != 3 or padded_bgr.shape[2] != 3:
        raise ValueError(f"padded_bgr must be (rows, cols, 3), got {padded_bgr.shape}")
    rows, cols = padded_bgr.shape[0] - (PATCH_PX - 1), padded_bgr.shape[1] - (PATCH_PX - 1)
    if rows < 1 or cols < 1:
        raise ValueError(f"padded_bgr {padded_bgr.shape[:2]} is smaller than one {PATCH_PX}x{PATCH_PX} patch")
    if tile_px < 1:
        raise ValueError(f"tile_px must be positive, got {tile_px}")
    wrong = [type(net).__name__ for net, _ in members if not isinstance(net, DensePatchNet)]
    if wrong:
        raise TypeError(f"dense_probabilities needs DensePatchNet members, got {wrong}")
    halo = PATCH_PX - 1
    image = torch.from_numpy(np.ascontiguousarray(padded_bgr, dtype=np.float32)).permute(2, 0, 1)
    means = [channel_mean(mean).to(device).view(1, 3, 1, 1) for _, mean in members]
    out = np.empty((rows, cols), dtype=np.float32)
    with torch.inference_mode():
        for r0, h in _tile_starts(rows, tile_px):
            for c0, w in _tile_starts(cols, tile_px):
                tile = image[:, r0 : r0 + h + halo, c0 : c0 + w + halo].to(device)[None]
                if mirror:
                    tile = torch.cat([tile, torch.flip(tile, dims=[3])])
                # NHWC: ~1.5x faster on CPU whatever the weights' layout (bench/dense_speedup.py).
                tile = tile.contiguous(memory_format=torch.channels_last)
                total = 0.0
                for (net, _), mean in zip(members, means, strict=True):
                    prob = torch.softmax(net.dense_logits(tile - mean), dim=1)[:, 1]
                    if mirror:
                        # Same order of operations as patch_probabilities: (plain + mirrored) / 2.
                        prob = 0.5 * (prob[:1] + torch.flip(prob[1:], dims=[2]))
                    total = total + prob[0]
                out[r0 : r0 + h, c0 : c0 + w] = (total / len(members)).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- fast student network

#: Output (model-frame) pixels per input pixel along each axis: 0.5 µm/px in, 0.125 µm/px out.
STUDENT_UPSCALE = 4


class SubpixelStudentNet(nn.Module):
    """A small fully convolutional network that reads 20x pixels and emits the model-frame map directly.

    It reads the slide at 0.5 µm/px (no 4x upscaling) and predicts, for each
    input pixel, the P(lymphocyte centre) of the ``STUDENT_UPSCALE x
    STUDENT_UPSCALE`` model-frame pixels inside it (a sub-pixel head, pixel
    shuffle), so the map it writes has the teacher's geometry and everything
    downstream (Zarr map, peaks, thresholds) is unchanged.  All convolutions are
    "valid": an output depends only on the input pixels within :attr:`halo_px`
    of it, so a map computed block by block (each block read with that halo)
    equals the whole-image map.

    Layers (per input pixel, multiply-adds), with the default ``dilations`` (2, 4, 1)::

        conv 3x3 3->w1                 27 w1
        conv 3x3 w1->w, relu           9 w1 w
        conv 3x3 dilation 2 w->w, relu 9 w^2
        conv 3x3 dilation 4 w->w, relu 9 w^2
        conv 3x3 w->w, relu            9 w^2
        conv 1x1 w->16, pixel shuffle 4 -> one logit per model-frame pixel

    Other ``dilations`` give other inner w->w layers (``conv3``, ``conv4``, ...),
    e.g. a deeper student of the same cost at a smaller width (BENCHMARKS.md).
    ``fine_width`` c > 0 adds a stage at twice the input resolution, whose
    logits are added to the head's (per input pixel)::

        conv 1x1 w->4c, pixel shuffle 2, activation  4 w c
        conv 3x3 c->c at 2x, activation              36 c^2
        conv 1x1 c->4 at 2x, pixel shuffle 2         16 c

    Inputs are BGR 0-255 minus the per-channel mean (the checkpoint's
    ``mean_bgr``), divided inside by ``input_std`` (like :class:`DensePatchNet`).

    Parameters
    ----------
    input_std : sequence of 3 floats
        Per-channel (B, G, R) standard deviation of training pixels, 0-255 scale.
    width : int
        Channels of the inner layers (``w``); ``w1 = 3 w / 4``.
    dilations : sequence of int
        Dilation of each inner 3x3 w->w layer, in order.
    residual : bool
        Each inner layer adds its input (cropped by the ``d`` pixels each side
        its valid convolution drops) to its output.
    activation : {"relu", "silu"}
        The non-linearity after every layer but the first and the heads.
    fine_width : int
        Channels ``c`` of the stage at twice the input resolution (0: none).

    Attributes
    ----------
    halo_px : int
        Input pixels each side that one output reads beyond its own input pixel:
        ``2 + sum(dilations)`` (9 for the default shape), one more with a fine stage.
    """

    upscale = STUDENT_UPSCALE
    #: The constructor's arguments that make a student's shape: what :meth:`shape` returns and checkpoints record.
    SHAPE_KEYS = ("width", "dilations", "residual", "activation", "fine_width")
    #: Non-linearities by name; each is applied in place (one activation-sized buffer less per layer).
    ACTIVATIONS = {"relu": F.relu_, "silu": partial(F.silu, inplace=True)}

    def __init__(self, input_std: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0), width: int = 32,
                 dilations: tuple[int, ...] | list[int] = (2, 4, 1), residual: bool = False,
                 activation: str = "relu", fine_width: int = 0) -> None:
        super().__init__()
        # The one check of a student's shape: checkpoints hand theirs straight to this constructor.
        if not (isinstance(width, int) and not isinstance(width, bool) and width >= 4):
            raise ValueError(f"width {width!r} is not a positive number of channels (4 or more)")
        if not (isinstance(dilations, list | tuple) and dilations
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations)):
            raise ValueError(f"dilations {dilations!r} are not one positive integer per inner layer")
        if not isinstance(residual, bool):
            raise ValueError(f"residual {residual!r} is not true or false")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(self.ACTIVATIONS)}")
        if not (isinstance(fine_width, int) and not isinstance(fine_width, bool) and fine_width >= 0):
            raise ValueError(f"fine_width {fine_width!r} is not a number of channels (0 for none)")
        # Recorded in checkpoints (shape()), so a student of another shape loads as it was trained.
        self.width, self.dilations, self.residual = width, tuple(dilations), bool(residual)
        self.activation, self.fine_width = activation, fine_width
        # The fine stage's 3x3 convolution reads half an input pixel further; rounded up to whole input pixels.
        self.halo_px = 2 + sum(self.dilations) + (1 if fine_width else 0)
        first = 3 * width // 4
        self.conv1 = nn.Conv2d(3, first, 3)
        self.conv2 = nn.Conv2d(first, width, 3)
        for number, dilation in enumerate(self.dilations, start=3):  # conv3, conv4, ...: the shipped weights' names
            setattr(self, f"conv{number}", nn.Conv2d(width, width, 3, dilation=dilation))
        self.head = nn.Conv2d(width, self.upscale**2, 1)
        if fine_width:
            self.fine_in = nn.Conv2d(width, 4 * fine_width, 1)
            self.fine_conv = nn.Conv2d(fine_width, fine_width, 3)
            self.fine_head = nn.Conv2d(fine_width, 4, 1)
            nn.init.zeros_(self.fine_head.weight)  # starts as the plain student, the stage learns a correction
            nn.init.zeros_(self.fine_head.bias)
        self.register_buffer("input_std", torch.as_tensor(input_std, dtype=torch.float32).reshape(3))

    def shape(self) -> dict:
        """The keyword arguments that rebuild this network's shape (:attr:`SHAPE_KEYS`)."""
        return {key: getattr(self, key) for key in self.SHAPE_KEYS} | {"dilations": list(self.dilations)}

    def _inner(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{number}") for number in range(3, 3 + len(self.dilations))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, 4 (H - 2 halo), 4 (W - 2 halo)) of (N, 3, H, W) input windows (BGR minus the channel mean)."""
        x = self.conv1(x / self.input_std.view(1, 3, 1, 1))
        # In place: the same values, one activation-sized buffer less per layer (3-6% of the forward, BENCHMARKS.md).
        act = self.ACTIVATIONS[self.activation]
        x = act(self.conv2(x))
        for conv, d in zip(self._inner(), self.dilations, strict=True):
            y = act(conv(x))
            x = x[:, :, d:-d, d:-d] + y if self.residual else y
        logits = F.pixel_shuffle(self.head(x), self.upscale)
        if not self.fine_width:
            return logits
        fine = act(F.pixel_shuffle(self.fine_in(x), 2))
        # The valid 3x3 drops one half-pixel each side; one more keeps the output on whole input pixels, so the
        # stage covers the trunk's pixels 1 .. n-2, each as 2 x 2 half-pixels, each of those as 2 x 2 logits.
        fine = act(self.fine_conv(fine))[:, :, 1:-1, 1:-1]
        u = self.upscale
        return logits[:, :, u:-u, u:-u] + F.pixel_shuffle(self.fine_head(fine), 2)

    def flops_per_input_px(self) -> float:
        """FLOP (2 x multiply-adds) per input pixel; biases, activations and additions not counted."""
        def flops(c: nn.Conv2d) -> int:
            return 2 * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1]

        total = sum(flops(c) for c in (self.conv1, self.conv2, *self._inner(), self.head))
        if self.fine_width:  # fine_in per input pixel; the rest at the 4 half-resolution pixels inside it
            total += flops(self.fine_in) + 4 * (flops(self.fine_conv) + flops(self.fine_head))
        return float(total)


def subpixel_probabilities(
    members: list[tuple[SubpixelStudentNet, torch.Tensor]],
    window_bgr: np.ndarray,
    *,
    device: str = "cpu",
    tile_px: int = 512,
) -> np.ndarray:
    """P(lymphocyte centre) of every model-frame pixel inside a window of input (0.5 µm/px) pixels.

    Parameters
    ----------
    members : list of (SubpixelStudentNet, mean image)
        Networks in eval mode on ``device``; probabilities are averaged.  The
        (3, 32, 32) mean image must be constant per channel.
    window_bgr : np.ndarray
        (rows, cols, 3) float32 BGR 0-255 input pixels, including ``halo_px``
        pixels on every side.
    device : str
        Torch device string.
    tile_px : int
        Input tile edge (outputs); bounds the activations' memory (~130 kB per
        input pixel of a tile at width 32).

    Returns
    -------
    np.ndarray
        (4 (rows - 2 halo), 4 (cols - 2 halo)) float32.
    """
    halo = max(net.halo_px for net, _ in members)
    up = STUDENT_UPSCALE
    rows, cols = window_bgr.shape[0] - 2 * halo, window_bgr.shape[1] - 2 * halo
    if rows < 1 or cols < 1:
        raise ValueError(f"window {window_bgr.shape[:2]} is not larger than the {2 * halo}-px halo")
    image = torch.from_numpy(np.ascontiguousarray(window_bgr, dtype=np.float32)).permute(2, 0, 1)
    means = [channel_mean(mean).to(device).view(1, 3, 1, 1) for _, mean in members]
    out = np.empty((rows * up, cols * up), dtype=np.float32)
    with torch.inference_mode():
        for r0, h in _tile_starts(rows, tile_px):
            for c0, w in _tile_starts(cols, tile_px):
                tile = image[:, r0 : r0 + h + 2 * halo, c0 : c0 + w + 2 * halo].to(device)[None]
                tile = tile.contiguous(memory_format=torch.channels_last)
                total = None  # the members' mean, without a copy for a single member (the same values)
                for (net, _), mean in zip(members, means, strict=True):
                    prob = net(tile - mean).sigmoid_()[0, 0]
                    total = prob if total is None else total + prob
                if len(members) > 1:
                    total = total / len(members)
                out[r0 * up : (r0 + h) * up, c0 * up : (c0 + w) * up] = total.cpu().numpy()
    return out
