"""LoRA files made for a given transformer, in the layouts people publish, for tests and the GPU
check: ai-toolkit/peft (``transformer.*``), kohya/sd-scripts (``lora_unet_*`` with alphas) and
fal Kontext (``base_model.model.*``; diffusers' converter for it assumes the real model's 19 + 38
blocks and width, so it fits full-size models only)."""

from __future__ import annotations

from pathlib import Path

import torch

FORMATS = ("peft", "kohya", "fal")


def make_lora(transformer: torch.nn.Module, fmt: str = "peft", rank: int = 4, seed: int = 0, scale: float = 1.0):
    """A random LoRA state dict for ``transformer`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    g = torch.Generator().manual_seed(seed)
    down_key, up_key = ("lora_down.weight", "lora_up.weight") if fmt == "kohya" else ("lora_A.weight", "lora_B.weight")
    sd: dict[str, torch.Tensor] = {}
    for prefix, (fan_in, fan_out) in _layers(transformer, fmt).items():
        sd[f"{prefix}.{down_key}"] = torch.randn(rank, fan_in, generator=g) * scale / fan_in**0.5
        sd[f"{prefix}.{up_key}"] = torch.randn(fan_out, rank, generator=g) * scale / rank**0.5
        if fmt == "kohya":
            sd[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2)
    return sd


def _layers(transformer: torch.nn.Module, fmt: str) -> dict[str, tuple[int, int]]:
    """Each layer's key prefix in ``fmt`` and its (fan_in, fan_out)."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    mlp = int(width * 4)
    if fmt == "peft":
        return {
            f"transformer.{name}": (module.in_features, module.out_features)
            for name, module in transformer.named_modules()
            if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and isinstance(module, torch.nn.Linear)
        }
    if fmt == "kohya":
        return {
            f"lora_unet_double_blocks_{i}_{stream}_{key}": shape
            for i in range(config.num_layers)
            for stream in ("img", "txt")
            for key, shape in {"attn_proj": (width, width), "mlp_0": (width, mlp), "mlp_2": (mlp, width)}.items()
        }
    double = {"mod.lin": (width, 6 * width), "attn.qkv": (width, 3 * width), "attn.proj": (width, width),
              "mlp.0": (width, mlp), "mlp.2": (mlp, width)}  # fmt: skip
    single = {
        "linear1": (width, 3 * width + mlp),
        "linear2": (width + mlp, width),
        "modulation.lin": (width, 3 * width),
    }
    layers = {
        f"base_model.model.double_blocks.{i}.{stream}_{key}": shape
        for i in range(config.num_layers)
        for stream in ("img", "txt")
        for key, shape in double.items()
    }
    layers.update(
        {
            f"base_model.model.single_blocks.{i}.{key}": shape
            for i in range(config.num_single_layers)
            for key, shape in single.items()
        }
    )
    layers["base_model.model.final_layer.linear"] = (width, 64)
    return layers


def write_lora(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path
