"""Content fingerprints of what a stage reads from outside the store: a local model directory or
data file/directory, or a hub id. They go into the stage's cache key (Stage.fingerprint), so a model
or data file overwritten in place re-runs the stages that read it.

A local fingerprint covers every file's relative path and size; files up to SMALL_FILE_BYTES
(configs, tokenizers, most data files) by their sha256, bigger ones by their mtime and, for
safetensors, their header (tensor names, dtypes, shapes). Hashing gigabytes of weights on every run
would cost more than the rare re-run a `touch` or a copy causes. Hidden files and datasets' own
`cache-*.arrow` files are left out: loaders never read the first and write the second themselves.

A hub id is keyed by the revision its `main` ref resolves to in the local Hugging Face cache, when
the cache has it; otherwise (never downloaded, or an offline machine without it) by its id alone.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SMALL_FILE_BYTES = 16 * 2**20
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own cap on a header


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.digest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (length,) = struct.unpack("<Q", head)
        return f.read(min(length, SAFETENSORS_HEADER_LIMIT))


def _read_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for p in path.rglob("*"):
        parts = p.relative_to(path).parts
        if any(part.startswith(".") for part in parts) or not p.is_file():
            continue
        if p.suffix == ".arrow" and p.name.startswith("cache-"):
            continue
        files.append(p)
    return sorted(files)


def local_fingerprint(path: Path) -> str:
    """A hash of the contents of file or directory `path`, as the module docstring describes."""
    path = Path(path)
    digest = hashlib.sha256()
    for f in _read_files(path):
        stat = f.stat()
        name = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0".encode())
        if stat.st_size <= SMALL_FILE_BYTES:
            digest.update(_sha256(f))
        else:
            digest.update(str(stat.st_mtime_ns).encode())
            if f.suffix == ".safetensors":
                digest.update(_safetensors_header(f))
    return f"local:{digest.hexdigest()[:16]}"


def hub_revision(repo_id: str, repo_type: str = "model") -> str:
    """The commit `repo_id`'s main ref points at in the local Hugging Face cache; "" if unknown."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = Path(constants.HF_HUB_CACHE) / folder / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return ""


def input_fingerprint(location: str, repo_type: str = "model") -> str:
    """The fingerprint of a model or data location: "" for `builtin` and for a hub id the local
    cache does not know (keyed by the id alone, as before)."""
    if location == "builtin" or not location:
        return ""
    path = Path(location).expanduser()
    if path.exists():
        return local_fingerprint(path)
    revision = hub_revision(location, repo_type)
    return f"hub:{revision}" if revision else ""
