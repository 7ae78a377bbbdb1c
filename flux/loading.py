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


def load_components(
    weights_dir: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Components:
    """Load the Kontext components with ``from_pretrained(..., local_files_only=True)``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    root = Path(weights_dir)
    device = device or pick_device()
    dtype = dtype or dtype_for(device)
    start = time.perf_counter()

    def load(cls, sub: str, **kwargs):
        return cls.from_pretrained(root / sub, local_files_only=True, **kwargs)

    components = Components(
        transformer=load(FluxTransformer2DModel, "transformer", dtype=dtype).to(device).eval(),
        vae=load(AutoencoderKL, "vae", dtype=dtype).to(device).eval(),
        text_encoder=load(CLIPTextModel, "text_encoder", dtype=dtype).to(device).eval(),
        text_encoder_2=load(T5EncoderModel, "text_encoder_2", dtype=dtype).to(device).eval(),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        tokenizer_2=load(T5TokenizerFast, "tokenizer_2"),
        scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"),
        device=device,
        dtype=dtype,
    )
    log.info("loaded %s on %s in %s in %.1fs", root, device, dtype, time.perf_counter() - start)
    return components
