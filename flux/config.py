"""The product's configuration: every environment variable it reads, parsed and checked once, at
setup (and once in each context-parallel worker), into one typed ``Config`` that is passed down.
Nothing reads the environment during a request.

``SETTINGS`` is the one table: name, default, meaning and what each accepts. A bad value stops
setup with a ``SetupError`` naming the variable, its value and what it accepts. The README's
settings table is generated from it (``python -m flux.config``; a test holds the two together).
An empty value counts as unset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from flux.errors import SetupError
from flux.outbound import AddressPolicy, Allowed, FetchLimits, parse_allowed

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SHAPE_POLICIES = ("dynamic", "static")


# --- parsers: text -> value, or ValueError saying what is accepted -----------------------------


def _optional_text(raw: str) -> str | None:
    return raw or None


def _path(raw: str) -> Path:
    return Path(raw)


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _url(raw: str) -> str:
    if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", raw):
        raise ValueError
    return raw.rstrip("/")


def _optional_url(raw: str) -> str | None:
    return _url(raw) if raw else None


def _switch(raw: str) -> bool:
    if raw.lower() in _ON:
        return True
    if raw.lower() in _OFF:
        return False
    raise ValueError


def _auto_switch(raw: str) -> str:
    """auto, on or off (1/0, true/false, yes/no count as on/off)."""
    return "auto" if raw.lower() == "auto" else ("on" if _switch(raw) else "off")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError
        return raw

    return parse


def _whole(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low:
            raise ValueError
        return value

    return parse


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError
    return value


def _rate(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError
    return value


def _device(raw: str) -> str | None:
    if raw and not re.fullmatch(r"cpu|cuda(:\d+)?", raw):
        raise ValueError
    return raw or None


def _backend_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*", raw):
        raise ValueError
    return raw


def _attention(raw: str) -> str:
    if raw == "auto":
        return raw
    from diffusers.models.attention_dispatch import AttentionBackendName

    if raw not in {backend.value for backend in AttentionBackendName}:
        raise ValueError
    return raw


def _branch_rank(raw: str) -> int | None:
    return None if raw == "auto" else _whole(0)(raw)


def _allowed(raw: str) -> tuple[Allowed, ...]:
    return parse_allowed(raw)


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str
    parse: Callable[[str], object]
    accepts: str

    @property
    def field(self) -> str:
        """The Config field it fills: the name in lower case without the FLUX_ prefix."""
        return self.name.lower().removeprefix("flux_")


SETTINGS: tuple[Setting, ...] = (
    Setting("WEIGHTS_DIR", "weights", "the weights tree setup() checks and loads (cog.yaml sets /src/weights)",
            _path, "a folder"),
    Setting("WEIGHTS_BASE_URL", "", "a mirror or weights CDN laid out like the tree; setup() fetches missing files",
            _optional_url, "an http(s) URL"),
    Setting("HF_TOKEN", "", "the operator's Hugging Face token, for the gated weights", _optional_text, "a token"),
    Setting("HF_ENDPOINT", "https://huggingface.co", "the Hub's address (a mirror)", _url, "an http(s) URL"),
    Setting("CIVITAI_ENDPOINT", "https://civitai.com", "CivitAI's address (a mirror)", _url, "an http(s) URL"),
    Setting("CIVITAI_API_TOKEN", "", "the operator's CivitAI token (for callers' LoRAs only with the next setting)",
            _optional_text, "a token"),
    Setting("FLUX_LORA_OPERATOR_TOKENS", "0", "1: a caller's LoRA may be fetched with the operator's tokens",
            _switch, "0 or 1"),
    Setting("FLUX_DEVICE", "", "cpu, cuda or cuda:N; default CUDA when present, else the CPU", _device,
            "cpu, cuda or cuda:N"),
    Setting("FLUX_OUTPUT_DIR", "", "where output images are written; default flux-outputs in the temp folder",
            _optional_path, "a folder"),
    Setting("FLUX_COMPILE", "auto", "torch.compile the transformer: auto (CUDA only), 1 or 0", _auto_switch,
            "auto, 1 or 0"),
    Setting("FLUX_COMPILE_BACKEND", "inductor", "the compile backend (eager checks graphs and guards in seconds)",
            _backend_name, "a torch.compile backend name"),
    Setting("FLUX_COMPILE_SHAPES", "dynamic", "dynamic (one graph for every size) or static",
            _choice(*SHAPE_POLICIES), " or ".join(SHAPE_POLICIES)),
    Setting("FLUX_COMPILE_MODE", "default", "the torch.compile mode", _choice(*COMPILE_MODES), ", ".join(COMPILE_MODES)),
    Setting("FLUX_COMPILE_CACHE", ".cache/torch-compile", "where compiled kernels are cached between starts", _path,
            "a folder"),
    Setting("FLUX_FP8", "auto", "FP8 linear layers: auto (compute capability 8.9+ with torchao), on or off",
            _auto_switch, "auto, on or off"),
    Setting("FLUX_ATTENTION", "auto", "the attention backend: auto (fastest diffusers accepts) or a backend name",
            _attention, "auto or a diffusers attention backend name (flash, _flash_3, native, ...)"),
    Setting("FLUX_LORA_BRANCH_RANK", "auto", "rank of the LoRA side branch: auto (64 with FP8, none without) or N",
            _branch_rank, "auto or a whole number"),
    Setting("FLUX_CONTEXT_PARALLEL", "1", "devices one edit runs on (context parallelism); 1 = off", _whole(1),
            "a whole number, 1 or more"),
    Setting("FLUX_CONTEXT_PARALLEL_TIMEOUT_S", "120", "deadline of every collective between the devices, seconds",
            _seconds, "a number of seconds above 0"),
    Setting("FLUX_LORA_CACHE", ".cache/loras", "the LoRA disk cache", _path, "a folder"),
    Setting("FLUX_LORA_CACHE_BYTES", str(10 * 2**30), "the LoRA cache's size; least recently used files go beyond",
            _whole(0), "a whole number of bytes"),
    Setting("FLUX_LORA_MAX_BYTES", str(2 * 2**30), "the largest LoRA download", _whole(1),
            "a whole number of bytes, 1 or more"),
    Setting("FLUX_FETCH_ALLOW", "", "hosts, addresses or networks (each with an optional port) fetches may reach",
            _allowed, "a comma list of hosts, addresses or networks, each with an optional :port"),
    Setting("FLUX_FETCH_DEADLINE_S", "600", "wall-clock deadline of a LoRA or API download, seconds", _seconds,
            "a number of seconds above 0"),
    Setting("FLUX_FETCH_MIN_RATE", "100000", "minimum rate of every download over each window, bytes a second",
            _rate, "a number of bytes a second, 0 or more"),
    Setting("FLUX_FETCH_RATE_WINDOW_S", "30", "the window of the minimum rate, and the longest wait for one read",
            _seconds, "a number of seconds above 0"),
)  # fmt: skip
_SECRETS = ("HF_TOKEN", "CIVITAI_API_TOKEN")


@dataclass(frozen=True)
class FastPathConfig:
    """The settings of the transformer's fast path (runtime.prepare_transformer), as ``Config.fast``
    reads them (their defaults are the SETTINGS'; ``FastPathConfig.defaults`` gives them)."""

    compile: str
    compile_backend: str
    compile_shapes: str
    compile_mode: str
    compile_cache: Path
    fp8: str
    attention: str
    lora_branch_rank: int | None  # None: auto

    @staticmethod
    def defaults(**changes: object) -> FastPathConfig:
        """The settings' defaults, with ``changes``."""
        return replace(Config.from_env({}).fast, **changes)

    def compiles_on(self, device_type: str) -> bool:
        return device_type == "cuda" if self.compile == "auto" else self.compile == "on"

    def wants_fp8(self, fp8_supported: bool) -> bool:
        return fp8_supported if self.fp8 == "auto" else self.fp8 == "on"

    def branch_rank(self, fp8_applied: bool, auto_rank: int) -> int:
        if self.lora_branch_rank is None:
            return auto_rank if fp8_applied else 0
        return self.lora_branch_rank


@dataclass(frozen=True)
class Config:
    """What a running server was configured with (each field: the setting of the same name, ``SETTINGS``)."""

    weights_dir: Path
    weights_base_url: str | None
    hf_token: str | None
    hf_endpoint: str
    civitai_endpoint: str
    civitai_api_token: str | None
    lora_operator_tokens: bool
    device: str | None
    output_dir: Path | None
    compile: str
    compile_backend: str
    compile_shapes: str
    compile_mode: str
    compile_cache: Path
    fp8: str
    attention: str
    lora_branch_rank: int | None
    context_parallel: int
    context_parallel_timeout_s: float
    lora_cache: Path
    lora_cache_bytes: int
    lora_max_bytes: int
    fetch_allow: tuple[Allowed, ...]
    fetch_deadline_s: float
    fetch_min_rate: float
    fetch_rate_window_s: float
    # the values as read, for the processes this one starts (context-parallel workers)
    raw: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: str) -> Config:
        """Parse every setting from ``environ`` (default: the process environment), with
        ``overrides`` (setting name -> text) on top; a bad value raises SetupError."""
        environ = os.environ if environ is None else environ
        values, raw = {}, []
        for setting in SETTINGS:
            text = overrides.get(setting.name) or environ.get(setting.name) or setting.default
            try:
                values[setting.field] = setting.parse(text)
            except (ValueError, ImportError):
                raise SetupError(
                    f"{setting.name}={text!r} is not valid: it accepts {setting.accepts} (default {setting.default!r})"
                ) from None
            raw.append((setting.name, text))
        return cls(**values, raw=tuple(raw))

    def process_environ(self) -> dict[str, str]:
        """The environment of a process this one starts (a context-parallel worker): this one's,
        with every setting as this Config read it, so the worker reads back the same Config."""
        return {**os.environ, **dict(self.raw)}

    def described(self) -> dict[str, str]:
        """Every setting's value, tokens masked: what setup() logs."""
        return {name: ("set" if name in _SECRETS and text else text) for name, text in self.raw}

    @property
    def fast(self) -> FastPathConfig:
        names = {f.name for f in fields(FastPathConfig)}
        return FastPathConfig(**{name: getattr(self, name) for name in names})

    @property
    def fetch_policy(self) -> AddressPolicy:
        return AddressPolicy(self.fetch_allow)

    def fetch_limits(self, deadline: bool = True) -> FetchLimits:
        """The bounds of a download; without ``deadline`` (the weights: they resume instead)."""
        return FetchLimits(self.fetch_deadline_s if deadline else None, self.fetch_min_rate, self.fetch_rate_window_s)


def set_library_default(name: str, value: str) -> bool:
    """Give a library's own environment variable a value where the operator set none (read by
    that library, not by the product: TORCHINDUCTOR_CACHE_DIR, GLOO/NCCL settings); True when
    this set it."""
    if name in os.environ:
        return False
    os.environ[name] = value
    return True


def markdown_table() -> str:
    """The README's settings table."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.name}` | {f'`{s.default}`' if s.default else ''} | {s.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
