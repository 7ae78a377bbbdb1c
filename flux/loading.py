"""Model loading: every component from a weights directory in the diffusers layout, offline."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flux.device import dtype_for, pick_device

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The loaded model: what an edit needs, on one device in one dtype."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype


def place_vae(vae: torch.nn.Module, device: torch.device) -> None:
    """On CUDA the VAE's convolutions run channels_last (faster there; a no-op elsewhere)."""
    if device.type == "cuda":
        vae.to(memory_format=torch.channels_last)


def load_transformer(weights_dir: str | Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of a weights tree, offline, on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(Path(weights_dir) / "transformer", local_files_only=True,
                                                         dtype=dtype)  # fmt: skip
    return transformer.to(device).eval()


def load_components(
    weights_dir: str | Path,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    transformer: torch.nn.Module | None = None,
) -> Components:
    """Load the Kontext components with ``from_pretrained(..., local_files_only=True)``; the
    transformer too unless one is given (the runtime's, already made fast)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    root = Path(weights_dir)
    device = device or pick_device()
    dtype = dtype or dtype_for(device)
    start = time.perf_counter()

    def load(cls, sub: str, **kwargs):
        return cls.from_pretrained(root / sub, local_files_only=True, **kwargs)

    components = Components(
        transformer=transformer if transformer is not None else load_transformer(root, device, dtype),
        vae=load(AutoencoderKL, "vae", dtype=dtype).to(device).eval(),
        text_encoder=load(CLIPTextModel, "text_encoder", dtype=dtype).to(device).eval(),
        text_encoder_2=load(T5EncoderModel, "text_encoder_2", dtype=dtype).to(device).eval(),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        tokenizer_2=load(T5TokenizerFast, "tokenizer_2"),
        scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"),
        device=device,
        dtype=dtype,
    )
    place_vae(components.vae, device)
    log.info("loaded %s on %s in %s in %.1fs", root, device, dtype, time.perf_counter() - start)
    return components
