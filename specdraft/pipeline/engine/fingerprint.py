"""Content fingerprints of what a stage reads from outside the store: a local model directory or
data file/directory, or a hub id. They go into the stage's cache key (Stage.fingerprint), so a model
or data file overwritten in place re-runs the stages that read it.

A local fingerprint covers every file's relative path and size, and its content: a file up to
`full_hash_bytes` (16 MiB for models: configs, tokenizers; 1 GiB for data) by its sha256, a bigger
one by its mtime and its sampled hash (`sampled_sha256`: 16 blocks of 64 KiB at offsets fixed by
its size, 1 MiB read), and for safetensors its header (tensor names, dtypes, shapes). Hashing
gigabytes of weights on every run would cost more than the rare re-run a `touch` or a copy causes;
so a big file edited in place with its size and mtime kept is told apart only where the edit
touches a sampled block (a different model or data file of the same size always is, unless it
agrees with the old one on those 1 MiB). Hidden files and datasets' own `cache-*.arrow` files are
left out: loaders never read the first and write the second themselves.

A hub id is keyed by the revision its `main` ref resolves to in the local Hugging Face cache, when
the cache has it; otherwise (never downloaded, or an offline machine without it) by its id alone.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

SMALL_FILE_BYTES = 16 * 2**20  # model files up to this are hashed whole
DATA_FILE_BYTES = 2**30  # data files up to this are hashed whole (the data stage reads them all)
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own cap on a header
SAMPLE_BLOCK = 64 * 2**10
SAMPLE_BLOCKS = 16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def sample_offsets(size: int) -> list[int]:
    """Where the sampled hash reads a file of `size` bytes: SAMPLE_BLOCKS blocks, the first at 0,
    the last ending at the end, the rest evenly between (one block covering a small file)."""
    if size <= SAMPLE_BLOCK:
        return [0]
    span = size - SAMPLE_BLOCK
    return sorted({span * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size and of the blocks at sample_offsets(size): at most 1 MiB read,
    whatever the file's size. It tells apart two files of one size that differ in a sampled
    block; a change elsewhere (a flipped bit) only a full hash finds."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha256(f"{size}\0".encode())
        for offset in sample_offsets(size):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BLOCK))
    return digest.hexdigest()


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


def local_fingerprint(path: Path, full_hash_bytes: int | None = None) -> str:
    """A hash of the contents of file or directory `path`, as the module docstring describes;
    files up to `full_hash_bytes` (default SMALL_FILE_BYTES) are hashed whole."""
    path = Path(path)
    limit = SMALL_FILE_BYTES if full_hash_bytes is None else full_hash_bytes
    digest = hashlib.sha256()
    for f in _read_files(path):
        stat = f.stat()
        name = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0".encode())
        if stat.st_size <= limit:
            digest.update(bytes.fromhex(sha256_file(f)))
        else:
            digest.update(f"{stat.st_mtime_ns}\0{sampled_sha256(f)}".encode())
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
        return local_fingerprint(path, DATA_FILE_BYTES if repo_type == "dataset" else None)
    revision = hub_revision(location, repo_type)
    return f"hub:{revision}" if revision else ""
