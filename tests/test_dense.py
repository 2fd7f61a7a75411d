"""DensePatchNet: fully convolutional every-pixel evaluation equals patch-by-patch evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsi_lymph.constants import PATCH_PX
from wsi_lymph.models.architectures import DENSE_ARCH, PAPER_ARCH
from wsi_lymph.models.checkpoints import CHECKPOINT_FORMAT, ModelError, load_checkpoint, save_checkpoint_atomic
from wsi_lymph.models.networks import (
    DENSE_FLOPS_PER_PATCH,
    DENSE_FLOPS_PER_PIXEL,
    FLOPS_PER_PATCH,
    DensePatchNet,
    PatchNet,
    dense_probabilities,
    patch_grid_probabilities,
    patch_probabilities,
)
from wsi_lymph.models.registry import load_model
from wsi_lymph.slides.resample import resize_window

CROPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lymph-centers"
MEAN_BGR = (150.0, 120.0, 170.0)
STD_BGR = (40.0, 50.0, 30.0)
TOLERANCE = 1e-5  # max abs difference in probability


def random_dense_net(seed: int) -> DensePatchNet:
    """Random weights scaled so that probabilities spread over (0, 1) rather than sit at 0.5."""
    gen = torch.Generator().manual_seed(seed)
    net = DensePatchNet(STD_BGR)
    with torch.no_grad():
        for layer in (net.conv1, net.conv2, net.conv3, net.ip1, net.ip2):
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
        net.ip2.weight.mul_(4.0)
    return net.eval()


def channel_mean_image(values=MEAN_BGR) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1).expand(3, PATCH_PX, PATCH_PX).contiguous()


@pytest.fixture(scope="module")
def members() -> list:
    return [(random_dense_net(0), channel_mean_image()), (random_dense_net(1), channel_mean_image())]


def test_dense_logits_equal_patch_forward(members):
    net = members[0][0]
    gen = torch.Generator().manual_seed(5)
    window = torch.rand((2, 3, 13 + 31, 9 + 31), generator=gen) * 255 - channel_mean_image()[:, :1, :1]
    with torch.inference_mode():
        dense = net.dense_logits(window)
        assert dense.shape == (2, 2, 13, 9)
        patches = window.unfold(2, PATCH_PX, 1).unfold(3, PATCH_PX, 1)  # (N, 3, 13, 9, 32, 32)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, PATCH_PX, PATCH_PX)
        patchwise = net(patches).reshape(2, 13, 9, 2).permute(0, 3, 1, 2)
    assert torch.allclose(dense, patchwise, atol=1e-4, rtol=1e-5)
    assert dense.std() > 0.5  # the comparison is not between near-constant maps


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("shape_rc", [(1, 1), (19, 27), (35, 14)])
def test_dense_probabilities_equal_patch_grid(members, mirror, shape_rc):
    rows, cols = shape_rc
    window = np.random.default_rng(rows * cols).uniform(0, 255, (rows + 31, cols + 31, 3)).astype(np.float32)
    patchwise = patch_grid_probabilities(members, window, mirror=mirror, batch_size=512)
    # A small tile exercises the tiling, including a last tile moved back to overlap its neighbour.
    dense = dense_probabilities(members, window, mirror=mirror, tile_px=16)
    assert dense.shape == patchwise.shape == shape_rc
    assert dense.dtype == np.float32
    assert np.abs(dense - patchwise).max() < TOLERANCE


def test_mirror_alignment_matches_mirrored_patches(members):
    """Dense output of the flipped window, flipped back, is the output of each patch mirrored in place."""
    net, mean = members[0]
    window = np.random.default_rng(3).uniform(0, 255, (6 + 31, 11 + 31, 3)).astype(np.float32)
    single = [(net, mean)]
    plain = dense_probabilities(single, window)
    both = dense_probabilities(single, window, mirror=True)
    patches = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(window, (32, 32), axis=(0, 1)).copy())
    patches = patches.reshape(-1, 3, 32, 32)
    with torch.inference_mode():
        mirrored = patch_probabilities(net, torch.flip(patches, dims=[3]), mean).numpy().reshape(6, 11)
    assert np.abs(both - 0.5 * (plain + mirrored)).max() < TOLERANCE
    # A one-column misalignment would be visible: the mirrored map is not just the plain map shifted.
    assert np.abs(mirrored[:, 1:] - plain[:, :-1]).max() > 1e-3


@pytest.mark.shared_data
def test_dense_on_real_crop_upscaled_4x(members):
    """A 128x128 region of example_1 upscaled 4x (MATLAB bicubic); mirrored oversampling on a part of it."""
    image = tifffile.imread(CROPS / "example_1.tif")  # (100, 100, 3) uint8 RGB
    rows = np.arange(120, 120 + 128 + 31)
    cols = np.arange(150, 150 + 128 + 31)
    up = resize_window(image, (0, 0), image.shape[:2], rows, cols, 4.0)
    window = np.ascontiguousarray(up[:, :, ::-1], dtype=np.float32)  # RGB -> BGR, 0-255
    mean = channel_mean_image(tuple(window.reshape(-1, 3).mean(axis=0)))
    real_members = [(members[0][0], mean)]
    patchwise = patch_grid_probabilities(real_members, window, batch_size=1024)
    dense = dense_probabilities(real_members, window)
    assert dense.shape == (128, 128)
    assert patchwise.std() > 0.01  # real structure reaches the output
    assert np.abs(dense - patchwise).max() < TOLERANCE
    part = window[40 : 40 + 48 + 31, 60 : 60 + 48 + 31]
    mirrored = patch_grid_probabilities(real_members, part, mirror=True, batch_size=1024)
    assert np.abs(dense_probabilities(real_members, part, mirror=True) - mirrored).max() < TOLERANCE


def test_dense_rejects_position_dependent_mean(members):
    net = members[0][0]
    varying = channel_mean_image().clone()
    varying[0, 0, 0] += 5.0
    with pytest.raises(ValueError, match="constant per channel"):
        dense_probabilities([(net, varying)], np.zeros((40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="smaller than one"):
        dense_probabilities([(net, channel_mean_image())], np.zeros((31, 40, 3), np.float32))
    with pytest.raises(TypeError, match="DensePatchNet members"):
        dense_probabilities([(PatchNet(), channel_mean_image())], np.zeros((40, 40, 3), np.float32))


def _count_flops(net: torch.nn.Module, out_hw: tuple[int, int]) -> float:
    """2 x multiply-adds of the convolutions/linear layers, for outputs of the given spatial size per layer."""
    layers = [getattr(net, name) for name in ("conv1", "conv2", "conv3", "ip1", "ip2")]
    return sum(2.0 * layer.weight.numel() * h * w for layer, (h, w) in zip(layers, out_hw, strict=True))


def test_flop_constants():
    dense = DensePatchNet()
    per_pixel = _count_flops(dense, [(1, 1)] * 5)
    per_patch = _count_flops(dense, [(28, 28), (10, 10), (1, 1), (1, 1), (1, 1)])
    paper = _count_flops(PatchNet(), [(32, 32), (16, 16), (8, 8), (1, 1), (1, 1)])
    assert pytest.approx(per_pixel, rel=0.01) == DENSE_FLOPS_PER_PIXEL
    assert pytest.approx(per_patch, rel=0.01) == DENSE_FLOPS_PER_PATCH
    assert pytest.approx(paper, rel=0.01) == FLOPS_PER_PATCH


def _meta(arch: str, name: str) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "name": name,
        "fold": None,
        "channel_order": "BGR",
        "input_range": 255.0,
        "model_mpp": 0.125,
        "threshold": 0.7706,
        "class_index": 1,
    }


@pytest.mark.parametrize("arch", [PAPER_ARCH, DENSE_ARCH])
def test_checkpoint_round_trip(tmp_path, members, arch):
    if arch == DENSE_ARCH:
        net, mean = members[0]
    else:
        torch.manual_seed(0)
        net = PatchNet().eval()
        mean = torch.rand(3, 32, 32) * 255
    path = save_checkpoint_atomic(
        {"state_dict": net.state_dict(), "mean_bgr": mean, "meta": _meta(arch, f"rt-{arch}")}, tmp_path / "m.pt"
    )
    model = load_model(str(path))
    loaded, loaded_mean = model.members[0]
    assert type(loaded) is type(net)
    assert model.meta["arch"] == arch and model.model_mpp == 0.125
    assert torch.equal(loaded_mean, mean)
    patches = torch.rand(8, 3, 32, 32) * 255
    with torch.inference_mode():
        assert torch.equal(patch_probabilities(loaded, patches, loaded_mean), patch_probabilities(net, patches, mean))
    if arch == DENSE_ARCH:
        assert torch.equal(loaded.input_std, net.input_std)
        window = np.random.default_rng(0).uniform(0, 255, (40, 40, 3)).astype(np.float32)
        assert np.array_equal(dense_probabilities(model.members, window), dense_probabilities([members[0]], window))


def test_load_checkpoint_rejects_bad_dense_and_unknown_arch(tmp_path, members):
    net, mean = members[0]
    varying = mean.clone()
    varying[1, 5, 5] = 0.0
    bad_mean = tmp_path / "bad_mean.pt"
    checkpoint = {"state_dict": net.state_dict(), "mean_bgr": varying, "meta": _meta(DENSE_ARCH, "x")}
    save_checkpoint_atomic(checkpoint, bad_mean)
    with pytest.raises(ModelError, match="constant per channel"):
        load_checkpoint(bad_mean)
    unknown = tmp_path / "unknown.pt"
    save_checkpoint_atomic({"state_dict": net.state_dict(), "mean_bgr": mean, "meta": _meta("vgg16", "x")}, unknown)
    with pytest.raises(ModelError, match="network architecture is 'vgg16'"):
        load_checkpoint(unknown)
    # Dense weights under the paper's arch string do not fit PatchNet.
    mislabelled = tmp_path / "mislabelled.pt"
    checkpoint = {"state_dict": net.state_dict(), "mean_bgr": mean, "meta": _meta(PAPER_ARCH, "x")}
    save_checkpoint_atomic(checkpoint, mislabelled)
    with pytest.raises(ModelError, match="do not fit"):
        load_checkpoint(mislabelled)
