"""PatchNet against an independent numpy re-implementation of Caffe's forward pass."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_lymph.models.caffe import import_caffe
from wsi_lymph.models.checkpoints import load_checkpoint
from wsi_lymph.models.networks import PatchNet, patch_grid_probabilities, patch_probabilities
from wsi_lymph.models.registry import caffemodel_filename, mean_filename

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELEASED = DATA / "models" / "janowczyk2016-lymphocyte"


# --------------------------------------------------------------------------- reference (float64 numpy)


def ref_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Caffe convolution (a cross-correlation), stride 1, zero padding: (N,C,H,W) -> (N,O,H',W')."""
    n, _, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.zeros((n, x.shape[1], h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad : pad + h, pad : pad + wd] = x
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, w.shape[0], oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], xp[:, :, dy : dy + oh, dx : dx + ow])
    return out + b[None, :, None, None]


def ref_pool(x: np.ndarray, kernel: int, stride: int, mode: str) -> np.ndarray:
    """Caffe pooling with pad 0, written from Caffe's definition rather than from torch's."""
    _, _, h, w = x.shape
    # Caffe rounds the number of windows up, so the last window may run past the edge.
    oh = math.ceil((h - kernel) / stride) + 1
    ow = math.ceil((w - kernel) / stride) + 1
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride, j * stride
            r1, c1 = min(r0 + kernel, h), min(c0 + kernel, w)
            window = x[:, :, r0:r1, c0:c1]
            if mode == "max":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                # With pad 0 Caffe divides by the number of input cells the window covers.
                out[:, :, i, j] = window.sum(axis=(2, 3)) / ((r1 - r0) * (c1 - c0))
    return out


def ref_forward(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Logits (N, 2) of the released network for (N, 3, 32, 32) mean-subtracted BGR input."""
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    a = relu(ref_pool(ref_conv(x, p["conv1.weight"], p["conv1.bias"], 2), 3, 2, "max"))
    a = ref_pool(relu(ref_conv(a, p["conv2.weight"], p["conv2.bias"], 2)), 3, 2, "ave")
    a = ref_pool(relu(ref_conv(a, p["conv3.weight"], p["conv3.bias"], 2)), 3, 2, "ave")
    assert a.shape[1:] == (64, 4, 4)  # 32 -> 16 -> 8 -> 4 with ceil rounding
    a = a.reshape(len(a), -1) @ p["ip1.weight"].T + p["ip1.bias"]  # no nonlinearity after ip1
    return a @ p["ip2.weight"].T + p["ip2.bias"]


def ref_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- fixtures


def _import_fold(fold: int, folder: Path) -> tuple[PatchNet, torch.Tensor]:
    path = import_caffe(
        RELEASED / caffemodel_filename(fold),
        RELEASED / mean_filename(fold),
        folder / f"fold{fold}.pt",
        name=f"janowczyk2016/fold{fold}",
        fold=fold,
    )
    net, mean, _ = load_checkpoint(path)
    return net, mean


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[PatchNet, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("ckpt")
    return [_import_fold(1, folder), _import_fold(2, folder)]


def _patches(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """16 BGR 0-255 patches: 8 uniform noise, 8 near the mean image (so probabilities are not all 0/1)."""
    noise = rng.uniform(0, 255, size=(8, 3, 32, 32))
    near = np.clip(mean[None] + rng.normal(0, 40, size=(8, 3, 32, 32)), 0, 255)
    # A dark blob in some of them looks more like a lymphocyte nucleus.
    yy, xx = np.mgrid[:32, :32]
    blob = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 4.0**2))
    near[::2] *= 1 - 0.6 * blob
    return np.concatenate([noise, near]).astype(np.float32)


# --------------------------------------------------------------------------- tests


@pytest.mark.shared_data
def test_patchnet_matches_caffe_reference(members: list[tuple[PatchNet, torch.Tensor]]) -> None:
    net, mean = members[0]
    params = {k: v.double().numpy() for k, v in net.state_dict().items()}
    patches = _patches(np.random.default_rng(0), mean.numpy())
    x = patches - mean.numpy()[None]

    ref_logits = ref_forward(x.astype(np.float64), params)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).double().numpy()
    prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    ref_prob = ref_softmax(ref_logits)

    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-5)
    # The comparison means something only if the probabilities are not all saturated.
    p1 = ref_prob[:, 1]
    assert np.any((p1 > 0.01) & (p1 < 0.99)) or (p1.min() < 0.5 < p1.max())

    # patch_probabilities subtracts the mean itself.
    with torch.no_grad():
        p = patch_probabilities(net, torch.from_numpy(patches), mean).numpy()
    np.testing.assert_allclose(p, ref_prob[:, 1], rtol=0, atol=1e-5)


def test_reference_pooling_matches_torch_ceil_mode() -> None:
    # Odd sizes exercise the clipped last window (ceil rounding) of both pooling types.
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 7))
    t = torch.from_numpy(x)
    mx = torch.nn.functional.max_pool2d(t, 3, 2, ceil_mode=True).numpy()
    av = torch.nn.functional.avg_pool2d(t, 3, 2, ceil_mode=True).numpy()
    np.testing.assert_allclose(mx, ref_pool(x, 3, 2, "max"), atol=1e-12)
    np.testing.assert_allclose(av, ref_pool(x, 3, 2, "ave"), atol=1e-12)


@pytest.mark.shared_data
def test_mirror_matches_caffe_oversample(members: list[tuple[PatchNet, torch.Tensor]]) -> None:
    net, mean = members[0]
    params = {k: v.double().numpy() for k, v in net.state_dict().items()}
    patches = _patches(np.random.default_rng(2), mean.numpy()).astype(np.float64)
    m = mean.numpy().astype(np.float64)[None]
    ref = 0.5 * (
        ref_softmax(ref_forward(patches - m, params))[:, 1]
        + ref_softmax(ref_forward(patches[..., ::-1] - m, params))[:, 1]
    )
    with torch.no_grad():
        got = patch_probabilities(
            net, torch.from_numpy(patches.astype(np.float32)), mean, mirror=True
        ).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.shared_data
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("mirror", [False, True])
def test_patch_grid_matches_single_patches(
    members: list[tuple[PatchNet, torch.Tensor]], stride: int, mirror: bool
) -> None:
    rng = np.random.default_rng(10 * stride + mirror)
    padded = rng.uniform(0, 255, size=(32 + 7, 32 + 10, 3)).astype(np.float32)
    grid = patch_grid_probabilities(members, padded, stride_px=stride, mirror=mirror, batch_size=7)
    n_rows, n_cols = (padded.shape[0] - 32) // stride + 1, (padded.shape[1] - 32) // stride + 1
    assert grid.shape == (n_rows, n_cols) and grid.dtype == np.float32

    expected = np.zeros((n_rows, n_cols))
    with torch.no_grad():
        for i in range(n_rows):
            for j in range(n_cols):
                patch = padded[i * stride : i * stride + 32, j * stride : j * stride + 32]
                x = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))[None]
                expected[i, j] = np.mean(
                    [patch_probabilities(net, x, mean, mirror=mirror).item() for net, mean in members]
                )
    np.testing.assert_allclose(grid, expected, rtol=0, atol=1e-5)
