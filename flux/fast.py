"""The GPU fast path: torch.compile, FP8 linear layers, the fastest attention backend, channels_last VAE.

Everything here applies on CUDA only; on the CPU ``optimize`` changes nothing and says so. The
TaylorSeer forecast is plain tensor math in the edit loop, outside the compiled transformer: the
compiled graph sees the same shapes on every computed step and is never recompiled by a forecast.

Settings (environment variables, read by ``FastSettings.from_env``):

| variable | default | meaning |
|---|---|---|
| FLUX_COMPILE | 1 | torch.compile the transformer |
| FLUX_COMPILE_MODE | default | torch.compile mode (max-autotune modes tune kernels for minutes at the first cold start) |
| FLUX_FP8 | auto | FP8 weights and activations for the transformer's linear layers (torchao); auto = on where the GPU supports FP8 (compute capability 8.9+) |
| FLUX_ATTENTION | auto | diffusers attention backend; auto tries FlashAttention 3, then cuDNN, then native SDPA |
| FLUX_WARM_SIZES | 1024x1024 | output sizes (WxH, comma-separated) compiled in setup(); other sizes compile on first use |
| FLUX_COMPILE_CACHE | .cache/torch-compile | where compiled kernels persist between cold starts (TORCHINDUCTOR_CACHE_DIR) |
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux.loading import Components

log = logging.getLogger(__name__)

ATTENTION_PREFERENCE = ("_flash_3", "flash", "_native_cudnn", "native")


@dataclass
class FastSettings:
    compile: bool = True
    compile_mode: str = "default"
    fp8: str = "auto"
    attention: str = "auto"
    warm_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    compile_cache: str = ".cache/torch-compile"

    @classmethod
    def from_env(cls) -> FastSettings:
        sizes = os.environ.get("FLUX_WARM_SIZES", "1024x1024")
        return cls(
            compile=os.environ.get("FLUX_COMPILE", "1") not in ("0", "false", "no"),
            compile_mode=os.environ.get("FLUX_COMPILE_MODE", "default"),
            fp8=os.environ.get("FLUX_FP8", "auto"),
            attention=os.environ.get("FLUX_ATTENTION", "auto"),
            warm_sizes=[tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",") if s.strip()],
            compile_cache=os.environ.get("FLUX_COMPILE_CACHE", ".cache/torch-compile"),
        )


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _wants_fp8(settings: FastSettings, device: torch.device) -> bool:
    if settings.fp8 == "auto":
        return fp8_supported(device)
    return settings.fp8 not in ("0", "false", "no", "off")


def set_attention_backend(c: Components, choice: str) -> str:
    """The first attention backend in order of preference that diffusers accepts here (its kernels installed)."""
    candidates = ATTENTION_PREFERENCE if choice == "auto" else (choice,)
    for name in candidates:
        try:
            c.transformer.set_attention_backend(name)
            return name
        except Exception as exc:  # a backend whose kernels are not installed says so by raising
            log.info("attention backend %s unavailable: %s", name, exc)
    c.transformer.reset_attention_backend()
    return "native"


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 (e4m3) weights and dynamic per-row activation scales for every linear layer (torchao)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as exc:  # missing, or built against another torch: either way FP8 cannot run
        raise RuntimeError(f"FP8 needs torchao (requirements-gpu.txt installs it): {exc}") from exc

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def optimize(c: Components, settings: FastSettings | None = None) -> dict[str, object]:
    """Apply the fast path in place; returns what was applied (empty on the CPU)."""
    if c.device.type != "cuda":
        log.info("fast path: off on %s (CUDA only); the CPU path is unchanged", c.device)
        return {}
    settings = settings or FastSettings.from_env()
    applied: dict[str, object] = {}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    applied["attention"] = set_attention_backend(c, settings.attention)
    c.vae.to(memory_format=torch.channels_last)
    applied["vae_channels_last"] = True
    if _wants_fp8(settings, c.device):
        try:
            quantize_fp8(c.transformer)
            applied["fp8"] = True
        except RuntimeError as exc:
            if settings.fp8 != "auto":
                raise  # asked for by name: say so rather than run slower than asked
            log.warning("fast path: FP8 left off: %s", exc)
            applied["fp8"] = f"off ({exc})"
    if settings.compile:
        cache = Path(settings.compile_cache).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        c.transformer.compile(mode=settings.compile_mode, fullgraph=False, dynamic=False)
        applied["compile"] = settings.compile_mode
        applied["compile_cache"] = str(cache)
    return applied
