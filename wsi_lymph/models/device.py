"""Which torch device a computation runs on, decided in one place."""

from __future__ import annotations

import torch


def select_device(device: str | None = None) -> str:
    """The torch device to use: ``device`` if given, else ``"cuda"`` when this process has a GPU, else ``"cpu"``."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def exact_cuda_numerics(device: str) -> None:
    """Turn TF32 off for inference on CUDA.

    TF32 convolutions (torch's default on CUDA) moved P by up to ~5e-3 on an H200;
    full float32 gives the CPU's map (measured: identical), which the method's
    threshold assumes.  No effect on a CPU device.
    """
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
