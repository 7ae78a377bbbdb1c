"""The pieces of the fast path, each one operation on a transformer: the attention backend, FP8
linear layers, torch.compile under a shape policy. ``flux.runtime.prepare_transformer`` applies
them in order and records what it decided.

The TaylorSeer forecast is plain tensor math in the edit loop, outside the compiled transformer:
a forecast step never calls, and so never recompiles, the compiled graph.

Shape policy (``FLUX_COMPILE_SHAPES``): the default output size follows the input image, so nearly
every request has its own token count (target tokens + conditioning tokens).
- ``dynamic`` (default): the token axis is symbolic; one graph serves every size a request can make,
  compiled in setup() by the warm-up. Nothing compiles during a request.
- ``static``: one specialised graph per token count: the warm-up sizes are compiled in setup(), and
  any other size compiles during the request that first brings it: a stall of tens of seconds on an
  H100, and past dynamo's recompile limit (8) new sizes run uncompiled. Kept as the baseline the
  GPU check measures the default against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flux import sizes
from flux.config import FastPathConfig, set_library_default
from flux.errors import SetupError

log = logging.getLogger(__name__)

ATTENTION_PREFERENCE = ("_flash_3", "flash", "_native_cudnn", "native")
# setup() edits once at each: the commonest output (square) and a wide one, so the graph is
# compiled and checked at two token counts before the first request
WARM_UP_RATIOS = ("1:1", "16:9")


@dataclass(frozen=True)
class Compiled:
    """How the transformer was compiled."""

    backend: str
    shapes: str
    mode: str | None = None  # inductor only
    cache: Path | None = None  # inductor only: where its kernels persist between starts


def warm_up_sizes(base: int = sizes.BASE_SIDE) -> list[tuple[int, int]]:
    """The output sizes setup() edits once after compiling, for a model whose native side is ``base``."""
    return [sizes.output_size(ratio, 1, 1, base) for ratio in WARM_UP_RATIOS]


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def set_attention_backend(transformer: torch.nn.Module, choice: str) -> str:
    """``choice``, or for auto the first backend in order of preference that diffusers accepts here
    (its kernels installed). A backend asked for by name that cannot run here stops setup."""
    candidates = ATTENTION_PREFERENCE if choice == "auto" else (choice,)
    for name in candidates:
        try:
            transformer.set_attention_backend(name)
            return name
        except Exception as exc:  # a backend whose kernels are not installed says so by raising
            if choice != "auto":
                raise SetupError(f"FLUX_ATTENTION={choice!r} cannot run on this machine: {exc}") from None
            log.info("attention backend %s unavailable: %s", name, exc)
    transformer.reset_attention_backend()
    return "native"


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 (e4m3) weights and dynamic per-row activation scales for every linear layer (torchao)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as exc:  # missing, or built against another torch: either way FP8 cannot run
        raise SetupError(f"FP8 needs torchao (requirements-gpu.txt installs it): {exc}") from exc

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def compile_transformer(transformer: torch.nn.Module, fast: FastPathConfig) -> Compiled:
    """torch.compile the transformer in place under the shape policy."""
    import torch._dynamo

    if fast.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise SetupError(f"FLUX_COMPILE_BACKEND={fast.compile_backend!r} is not a torch.compile backend here")
    options: dict[str, object] = {}
    compiled = Compiled(fast.compile_backend, fast.compile_shapes)
    if fast.compile_backend == "inductor":
        cache = fast.compile_cache.resolve()
        cache.mkdir(parents=True, exist_ok=True)
        set_library_default("TORCHINDUCTOR_CACHE_DIR", str(cache))
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        options["mode"] = fast.compile_mode
        compiled = Compiled(fast.compile_backend, fast.compile_shapes, fast.compile_mode, cache)
    # dynamic=True: sizes are symbolic from the first trace (no specialise-then-recompile on the
    # second size, as dynamo's automatic dynamic shapes would do in a request)
    dynamic = fast.compile_shapes == "dynamic"
    transformer.compile(backend=fast.compile_backend, fullgraph=False, dynamic=dynamic, **options)
    return compiled
