"""LoRA per request: where a LoRA file comes from, the disk cache, diffusers' conversion, and
merging into the transformer's weights with exact copies of the originals.

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

Sources (``lora_weights``): a Hugging Face repo ``owner/name`` (its one .safetensors file) or
``owner/name/file.safetensors``, a huggingface.co URL, any http(s) URL of a .safetensors file, a
Replicate weights .tar holding one .safetensors, a CivitAI model or download URL. Only safetensors
are read: pickle files are refused before anything is downloaded.

Settings (environment): FLUX_LORA_CACHE (default .cache/loras), FLUX_LORA_CACHE_BYTES (10 GiB; least
recently used files are evicted beyond it), FLUX_LORA_MAX_BYTES (2 GiB per download),
HF_ENDPOINT, CIVITAI_ENDPOINT, HF_TOKEN, CIVITAI_API_TOKEN (sent only to their own hosts, never
logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flux.errors import EditError, InputError
from flux.fetch import USER_AGENT, FetchError, hf_endpoint, stream

log = logging.getLogger(__name__)

MIN_STRENGTH, MAX_STRENGTH = -1.0, 3.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_REPO_FILE = re.compile(r"^([\w.-]+/[\w.-]+)/(.+\.safetensors)$")
LOADED_IN_MEMORY = 4  # converted LoRAs kept in memory for the next request


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA of a request: where it comes from and how strongly it applies."""

    source: str
    strength: float = 1.0
    field: str = "lora_weights"


# --- where a LoRA comes from -------------------------------------------------------------------


def describe(source: str) -> str:
    """The source as it may be logged and reported: a URL without its query (which can carry a token)."""
    parsed = urllib.parse.urlparse(source.strip())
    return parsed._replace(query="", fragment="").geturl() if parsed.scheme else source.strip()


def _host(url: str) -> str:
    return (urllib.parse.urlparse(url).hostname or "").lower()


def _token_for(url: str) -> str | None:
    host = _host(url)
    if host == _host(hf_endpoint()) or host.endswith("huggingface.co"):
        return os.environ.get("HF_TOKEN") or None
    if host.endswith("civitai.com") or host == _host(civitai_endpoint()):
        return os.environ.get("CIVITAI_API_TOKEN") or None
    return None


def civitai_endpoint() -> str:
    """CivitAI's address (CIVITAI_ENDPOINT: a mirror, or the tests' local server)."""
    return os.environ.get("CIVITAI_ENDPOINT", "https://civitai.com").rstrip("/")


def _headers(url: str) -> dict[str, str]:
    token = _token_for(url)
    return {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {token}"} if token else {})}


def _refuse_pickle(name: str, where: str) -> None:
    if name.lower().split("?")[0].endswith(PICKLE_SUFFIXES):
        raise InputError(
            f"{where}: {name!r} is a pickle file (.bin/.pt/.ckpt), which can run code when opened; "
            "only .safetensors LoRAs are accepted"
        )


def resolve(source: str, field_name: str = "lora_weights") -> tuple[str, str]:
    """(url, kind) for a source; kind is "file" (a .safetensors) or "tar" (a Replicate weights tar).
    Asks the Hub's API for a repo's one .safetensors file, CivitAI's for a model page's file."""
    text = source.strip()
    _refuse_pickle(text, field_name)
    if match := _REPO_FILE.match(text):
        return f"{hf_endpoint()}/{match[1]}/resolve/main/{match[2]}", "file"
    if _REPO.match(text):
        return _hub_repo_file(text, "main", field_name), "file"
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(
            f"{field_name} must be a Hugging Face repo (owner/name or owner/name/file.safetensors) or an "
            f"http(s) URL of a .safetensors file, a Replicate .tar or a CivitAI model; got {source!r}"
        )
    parts = [p for p in parsed.path.split("/") if p]
    host = parsed.hostname.lower()
    if host == _host(hf_endpoint()) or host.endswith("huggingface.co"):
        if len(parts) == 2:
            return _hub_repo_file("/".join(parts), "main", field_name), "file"
        if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
            return f"{hf_endpoint()}/{parts[0]}/{parts[1]}/resolve/{parts[3]}/{'/'.join(parts[4:])}", "file"
    if host.endswith("civitai.com") and len(parts) >= 2 and parts[0] == "models" and parts[1].isdigit():
        version = urllib.parse.parse_qs(parsed.query).get("modelVersionId", [None])[0]
        return _civitai_model_file(parts[1], version, field_name), "file"
    if parsed.path.lower().endswith(".tar"):
        return text, "tar"
    return text, "file"


def _get_json(url: str, field_name: str) -> dict:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_headers(url)), timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise InputError(_http_message(field_name, exc.code, url)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"{field_name}: could not ask {_host(url)} about the LoRA ({exc}); try again") from None


def _hub_repo_file(repo: str, revision: str, field_name: str) -> str:
    info = _get_json(f"{hf_endpoint()}/api/models/{repo}/revision/{revision}", field_name)
    files = [s["rfilename"] for s in info.get("siblings", []) if s.get("rfilename", "").endswith(".safetensors")]
    if len(files) != 1:
        found = ", ".join(files[:5]) or "none"
        raise InputError(
            f"{field_name}: {repo} has {len(files)} .safetensors files ({found}); name one as {repo}/FILE.safetensors"
        )
    return f"{hf_endpoint()}/{repo}/resolve/{revision}/{files[0]}"


def _civitai_model_file(model_id: str, version_id: str | None, field_name: str) -> str:
    """The download URL of a CivitAI model page's SafeTensor file: of the version the page's
    ``modelVersionId`` names, else of the newest version (CivitAI lists it first); its primary file first."""
    info = _get_json(f"{civitai_endpoint()}/api/v1/models/{model_id}", field_name)
    versions = info.get("modelVersions", [])
    if version_id is not None:
        versions = [v for v in versions if str(v.get("id")) == version_id]
        if not versions:
            raise InputError(f"{field_name}: CivitAI model {model_id} has no version {version_id}")
    for version in versions[:1]:
        files = sorted(version.get("files", []), key=lambda f: not f.get("primary"))
        for file in files:
            if file.get("metadata", {}).get("format") == "SafeTensor" and file.get("downloadUrl"):
                return file["downloadUrl"]
    raise InputError(f"{field_name}: CivitAI model {model_id} has no SafeTensor file; only safetensors are accepted")


def _http_message(field_name: str, status: int, url: str) -> str:
    if status in (401, 403):
        return (
            f"{field_name}: access denied (HTTP {status}) by {_host(url)}; for a gated or private Hugging Face "
            "repo set HF_TOKEN, for CivitAI set CIVITAI_API_TOKEN"
        )
    if status == 404:
        return f"{field_name}: not found (HTTP 404) at {_host(url)}; check the repo, file or URL"
    if status == 413:
        return f"{field_name}: the LoRA is larger than the limit of {max_download_bytes()} bytes (FLUX_LORA_MAX_BYTES)"
    return f"{field_name}: HTTP {status} from {_host(url)}; try again later"


# --- the disk cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("FLUX_LORA_CACHE", ".cache/loras"))


def cache_limit_bytes() -> int:
    return int(os.environ.get("FLUX_LORA_CACHE_BYTES", 10 * 2**30))


def max_download_bytes() -> int:
    return int(os.environ.get("FLUX_LORA_MAX_BYTES", 2 * 2**30))


def cached_path(source: str) -> Path:
    return cache_dir() / (hashlib.sha256(source.strip().encode()).hexdigest()[:40] + ".safetensors")


def fetch_lora(source: str, field_name: str = "lora_weights") -> tuple[Path, bool]:
    """The LoRA's verified .safetensors in the disk cache, downloading it on first use: (path, downloaded)."""
    target = cached_path(source)
    if target.is_file():
        os.utime(target)  # most recently used
        return target, False
    url, kind = resolve(source, field_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        try:
            stream(url, partial, _headers(url), limit=max_download_bytes(), retries=2, timeout=60, name=field_name)
        except FetchError as exc:
            if exc.status is not None:
                raise InputError(_http_message(field_name, exc.status, url)) from None
            raise InputError(f"{field_name}: the download failed ({exc}); try again") from None
        if kind == "tar":
            _extract_one_safetensors(partial, field_name)
        _check_safetensors(partial, field_name)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    evict(keep=target)
    return target, True


def _extract_one_safetensors(tar_path: Path, field_name: str) -> None:
    """Replace ``tar_path`` by the one .safetensors file inside it; refuse links, paths outside the
    archive's folder, and archives with no or several candidates."""
    try:
        with tarfile.open(tar_path) as archive:
            members = archive.getmembers()
            for member in members:
                name = member.name
                if member.issym() or member.islnk():
                    raise InputError(f"{field_name}: the archive holds a link ({name}); links are refused")
                if name.startswith("/") or ".." in Path(name).parts:
                    raise InputError(f"{field_name}: the archive entry {name!r} would land outside its folder")
            candidates = [m for m in members if m.isfile() and m.name.endswith(".safetensors")]
            if len(candidates) != 1:
                found = ", ".join(m.name for m in candidates[:5]) or "none"
                raise InputError(
                    f"{field_name}: the archive must hold exactly one .safetensors LoRA; found {len(candidates)} ({found})"
                )
            if candidates[0].size > max_download_bytes():
                raise InputError(_http_message(field_name, 413, ""))
            data = archive.extractfile(candidates[0]).read()
    except tarfile.TarError as exc:
        raise InputError(f"{field_name}: not a readable .tar archive ({exc})") from None
    tar_path.write_bytes(data)


def _check_safetensors(path: Path, field_name: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise InputError(f"{field_name}: the LoRA file holds no tensors")
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise InputError(f"{field_name}: not a valid .safetensors file ({exc})") from None


def evict(keep: Path | None = None) -> list[Path]:
    """Delete least recently used LoRAs until the cache fits its limit; returns what was deleted."""
    files = sorted(cache_dir().glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = []
    for path in files:
        if total <= cache_limit_bytes():
            break
        if path == keep:
            continue
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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
    try:
        state, alphas, metadata = FluxKontextPipeline.lora_state_dict(
            raw, return_alphas=True, return_lora_metadata=True
        )
    except Exception as exc:  # diffusers' converters raise KeyError/ValueError on layouts they do not know
        raise InputError(
            f"{field_name}: this LoRA's layout is not one diffusers' Flux LoRA loader converts for this model; "
            f"is it a LoRA for FLUX.1 (not SDXL or another model)? ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    text_keys = [k for k in state if not k.startswith("transformer.")]
    if text_keys:
        log.info(
            "%s: %d text-encoder LoRA tensors skipped (only the transformer is adapted)", field_name, len(text_keys)
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if not key.startswith("transformer."):
            continue
        name = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name.removesuffix(marker), {})[part] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise InputError(
            f"{field_name}: unsupported LoRA tensors (for example {unknown[0]}); only lora_A/lora_B weights are"
        )
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
    return LoadedLora(source, layers, len(text_keys))


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


def branch_rank(transformer: torch.nn.Module) -> int:
    """The rank of the installed side branches; 0 where there are none."""
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            down = getattr(module, "lora_down", None)
            return 0 if down is None else down.shape[0]
    return 0


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
    next request."""

    transformer: torch.nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    branched: set[str] = field(default_factory=set)
    applied: tuple[tuple[str, float], ...] = ()
    loaded: OrderedDict[str, LoadedLora] = field(default_factory=OrderedDict)

    def load(self, request: LoraRequest) -> tuple[LoadedLora, dict[str, float | bool]]:
        """The converted LoRA (from memory, the disk cache, or downloaded), with what it cost."""
        if request.source in self.loaded:
            self.loaded.move_to_end(request.source)
            return self.loaded[request.source], {"fetch_seconds": 0.0, "load_seconds": 0.0, "downloaded": False}
        start = time.perf_counter()
        path, downloaded = fetch_lora(request.source, request.field)
        fetched = time.perf_counter() - start
        lora = convert(path, request.source, self.transformer, request.field)
        self.loaded[request.source] = lora
        while len(self.loaded) > LOADED_IN_MEMORY:
            self.loaded.popitem(last=False)
        return lora, {"fetch_seconds": fetched, "load_seconds": time.perf_counter() - start - fetched,
                      "downloaded": downloaded}  # fmt: skip

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
            rank = branch_rank(self.transformer)
            if rank:
                self._set_branches(wanted, modules, rank)
            else:
                self._merge(wanted, modules)
        except BaseException:
            self.restore()  # never leave a half-merged LoRA for the next request
            raise
        self.applied = key
        return time.perf_counter() - start

    @torch.no_grad()
    def _merge(self, wanted: list[tuple[LoadedLora, float]], modules: dict[str, torch.nn.Module]) -> None:
        for lora, strength in wanted:
            if strength == 0.0:
                continue
            for name, (down, up) in lora.layers.items():
                weight = modules[name].weight
                if type(weight.data) is not torch.Tensor:
                    raise EditError(
                        "LoRAs cannot be merged into FP8-quantized weights without losing most of their effect; "
                        "this server runs FP8 without LoRA branches (FLUX_LORA_BRANCH_RANK=0): set "
                        "FLUX_LORA_BRANCH_RANK=auto or FLUX_FP8=off to serve LoRAs"
                    )
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
