"""Weights on disk: the manifest of every file the model loads, and the check of a weights tree against it."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flux.errors import SetupError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = PROJECT_ROOT / "weights_manifest.json"
# the trained proxy (scripts/train_proxy.py), committed: a real edit on the CPU without the real
# weights (left out of the image cog builds)
PROXY_DIR = PROJECT_ROOT / "flux" / "proxy_weights"
# A tree the project generated (tiny or trained proxy) describes its own files in this file.
TREE_MANIFEST_NAME = "weights_manifest.json"


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int | None = None
    sha256: str | None = None
    source: str | None = None
    remote: str | None = None


def load_manifest(path: str | Path = MANIFEST_PATH) -> dict:
    return json.loads(Path(path).read_text())


def manifest_files(manifest: dict) -> list[ManifestFile]:
    return [
        ManifestFile(**{k: f.get(k) for k in ("path", "size", "sha256", "source", "remote")}) for f in manifest["files"]
    ]


def manifest_for(weights_dir: str | Path) -> dict:
    """The manifest a tree is checked against: its own (a generated tree) or the project's (the real model)."""
    own = Path(weights_dir) / TREE_MANIFEST_NAME
    return load_manifest(own if own.is_file() else MANIFEST_PATH)


def problems(weights_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Missing files and files whose size differs from the manifest; empty when the tree is complete.

    Checks sizes only, so a complete tree is recognised in well under a second.
    """
    root = Path(weights_dir)
    manifest = manifest if manifest is not None else manifest_for(root)
    found = []
    for f in manifest_files(manifest):
        target = root / f.path
        try:
            size = os.stat(target).st_size
        except FileNotFoundError:
            found.append(f"missing: {f.path}")
            continue
        except OSError as exc:
            found.append(f"unreadable: {f.path} ({exc.strerror})")
            continue
        if f.size is not None and size != f.size:
            found.append(f"wrong size: {f.path} ({size} bytes, expected {f.size})")
    return found


def fetch_command(weights_dir: str | Path) -> str:
    """The command that fetches the weights, with the interpreter running now (the project's
    .venv/bin/python, or python in the image cog builds)."""
    python = Path(sys.executable)
    shown = python.relative_to(Path.cwd()) if python.is_relative_to(Path.cwd()) else "python"
    return f"{shown} -m flux download --out {weights_dir}"


def require_complete(weights_dir: str | Path) -> None:
    """Raise SetupError listing what is missing, and the command that fetches it."""
    found = problems(weights_dir)
    if found:
        listed = "\n  ".join(found[:40]) + (f"\n  ... and {len(found) - 40} more" if len(found) > 40 else "")
        raise SetupError(
            f"the weights in {weights_dir} are incomplete:\n  {listed}\n"
            f"Fetch them with: {fetch_command(weights_dir)}, or let setup() fetch them: set "
            "WEIGHTS_BASE_URL (a mirror or weights CDN) or HF_TOKEN (the Hugging Face Hub)"
        )


def sha256_of(path: str | Path, chunk: int = 8 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_tree(weights_dir: str | Path, base: dict | None = None) -> dict:
    """A manifest of ``weights_dir`` with the size and sha256 of each of the project manifest's files."""
    root = Path(weights_dir)
    base = base if base is not None else load_manifest(MANIFEST_PATH)
    described = {k: v for k, v in base.items() if k != "files"}
    described["files"] = [
        {**f, "size": (root / f["path"]).stat().st_size, "sha256": sha256_of(root / f["path"])} for f in base["files"]
    ]
    described["total_size"] = sum(f["size"] for f in described["files"])
    return described
