"""Artifact directories: the manifest a finished stage leaves (with every file's size and sha256),
their integrity checks, atomic writes, and the context a running stage is given.

What reuse guarantees (artifact_problem, on every reuse, export and fetch): every file the manifest
lists is there with its recorded size; an artifact of at most $SPECDRAFT_VERIFY_HASH_BYTES (64 MiB)
is hashed whole, and so is any file of at most 1 MiB, any file written since publication (its
mtime moved) and any file whose manifest predates sampled hashes; every other file must match its
sampled sha256 (16 blocks of 64 KiB at offsets fixed by its size: 1 MiB read per file). So a file
replaced by other content of the same size (another model's weights, a re-trained checkpoint)
is refused even with its mtime put back, unless the two agree on all 16 blocks; a few flipped bytes
outside the blocks (bit rot) are found only by `specdraft verify-store`, which hashes every file
whole. A manifest without a file list cannot be checked and counts as damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specdraft.drafts.pair import UNTRUSTED, ModelTrust
from specdraft.pipeline.engine.environment import hash_on_reuse_bytes
from specdraft.pipeline.engine.fingerprint import (
    SAMPLE_BLOCK,
    SAMPLE_BLOCKS,
    sampled_sha256,
    sha256_file,
)

if TYPE_CHECKING:
    from specdraft.pipeline.engine.store import RemoteCheckpoints, Store

MANIFEST = "manifest.json"
# Files up to this many bytes are always hashed whole (a sampled hash would read as much).
SAMPLED_FILE_BYTES = SAMPLE_BLOCK * SAMPLE_BLOCKS


def lineage_hash(artifacts) -> str:
    """One hash for a set of content-addressed artifact directories: names the job's results."""
    names = "\n".join(sorted(Path(p).name for p in artifacts))
    return hashlib.sha256(names.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageContext:
    """What the executor gives a running stage besides its config and inputs."""

    out: Path  # the directory the stage writes its artifact into
    seed: int
    # Survives a failed attempt (named after the stage's artifact): training stages keep their
    # checkpoints there so that a retry resumes. None: nothing is kept across attempts.
    checkpoints: Path | None = None
    # With a remote store: keeps the checkpoints in the store too (a retry elsewhere resumes).
    checkpoint_mirror: RemoteCheckpoints | None = None
    # The store and the names of the stage's input artifacts, so that data-parallel workers on
    # other machines fetch the same inputs first.
    store: Store | None = None
    input_names: tuple[str, ...] = ()
    # Whose model code shipped in a checkpoint may run, per model (the target's, the drafts'): the
    # running job's settings, never an artifact's (a manifest is writable by anyone who can write
    # the store). Load input `name` with trust_remote_code=ctx.trust.of_input(name).
    trust: ModelTrust = UNTRUSTED


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def parse_manifest(data: bytes | str) -> tuple[dict | None, str]:
    """(the manifest, "") or (None, what is wrong with it)."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{MANIFEST} is not valid JSON"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST} holds a {type(manifest).__name__}, not a manifest"
    files = manifest.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(_file_record_ok(v) for v in files.values())
    ):
        return None, f"{MANIFEST} has a malformed file list"
    return manifest, ""


def _file_record_ok(record) -> bool:
    return (
        isinstance(record, dict)
        and type(record.get("size")) is int
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("sample", ""), str)
    )


def artifact_files(folder: Path) -> list[Path]:
    """Every file of an artifact directory but its manifest, in a stable order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)


def file_records(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256, mtime_ns[, sample]}} of every file of `folder` but its
    manifest; `sample` (fingerprint.sampled_sha256) for files over SAMPLED_FILE_BYTES."""
    records = {}
    for path in artifact_files(folder):
        stat = path.stat()
        record = {"size": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}
        if stat.st_size > SAMPLED_FILE_BYTES:
            record["sample"] = sampled_sha256(path)
        records[path.relative_to(folder).as_posix()] = record
    return records


def artifact_problem(folder: Path, manifest: dict, *, full: bool = False) -> str:
    """What is wrong with the files of artifact `folder` against its manifest's file list; "" when
    nothing is. Sizes are always checked, then hashes as the module docstring says: in full when
    `full` (verify-store, a fetch), else whole or sampled.

    A manifest without a file list (written by specdraft before it recorded one, or edited) cannot
    be checked, so it is a problem: the artifact is made again rather than trusted unchecked."""
    folder = Path(folder)
    files = manifest.get("files")
    if files is None:
        return f"its {MANIFEST} has no file list, so its files cannot be checked"
    present = {p.relative_to(folder).as_posix(): p for p in artifact_files(folder)}
    missing = sorted(set(files) - set(present))
    if missing:
        return f"{missing[0]} is missing" + (
            f" (and {len(missing) - 1} more)" if missing[1:] else ""
        )
    # Files the manifest does not list are not damage: readers leave some (datasets' `map` writes
    # cache-*.arrow beside the arrow files it reads), and none of them is read as the artifact.
    stats = {name: present[name].stat() for name in files}
    for name, record in files.items():
        if stats[name].st_size != record.get("size"):
            return f"{name} has {stats[name].st_size} bytes, its manifest says {record.get('size')}"
    whole = full or sum(s.st_size for s in stats.values()) <= hash_on_reuse_bytes()
    for name, record in files.items():
        moved = record.get("mtime_ns") not in (None, stats[name].st_mtime_ns)
        sampled = not (whole or moved) and "sample" in record
        if sampled and stats[name].st_size > SAMPLED_FILE_BYTES:
            if sampled_sha256(present[name]) != record["sample"]:
                return f"{name} does not match its sampled sha256 in the manifest"
        elif sha256_file(present[name]) != record["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return ""


def restore_mtimes(folder: Path, manifest: dict) -> None:
    """Give fetched files the mtimes their manifest recorded, so that reuse on this machine can
    tell a file written since (hashed) from one untouched since it was verified (sized only)."""
    for name, record in (manifest.get("files") or {}).items():
        if "mtime_ns" in record and (Path(folder) / name).is_file():
            os.utime(Path(folder) / name, ns=(record["mtime_ns"], record["mtime_ns"]))


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) refuse fsync on a directory
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder` to disk, so a rename that publishes it
    cannot outlive its contents in a power loss (an empty manifest, a truncated weight file)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(folder))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all: a temporary file beside it, flushed to
    disk, renamed over `path`. The one file writer of specdraft (manifests, metrics, reports):
    a reader never sees half a file, and a failed write leaves the old one and no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # open() creates it 0666 less the umask, like any file: reports are meant to be shared
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the name does
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data) -> None:
    """`data` as indented JSON, written atomically (atomic_write_text)."""
    atomic_write_text(path, json.dumps(data, indent=2))


def commit_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an existing one by rename; its
    contents are flushed to disk first."""
    fsync_tree(tmp)
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def given_model(cfg, out: Path) -> dict:
    """A user's model is recorded, not copied: later stages load it with these settings. A GGUF
    file is the exception: dequantised once into `model/` in `out`, a plain safetensors
    directory with its tokenizer, which later stages and the export load instead."""
    from specdraft.drafts.gguf import is_gguf, write_plain_model

    settings = {
        "model": cfg.model,
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if is_gguf(cfg.model):
        return {
            **settings,
            **write_plain_model(cfg.model, out / "model", cfg.dtype),
            "model": "model",
        }
    return settings


def model_location(artifact: Path) -> str:
    """The model id or directory a model stage (target, draft_init, reference, distil) produced."""
    location = read_manifest(artifact)["info"]["model"]
    local = Path(artifact) / location
    return str(local) if local.exists() else location


def load_model_artifact(artifact: Path, device="cpu", *, trust_remote_code: bool = False):
    """Load the causal LM a model stage produced, with the settings it recorded (dtype, attention).
    Model code shipped with it runs only when the running job allows it for this model
    (`trust_remote_code`: the StageContext's trust.of_input(name) of the input it was given as):
    the artifact's own record of that setting is not trusted."""
    from specdraft.drafts.models import load_causal_lm

    info = read_manifest(artifact)["info"]
    return load_causal_lm(
        model_location(artifact),
        dtype=info.get("dtype", "float32"),
        attn_implementation=info.get("attn_implementation", "auto"),
        trust_remote_code=trust_remote_code,
        device=device,
    )


def load_tokenizer_artifact(artifact: Path, *, trust_remote_code: bool = False):
    """The tokenizer of a model stage's model (the target's tokenizer is the pair's tokenizer);
    tokenizer code runs only when the running job allows it, as in load_model_artifact."""
    from specdraft.drafts.models import load_tokenizer

    return load_tokenizer(model_location(artifact), trust_remote_code=trust_remote_code)
