"""Output files of a long-running server: one unique file per prediction, old ones cleaned up."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

# Cog returns a file after predict() ends, so the newest few must outlive their prediction.
KEEP_OUTPUTS = 8


def output_dir(configured: Path | None = None) -> Path:
    """FLUX_OUTPUT_DIR, default flux-outputs in the temporary folder; made if missing."""
    directory = configured or Path(tempfile.gettempdir()) / "flux-outputs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def new_output_path(extension: str, directory: Path, keep: int = KEEP_OUTPUTS) -> Path:
    """A fresh unique path in ``directory``; removes all but the newest ``keep - 1`` earlier outputs first."""
    earlier = sorted(
        (p for p in directory.glob("edit-*") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in earlier[keep - 1 :]:
        old.unlink(missing_ok=True)
    return directory / f"edit-{uuid.uuid4().hex}.{extension}"
