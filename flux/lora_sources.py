"""Where a LoRA comes from: its source, whose token it is fetched with, the download, the disk cache.

Sources (``lora_weights``): a Hugging Face repo ``owner/name`` (its one .safetensors file) or
``owner/name/file.safetensors``, a huggingface.co URL, any http(s) URL of a .safetensors file, a
Replicate weights .tar (uncompressed) holding one .safetensors, a CivitAI model or download URL.
Only safetensors are read: pickle files are refused before anything is downloaded.

Tokens: the caller's own (``hf_api_token``, ``civitai_api_token``), each sent only to its service
(``flux.outbound.Credential``). The operator's ``HF_TOKEN`` / ``CIVITAI_API_TOKEN`` are used for a
caller's LoRA only where ``FLUX_LORA_OPERATOR_TOKENS=1``. A LoRA fetched with a token is cached
under a key that includes the token's hash, so no other caller gets it from the cache.

Every download goes through ``flux.outbound`` (address rule, redirects, size, deadline, minimum
rate). For a URL that is neither the Hub nor CivitAI, every failure reads the same ("could not
fetch"), so the server cannot be used to tell which internal ports answer.

``LoraStore`` holds what the configuration decides for all of this (``LoraStore.from_config``:
FLUX_LORA_CACHE, FLUX_LORA_CACHE_BYTES, FLUX_LORA_MAX_BYTES, HF_ENDPOINT, CIVITAI_ENDPOINT,
FLUX_LORA_OPERATOR_TOKENS and the FLUX_FETCH_* rules).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flux.errors import InputError
from flux.outbound import (
    AddressPolicy,
    Credential,
    FetchError,
    FetchLimits,
    Refused,
    TooSlow,
    download,
    get_json,
    serves,
)

if TYPE_CHECKING:
    from flux.config import Config

MAX_TAR_ENTRIES = 1000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NAME = r"[\w][\w.-]*"
_REPO = re.compile(rf"^{_NAME}/{_NAME}$")
_REPO_FILE = re.compile(rf"^({_NAME}/{_NAME})/((?:{_NAME}/)*{_NAME}\.safetensors)$")
# the first bytes of a gzip, bzip2, xz or zstd stream
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA of a request: where it comes from and how strongly it applies."""

    source: str
    strength: float = 1.0
    field: str = "lora_weights"


def lora_requests(*given: tuple[str | None, float, str]) -> tuple[LoraRequest, ...]:
    """(source, strength, field) triples as requests; blank sources are left out."""
    return tuple(
        LoraRequest(source.strip(), strength, name) for source, strength, name in given if source and source.strip()
    )


@dataclass(frozen=True)
class LoraTokens:
    """A request's tokens for LoRA downloads (the caller's, or the operator's where allowed)."""

    hf: str | None = None
    civitai: str | None = None

    def __repr__(self) -> str:
        return f"LoraTokens(hf={'set' if self.hf else None}, civitai={'set' if self.civitai else None})"

    def fingerprint(self) -> str:
        return "".join(hashlib.sha256(t.encode()).hexdigest() for t in (self.hf, self.civitai) if t)


NO_TOKENS = LoraTokens()


def describe(source: str) -> str:
    """The source as it may be logged and reported: a URL without its query (which can carry a token)."""
    parsed = urllib.parse.urlparse(source.strip())
    return parsed._replace(query="", fragment="").geturl() if parsed.scheme else source.strip()


def _is_service(url: str, domain: str, endpoint: str) -> bool:
    """Whether ``url`` is the service's (``outbound.serves``), whatever its scheme."""
    import httpx2

    try:
        return serves(httpx2.URL(url), domain, (endpoint,))
    except (httpx2.InvalidURL, ValueError, TypeError):
        return False


def _refuse_pickle(name: str, where: str) -> None:
    if name.lower().split("?")[0].endswith(PICKLE_SUFFIXES):
        raise InputError(
            f"{where}: {name!r} is a pickle file (.bin/.pt/.ckpt), which can run code when opened; "
            "only .safetensors LoRAs are accepted",
            where,
        )


@dataclass(frozen=True)
class LoraStore:
    """Where LoRAs come from and where they are kept: the services' addresses, the operator's
    tokens (used for a caller's LoRA only where ``operator_tokens``), the disk cache and its
    bounds, and the outbound rules every download follows."""

    cache: Path
    cache_bytes: int
    max_bytes: int
    hf_endpoint: str
    civitai_endpoint: str
    operator: LoraTokens
    policy: AddressPolicy
    limits: FetchLimits

    @classmethod
    def from_config(cls, config: Config) -> LoraStore:
        operator = LoraTokens(config.hf_token, config.civitai_api_token) if config.lora_operator_tokens else NO_TOKENS
        return cls(config.lora_cache, config.lora_cache_bytes, config.lora_max_bytes, config.hf_endpoint,
                   config.civitai_endpoint, operator, config.fetch_policy, config.fetch_limits())  # fmt: skip

    def tokens_for(self, hf: str | None = None, civitai: str | None = None) -> LoraTokens:
        """The caller's tokens; where the caller gives none, the operator's where allowed."""
        return LoraTokens(hf=hf or self.operator.hf or None, civitai=civitai or self.operator.civitai or None)

    # --- sources -------------------------------------------------------------------------------

    def _credentials(self, tokens: LoraTokens) -> list[Credential]:
        found = []
        if tokens.hf:
            found.append(Credential(tokens.hf, "huggingface.co", (self.hf_endpoint,)))
        if tokens.civitai:
            found.append(Credential(tokens.civitai, "civitai.com", (self.civitai_endpoint,)))
        return found

    def _credential_for(self, url: str, tokens: LoraTokens) -> Credential | None:
        import httpx2

        return next((c for c in self._credentials(tokens) if c.applies_to(httpx2.URL(url))), None)

    def _is_hub(self, url: str) -> bool:
        return _is_service(url, "huggingface.co", self.hf_endpoint)

    def _is_civitai(self, url: str) -> bool:
        return _is_service(url, "civitai.com", self.civitai_endpoint)

    def resolve(self, source: str, field_name: str = "lora_weights", tokens: LoraTokens = NO_TOKENS) -> tuple[str, str]:
        """(url, kind) for a source; kind is "file" (a .safetensors) or "tar" (a Replicate weights tar).
        Asks the Hub's API for a repo's one .safetensors file, CivitAI's for a model page's file."""
        text = source.strip()
        _refuse_pickle(text, field_name)
        if match := _REPO_FILE.match(text):
            return f"{self.hf_endpoint}/{match[1]}/resolve/main/{match[2]}", "file"
        if _REPO.match(text):
            return self._hub_repo_file(text, "main", field_name, tokens), "file"
        parsed = urllib.parse.urlparse(text)
        parts = parsed.path.split("/")[1:]
        if parsed.scheme not in ("http", "https") or not parsed.hostname or "." in parts or ".." in parts:
            raise InputError(
                f"{field_name} must be a Hugging Face repo (owner/name or owner/name/file.safetensors) or an "
                f"http(s) URL of a .safetensors file, a Replicate .tar or a CivitAI model; got {describe(source)!r}",
                field_name,
            )
        parts = [p for p in parts if p]
        if self._is_hub(text):
            if len(parts) == 2:
                return self._hub_repo_file("/".join(parts), "main", field_name, tokens), "file"
            if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
                return f"{self.hf_endpoint}/{parts[0]}/{parts[1]}/resolve/{parts[3]}/{'/'.join(parts[4:])}", "file"
        if self._is_civitai(text) and len(parts) >= 2 and parts[0] == "models" and parts[1].isdigit():
            version = urllib.parse.parse_qs(parsed.query).get("modelVersionId", [None])[0]
            return self._civitai_model_file(parts[1], version, field_name, tokens), "file"
        if parsed.path.lower().endswith(".tar"):
            return text, "tar"
        return text, "file"

    def _get_json(self, url: str, field_name: str, tokens: LoraTokens) -> dict:
        try:
            answer = get_json(url, limits=self.limits, policy=self.policy, credential=self._credential_for(url, tokens))
        except FetchError as exc:
            raise InputError(self._failure(field_name, url, exc), field_name) from None
        return answer if isinstance(answer, dict) else {}

    def _hub_repo_file(self, repo: str, revision: str, field_name: str, tokens: LoraTokens) -> str:
        url = f"{self.hf_endpoint}/api/models/{repo}/revision/{revision}"
        info = self._get_json(url, field_name, tokens)
        siblings = info.get("siblings", [])
        files = [s["rfilename"] for s in siblings if str(s.get("rfilename", "")).endswith(".safetensors")]
        if len(files) != 1:
            # a listing read with a token may be a private repo's: its file names are not repeated
            found = "" if self._credential_for(url, tokens) else f" ({', '.join(files[:5]) or 'none'})"
            raise InputError(
                f"{field_name}: {repo} has {len(files)} .safetensors files{found}; name one as {repo}/FILE.safetensors",
                field_name,
            )
        return f"{self.hf_endpoint}/{repo}/resolve/{revision}/{urllib.parse.quote(files[0])}"

    def _civitai_model_file(self, model_id: str, version_id: str | None, field_name: str, tokens: LoraTokens) -> str:
        """The download URL of a CivitAI model page's SafeTensor file: of the version the page's
        ``modelVersionId`` names, else of the newest version (CivitAI lists it first); its primary file first."""
        info = self._get_json(f"{self.civitai_endpoint}/api/v1/models/{model_id}", field_name, tokens)
        versions = info.get("modelVersions", [])
        if version_id is not None:
            versions = [v for v in versions if str(v.get("id")) == version_id]
            if not versions:
                raise InputError(f"{field_name}: CivitAI model {model_id} has no version {version_id}", field_name)
        for version in versions[:1]:
            files = sorted(version.get("files", []), key=lambda f: not f.get("primary"))
            for file in files:
                if file.get("metadata", {}).get("format") == "SafeTensor" and file.get("downloadUrl"):
                    return file["downloadUrl"]
        raise InputError(
            f"{field_name}: CivitAI model {model_id} has no SafeTensor file; only safetensors are accepted", field_name
        )

    def _failure(self, field_name: str, url: str, exc: FetchError) -> str:
        """What a caller is told: the Hub and CivitAI explain 401/403/404 and slowness; any other URL
        gets one message whatever happened, so answers cannot map what the server can reach."""
        if exc.status == 413:
            return f"{field_name}: the LoRA is larger than the limit of {self.max_bytes} bytes (FLUX_LORA_MAX_BYTES)"
        if not (self._is_hub(url) or self._is_civitai(url)) or isinstance(exc, Refused):
            return f"{field_name}: could not fetch the LoRA from {describe(url)}"
        host = urllib.parse.urlparse(url).hostname
        if exc.status in (401, 403):
            return (
                f"{field_name}: access denied (HTTP {exc.status}) by {host}; for a gated or private Hugging Face "
                "repo give hf_api_token, for CivitAI civitai_api_token"
            )
        if exc.status == 404:
            return f"{field_name}: not found (HTTP 404) at {host}; check the repo, file or URL"
        if isinstance(exc, TooSlow):
            return f"{field_name}: the download from {host} was too slow ({exc}); try again"
        return f"{field_name}: {host} did not answer ({exc}); try again later"

    # --- the disk cache ----------------------------------------------------------------------------

    def cached_path(self, source: str, tokens: LoraTokens = NO_TOKENS) -> Path:
        key = hashlib.sha256((source.strip() + "\n" + tokens.fingerprint()).encode()).hexdigest()[:40]
        return self.cache / f"{key}.safetensors"

    def fetch(self, source: str, field_name: str = "lora_weights", tokens: LoraTokens = NO_TOKENS) -> tuple[Path, bool]:
        """The LoRA's verified .safetensors in the disk cache, downloading it on first use: (path, downloaded)."""
        target = self.cached_path(source, tokens)
        if target.is_file():
            os.utime(target)  # most recently used
            return target, False
        url, kind = self.resolve(source, field_name, tokens)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            try:
                download(url, partial, limits=self.limits, policy=self.policy,
                         credential=self._credential_for(url, tokens), limit=self.max_bytes, retries=2)  # fmt: skip
            except FetchError as exc:
                raise InputError(self._failure(field_name, url, exc), field_name) from None
            if kind == "tar":
                _extract_one_safetensors(partial, field_name)
            check_safetensors(partial, field_name)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        self.evict(keep=target)
        return target, True

    def clean_partials(self) -> list[Path]:
        """Remove partial downloads left by a worker that died mid-download (call at startup)."""
        removed = [p for p in self.cache.glob("*.part*") if p.is_file()]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used files (LoRAs and stray partial downloads) until the cache fits its
        limit; returns what was deleted."""
        files = sorted((p for p in self.cache.glob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        removed = []
        for path in files:
            if total <= self.cache_bytes:
                break
            if path == keep:
                continue
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed


def _extract_one_safetensors(tar_path: Path, field_name: str) -> None:
    """Replace ``tar_path`` by the one .safetensors file inside it. Only uncompressed tars are read,
    at most MAX_TAR_ENTRIES entries; links, paths outside the archive's folder, and archives with no
    or several candidates are refused."""
    with open(tar_path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED):
            raise InputError(f"{field_name}: compressed archives are refused; send an uncompressed .tar", field_name)
    extracted = tar_path.with_name(tar_path.name + ".member")
    try:
        with tarfile.open(tar_path, "r:") as archive:
            candidate = None
            for count, member in enumerate(archive, start=1):
                if count > MAX_TAR_ENTRIES:
                    raise InputError(f"{field_name}: the archive holds more than {MAX_TAR_ENTRIES} entries", field_name)
                name = member.name
                if member.issym() or member.islnk():
                    raise InputError(f"{field_name}: the archive holds a link ({name}); links are refused", field_name)
                if name.startswith("/") or ".." in Path(name).parts:
                    raise InputError(
                        f"{field_name}: the archive entry {name!r} would land outside its folder", field_name
                    )
                if member.isfile() and name.endswith(".safetensors"):
                    if candidate is not None:
                        raise InputError(
                            f"{field_name}: the archive must hold exactly one .safetensors LoRA; found "
                            f"{candidate.name} and {name}"
                        )
                    candidate = member
            if candidate is None:
                raise InputError(
                    f"{field_name}: the archive must hold exactly one .safetensors LoRA; found none", field_name
                )
            with archive.extractfile(candidate) as member_file, open(extracted, "wb") as out:
                shutil.copyfileobj(member_file, out, 1 << 20)
        os.replace(extracted, tar_path)
    except tarfile.TarError as exc:
        raise InputError(f"{field_name}: not a readable uncompressed .tar archive ({exc})", field_name) from None
    finally:
        extracted.unlink(missing_ok=True)


def check_safetensors(path: Path, field_name: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise InputError(f"{field_name}: the LoRA file holds no tensors", field_name)
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise InputError(f"{field_name}: not a valid .safetensors file ({exc})", field_name) from None
