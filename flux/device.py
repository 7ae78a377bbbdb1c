"""The one place that decides the device and the dtype."""

from __future__ import annotations

import torch

from flux.errors import SetupError


def pick_device(wanted: str | None = None) -> torch.device:
    """``wanted`` (FLUX_DEVICE: cpu, cuda or cuda:N, checked by the configuration), else CUDA when
    present, else the CPU. A device this machine cannot honour is a SetupError here, not a trace
    from the first tensor moved to it."""
    if not wanted:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(wanted)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"FLUX_DEVICE={wanted!r} asks for CUDA, but this machine has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"FLUX_DEVICE={wanted!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (the CPU has no fast bf16 matmul and parity tests need fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings mean something; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Hand freed memory back: cached CUDA blocks, and glibc's free heap pages.

    Without the trim a long-running CPU worker's resident memory creeps up with allocator
    fragmentation from one prediction to the next.
    """
    import contextlib
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def freeze_loaded_objects() -> None:
    """Once the model is loaded: collect, then move every object alive now out of the cyclic
    collector's sight (``gc.freeze``). The loaded model is some 400,000 Python objects that live as
    long as the process; left in view, every full collection walks them all: the one
    ``release_memory`` makes after each prediction (0.3 s on a 2-core CPU, on the request's clock)
    and the automatic ones that can land inside a denoise step. Objects made by requests are
    collected as before."""
    import gc

    gc.collect()
    gc.freeze()
