"""Where a stage's model lives: a model stage records a HF id or writes a `model/` directory."""

from __future__ import annotations

from pathlib import Path

from specdraft.pipeline.dag import read_manifest


def model_location(artifact: Path) -> str:
    """The model id or directory a model stage (target, draft_init, reference, distil) produced."""
    location = read_manifest(artifact)["info"]["model"]
    local = Path(artifact) / location
    return str(local) if local.exists() else location
