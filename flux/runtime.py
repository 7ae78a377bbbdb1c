"""The transformer runtime: the transformer loaded and made fast, and the operations an edit needs
of it. ``build_transformer`` is the one way to a ready transformer, shared by the predictor's
process and every context-parallel worker: load, attention backend, FP8, LoRA side branch, context
parallelism, compile, in that order. What it decided is a ``FastPath``.

``LocalRuntime`` runs the transformer on one device; ``flux.parallel.ParallelRuntime`` runs it on
several and offers the same operations (``TransformerRuntime``), so the pipeline and the edit do
not know which they have. This module knows nothing of processes or process groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from flux.config import FastPathConfig
from flux.fast import Compiled, compile_transformer, fp8_supported, quantize_fp8, set_attention_backend
from flux.loading import load_transformer
from flux.lora import LoraState, install_branches
from flux.report import StepCallback

log = logging.getLogger(__name__)
T = TypeVar("T")

# most published FLUX LoRAs have rank 16 to 64; two at once past 64 get their best rank-64 approximation
AUTO_LORA_BRANCH_RANK = 64


@dataclass(frozen=True)
class FastPath:
    """What setup decided for the transformer (the same on every rank)."""

    attention: str | None = None  # the attention backend set (CUDA); None: diffusers' default
    fp8: bool = False  # the linear layers are FP8
    fp8_off_because: str | None = None  # why FP8 stayed off where auto would have turned it on
    lora_branch_rank: int = 0  # the LoRA side branches' rank (lora.install_branches); 0: LoRAs are merged
    lora_branch_layers: int = 0
    context_parallel: int = 1  # ranks one edit runs on (Ulysses)
    compiled: Compiled | None = None
    seconds: float = field(default=0.0, compare=False)  # spent applying it

    def summary(self) -> dict[str, str]:
        """What was applied, for the log line and the benchmarks' reports (empty: nothing)."""
        done: dict[str, str] = {}
        if self.attention:
            done["attention"] = self.attention
        if self.fp8 or self.fp8_off_because:
            done["fp8"] = "on" if self.fp8 else f"off ({self.fp8_off_because})"
        if self.lora_branch_rank:
            done["lora_branch"] = f"rank {self.lora_branch_rank} on {self.lora_branch_layers} linear layers"
        if self.context_parallel > 1:
            done["context_parallel"] = f"ulysses x{self.context_parallel}"
        if self.compiled is not None:
            done["compile"] = self.compiled.backend
            done["compile_shapes"] = self.compiled.shapes
            if self.compiled.mode:
                done["compile_mode"] = self.compiled.mode
        return done


def enable_ulysses(transformer: torch.nn.Module, degree: int) -> None:
    """diffusers' context parallelism (Ulysses, ``degree`` ranks) on the transformer. The process
    group must be up. diffusers derives each rank's device from ``torch.accelerator.device_count()``,
    which is 0 on a CPU-only machine: it is counted as 1 for the call (each CPU rank is a process)."""
    from diffusers import ContextParallelConfig

    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, count())
    try:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        torch.accelerator.device_count = count


def prepare_transformer(
    transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, fast: FastPathConfig, ranks: int = 1
) -> FastPath:
    """The fast path, in its order: attention backend and FP8 (CUDA), the LoRA side branch, context
    parallelism over ``ranks`` (its process group up), compile. Returns what it decided."""
    attention, fp8, fp8_off_because = None, False, None
    start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        attention = set_attention_backend(transformer, fast.attention)
        if fast.wants_fp8(fp8_supported(device)):
            fp8, fp8_off_because = _fp8(transformer, fast)
    else:
        log.info("fast path: FP8, attention backends and channels_last are CUDA only; off on %s", device)
    rank = fast.branch_rank(fp8, AUTO_LORA_BRANCH_RANK)
    layers = install_branches(transformer, rank, dtype) if rank else 0
    if ranks > 1:
        enable_ulysses(transformer, ranks)
    compiled = compile_transformer(transformer, fast) if fast.compiles_on(device.type) else None
    return FastPath(attention, fp8, fp8_off_because, rank, layers, ranks, compiled, time.perf_counter() - start)


def _fp8(transformer: torch.nn.Module, fast: FastPathConfig) -> tuple[bool, str | None]:
    """(FP8 applied, why not): asked for by name, a failure stops setup; under auto it is logged."""
    try:
        quantize_fp8(transformer)
        return True, None
    except Exception as exc:
        if fast.fp8 != "auto":
            raise
        log.warning("fast path: FP8 left off: %s", exc)
        return False, str(exc)


def build_transformer(
    weights_dir: str | Path, device: torch.device, dtype: torch.dtype, fast: FastPathConfig, ranks: int = 1
) -> tuple[torch.nn.Module, FastPath]:
    """Load the transformer and apply the fast path (``prepare_transformer``): what rank 0 and
    every context-parallel worker run, in the same order."""
    transformer = load_transformer(weights_dir, device, dtype)
    return transformer, prepare_transformer(transformer, device, dtype, fast, ranks)


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to apply: its verified file, where it came from, its strength and the input it came in."""

    path: Path
    source: str
    strength: float
    field: str = "lora_weights"


@dataclass
class LorasApplied:
    """What applying a request's LoRAs did: each LoRA's layer count, and the seconds converting and merging."""

    layers: list[int] = field(default_factory=list)
    load_seconds: float = 0.0
    merge_seconds: float = 0.0


class TransformerRuntime(Protocol):
    """What the pipeline and the edit need of the transformer, however many devices run it."""

    decided: FastPath
    transformer: torch.nn.Module  # this process's (rank 0's) module: its config, the components' transformer

    def __call__(self, **inputs: object) -> tuple[torch.Tensor, ...]: ...
    def apply_loras(self, files: Sequence[LoraFile]) -> LorasApplied: ...
    def servable_size(self, width: int, height: int, conditioning_tokens: int) -> tuple[int, int]: ...
    def run(self, edit: Callable[[StepCallback | None], T], on_step: StepCallback | None) -> T: ...
    def healthy(self) -> bool: ...
    def compiled_frames(self) -> list[int]: ...
    def close(self) -> None: ...


@dataclass
class LocalRuntime:
    """The transformer on one device."""

    transformer: torch.nn.Module
    decided: FastPath = field(default_factory=FastPath)
    loras: LoraState = field(init=False)

    def __post_init__(self) -> None:
        self.loras = LoraState(self.transformer, self.decided.lora_branch_rank, self.decided.fp8)

    def __call__(self, **inputs: object) -> tuple[torch.Tensor, ...]:
        return self.transformer(**inputs, return_dict=False)

    def apply_loras(self, files: Sequence[LoraFile]) -> LorasApplied:
        """Make the transformer compute with ``files`` at their strengths (none: the exact base weights)."""
        applied, wanted = LorasApplied(), []
        for file in files:
            lora, seconds = self.loras.converted(file.path, file.source, file.field)
            applied.layers.append(len(lora.layers))
            applied.load_seconds += seconds
            wanted.append((lora, file.strength))
        applied.merge_seconds = self.loras.apply(wanted)
        return applied

    def servable_size(self, width: int, height: int, conditioning_tokens: int) -> tuple[int, int]:
        """The output size this runtime serves for the one asked (on one device: that one)."""
        return width, height

    def run(self, edit: Callable[[StepCallback | None], T], on_step: StepCallback | None) -> T:
        """Run ``edit(step_callback)``: on one device, as it is."""
        return edit(on_step)

    def healthy(self) -> bool:
        return True

    def compiled_frames(self) -> list[int]:
        """How many frames dynamo has compiled in this process."""
        from torch._dynamo.utils import counters

        return [int(counters["frames"]["total"])]

    def close(self) -> None:
        pass


def start_local(
    weights_dir: str | Path, device: torch.device, dtype: torch.dtype, fast: FastPathConfig
) -> LocalRuntime:
    """The transformer of ``weights_dir`` ready on one device."""
    start = time.perf_counter()
    transformer, decided = build_transformer(weights_dir, device, dtype, fast)
    log.info("transformer ready on %s in %.1fs: %s", device, time.perf_counter() - start, decided.summary() or "eager")
    return LocalRuntime(transformer, decided)
