"""The weights fetcher: parallel, resumable (HTTP Range), verified before a file reaches its final path.

Files come from the Hugging Face Hub (``HF_ENDPOINT``, at each source's pinned revision) or from
any plain HTTPS mirror laid out like the weights tree (``WEIGHTS_BASE_URL``): ``WeightsRemote``. A file the
manifest gives no sha256 for is checked against what the Hub reports for it at the pinned revision
(its LFS sha256, or the git blob hash of a small file), so no file is accepted on its size alone
when a hash can be had. Each file is written to ``PATH.part``,
resumed from where it stopped after a dropped connection, and renamed to ``PATH`` only when its
size and sha256 match the manifest; a mismatching file is moved aside to ``.rejected/`` and never
used. The token (``HF_TOKEN``) is sent as an Authorization header only to the Hub over https,
``HF_ENDPOINT`` and the mirror the operator named (never to a redirect off that origin), and is
never printed. Every connection goes through ``flux.outbound``'s address rule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flux import weights
from flux.outbound import (
    PUBLIC_ONLY,
    AddressPolicy,
    Clock,
    Credential,
    FetchError,
    FetchLimits,
    download,
    get_json,
    open_url,
)

if TYPE_CHECKING:
    from flux.config import Config

log = logging.getLogger(__name__)

__all__ = ["FetchError", "FetchReport", "WeightsRemote", "fetch", "pin"]


@dataclass
class FetchReport:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class WeightsRemote:
    """Where the weights come from and the rules of the fetch: the Hub (``hf_endpoint``) at each
    source's pinned revision, or a mirror laid out like the tree (``base_url``); the operator's
    token; the address rule and the bounds (no deadline: a weights file resumes instead)."""

    hf_endpoint: str = "https://huggingface.co"
    base_url: str | None = None
    token: str | None = None
    policy: AddressPolicy = PUBLIC_ONLY
    limits: FetchLimits = FetchLimits(deadline_s=None, min_rate=100_000, window_s=30)

    @classmethod
    def from_config(cls, config: Config) -> WeightsRemote:
        return cls(config.hf_endpoint, config.weights_base_url, config.hf_token, config.fetch_policy,
                   config.fetch_limits(deadline=False))  # fmt: skip

    @property
    def credential(self) -> Credential | None:
        """The operator's token for the weights: to the Hub (https), HF_ENDPOINT and the mirror the operator named."""
        return Credential(self.token, "huggingface.co", (self.hf_endpoint, self.base_url or "")) if self.token else None

    def file_url(self, entry: dict, manifest: dict) -> str:
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + entry["path"]
        source = manifest["sources"][entry["source"]]
        revision = source.get("revision") or "main"
        return f"{self.hf_endpoint}/{source['repository']}/resolve/{revision}/{urllib.parse.quote(entry['remote'])}"


def hub_file_info(remote: WeightsRemote, repository: str, revision: str, paths: list[str]) -> dict[str, dict]:
    """What the Hub reports for files at a revision: {path: {"size", "sha256" (LFS files) or "git_sha1"}}."""
    url = f"{remote.hf_endpoint}/api/models/{repository}/paths-info/{revision}"
    body = urllib.parse.urlencode([("paths", p) for p in paths] + [("expand", "true")]).encode()
    listing = get_json(
        url, limits=remote.limits, policy=remote.policy, credential=remote.credential, method="POST", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    info = {}
    for item in listing if isinstance(listing, list) else []:
        if item.get("type", "file") != "file":
            continue
        lfs = item.get("lfs") or {}
        hashes = {"sha256": lfs["oid"]} if lfs.get("oid") else {"git_sha1": item.get("oid")}
        info[item["path"]] = {"size": item.get("size"), **hashes}
    return info


def with_hub_hashes(manifest: dict, remote: WeightsRemote) -> dict:
    """The manifest, with the Hub's size and hash filled in for every file it has no sha256 for."""
    missing: dict[str, list[dict]] = {}
    for entry in manifest["files"]:
        if not entry.get("sha256") and entry.get("source"):
            missing.setdefault(entry["source"], []).append(entry)
    if not missing:
        return manifest
    filled = {**manifest, "files": [dict(e) for e in manifest["files"]]}
    by_path = {e["path"]: e for e in filled["files"]}
    for name, entries in missing.items():
        source = manifest["sources"][name]
        revision = source.get("revision") or "main"
        try:
            info = hub_file_info(remote, source["repository"], revision, [e["remote"] for e in entries])
        except FetchError as exc:
            log.warning(
                "could not ask the Hub for the hashes of %d files of %s@%s (%s): they are checked by size only",
                len(entries), source["repository"], revision, exc,
            )  # fmt: skip
            continue
        for entry in entries:
            reported = info.get(entry["remote"])
            if reported is None:
                raise FetchError(
                    f"{entry['path']}: the Hub lists no {entry['remote']} in {source['repository']}@{revision}"
                )
            target = by_path[entry["path"]]
            if target.get("size") is None:
                target["size"] = reported["size"]
            target.update({k: v for k, v in reported.items() if k in ("sha256", "git_sha1") and v})
    return filled


def git_blob_sha1(path: Path) -> str:
    """The git blob hash of a file (what the Hub reports as the oid of a file not in LFS)."""
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _licence_hint(manifest: dict, entry: dict) -> str:
    source = manifest.get("sources", {}).get(entry.get("source") or "", {})
    repo = source.get("repository", "the model repository")
    return (
        f"access denied. {repo} is gated: accept its licence at https://huggingface.co/{repo} with your account, "
        "create a read token, and set HF_TOKEN to it"
    )


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="weights")

    def add(self, n: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _set_aside(root: Path, path: Path) -> Path:
    rejected = root / ".rejected" / f"{path.relative_to(root)}.{int(time.time() * 1000)}"
    rejected.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, rejected)
    return rejected


def fetch_file(
    entry: dict,
    manifest: dict,
    root: Path,
    remote: WeightsRemote,
    on_bytes: Callable[[int], None] = lambda n: None,
    **download_options,
) -> int:
    """Download one manifest entry into ``root``; returns the bytes transferred."""
    target = root / entry["path"]
    partial = target.with_name(target.name + ".part")
    url = remote.file_url(entry, manifest)
    expected = entry.get("size")
    token = remote.token
    try:
        transferred = download(
            url, partial, limits=remote.limits, policy=remote.policy, credential=remote.credential,
            expected=expected, on_bytes=on_bytes, **download_options,
        )  # fmt: skip
    except FetchError as exc:
        if exc.status in (401, 403):
            raise FetchError(f"{entry['path']}: HTTP {exc.status}, {_licence_hint(manifest, entry)}") from None
        if exc.status == 404:
            raise FetchError(f"{entry['path']}: not found (HTTP 404) at {_redact(url, token)}") from None
        if exc.status is not None:
            raise FetchError(f"{entry['path']}: HTTP {exc.status} from {_redact(url, token)}") from None
        raise FetchError(f"{entry['path']}: {_redact(str(exc), token)}; try again to resume") from None

    size = partial.stat().st_size
    if expected is not None and size != expected:
        aside = _set_aside(root, partial)
        raise FetchError(f"{entry['path']}: {size} bytes, expected {expected}; set aside as {aside}")
    if entry.get("sha256"):
        digest = weights.sha256_of(partial)
        if digest != entry["sha256"]:
            aside = _set_aside(root, partial)
            raise FetchError(f"{entry['path']}: sha256 {digest} does not match {entry['sha256']}; set aside as {aside}")
    elif entry.get("git_sha1"):
        digest = git_blob_sha1(partial)
        if digest != entry["git_sha1"]:
            aside = _set_aside(root, partial)
            raise FetchError(
                f"{entry['path']}: git hash {digest} does not match the Hub's {entry['git_sha1']}; set aside as {aside}"
            )
    os.replace(partial, target)
    return transferred


def _remote_size(entry: dict, manifest: dict, remote: WeightsRemote) -> int | None:
    clock = Clock(remote.limits)
    url = remote.file_url(entry, manifest)
    try:
        with open_url(url, clock=clock, credential=remote.credential, method="HEAD", policy=remote.policy) as r:
            length = r.headers.get("Content-Length")
            return int(length) if r.status_code < 400 and length and length.isdigit() else None
    except FetchError:
        return None


def _check_free_disk(root: Path, sizes: dict[str, int | None]) -> None:
    """Fail before downloading when the files left to fetch (less what their .part files hold) do not fit."""
    needed = 0
    for path, size in sizes.items():
        partial = root / (path + ".part")
        needed += max((size or 0) - (partial.stat().st_size if partial.exists() else 0), 0)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise FetchError(f"not enough free disk in {root}: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")


def fetch(
    out_dir: str | Path,
    manifest: dict | None = None,
    remote: WeightsRemote = WeightsRemote(),
    workers: int = 8,
    rehash: bool = False,
    progress: bool = True,
    **file_options,
) -> FetchReport:
    """Bring ``out_dir`` to the manifest: download what is missing or wrong, skip what is verified."""
    started = time.perf_counter()
    manifest = manifest if manifest is not None else weights.load_manifest()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    given = manifest
    manifest = with_hub_hashes(manifest, remote)
    report = FetchReport()
    todo = []
    for entry in manifest["files"]:
        target = root / entry["path"]
        size_ok = target.is_file() and (entry.get("size") is None or target.stat().st_size == entry["size"])
        if size_ok and (not rehash or not entry.get("sha256") or weights.sha256_of(target) == entry["sha256"]):
            report.skipped.append(entry["path"])
            continue
        if target.exists():
            _set_aside(root, target)
        todo.append(entry)
    if todo:
        sizes = {e["path"]: e.get("size") or _remote_size(e, manifest, remote) for e in todo}
        _check_free_disk(root, sizes)
        bar = _Progress(sum(s or 0 for s in sizes.values()), progress)
        errors: list[str] = []
        lock = threading.Lock()

        def one(entry: dict) -> None:
            try:
                n = fetch_file(entry, manifest, root, remote, on_bytes=bar.add, **file_options)
                with lock:
                    report.downloaded.append(entry["path"])
                    report.bytes_downloaded += n
            except FetchError as exc:
                with lock:
                    errors.append(str(exc))

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                list(pool.map(one, todo))
        finally:
            bar.close()
        if errors:
            raise FetchError("could not fetch every file:\n  " + "\n  ".join(sorted(errors)))
    if given.get("files") != weights.load_manifest()["files"]:
        (root / weights.TREE_MANIFEST_NAME).write_text(json.dumps(given, indent=2) + "\n")
    report.seconds = time.perf_counter() - started
    return report


def pin(out_dir: str | Path, manifest_path: Path = weights.MANIFEST_PATH) -> dict:
    """Record sizes and sha256 of a verified download into the project manifest."""
    pinned = weights.describe_tree(out_dir, weights.load_manifest(manifest_path))
    pinned.pop("note", None)
    manifest_path.write_text(json.dumps(pinned, indent=2) + "\n")
    return pinned
