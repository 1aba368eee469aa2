"""Artifact directories: the manifest a finished stage leaves, and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextvars import ContextVar
from pathlib import Path

MANIFEST = "manifest.json"


def lineage_hash(artifacts) -> str:
    """One hash for a set of content-addressed artifact directories: names the job's results."""
    names = "\n".join(sorted(Path(p).name for p in artifacts))
    return hashlib.sha256(names.encode()).hexdigest()[:16]


# Set by the executor while a stage runs: a directory that survives a failed attempt (named after
# the stage's artifact), where training stages keep checkpoints so that a retry resumes.
checkpoint_dir: ContextVar[Path | None] = ContextVar("checkpoint_dir", default=None)

# Set by the executor while a stage runs with a remote store: a store.RemoteCheckpoints that keeps
# the checkpoint directory's checkpoints in the store too (a retry elsewhere resumes from them).
checkpoint_mirror: ContextVar = ContextVar("checkpoint_mirror", default=None)

# Set by the executor while a stage runs: (its store, the names of its input artifacts), so that
# the stage's data-parallel workers on other machines fetch the same inputs first.
stage_inputs: ContextVar[tuple | None] = ContextVar("stage_inputs", default=None)


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


def given_model(cfg) -> dict:
    """A user's model is recorded, not copied: later stages load it with these settings."""
    return {
        "model": cfg.model,
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }


def model_location(artifact: Path) -> str:
    """The model id or directory a model stage (target, draft_init, reference, distil) produced."""
    location = read_manifest(artifact)["info"]["model"]
    local = Path(artifact) / location
    return str(local) if local.exists() else location


def load_model_artifact(artifact: Path, device="cpu"):
    """Load the causal LM a model stage produced, with the settings it recorded (dtype, attention)."""
    from specdraft.drafts.models import load_causal_lm

    info = read_manifest(artifact)["info"]
    return load_causal_lm(
        model_location(artifact),
        dtype=info.get("dtype", "float32"),
        attn_implementation=info.get("attn_implementation", "auto"),
        trust_remote_code=info.get("trust_remote_code", False),
        device=device,
    )


def load_tokenizer_artifact(artifact: Path):
    """The tokenizer of a model stage's model (the target's tokenizer is the pair's tokenizer)."""
    from specdraft.drafts.models import load_tokenizer

    info = read_manifest(artifact)["info"]
    return load_tokenizer(
        model_location(artifact), trust_remote_code=info.get("trust_remote_code", False)
    )
