"""Leased locks in the artifact store: two runs sharing a store never make one artifact at once.

A run that is about to make stage artifact `<name>-<key>` first creates `.lock-<name>-<key>` in the
store with an exclusive create (O_CREAT | O_EXCL on local disks and NFS v3+; a conditional write
on an object store, see store.py). The file names its holder and an expiry; a
heartbeat thread pushes the expiry forward every lease / 3 seconds while the stage runs. Another run
finding the lock waits until it is gone (and then reuses the artifact), or takes it over when the
lease has run out or the holder's process on this host is dead (a driver killed with SIGKILL).
A takeover rewrites the lock in one step (a rename locally, one PUT in an object store) and reads
it back after a short pause: of two runs taking over at once, the last write wins and the other one
goes back to waiting.

Fencing: each acquisition carries a generation (1 when the lock is created, one more at every
takeover). Right before it publishes, a stage checks that the lock still names its run and its
generation (`StageLock.check`); a holder that stalled past its lease (SIGSTOP, a swapped-out VM)
and was taken over finds another owner or a later generation there and discards its result. And a
publication that is not a forced re-run never replaces an artifact that exists (store.publish), so
even a holder stalled between that check and its publication cannot remove an artifact another run
may be reading.

A lock file is trusted only as far as it is well formed. One that is not JSON yet may be being
written: it counts as stale once it has sat there longer than a lease. One that is JSON but not a
record (`null`, `[]`, an expiry that is no number, pid 0) is stale at once. And no record may claim
more than twice the lease it states (at most MAX_LEASE_SECONDS), so a far-future expiry is never
waited on for longer than that.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from specdraft.pipeline.engine.environment import MAX_LEASE_SECONDS, lock_lease
from specdraft.pipeline.engine.store import Store, _say, as_store

SETTLE_SECONDS = 0.2  # between a takeover's rename and its read-back
ACQUIRE_ATTEMPTS = 3  # a lock released between our create and our read: create again this often


def lease_seconds() -> float:
    return lock_lease()


def _pid_alive(pid: int) -> bool:
    if pid < 1:
        return False  # 0 and negative pids name process groups, never a holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def valid_record(record) -> bool:
    """Whether `record` (a lock file's parsed JSON) is a lock record this module could write."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("owner"), str)
        and _is_int(record.get("generation"))
        and record["generation"] >= 1
        and isinstance(record.get("host"), str)
        and _is_int(record.get("pid"))
        and record["pid"] >= 1
        and _is_number(record.get("expires"))
        and (record.get("lease") is None or _is_number(record["lease"]))
    )


class LockLost(RuntimeError):
    """This run's lock on a stage was taken over by another run: its result must not be published."""


# What a lock file holds, as StageLock.read sees it.
MISSING, PARTIAL, CORRUPT, VALID = "missing", "partial", "corrupt", "valid"


class StageLock:
    """One stage artifact's lock (file `name` in `store`); `owner` tells this run's locks from any
    other's, `generation` this acquisition from an earlier or later one."""

    def __init__(self, store: Store, name: str, owner: str, lease: float):
        self.store, self.name, self.owner, self.lease = store, name, owner, lease
        self.generation = 0  # not held

    def _record(self) -> str:
        record = {
            "owner": self.owner,
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + self.lease,
            "lease": self.lease,
        }
        return json.dumps(record)

    def _ours(self, record: dict | None) -> bool:
        return (
            valid_record(record)
            and record["owner"] == self.owner
            and record["generation"] == self.generation
        )

    def read(self) -> tuple[str, dict]:
        """(MISSING | PARTIAL | CORRUPT | VALID, the record when VALID else {}). PARTIAL: not JSON
        (being written, or garbage); CORRUPT: JSON that is no lock record."""
        try:
            text = self.store.read_text(self.name)
        except (OSError, UnicodeDecodeError):
            return PARTIAL, {}
        if text is None:
            return MISSING, {}
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return PARTIAL, {}
        return (VALID, record) if valid_record(record) else (CORRUPT, {})

    def holder(self) -> dict | None:
        """The lock's record; None when there is no lock, {} when it holds no valid record."""
        state, record = self.read()
        return None if state == MISSING else record

    def stale(self, state: str, record: dict) -> bool:
        """Whether a lock found as (`state`, `record`) may be taken over or removed."""
        if state == MISSING or state == CORRUPT:
            return True
        if state == PARTIAL:  # perhaps being written: stale once it sat there longer than a lease
            age = self.store.age(self.name)
            return age is None or age > self.lease
        now = time.time()
        stated = record.get("lease")
        claim = min(stated if stated and stated > 0 else self.lease, MAX_LEASE_SECONDS)
        if record["expires"] < now or record["expires"] > now + 2 * claim:
            return True  # run out, or claiming more than any holder renews to
        same_host = record["host"] == socket.gethostname()
        return same_host and not _pid_alive(record["pid"])

    def try_acquire(self) -> bool:
        self.generation = 1
        for _ in range(ACQUIRE_ATTEMPTS):
            if self.store.create_exclusive(self.name, self._record()):
                return True
            state, record = self.read()
            if state != MISSING:
                break
        else:  # created and released by others faster than we look: try at the next poll
            self.generation = 0
            return False
        if state == VALID and record["owner"] == self.owner:
            self.generation = record["generation"]
            return True
        if not self.stale(state, record):
            self.generation = 0
            return False
        self.generation = (record["generation"] if state == VALID else 0) + 1
        self.store.write_text(self.name, self._record())
        time.sleep(SETTLE_SECONDS)
        if self._ours(self.holder()):
            return True
        self.generation = 0
        return False

    def check(self) -> None:
        """Raise LockLost unless the lock still names this run and this acquisition (called right
        before a stage publishes: the fencing token's check)."""
        state, record = self.read()
        if state == PARTIAL:  # being rewritten this instant: read it once more
            time.sleep(SETTLE_SECONDS)
            state, record = self.read()
        if not self._ours(record):
            found = "gone" if state == MISSING else f"held by {_describe(record)}"
            raise LockLost(
                f"this run's lock {self.name} (generation {self.generation}) was taken over while "
                f"the stage ran (the run stalled past its lease of {self.lease:g}s?): now {found}"
            )

    def renew(self) -> None:
        if self._ours(self.holder()):
            self.store.write_text(self.name, self._record())

    def release(self) -> None:
        if self._ours(self.holder()):
            self.store.remove(self.name)

    def remove_if_stale(self) -> bool:
        """Remove the lock when it is stale (a leftover of a killed run); whether it was removed.
        A takeover landing between the look and the removal loses its lock: its read-back or its
        fence check finds that, and it waits again (no artifact is published twice)."""
        state, record = self.read()
        if state == MISSING or not self.stale(state, record):
            return False
        if self.read() != (state, record):
            return False  # rewritten meanwhile
        self.store.remove(self.name)
        return True


def _describe(record: dict) -> str:
    if not record:
        return "an unreadable record"
    return f"pid {record['pid']} on {record['host']}, generation {record['generation']}"


def describe_holder(record: dict | None) -> str:
    """A lock's holder for a log line: `pid 12 on host`, or what is wrong with the lock."""
    return "released this instant" if record is None else _describe(record)


class StoreLocks:
    """The locks one run holds, renewed by a daemon thread until released."""

    def __init__(self, store: Store | Path, lease: float | None = None):
        self.store = as_store(store)
        self.owner = uuid.uuid4().hex
        self.lease = lease_seconds() if lease is None else lease
        self.held: dict[str, StageLock] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lock_for(self, artifact: Path) -> StageLock:
        return StageLock(self.store, f".lock-{Path(artifact).name}", self.owner, self.lease)

    def acquire(self, artifact: Path) -> bool:
        lock = self.lock_for(artifact)
        if not lock.try_acquire():
            return False
        with self._guard:
            self.held[lock.name] = lock
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
        return True

    def holder(self, artifact: Path) -> dict | None:
        return self.lock_for(artifact).holder()

    def held_lock(self, artifact: Path) -> StageLock | None:
        """This run's acquisition of `artifact`'s lock (what a stage checks before it publishes)."""
        with self._guard:
            return self.held.get(self.lock_for(artifact).name)

    def release(self, artifact: Path) -> None:
        with self._guard:
            lock = self.held.pop(self.lock_for(artifact).name, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        self._stop.set()
        with self._guard:
            locks, self.held = list(self.held.values()), {}
        for lock in locks:
            lock.release()

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(self.lease / 3):
            with self._guard:
                locks = list(self.held.values())
            for lock in locks:
                try:
                    lock.renew()
                except Exception as err:  # a store hiccup: say it once, keep renewing
                    if not failing:
                        _say(f"cannot renew the lock {lock.name} ({err}); trying again")
                    failing = True
                else:
                    failing = False
