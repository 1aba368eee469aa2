"""The store under damage and attack: artifacts checked on reuse and by `verify-store`, local inputs
keyed by content, model code trusted only by the running job, lock fencing, fsync before rename."""

import json
import os
import threading
import time

import pytest

from specdraft.cli import main
from specdraft.drafts.pair import ModelTrust
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine import fingerprint
from specdraft.pipeline.engine.artifacts import (
    MANIFEST,
    atomic_write_text,
    commit_dir,
    load_model_artifact,
)
from specdraft.pipeline.engine.dag import Stage, execute, plan, run_stage
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.lock import LockLost, StageLock
from specdraft.pipeline.engine.store import Store, artifact_at

MODULE = "dag_stages"


def chain():
    return [
        Stage("a", MODULE, {"name": "a", "add": 1}),
        Stage("b", MODULE, {"name": "b", "add": 2}, deps=("a",)),
        Stage("c", MODULE, {"name": "c", "add": 10}, deps=("b",)),
    ]


def run(stages, store, **kw):
    return execute(stages, store, use_ray=False, say=lambda _: None, **kw)


def value(artifact) -> int:
    return json.loads((artifact / "value.json").read_text())


def set_aside(store) -> list[str]:
    return sorted(p.name.split("-")[1] for p in store.iterdir() if p.name.startswith(".damaged-"))


# Integrity: every reuse checks the artifact against its manifest's file list.


@pytest.mark.parametrize(
    "damage, report",
    [
        (
            lambda b: (b / "value.json").write_text(""),
            "value.json has 0 bytes, its manifest says 1",
        ),
        (lambda b: (b / "value.json").unlink(), "value.json is missing"),
        (lambda b: (b / MANIFEST).write_text("{not json"), "manifest.json is not valid JSON"),
        (
            lambda b: (b / MANIFEST).write_text("[1, 2]"),
            "manifest.json holds a list, not a manifest",
        ),
    ],
    ids=["truncated", "missing", "garbage-manifest", "list-manifest"],
)
def test_a_damaged_artifact_is_reported_set_aside_and_made_again(
    tmp_path, calls, capsys, damage, report
):
    store = tmp_path / "store"
    first = run(chain(), store)
    damage(first["b"].path)
    again = run(chain(), store)
    assert calls() == ["a", "b", "c", "b"]  # b made again; a and c (same keys) reused
    assert not again["b"].reused and again["a"].reused and again["c"].reused
    assert value(again["b"].path) == 3
    assert f"damaged artifact {first['b'].path}: {report}; moved aside" in capsys.readouterr().err
    assert set_aside(store) == ["b"]


def test_bytes_changed_in_place_fail_the_hash(tmp_path, calls, capsys):
    store = tmp_path / "store"
    first = run(chain(), store)
    changed = first["b"].path / "value.json"
    stat = changed.stat()
    changed.write_text("4")  # "3" -> "4": same size, and the old mtime put back
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = run(chain(), store)
    assert value(again["b"].path) == 3
    assert "value.json does not match its sha256" in capsys.readouterr().err


def test_a_big_artifact_is_hashed_where_a_file_was_written_since(
    tmp_path, calls, capsys, monkeypatch
):
    """Over $SPECDRAFT_VERIFY_HASH_BYTES reuse hashes small files (here all of them) and the
    files whose mtime moved since publication whole; verify-store hashes everything."""
    monkeypatch.setenv("SPECDRAFT_VERIFY_HASH_BYTES", "0")  # every artifact counts as big
    store = tmp_path / "store"
    first = run(chain(), store)
    changed = first["a"].path / "value.json"
    stat = changed.stat()
    changed.write_text("7")  # same size, old mtime put back: a small file is hashed all the same
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(["verify-store", "--store", str(store)]) == 1
    assert f"damaged   {first['a'].path}: value.json does not match" in capsys.readouterr().out
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # written since
    again = run(chain(), store)
    assert not again["a"].reused and value(again["a"].path) == 1


def test_a_manifest_without_a_file_list_is_made_again(tmp_path, calls, capsys):
    """A manifest without a file list cannot be checked (made before manifests listed their
    files, or edited to drop it): its artifact counts as damaged rather than used unchecked."""
    store = tmp_path / "store"
    first = run(chain(), store)
    manifest = json.loads((first["b"].path / MANIFEST).read_text())
    del manifest["files"]
    (first["b"].path / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify-store", "--store", str(store)]) == 1
    assert "manifest.json has no file list" in capsys.readouterr().out
    again = run(chain(), store)
    assert calls() == ["a", "b", "c", "b"] and not again["b"].reused
    assert (
        "has no file list, so its files cannot be checked; moved aside" in capsys.readouterr().err
    )


def test_verify_store_reports_damage_and_repair_sets_it_aside(tmp_path, calls, capsys):
    store = tmp_path / "store"
    first = run(chain(), store)
    assert main(["verify-store", "--store", str(store)]) == 0
    assert "3 artifacts intact, 0 damaged" in capsys.readouterr().out
    (first["c"].path / "value.json").write_text("")
    assert main(["verify-store", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"damaged   {first['c'].path}: value.json has 0 bytes" in out
    assert "2 artifacts intact, 1 damaged" in out
    assert main(["verify-store", "--store", str(store), "--repair"]) == 1
    assert set_aside(store) == ["c"]
    assert main(["verify-store", "--store", str(store)]) == 0
    assert main(["verify-store", "--store", str(tmp_path / "nowhere")]) == 2


def test_export_treats_a_damaged_artifact_as_gone(tmp_path, calls, capsys):
    first = run(chain(), tmp_path / "store")
    (first["b"].path / "value.json").write_text("")
    assert artifact_at(str(first["a"].path)) == first["a"].path
    assert artifact_at(str(first["b"].path)) is None
    assert "damaged artifact" in capsys.readouterr().err


def test_a_damaged_artifact_in_a_remote_store_is_unpublished_and_made_again(
    s3_store, tmp_path, calls, capsys, monkeypatch
):
    first = run(chain(), Store(s3_store))
    name = first["b"].path.name
    Store(s3_store).fs.pipe_file(f"{s3_store}/{name}/value.json", b"")  # truncated in the store
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "other-machine"))
    again = run(chain(), Store(s3_store))
    assert calls() == ["a", "b", "c", "b"]
    assert value(again["b"].path) == 3
    err = capsys.readouterr().err
    assert f"damaged artifact {s3_store}/{name}: value.json has 0 bytes" in err
    assert "unpublished" in err


def test_verify_store_hashes_a_remote_store(s3_store, calls, capsys):
    first = run(chain(), Store(s3_store))
    assert main(["verify-store", "--store", s3_store]) == 0
    name = first["c"].path.name
    Store(s3_store).fs.pipe_file(f"{s3_store}/{name}/value.json", b"99")  # same size as "13"
    assert main(["verify-store", "--store", s3_store]) == 1
    assert f"damaged   {s3_store}/{name}: value.json does not match" in capsys.readouterr().out


def test_a_damaged_mirror_copy_is_fetched_again(s3_store, calls, capsys):
    store = Store(s3_store)
    first = run(chain(), store)
    (first["b"].path / "value.json").write_text("")  # this machine's copy, not the store's
    again = run(chain(), store)
    assert calls() == ["a", "b", "c"]  # nothing made again
    assert value(again["b"].path) == 3
    assert "the mirror copy" in capsys.readouterr().err


# Local inputs are keyed by content.


def _user_job(tmp_path, target="target", draft="draft", data="data.jsonl"):
    return load_job(
        None,
        [
            f"target={tmp_path / target if (tmp_path / target).exists() else target}",
            f"draft={tmp_path / draft if (tmp_path / draft).exists() else draft}",
            f"data={tmp_path / data}",
            "data.response_field=response",
        ],
    )


def _keys(job, store) -> dict[str, str]:
    return {stage.name: key for stage, key, _ in plan(build_stages(job), store)}


def _make_inputs(tmp_path):
    for name in ("target", "draft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
        weights = len(header).to_bytes(8, "little") + header.encode() + bytes(8)
        (tmp_path / name / "model.safetensors").write_bytes(weights)
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n')


@pytest.mark.parametrize("small_file_bytes", [16 * 2**20, 0], ids=["hashed", "mtime+header"])
def test_a_model_or_data_overwritten_in_place_re_keys_the_stages_that_read_it(
    tmp_path, monkeypatch, small_file_bytes
):
    monkeypatch.setattr(fingerprint, "SMALL_FILE_BYTES", small_file_bytes)
    _make_inputs(tmp_path)
    store = tmp_path / "store"
    job = _user_job(tmp_path)
    before = _keys(job, store)
    assert _keys(_user_job(tmp_path), store) == before  # nothing changed: same keys
    assert job.target.model == str(tmp_path / "target")  # the config keeps the path

    weights = tmp_path / "target" / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(weights.read_bytes()[:-8] + bytes([1] * 8))  # new weights, same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after_model = _keys(_user_job(tmp_path), store)
    assert after_model["target"] != before["target"]
    assert (
        after_model["data"] == before["data"] and after_model["draft_init"] == before["draft_init"]
    )
    assert after_model["evaluate"] != before["evaluate"]  # dependents follow

    data = tmp_path / "data.jsonl"
    stat = data.stat()
    data.write_text('{"prompt": "1+1", "response": "3"}\n')  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after_data = _keys(_user_job(tmp_path), store)
    assert after_data["data"] != after_model["data"]
    assert after_data["draft_init"] != after_model["draft_init"]  # it reads the data stage


def test_a_hub_id_is_keyed_by_its_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n')
    store = tmp_path / "store"
    uncached = _keys(_user_job(tmp_path, "org/big", "org/small"), store)
    ref = hub / "models--org--big" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("1111111111111111111111111111111111111111")
    first = _keys(_user_job(tmp_path, "org/big", "org/small"), store)
    ref.write_text("2222222222222222222222222222222222222222")  # the hub moved on; cache updated
    second = _keys(_user_job(tmp_path, "org/big", "org/small"), store)
    assert len({uncached["target"], first["target"], second["target"]}) == 3
    assert uncached["draft_init"] == first["draft_init"] == second["draft_init"]


# Model code runs only when the running job allows it.

PLANTED = """
import os
from pathlib import Path

Path(os.environ["PLANTED_CODE_RAN"]).write_text("ran")

from transformers import LlamaConfig, LlamaForCausalLM


class PlantedForCausalLM(LlamaForCausalLM):
    config_class = LlamaConfig
"""


def _planted_artifact(tmp_path):
    """A `distil` artifact as an attacker who can write the store leaves it: its manifest says
    trust_remote_code, its config maps AutoModelForCausalLM to a module beside the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    artifact = tmp_path / "store" / "distil-0123456789abcdef"
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(artifact / "model")
    config_file = artifact / "model" / "config.json"
    planted = json.loads(config_file.read_text())
    planted["auto_map"] = {"AutoModelForCausalLM": "planted.PlantedForCausalLM"}
    config_file.write_text(json.dumps(planted))
    (artifact / "model" / "planted.py").write_text(PLANTED)
    info = {"model": "model", "dtype": "float32", "attn_implementation": "eager"}
    manifest = {"info": {**info, "trust_remote_code": True}}
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    return artifact


def test_a_manifest_cannot_grant_trust_remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("PLANTED_CODE_RAN", str(marker))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    artifact = _planted_artifact(tmp_path)
    model = load_model_artifact(artifact)  # the job said nothing: false
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    load_model_artifact(artifact, trust_remote_code=True)  # the job's own flag: it runs
    assert marker.read_text() == "ran"


def test_stages_trust_remote_code_only_when_the_job_does(tmp_path, calls):
    """Per model: trusting the target lets a stage run the target's code and not the draft's."""
    stages = [Stage("a", MODULE, {"name": "a", "add": 1, "report_trust": True})]
    untrusted = run(stages, tmp_path / "s1")["a"].manifest["info"]["trust_remote_code"]
    assert untrusted == {"target": False, "draft": False}
    trusted = run(stages, tmp_path / "s2", trust=ModelTrust(target=True))
    assert trusted["a"].manifest["info"]["trust_remote_code"] == {"target": True, "draft": False}


# Fencing: a holder whose lock was taken over never publishes.


def _expire(store: Store, name: str) -> None:
    """The holder stalled past its lease: its record's expiry lies in the past."""
    record = json.loads(store.read_text(name))
    store.write_text(name, json.dumps({**record, "expires": 0}))


def test_a_taken_over_holder_fails_its_fence_check_and_cannot_renew_its_way_back(tmp_path):
    store = Store(tmp_path)
    stalled = StageLock(store, ".lock-x", "stalled", lease=60)
    assert stalled.try_acquire() and stalled.generation == 1
    stalled.check()
    _expire(store, ".lock-x")
    taker = StageLock(store, ".lock-x", "taker", lease=60)
    assert taker.try_acquire() and taker.generation == 2
    stalled.renew()  # its heartbeat wakes up
    stalled.release()
    with pytest.raises(LockLost, match=r"generation 1\) was taken over"):
        stalled.check()
    taker.check()
    assert taker.holder()["owner"] == "taker"


def test_a_stage_whose_lock_was_taken_over_publishes_nothing(tmp_path, calls):
    store = Store(tmp_path / "store")
    store.local.mkdir()
    stalled = StageLock(store, ".lock-a-1", "stalled", lease=60)
    assert stalled.try_acquire()
    _expire(store, ".lock-a-1")
    assert StageLock(store, ".lock-a-1", "taker", lease=60).try_acquire()
    with pytest.raises(LockLost):
        run_stage(MODULE, {"name": "a", "add": 1}, {}, store, "a-1", 0, {}, fence=stalled)
    assert calls() == ["a"]
    assert sorted(p.name for p in store.local.iterdir()) == [".lock-a-1"]  # no artifact, no tmp


def test_only_a_forced_re_run_replaces_an_artifact(tmp_path, calls):
    store = Store(tmp_path / "store")
    made = run(chain(), store.local)["a"].path
    inode = made.stat().st_ino
    with pytest.raises(LockLost, match="published by another run"):
        run_stage(MODULE, {"name": "a", "add": 5}, {}, store, made.name, 0, {})
    assert value(made) == 1 and made.stat().st_ino == inode  # never moved: readers keep reading
    run_stage(MODULE, {"name": "a", "add": 5}, {}, store, made.name, 0, {}, replace=True)
    assert value(made) == 5


def test_a_run_stalled_past_its_lease_discards_its_result(tmp_path, calls, monkeypatch):
    """Run 1 stalls inside stage a past its lease (its heartbeat stopped with it); run 2 takes the
    lock over, makes a and publishes it. Run 1 wakes up, finds its lock gone, discards its result
    and uses run 2's artifact, which it never touched."""
    monkeypatch.setattr(StageLock, "renew", lambda self: None)  # a stopped process renews nothing
    store = Store(tmp_path / "store")
    stall = tmp_path / "stall"
    stages = [Stage("a", MODULE, {"name": "a", "add": 1, "stall_first": str(stall)})]
    said, first = [], {}
    stalled = threading.Thread(
        target=lambda: first.update(execute(stages, store, use_ray=False, say=said.append))
    )
    stalled.start()
    deadline = time.time() + 30
    while not stall.exists() and time.time() < deadline:
        time.sleep(0.02)
    (lock,) = [p.name for p in store.local.iterdir() if p.name.startswith(".lock-a-")]
    _expire(store, lock)
    second = run(stages, store)["a"]
    inode = second.path.stat().st_ino
    stall.write_text("go on")
    stalled.join(timeout=60)
    assert calls() == ["a", "a"]  # run 1 made it too before it knew: never published
    assert first["a"].reused and first["a"].path == second.path
    assert second.path.stat().st_ino == inode and value(second.path) == 1
    assert any("discarded its result" in line and "taken over" in line for line in said)


# Writes reach the disk before their names do.


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", lambda src, dst: (replace(src, dst), real_rename)[0])
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fd paths from /proc")
def test_writes_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = _record_fsyncs_and_renames(monkeypatch)
    atomic_write_text(tmp_path / MANIFEST, "{}")
    (renamed,) = [path for kind, path in events if kind == "rename"]
    assert events.index(("fsync", renamed)) < events.index(("rename", renamed))

    events.clear()
    tmp = tmp_path / ".tmp-x"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "weights.bin").write_bytes(b"w" * 10)
    (tmp / MANIFEST).write_text("{}")
    commit_dir(tmp, tmp_path / "x")
    moved = events.index(("rename", str(tmp)))
    synced = {path for kind, path in events[:moved] if kind == "fsync"}
    assert {str(tmp / "model" / "weights.bin"), str(tmp / MANIFEST), str(tmp)} <= synced
