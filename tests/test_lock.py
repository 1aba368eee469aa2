"""Two runs sharing one artifact store: leased stage locks, stale locks taken over."""

import json
import os
import subprocess
import threading
import time

import pytest

from specdraft.pipeline.engine import dag
from specdraft.pipeline.engine.dag import Stage, execute
from specdraft.pipeline.engine.lock import StageLock, StoreLocks
from specdraft.pipeline.engine.store import Store

MODULE = "dag_stages"


def slow_chain():
    return [
        Stage("a", MODULE, {"name": "a", "add": 1, "sleep": 0.6}),
        Stage("b", MODULE, {"name": "b", "add": 2, "sleep": 0.6}, deps=("a",)),
        Stage("c", MODULE, {"name": "c", "add": 3}, deps=("a",)),
    ]


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """A local store, and one in an object store (S3 conditional writes instead of O_EXCL)."""
    if request.param == "s3":
        return Store(request.getfixturevalue("s3_store"))
    (tmp_path / "store").mkdir()
    return Store(tmp_path / "store")


def test_lock_excludes_a_second_owner_until_released(any_store):
    first, second = (StageLock(any_store, ".lock-x", owner, lease=30) for owner in "AB")
    assert first.try_acquire()
    assert first.try_acquire()  # re-entrant for its owner
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert json.loads(any_store.read_text(".lock-x"))["owner"] == "B"


def test_an_expired_lease_or_a_dead_holder_is_taken_over(any_store):
    stale = StageLock(any_store, ".lock-x", "old", lease=30)
    assert stale.try_acquire()
    record = json.loads(any_store.read_text(".lock-x"))
    any_store.write_text(".lock-x", json.dumps({**record, "expires": time.time() - 1}))
    assert StageLock(any_store, ".lock-x", "new", lease=30).try_acquire()

    dead = subprocess.Popen(["true"])
    dead.wait()
    lease_valid = {**record, "owner": "old", "pid": dead.pid}
    any_store.write_text(".lock-x", json.dumps(lease_valid))
    assert StageLock(any_store, ".lock-x", "newer", lease=30).try_acquire()

    alive = {**record, "owner": "old", "pid": os.getpid()}
    any_store.write_text(".lock-x", json.dumps(alive))
    assert not StageLock(any_store, ".lock-x", "newest", lease=30).try_acquire()


def test_an_unreadable_lock_goes_stale_after_a_lease(any_store):
    any_store.write_text(".lock-x", "{not json")
    assert not StageLock(any_store, ".lock-x", "new", lease=30).try_acquire()
    assert StageLock(any_store, ".lock-x", "new", lease=0.0).try_acquire()


def test_the_heartbeat_keeps_a_held_lease_alive(any_store):
    locks = StoreLocks(any_store, lease=1.5)  # renewed every 0.5 s: a loaded machine keeps up
    assert locks.acquire(any_store.path("a-123"))
    time.sleep(4.5)  # three leases: only renewals keep it valid
    other = StageLock(any_store, ".lock-a-123", "other", lease=1.5)
    assert not other.try_acquire()
    locks.release_all()
    assert any_store.read_text(".lock-a-123") is None
    assert other.try_acquire()


def test_two_runs_sharing_a_store_make_each_stage_once(any_store, calls):
    results = {}

    def run(name):  # each run opens the store itself, as another process would
        results[name] = execute(
            slow_chain(), Store(any_store.url), use_ray=False, say=lambda _: None
        )

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
    assert all(any_store.read_text(f".lock-{r.path.name}") is None for r in results["one"].values())


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


@pytest.mark.parametrize(
    "text",
    [
        "null",
        "[]",
        '"soon"',
        '{"owner": "x", "generation": 1, "host": "h", "pid": 1, "expires": "soon"}',
        '{"owner": "x", "generation": "1", "host": "h", "pid": "abc", "expires": 1e18}',
    ],
    ids=["null", "list", "string", "expires-soon", "pid-abc"],
)
def test_a_corrupt_lock_record_is_stale_at_once(any_store, text):
    """JSON that is no lock record (not a write in progress) is taken over: `null` recursed
    forever, `[]` and `"expires": "soon"` raised."""
    any_store.write_text(".lock-x", text)
    lock = StageLock(any_store, ".lock-x", "new", lease=30)
    assert lock.try_acquire() and lock.generation == 1
    lock.check()


@pytest.mark.parametrize(
    "change",
    [{"pid": 0}, {"pid": -1}, {"expires": 1e12}, {"expires": 1e12, "lease": 1e12}],
    ids=["pid-0", "pid-negative", "far-future", "far-future-claiming-a-long-lease"],
)
def test_a_lock_is_never_waited_on_past_the_lease_it_may_claim(any_store, change):
    """pid 0 (a process group: always "alive") and an expiry past twice the lease a record may
    claim would have been waited on forever."""
    holder = StageLock(any_store, ".lock-x", "old", lease=30)
    assert holder.try_acquire()
    record = json.loads(any_store.read_text(".lock-x"))
    any_store.write_text(".lock-x", json.dumps({**record, **change, "host": "elsewhere"}))
    assert StageLock(any_store, ".lock-x", "new", lease=30).try_acquire()


def test_a_live_lock_within_its_lease_is_respected(any_store):
    holder = StageLock(any_store, ".lock-x", "old", lease=3600)
    assert holder.try_acquire()
    record = json.loads(any_store.read_text(".lock-x"))
    any_store.write_text(".lock-x", json.dumps({**record, "host": "elsewhere"}))
    assert not StageLock(any_store, ".lock-x", "new", lease=30).try_acquire()  # its lease: 3600
