"""Two runs sharing one artifact store: leased stage locks, stale locks taken over."""

import json
import os
import subprocess
import threading
import time

import pytest

from specdraft.pipeline import dag
from specdraft.pipeline.dag import Stage, execute
from specdraft.pipeline.lock import StageLock, StoreLocks

MODULE = "dag_stages"


@pytest.fixture
def calls(tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("DAG_TEST_LOG", str(log))
    monkeypatch.setattr(dag, "POLL_SECONDS", 0.05)
    return lambda: log.read_text().split() if log.exists() else []


def slow_chain():
    return [
        Stage("a", MODULE, {"name": "a", "add": 1, "sleep": 0.6}),
        Stage("b", MODULE, {"name": "b", "add": 2, "sleep": 0.6}, deps=("a",)),
        Stage("c", MODULE, {"name": "c", "add": 3}, deps=("a",)),
    ]


def test_lock_excludes_a_second_owner_until_released(tmp_path):
    first, second = (StageLock(tmp_path / ".lock-x", owner, lease=30) for owner in "AB")
    assert first.try_acquire()
    assert first.try_acquire()  # re-entrant for its owner
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert json.loads((tmp_path / ".lock-x").read_text())["owner"] == "B"


def test_an_expired_lease_or_a_dead_holder_is_taken_over(tmp_path):
    lock = tmp_path / ".lock-x"
    stale = StageLock(lock, "old", lease=30)
    assert stale.try_acquire()
    record = json.loads(lock.read_text())
    lock.write_text(json.dumps({**record, "expires": time.time() - 1}))
    assert StageLock(lock, "new", lease=30).try_acquire()

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({**record, "owner": "old", "pid": dead.pid}))  # lease still valid
    assert StageLock(lock, "newer", lease=30).try_acquire()

    lock.write_text(json.dumps({**record, "owner": "old", "pid": os.getpid()}))  # alive, valid
    assert not StageLock(lock, "newest", lease=30).try_acquire()


def test_the_heartbeat_keeps_a_held_lease_alive(tmp_path):
    locks = StoreLocks(tmp_path, lease=0.3)
    artifact = tmp_path / "a-123"
    assert locks.acquire(artifact)
    time.sleep(0.9)  # three leases: only renewals keep it valid
    other = StageLock(tmp_path / ".lock-a-123", "other", lease=0.3)
    assert not other.try_acquire()
    locks.release_all()
    assert not (tmp_path / ".lock-a-123").exists()
    assert other.try_acquire()


def test_two_runs_sharing_a_store_make_each_stage_once(tmp_path, calls):
    store = tmp_path / "store"
    results = {}

    def run(name):
        results[name] = execute(slow_chain(), store, use_ray=False, say=lambda _: None)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=60)
    assert sorted(calls()) == ["a", "b", "c"]  # each stage made once, by one of the runs
    assert {n: r.path for n, r in results["one"].items()} == {
        n: r.path for n, r in results["two"].items()
    }
    made = [n for r in results.values() for n, res in r.items() if not res.reused]
    assert sorted(made) == ["a", "b", "c"]  # the runs split the work, none made twice
    assert results["two"]["a"].reused  # it waited for the first run's `a`
    assert not list(store.glob(".lock-*"))


def test_a_run_waits_for_a_live_lock_and_runs_once_it_is_released(tmp_path, calls):
    store = tmp_path / "store"
    store.mkdir()
    stages = [Stage("a", MODULE, {"name": "a", "add": 1})]
    ((_, _, path),) = dag.plan(stages, store)
    other = StoreLocks(store, lease=30)
    assert other.acquire(path)
    said = []
    worker = threading.Thread(target=lambda: execute(stages, store, use_ray=False, say=said.append))
    worker.start()
    time.sleep(0.5)
    assert calls() == [] and any("waiting" in line for line in said)
    other.release_all()  # it gave up without making the artifact: the waiting run makes it
    worker.join(timeout=30)
    assert calls() == ["a"]
    assert json.loads((path / "value.json").read_text()) == 1
