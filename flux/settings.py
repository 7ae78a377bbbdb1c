"""Every environment variable the product reads: its name, default and meaning, and the one place
``os.environ`` is read. The README's settings table lists exactly these (a test holds them together).

An empty value counts as unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting("WEIGHTS_DIR", "weights", "the weights tree setup() checks and loads (cog.yaml sets /src/weights)"),
    Setting("WEIGHTS_BASE_URL", "", "a mirror or weights CDN laid out like the tree; setup() fetches missing files"),
    Setting("HF_TOKEN", "", "the operator's Hugging Face token, for the gated weights"),
    Setting("HF_ENDPOINT", "https://huggingface.co", "the Hub's address (a mirror)"),
    Setting("CIVITAI_ENDPOINT", "https://civitai.com", "CivitAI's address (a mirror)"),
    Setting("CIVITAI_API_TOKEN", "", "the operator's CivitAI token (for callers' LoRAs only with the next setting)"),
    Setting("FLUX_LORA_OPERATOR_TOKENS", "0", "1: a caller's LoRA may be fetched with the operator's tokens"),
    Setting("FLUX_DEVICE", "", "cpu, cuda or cuda:N; default CUDA when present, else the CPU"),
    Setting("FLUX_OUTPUT_DIR", "", "where output images are written; default flux-outputs in the temp folder"),
    Setting("FLUX_COMPILE", "auto", "torch.compile the transformer: auto (CUDA only), 1 or 0"),
    Setting("FLUX_COMPILE_BACKEND", "inductor", "the compile backend (eager checks graphs and guards in seconds)"),
    Setting("FLUX_COMPILE_SHAPES", "dynamic", "dynamic (one graph for every size) or static"),
    Setting("FLUX_COMPILE_MODE", "default", "the torch.compile mode"),
    Setting("FLUX_COMPILE_CACHE", ".cache/torch-compile", "where compiled kernels are cached between starts"),
    Setting("FLUX_FP8", "auto", "FP8 linear layers: auto (compute capability 8.9+ with torchao), on or off"),
    Setting("FLUX_ATTENTION", "auto", "the attention backend: auto (fastest diffusers accepts) or a backend name"),
    Setting("FLUX_LORA_BRANCH_RANK", "auto", "rank of the LoRA side branch: auto (64 with FP8, none without) or N"),
    Setting("FLUX_CONTEXT_PARALLEL", "1", "devices one edit runs on (context parallelism); 1 = off"),
    Setting("FLUX_CONTEXT_PARALLEL_TIMEOUT_S", "120", "deadline of every collective between the devices, seconds"),
    Setting("FLUX_LORA_CACHE", ".cache/loras", "the LoRA disk cache"),
    Setting("FLUX_LORA_CACHE_BYTES", str(10 * 2**30), "the LoRA cache's size; least recently used files go beyond"),
    Setting("FLUX_LORA_MAX_BYTES", str(2 * 2**30), "the largest LoRA download"),
    Setting("FLUX_FETCH_ALLOW", "", "hosts, addresses or networks (each with an optional port) fetches may reach"),
    Setting("FLUX_FETCH_DEADLINE_S", "600", "wall-clock deadline of a LoRA or API download, seconds"),
    Setting("FLUX_FETCH_MIN_RATE", "100000", "minimum rate of every download over each window, bytes a second"),
    Setting("FLUX_FETCH_RATE_WINDOW_S", "30", "the window of the minimum rate, and the longest wait for one read"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def default(name: str) -> str:
    return _BY_NAME[name].default


def get(name: str) -> str:
    """The setting's value, or its default when unset or empty."""
    return os.environ.get(name) or _BY_NAME[name].default


def get_int(name: str) -> int:
    return int(get(name))


def get_float(name: str) -> float:
    return float(get(name))


def default_for_library(name: str, value: str) -> None:
    """Give a library's own environment variable a value where the operator set none."""
    os.environ.setdefault(name, value)
