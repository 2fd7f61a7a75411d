"""Which torch device a computation runs on, decided in one place."""

from __future__ import annotations

import ctypes
import functools

import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


#: Environment every worker process starts with (set before it starts: glibc reads it once).  glibc gives each
#: thread but a process's first its own malloc arena, whose heaps grow to 64 MB at most; a Dask task runs in such a
#: thread, and a forward pass's activations (tens of MB per batch) then come from fresh mappings every batch,
#: whatever :func:`reuse_freed_memory` says.  With one arena the task thread reuses the process's heap like the
#: main thread.  ``bench/allocator.py --batch 512`` (paper network, one torch thread, fresh processes): 3,902
#: patches/s on the main thread, 2,675 on a second thread, 3,577 on a second thread with this setting; which
#: workers draw the slow path varies (``bench/worker_arena.py``), with the setting none does.
WORKER_MALLOC_ENVIRON = {"MALLOC_ARENA_MAX": "1"}


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


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve large buffers from the heap and keep freed memory for reuse (once per process).

    By default glibc maps every buffer above its (dynamic) mmap threshold afresh and unmaps it on
    free, and ``distributed`` starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; a CPU forward
    pass allocates tens of MB of activations per batch, so each batch pays for zeroing and
    faulting in new pages.  With mmap off and a 1 GiB trim threshold the paper network's bare
    forward ran 1.7x faster here, as fast as with tcmalloc (``bench/allocator.py``).  The cost: a
    process keeps the memory of its largest batch until it exits.

    Returns
    -------
    bool
        True if applied; False where the C library is not glibc (nothing is changed).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
