"""How a LoRA is applied: diffusers' conversion, and merging into the transformer's weights with
exact copies of the originals (where a LoRA comes from is ``flux.lora_sources``).

Why merging: the weights change in place, so the compiled transformer sees new values through the
same graph (no recompile, whatever the LoRA's rank or strength), an edit with a LoRA costs what an
edit without one costs, and a request without a LoRA restores the saved originals bit for bit (no
drift from repeated fuse and unfuse).

Beside FP8 weights a LoRA is not merged (rounding W + delta to FP8 loses most of a LoRA's small
delta): setup() gives every linear layer a zeroed low-rank side branch in the compute dtype,
``output + up @ (down @ x)``, before compiling (``install_branches``; FLUX_LORA_BRANCH_RANK). A
request's LoRAs are copied into the branches' buffers: no recompile, and no LoRA is exact zeros,
so the base output comes back bit for bit. LoRAs whose ranks add up past the branch's rank are
reduced to their best approximation of that rank (truncated SVD of the summed delta, logged).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flux.errors import EditError, InputError

log = logging.getLogger(__name__)

LOADED_IN_MEMORY = 4  # converted LoRAs kept in memory for the next request


# --- diffusers' conversion, and the merge ------------------------------------------------------


@dataclass
class LoadedLora:
    """A converted LoRA: for each transformer Linear, its down (r, in) and scaled up (out, r) weights."""

    source: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    skipped_text_encoder_keys: int = 0


def convert(path: Path, source: str, transformer: torch.nn.Module, field_name: str = "lora_weights") -> LoadedLora:
    """Read a LoRA file and convert it with diffusers' Flux LoRA loader (kohya/sd-scripts, xlabs,
    BFL control, fal Kontext, ai-toolkit/peft); refuse one that matches no layer or has wrong shapes."""
    from diffusers import FluxKontextPipeline
    from safetensors.torch import load_file

    raw = load_file(str(path))
    broken = next((key for key, tensor in raw.items() if not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise InputError(f"{field_name}: the LoRA holds NaN or infinite values (in {broken}); it is refused")
    try:
        state, alphas, metadata = FluxKontextPipeline.lora_state_dict(
            raw, return_alphas=True, return_lora_metadata=True
        )
    except Exception as exc:  # diffusers' converters raise KeyError/ValueError on layouts they do not know
        raise InputError(
            f"{field_name}: this LoRA's layout is not one diffusers' Flux LoRA loader converts for this model; "
            f"is it a LoRA for FLUX.1 (not SDXL or another model)? ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    pairs = _transformer_pairs(state, field_name)
    global_alpha = _metadata_alpha(metadata)
    layers = {}
    modules = dict(transformer.named_modules())
    for name, pair in pairs.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear) or set(pair) != {"lora_A", "lora_B"}:
            raise InputError(
                f"{field_name}: the LoRA's layer {name!r} is not a linear layer of this model; "
                "is it a LoRA for FLUX.1 (not SDXL or another model)?"
            )
        down, up = pair["lora_A"].float(), pair["lora_B"].float()
        rank = down.shape[0]
        if down.shape[1] != module.in_features or up.shape != (module.out_features, rank):
            raise InputError(
                f"{field_name}: the LoRA's shapes for {name} ({tuple(up.shape)} x {tuple(down.shape)}) do not fit "
                f"the layer ({module.out_features} x {module.in_features})"
            )
        alpha = alphas.get(f"transformer.{name}.alpha") if alphas else None
        alpha = float(alpha) if alpha is not None else global_alpha
        scale = alpha / rank if alpha is not None else 1.0
        layers[name] = (down, up * scale)
    if not layers:
        raise InputError(
            f"{field_name}: the LoRA matches no layer of this model's transformer; is it a LoRA for FLUX.1 "
            "(not SDXL or another model)?"
        )
    return LoadedLora(source, layers, sum(not k.startswith("transformer.") for k in state))


def _transformer_pairs(state: dict[str, torch.Tensor], field_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: {"lora_A": down, "lora_B": up}} of the transformer's part of a converted LoRA."""
    text_keys = [k for k in state if not k.startswith("transformer.")]
    if text_keys:
        log.info(
            "%s: %d text-encoder LoRA tensors skipped (only the transformer is adapted)", field_name, len(text_keys)
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith("transformer."):
            continue
        name = key.removeprefix("transformer.")
        part = next((p for p in ("lora_A", "lora_B") if name.endswith(f".{p}.weight")), None)
        if part is None:
            raise InputError(
                f"{field_name}: unsupported LoRA tensors (for example {key}); only lora_A/lora_B weights are"
            )
        pairs.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = tensor
    return pairs


def _metadata_alpha(metadata: dict | None) -> float | None:
    """lora_alpha from the adapter config diffusers writes into a LoRA's safetensors metadata."""
    if not metadata:
        return None
    config = metadata.get("transformer") or metadata
    if isinstance(config, str):
        config = json.loads(config)
    alpha = config.get("lora_alpha") if isinstance(config, dict) else None
    return float(alpha) if alpha is not None else None


# --- the low-rank side branch (beside FP8 weights) ---------------------------------------------


def install_branches(transformer: torch.nn.Module, rank: int, dtype: torch.dtype) -> int:
    """Give every linear layer of the transformer a zeroed rank-``rank`` side branch; returns how many.
    Call before compiling: the branch's buffers are graph inputs, so new values need no recompile."""
    count = 0
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear) and not hasattr(module, "lora_down"):
            device = module.weight.device
            module.register_buffer("lora_down", torch.zeros(rank, module.in_features, dtype=dtype, device=device),
                                   persistent=False)  # fmt: skip
            module.register_buffer("lora_up", torch.zeros(module.out_features, rank, dtype=dtype, device=device),
                                   persistent=False)  # fmt: skip
            module.register_forward_hook(_add_branch)
            count += 1
    return count


def _add_branch(module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return output + F.linear(F.linear(x.to(module.lora_down.dtype), module.lora_down), module.lora_up).to(output.dtype)


def fit_rank(factors: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) pair of rank at most ``rank`` for sum(up @ down) over ``factors``: exact when the
    ranks add up to ``rank`` or less, otherwise the best rank-``rank`` approximation (truncated SVD)."""
    down = torch.cat([d.float() for d, _ in factors])
    up = torch.cat([u.float() for _, u in factors], dim=1)
    if down.shape[0] <= rank:
        return down, up
    # up @ down = Qu (Ru Rd^T) Qd^T: the SVD of the small core gives the SVD of the full delta
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]) @ q_down.T, (q_up @ u[:, :rank]) * root


@dataclass
class LoraState:
    """The LoRAs applied to one transformer now (merged, or in its side branches where it has them),
    the originals of every weight a merge changed, and the converted LoRAs kept in memory for the
    next request. ``branch_rank`` and ``fp8`` are what the fast path decided for this transformer."""

    transformer: torch.nn.Module
    branch_rank: int = 0  # the side branches' rank (install_branches); 0: LoRAs are merged
    fp8: bool = False  # the linear weights are FP8: without branches, no LoRA can be served
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    branched: set[str] = field(default_factory=set)
    applied: tuple[tuple[str, float], ...] = ()
    loaded: OrderedDict[Path, LoadedLora] = field(default_factory=OrderedDict)

    def converted(self, path: Path, source: str, field_name: str = "lora_weights") -> tuple[LoadedLora, float]:
        """The LoRA file converted for this transformer (kept in memory for the next requests), with
        the seconds it took (0 when it was in memory)."""
        if path in self.loaded:
            self.loaded.move_to_end(path)
            return self.loaded[path], 0.0
        start = time.perf_counter()
        self.loaded[path] = convert(path, source, self.transformer, field_name)
        while len(self.loaded) > LOADED_IN_MEMORY:
            self.loaded.popitem(last=False)
        return self.loaded[path], time.perf_counter() - start

    def apply(self, wanted: list[tuple[LoadedLora, float]]) -> float:
        """Make the transformer compute base + sum(strength * up @ down) (merged into the weights, or
        in the side branches); returns the seconds spent. The same LoRAs and strengths as now cost
        nothing; none restores the exact base."""
        key = tuple((lora.source, strength) for lora, strength in wanted if strength != 0.0)
        if key == self.applied:
            return 0.0
        start = time.perf_counter()
        modules = dict(self.transformer.named_modules())
        self.restore()
        try:
            if self.branch_rank:
                self._set_branches(wanted, modules, self.branch_rank)
            else:
                self._merge(wanted, modules)
        except BaseException:
            self.restore()  # never leave a half-merged LoRA for the next request
            raise
        self.applied = key
        return time.perf_counter() - start

    @torch.no_grad()
    def _merge(self, wanted: list[tuple[LoadedLora, float]], modules: dict[str, torch.nn.Module]) -> None:
        if self.fp8 and any(strength != 0.0 for _, strength in wanted):
            raise EditError(
                "LoRAs cannot be merged into FP8-quantized weights without losing most of their effect, and "
                "this server runs FP8 without LoRA side branches (README, LoRA: 'Beside FP8')"
            )
        for lora, strength in wanted:
            if strength == 0.0:
                continue
            for name, (down, up) in lora.layers.items():
                weight = modules[name].weight
                if name not in self.originals:
                    self.originals[name] = weight.detach().to("cpu", copy=True)
                delta = (up.to(weight.device) @ down.to(weight.device)) * strength
                weight.copy_((weight.float() + delta).to(weight.dtype))

    @torch.no_grad()
    def _set_branches(self, wanted: list[tuple[LoadedLora, float]], modules: dict[str, torch.nn.Module],
                      rank: int) -> None:  # fmt: skip
        per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for lora, strength in wanted:
            if strength == 0.0:
                continue
            for name, (down, up) in lora.layers.items():
                per_layer.setdefault(name, []).append((down, up * strength))
        reduced = 0
        for name, factors in per_layer.items():
            module = modules[name]
            reduced += sum(down.shape[0] for down, _ in factors) > rank
            down, up = fit_rank(factors, rank)
            self.branched.add(name)
            module.lora_down[: down.shape[0]].copy_(down)
            module.lora_up[:, : up.shape[1]].copy_(up)
        if reduced:
            log.warning("LoRA ranks add up past the branch's rank %d in %d layers: applied their best rank-%d "
                        "approximation there", rank, reduced, rank)  # fmt: skip

    def restore(self) -> None:
        """Copy every merged weight back from its saved original and zero every used branch, bit for bit."""
        modules = dict(self.transformer.named_modules())
        with torch.no_grad():
            for name, original in self.originals.items():
                modules[name].weight.copy_(original)
            for name in self.branched:
                modules[name].lora_down.zero_()
                modules[name].lora_up.zero_()
        self.originals.clear()
        self.branched.clear()
        self.applied = ()
