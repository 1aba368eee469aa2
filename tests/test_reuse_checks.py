"""The integrity default: what reuse checks of a big artifact (sampled hashes, always), what only
`verify-store` finds, and how local inputs bigger than the full-hash bound are keyed."""

import json
import os
import random

import pytest

from specdraft.pipeline.engine import fingerprint
from specdraft.pipeline.engine.artifacts import MANIFEST, artifact_problem, file_records
from specdraft.pipeline.engine.fingerprint import SAMPLE_BLOCK, local_fingerprint, sample_offsets
from specdraft.pipeline.engine.store import Store

SIZE = 3 * 2**20 + 17  # over the 1 MiB a sampled hash reads; an odd size


def weights(seed: int) -> bytes:
    return random.Random(seed).randbytes(SIZE)


def publish(store: Store, name: str, data: bytes) -> None:
    folder = store.path(name)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(data)
    (folder / "config.json").write_text("{}")
    (folder / MANIFEST).write_text(json.dumps({"files": file_records(folder)}))


def overwrite_keeping_mtime(path, data: bytes) -> None:
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def big(monkeypatch):
    """Every artifact counts as big (over $SPECDRAFT_VERIFY_HASH_BYTES): the sampled path."""
    monkeypatch.setenv("SPECDRAFT_VERIFY_HASH_BYTES", "0")


def test_a_model_swapped_for_another_of_the_same_size_is_not_reused(tmp_path, big, capsys):
    """The probe's case: the final draft's weights replaced by the reference's (same shapes, so
    the same size) with the mtime put back. Checked by size only before: reused and exported."""
    store = Store(tmp_path)
    publish(store, "distil-1", weights(1))
    overwrite_keeping_mtime(store.path("distil-1") / "model" / "model.safetensors", weights(2))
    assert store.committed_path("distil-1") is None  # set aside: made again
    err = capsys.readouterr().err
    assert "model/model.safetensors does not match its sampled sha256" in err


def test_reuse_reads_one_mebibyte_per_big_file_and_verify_store_reads_all(tmp_path, big):
    """The guarantee, exactly: a change inside a sampled block is found on reuse; a flipped byte
    between the blocks only by verify-store's full hash."""
    store = Store(tmp_path)
    publish(store, "a-1", weights(1))
    path = store.path("a-1") / "model" / "model.safetensors"
    offsets = sample_offsets(SIZE)
    assert len(offsets) == 16 and offsets[0] == 0 and offsets[-1] == SIZE - SAMPLE_BLOCK
    between = offsets[1] + SAMPLE_BLOCK + 10  # in no block
    assert not any(o <= between < o + SAMPLE_BLOCK for o in offsets)
    data = bytearray(weights(1))
    data[between] ^= 1  # bit rot
    overwrite_keeping_mtime(path, bytes(data))
    manifest = json.loads((store.path("a-1") / MANIFEST).read_text())
    assert artifact_problem(store.path("a-1"), manifest) == ""
    assert "does not match its sha256" in artifact_problem(store.path("a-1"), manifest, full=True)
    assert store.verify("a-1")[0] == "damaged"
    data[offsets[7] + 5] ^= 1  # inside a block
    overwrite_keeping_mtime(path, bytes(data))
    assert "sampled sha256" in artifact_problem(store.path("a-1"), manifest)


def test_a_manifest_without_sampled_hashes_is_hashed_whole(tmp_path, big):
    """Manifests written before sampled hashes: their big files are hashed in full on reuse."""
    store = Store(tmp_path)
    publish(store, "a-1", weights(1))
    manifest = json.loads((store.path("a-1") / MANIFEST).read_text())
    for record in manifest["files"].values():
        record.pop("sample", None)
    data = bytearray(weights(1))
    data[SAMPLE_BLOCK + 10] ^= 1  # in no block
    overwrite_keeping_mtime(store.path("a-1") / "model" / "model.safetensors", bytes(data))
    assert "does not match its sha256" in artifact_problem(store.path("a-1"), manifest)


def test_a_big_data_file_edited_in_place_with_its_mtime_kept_is_keyed_anew(tmp_path):
    """A data file over 16 MiB was keyed by size and mtime: one edited in place (same size, mtime
    put back) kept its key and its stale data stage. Data up to 1 GiB is hashed whole now."""
    data = tmp_path / "data.jsonl"
    row = json.dumps({"prompt": "p" * 100, "response": "r" * 100}) + "\n"
    data.write_text(row * (17 * 2**20 // len(row) + 1))
    assert data.stat().st_size > fingerprint.SMALL_FILE_BYTES
    before = fingerprint.input_fingerprint(str(data), "dataset")
    text = data.read_text()
    middle = len(text) // 2 + 7
    overwrite_keeping_mtime(data, (text[:middle] + "q" + text[middle + 1 :]).encode())
    assert fingerprint.input_fingerprint(str(data), "dataset") != before


def test_a_big_model_file_replaced_with_its_mtime_kept_is_keyed_anew(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "SMALL_FILE_BYTES", 2**20)  # weights(…) counts as big
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(weights(1))
    before = local_fingerprint(model)
    overwrite_keeping_mtime(model / "weights.bin", weights(2))
    assert local_fingerprint(model) != before
