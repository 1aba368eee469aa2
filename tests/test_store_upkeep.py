"""What killed runs leave in a store (scratch, stale locks) is removed once provably abandoned;
`verify-store` lists it and `--repair` removes it; a dry run (`run --plan`) changes nothing."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdraft.errors import InputError
from specdraft.pipeline.engine import upkeep
from specdraft.pipeline.engine.dag import Stage, execute
from specdraft.pipeline.engine.lock import StageLock, StoreLocks
from specdraft.pipeline.engine.store import Store, host_tag

MODULE = "dag_stages"
TESTS = Path(__file__).resolve().parent
DRIVER = """
import sys
from specdraft.pipeline.engine.dag import Stage, execute
stage = Stage("a", "dag_stages", {"name": "a", "add": 1, "hold": sys.argv[2], "log": sys.argv[3]})
execute([stage], sys.argv[1], use_ray=False)
"""


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def hidden(store: Path) -> list[str]:
    return sorted(p.name.split("-")[0] + "-" for p in store.iterdir() if p.name.startswith("."))


def test_a_killed_runs_scratch_and_lock_are_removed_by_the_next_run(tmp_path, calls):
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.touch()  # the stage stays busy while it exists
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(store), str(hold), str(tmp_path / "log")], env=env
    )
    deadline = time.time() + 120
    while not (tmp_path / "log").exists() and time.time() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-stage, as under `kill -9`
    driver.wait()
    assert hidden(store) == [".lock-", ".tmp-"]  # left behind: before, for ever
    said = []
    made = execute(
        [Stage("a", MODULE, {"name": "a", "add": 1})], store, use_ray=False, say=said.append
    )
    assert json.loads((made["a"].path / "value.json").read_text()) == 1
    assert hidden(store) == []
    assert any("removed 2 leftovers of killed runs" in line for line in said)


def _scratch(store: Path, artifact: str, pid: int | None, host: str | None = None) -> Path:
    suffix = "" if pid is None else f".{pid}.{host or host_tag()}"
    folder = store / f".tmp-{artifact}-0123abcd{suffix}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(b"w" * 100)
    return folder


def _age(folder: Path, seconds: float) -> None:
    past = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (past, past))


def test_only_provably_abandoned_scratch_is_removed(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    store = Store(root)
    dead = _scratch(root, "a-1", dead_pid())
    alive = _scratch(root, "b-1", os.getpid())  # its process runs
    locked = _scratch(root, "c-1", dead_pid())  # a retry of it holds the lock now
    other_host = _scratch(root, "d-1", 1234, host="0badc0de")
    old_other_host = _scratch(root, "e-1", 1234, host="0badc0de")
    _age(old_other_host, 2 * upkeep.UNTOUCHED_SECONDS)
    legacy_recent = _scratch(root, "f-1", None)  # named by specdraft before it named the maker
    legacy_old = _scratch(root, "g-1", None)
    _age(legacy_old, 2 * upkeep.UNTOUCHED_SECONDS)
    locks = StoreLocks(store, lease=30)
    assert locks.acquire(root / "c-1")
    try:
        found = {item.name for item in upkeep.find_leftovers(store)}
        assert found == {dead.name, old_other_host.name, legacy_old.name}
        assert upkeep.remove_leftovers(store, upkeep.find_leftovers(store)) == 3
    finally:
        locks.release_all()
    assert [p.exists() for p in (alive, locked, other_host, legacy_recent)] == [True] * 4
    assert not dead.exists() and not old_other_host.exists() and not legacy_old.exists()
    assert not list(root.glob(".trash-*"))


def test_stale_locks_are_leftovers_and_live_ones_are_not(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    store = Store(root)
    live = StageLock(store, ".lock-live-1", "run", lease=30)
    assert live.try_acquire()
    dead = StageLock(store, ".lock-dead-1", "run", lease=30)
    assert dead.try_acquire()
    record = json.loads(store.read_text(".lock-dead-1"))
    store.write_text(".lock-dead-1", json.dumps({**record, "pid": dead_pid()}))
    store.write_text(".lock-null-1", "null")
    assert {item.name for item in upkeep.find_leftovers(store)} == {".lock-dead-1", ".lock-null-1"}
    upkeep.remove_leftovers(store, upkeep.find_leftovers(store))
    assert sorted(p.name for p in root.iterdir()) == [".lock-live-1"]


def test_verify_store_lists_leftovers_and_repair_removes_them(tmp_path, calls):
    root = tmp_path / "store"
    execute([Stage("a", MODULE, {"name": "a", "add": 1})], root, use_ray=False, say=lambda _: None)
    store = Store(root)
    scratch = _scratch(root, "a-1", dead_pid())
    store.write_text(".lock-a-1", "[]")
    lines = []
    assert upkeep.verify_store(store, repair=False, say=lines.append) == 0
    assert f"leftover  {scratch}: scratch of a-1: its process" in "\n".join(lines)
    assert f"leftover  {root / '.lock-a-1'}: a stale lock (corrupt record)" in lines
    assert lines[-2] == "1 artifacts intact, 0 damaged, 2 leftovers of killed runs (to remove)"
    assert scratch.exists()
    lines.clear()
    assert upkeep.verify_store(store, repair=True, say=lines.append) == 0
    assert "2 leftovers of killed runs (removed)" in lines[-1]
    assert not scratch.exists() and not (root / ".lock-a-1").exists()


def _read_only(monkeypatch):
    """What a store mounted read-only (or owned by another user) answers to a rename or unlink;
    tests may run as root, for whom a chmod changes nothing."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "unlink", refuse)


def test_repair_on_a_read_only_store_is_one_message(tmp_path, calls, monkeypatch):
    root = tmp_path / "store"
    made = execute(
        [Stage("a", MODULE, {"name": "a", "add": 1})], root, use_ray=False, say=lambda _: None
    )
    (made["a"].path / "value.json").write_text("")
    _read_only(monkeypatch)
    with pytest.raises(InputError, match="cannot be set aside \\(Read-only file system\\)"):
        upkeep.verify_store(Store(root), repair=True, say=lambda _: None)  # an OSError before
    _scratch(root, "b-1", dead_pid())
    monkeypatch.setattr(Store, "verify", lambda self, name, repair: ("ok", ""))
    with pytest.raises(InputError, match="cannot remove .*the store is not writable here"):
        upkeep.verify_store(Store(root), repair=True, say=lambda _: None)


def test_a_plan_reports_a_damaged_artifact_and_changes_nothing(tmp_path, calls, monkeypatch):
    """`run --plan` set damaged artifacts aside (renamed them) and failed on a read-only store."""
    root = tmp_path / "store"
    made = execute(
        [Stage("a", MODULE, {"name": "a", "add": 1})], root, use_ray=False, say=lambda _: None
    )
    store = Store(root)
    assert store.state(made["a"].path.name) == ("cached", "")
    assert store.state("b-0123") == ("missing", "")
    (made["a"].path / "value.json").write_text("")
    before = sorted(p.name for p in root.iterdir())
    _read_only(monkeypatch)
    state = store.state(made["a"].path.name)
    assert state == ("damaged", "value.json has 0 bytes, its manifest says 1")
    assert sorted(p.name for p in root.iterdir()) == before
