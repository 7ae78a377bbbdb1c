"""LoRA files made for a given transformer, in the layouts people publish, for tests and the GPU
check: ai-toolkit/peft (``transformer.*``), kohya/sd-scripts (``lora_unet_*`` with alphas) and
fal Kontext (``base_model.model.*``; diffusers' converter for it assumes the real model's 19 + 38
blocks and width, so it fits full-size models only)."""

from __future__ import annotations

from pathlib import Path

import torch

FORMATS = ("peft", "kohya", "fal")


def _pair(generator: torch.Generator, rank: int, fan_in: int, fan_out: int, scale: float):
    down = torch.randn(rank, fan_in, generator=generator) * scale / fan_in**0.5
    up = torch.randn(fan_out, rank, generator=generator) * scale / rank**0.5
    return down, up


def make_lora(transformer: torch.nn.Module, fmt: str = "peft", rank: int = 4, seed: int = 0, scale: float = 1.0):
    """A random LoRA state dict for ``transformer`` in ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    sd: dict[str, torch.Tensor] = {}
    if fmt == "peft":
        for name, module in transformer.named_modules():
            if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and isinstance(
                module, torch.nn.Linear
            ):
                down, up = _pair(g, rank, module.in_features, module.out_features, scale)
                sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
        return sd
    if fmt == "kohya":
        mlp = transformer.transformer_blocks[0].ff.net[0].proj.out_features
        for i in range(config.num_layers):
            for stream in ("img", "txt"):
                for key, (fan_in, fan_out) in {
                    f"{stream}_attn_proj": (width, width),
                    f"{stream}_mlp_0": (width, mlp),
                    f"{stream}_mlp_2": (mlp, width),
                }.items():
                    down, up = _pair(g, rank, fan_in, fan_out, scale)
                    prefix = f"lora_unet_double_blocks_{i}_{key}"
                    sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"] = down, up
                    sd[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2)
        return sd
    if fmt == "fal":
        mlp = int(width * 4)
        single_in, single_out = width, 3 * width + mlp
        for i in range(config.num_layers):
            for stream in ("img", "txt"):
                for key, (fan_in, fan_out) in {
                    f"{stream}_mod.lin": (width, 6 * width),
                    f"{stream}_attn.qkv": (width, 3 * width),
                    f"{stream}_attn.proj": (width, width),
                    f"{stream}_mlp.0": (width, mlp),
                    f"{stream}_mlp.2": (mlp, width),
                }.items():
                    down, up = _pair(g, rank, fan_in, fan_out, scale)
                    prefix = f"base_model.model.double_blocks.{i}.{key}"
                    sd[f"{prefix}.lora_A.weight"], sd[f"{prefix}.lora_B.weight"] = down, up
        for i in range(config.num_single_layers):
            for key, (fan_in, fan_out) in {
                "linear1": (single_in, single_out),
                "linear2": (width + mlp, width),
                "modulation.lin": (width, 3 * width),
            }.items():
                down, up = _pair(g, rank, fan_in, fan_out, scale)
                prefix = f"base_model.model.single_blocks.{i}.{key}"
                sd[f"{prefix}.lora_A.weight"], sd[f"{prefix}.lora_B.weight"] = down, up
        for key, (fan_in, fan_out) in {
            "final_layer.linear": (width, 64),
        }.items():
            down, up = _pair(g, rank, fan_in, fan_out, scale)
            sd[f"base_model.model.{key}.lora_A.weight"], sd[f"base_model.model.{key}.lora_B.weight"] = down, up
        return sd
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def write_lora(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path
