"""The safety checker: the Stable Diffusion safety checker (CLIP ViT-L/14 + concept embeddings)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class SafetyChecker:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype


def load_safety_checker(weights_dir: str | Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
    """From ``safety_checker/`` and ``feature_extractor/`` of the weights tree, offline."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    # its warning says a black image is returned instead; the product refuses the image instead
    logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)
    root = Path(weights_dir)
    model = StableDiffusionSafetyChecker.from_pretrained(root / "safety_checker", local_files_only=True, dtype=dtype)
    processor = CLIPImageProcessorPil.from_pretrained(root / "feature_extractor", local_files_only=True)
    return SafetyChecker(model=model.to(device).eval(), processor=processor, device=device, dtype=dtype)


@torch.inference_mode()
def is_flagged(checker: SafetyChecker, image: Image.Image) -> bool:
    """True when the image shows a flagged concept."""
    clip_input = checker.processor(images=[image], return_tensors="pt").pixel_values
    _, flagged = checker.model(
        clip_input=clip_input.to(device=checker.device, dtype=checker.dtype), images=[np.asarray(image)]
    )
    return bool(flagged[0])
