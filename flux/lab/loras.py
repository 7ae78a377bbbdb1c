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


def fp8_merge_error(weight: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """What merging ``delta`` into FP8 weights keeps of it: the relative error and the cosine of
    q(W + delta) - q(W) against delta, q being per-row e4m3 rounding as torchao's FP8 weights use."""

    def q(w: torch.Tensor) -> torch.Tensor:
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
        return (w / scale).to(torch.float8_e4m3fn).float() * scale

    realized = q(weight.float() + delta.float()) - q(weight.float())
    error = float((realized - delta).norm() / delta.norm())
    cosine = float(torch.nn.functional.cosine_similarity(realized.flatten(), delta.flatten().float(), dim=0))
    return error, cosine


def main() -> None:
    """Prints what a merge into FP8 keeps of a rank-16 LoRA on a 3072x3072 layer (N(0, 0.02) weights),
    for deltas 1% to 30% of the weight's norm: why FP8 servers carry LoRAs in a side branch."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 3072, generator=g) * 0.02
    for ratio in (0.01, 0.03, 0.1, 0.3):
        delta = torch.randn(3072, 16, generator=g) @ torch.randn(16, 3072, generator=g)
        delta *= ratio * weight.norm() / delta.norm()
        error, cosine = fp8_merge_error(weight, delta)
        print(
            f"delta {ratio:4.0%} of the weight: merged into FP8 the delta is off by {error:.0%} (cosine {cosine:.3f})"
        )


if __name__ == "__main__":
    main()
