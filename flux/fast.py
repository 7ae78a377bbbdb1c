"""The fast path: torch.compile of the transformer under a shape policy; on CUDA also FP8 linear
layers, the fastest attention backend and a channels_last VAE.

The TaylorSeer forecast is plain tensor math in the edit loop, outside the compiled transformer:
a forecast step never calls, and so never recompiles, the compiled graph.

Shape policy (``FLUX_COMPILE_SHAPES``): the default output size follows the input image, so nearly
every request has its own token count (target tokens + conditioning tokens).
- ``dynamic`` (default): the token axis is symbolic; one graph serves every size a request can make,
  compiled in setup() by the warm-up. Nothing compiles during a request.
- ``static``: one specialised graph per token count (the old behaviour): the warm-up sizes are
  compiled in setup(), and any other size compiles during the request that first brings it: a stall
  of tens of seconds on an H100, and past dynamo's recompile limit (8) new sizes run uncompiled.
  Kept as the baseline the GPU check measures the default against.

Settings (environment variables, read by ``FastSettings.from_env``):

| variable | default | meaning |
|---|---|---|
| FLUX_COMPILE | auto | torch.compile the transformer: auto = on CUDA only; 1 = on any device (the CPU too); 0 = off |
| FLUX_COMPILE_BACKEND | inductor | torch.compile backend; `eager` checks dynamo's graphs and guards in seconds (tests) |
| FLUX_COMPILE_SHAPES | dynamic | the shape policy above |
| FLUX_COMPILE_MODE | default | inductor mode (max-autotune modes tune kernels for minutes at the first cold start) |
| FLUX_FP8 | auto | FP8 weights and activations for the transformer's linear layers (torchao, CUDA); auto = on where the GPU supports FP8 (compute capability 8.9+) |
| FLUX_LORA_BRANCH_RANK | auto | rank of the LoRA side branch given to every linear layer before compiling (flux/lora.py), so LoRAs apply beside FP8 weights; auto = 64 where FP8 is on, none otherwise (LoRAs are then merged); an integer installs it on any device; 0 = none (an FP8 server then refuses LoRAs) |
| FLUX_ATTENTION | auto | diffusers attention backend (CUDA); auto tries FlashAttention 3, then cuDNN, then native SDPA |
| FLUX_COMPILE_CACHE | .cache/torch-compile | where compiled kernels persist between cold starts (TORCHINDUCTOR_CACHE_DIR) |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import sizes
from flux.loading import Components
from flux.lora import install_branches
from flux.settings import default as setting_default
from flux.settings import default_for_library
from flux.settings import get as setting

log = logging.getLogger(__name__)

ATTENTION_PREFERENCE = ("_flash_3", "flash", "_native_cudnn", "native")
SHAPE_POLICIES = ("dynamic", "static")
# setup() edits once at each: the commonest output (square) and a wide one, so the graph is
# compiled and checked at two token counts before the first request
WARM_UP_RATIOS = ("1:1", "16:9")
_OFF = ("0", "false", "no", "off")
# most published FLUX LoRAs have rank 16 to 64; two at once past 64 get their best rank-64 approximation
AUTO_LORA_BRANCH_RANK = 64


# each field is read from the setting of the same name with FLUX_ before it (flux.settings has the defaults)
_FIELDS = ("compile", "compile_backend", "compile_shapes", "compile_mode", "fp8", "attention", "compile_cache",
           "lora_branch_rank")  # fmt: skip


def _default(name: str) -> str:
    return setting_default(f"FLUX_{name.upper()}")


@dataclass
class FastSettings:
    compile: str = _default("compile")
    compile_backend: str = _default("compile_backend")
    compile_shapes: str = _default("compile_shapes")
    compile_mode: str = _default("compile_mode")
    fp8: str = _default("fp8")
    attention: str = _default("attention")
    compile_cache: str = _default("compile_cache")
    lora_branch_rank: str = _default("lora_branch_rank")

    @classmethod
    def from_env(cls) -> FastSettings:
        chosen = cls(**{name: setting(f"FLUX_{name.upper()}") for name in _FIELDS})
        if chosen.lora_branch_rank != "auto" and not chosen.lora_branch_rank.isdigit():
            raise ValueError(f"FLUX_LORA_BRANCH_RANK must be auto or a whole number; got {chosen.lora_branch_rank!r}")
        if chosen.compile_shapes not in SHAPE_POLICIES:
            raise ValueError(
                f"FLUX_COMPILE_SHAPES must be one of {', '.join(SHAPE_POLICIES)}; got {chosen.compile_shapes!r}"
            )
        return chosen

    def compiles_on(self, device: torch.device) -> bool:
        if self.compile == "auto":
            return device.type == "cuda"
        return self.compile.lower() not in _OFF

    def branch_rank(self, fp8_applied: bool) -> int:
        if self.lora_branch_rank == "auto":
            return AUTO_LORA_BRANCH_RANK if fp8_applied else 0
        return int(self.lora_branch_rank)


def warm_up_sizes(base: int = sizes.BASE_SIDE) -> list[tuple[int, int]]:
    """The output sizes setup() edits once after compiling, for a model whose native side is ``base``."""
    return [sizes.output_size(ratio, 1, 1, base) for ratio in WARM_UP_RATIOS]


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _wants_fp8(settings: FastSettings, device: torch.device) -> bool:
    if settings.fp8 == "auto":
        return fp8_supported(device)
    return settings.fp8.lower() not in _OFF


def set_attention_backend(transformer: torch.nn.Module, choice: str) -> str:
    """The first attention backend in order of preference that diffusers accepts here (its kernels installed)."""
    candidates = ATTENTION_PREFERENCE if choice == "auto" else (choice,)
    for name in candidates:
        try:
            transformer.set_attention_backend(name)
            return name
        except Exception as exc:  # a backend whose kernels are not installed says so by raising
            log.info("attention backend %s unavailable: %s", name, exc)
    transformer.reset_attention_backend()
    return "native"


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 (e4m3) weights and dynamic per-row activation scales for every linear layer (torchao)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as exc:  # missing, or built against another torch: either way FP8 cannot run
        raise RuntimeError(f"FP8 needs torchao (requirements-gpu.txt installs it): {exc}") from exc

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def compile_transformer(components: Components, settings: FastSettings) -> dict[str, object]:
    """torch.compile the transformer in place under the shape policy; returns what was applied."""
    return _compile(components.transformer, settings)


def _compile(transformer: torch.nn.Module, settings: FastSettings) -> dict[str, object]:
    applied: dict[str, object] = {"compile": settings.compile_backend, "compile_shapes": settings.compile_shapes}
    options: dict[str, object] = {}
    if settings.compile_backend == "inductor":
        cache = Path(settings.compile_cache).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        default_for_library("TORCHINDUCTOR_CACHE_DIR", str(cache))
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        options["mode"] = settings.compile_mode
        applied["compile_mode"] = settings.compile_mode
        applied["compile_cache"] = str(cache)
    # dynamic=True: sizes are symbolic from the first trace (no specialise-then-recompile on the
    # second size, as dynamo's automatic dynamic shapes would do in a request)
    dynamic = settings.compile_shapes == "dynamic"
    transformer.compile(backend=settings.compile_backend, fullgraph=False, dynamic=dynamic, **options)
    return applied


def optimize(components: Components, settings: FastSettings | None = None, parallel: int = 1) -> dict[str, object]:
    """Apply the fast path in place; returns what was applied (empty where nothing applies), with
    the decisions LoRAs depend on: ``fp8`` (True when the weights are FP8) and ``lora_branch_rank``.
    ``parallel`` > 1: context parallelism over that many ranks (flux.parallel; its process group is up)."""
    settings = settings or FastSettings.from_env()
    if components.device.type == "cuda":
        components.vae.to(memory_format=torch.channels_last)
    else:
        log.info("fast path: FP8, attention backends and channels_last are CUDA only; off on %s", components.device)
    applied = optimize_transformer(components.transformer, components.device, components.dtype, settings, parallel)
    return {**applied, "vae_channels_last": True} if components.device.type == "cuda" else applied


def optimize_transformer(
    transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, settings: FastSettings, parallel: int = 1
) -> dict[str, object]:
    """The transformer's part of the fast path, in its order: attention backend, FP8, the LoRA side
    branch, context parallelism, compile (every rank of a parallel edit runs exactly this)."""
    applied: dict[str, object] = {}
    if device.type == "cuda":
        applied.update(_cuda_only(transformer, device, settings))
    rank = settings.branch_rank(applied.get("fp8") is True)
    if rank:
        layers = install_branches(transformer, rank, dtype)
        applied["lora_branch"] = f"rank {rank} on {layers} linear layers"
        applied["lora_branch_rank"] = rank
    if parallel > 1:
        from flux.parallel import enable_ulysses

        enable_ulysses(transformer, parallel)
        applied["context_parallel"] = f"ulysses x{parallel}"
    if settings.compiles_on(device):
        applied.update(_compile(transformer, settings))
    return applied


def _cuda_only(transformer: torch.nn.Module, device: torch.device, settings: FastSettings) -> dict[str, object]:
    applied: dict[str, object] = {}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    applied["attention"] = set_attention_backend(transformer, settings.attention)
    if _wants_fp8(settings, device):
        try:
            quantize_fp8(transformer)
            applied["fp8"] = True
        except RuntimeError as exc:
            if settings.fp8 != "auto":
                raise  # asked for by name: say so rather than run slower than asked
            log.warning("fast path: FP8 left off: %s", exc)
            applied["fp8"] = f"off ({exc})"
    return applied
