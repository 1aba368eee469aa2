"""Artifact directories: the manifest a finished stage leaves, and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

MANIFEST = "manifest.json"


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an existing one by rename."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def model_location(artifact: Path) -> str:
    """The model id or directory a model stage (target, draft_init, reference, distil) produced."""
    location = read_manifest(artifact)["info"]["model"]
    local = Path(artifact) / location
    return str(local) if local.exists() else location
