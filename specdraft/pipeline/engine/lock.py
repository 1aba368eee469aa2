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
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from specdraft.pipeline.engine.store import Store, as_store

DEFAULT_LEASE_SECONDS = 60.0
SETTLE_SECONDS = 0.2  # between a takeover's rename and its read-back


def lease_seconds() -> float:
    return float(os.environ.get("SPECDRAFT_LOCK_LEASE", DEFAULT_LEASE_SECONDS))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockLost(RuntimeError):
    """This run's lock on a stage was taken over by another run: its result must not be published."""


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
        }
        return json.dumps(record)

    def _ours(self, record: dict | None) -> bool:
        record = record or {}
        return record.get("owner") == self.owner and record.get("generation") == self.generation

    def holder(self) -> dict | None:
        """The lock's record; {} when it exists but cannot be read yet (being written)."""
        try:
            text = self.store.read_text(self.name)
        except OSError:
            return {}
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}

    def _stale(self, record: dict) -> bool:
        if not record:  # unreadable: stale only once it has sat there longer than a lease
            age = self.store.age(self.name)
            return age is None or age > self.lease
        if record.get("expires", 0) < time.time():
            return True
        same_host = record.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(record.get("pid", 0)))

    def try_acquire(self) -> bool:
        self.generation = 1
        if self.store.create_exclusive(self.name, self._record()):
            return True
        record = self.holder()
        if record is None:
            return self.try_acquire()  # released meanwhile
        if record.get("owner") == self.owner:
            self.generation = record.get("generation", 0)
            return True
        if not self._stale(record):
            self.generation = 0
            return False
        self.generation = int(record.get("generation") or 0) + 1
        self.store.write_text(self.name, self._record())
        time.sleep(SETTLE_SECONDS)
        if self._ours(self.holder()):
            return True
        self.generation = 0
        return False

    def check(self) -> None:
        """Raise LockLost unless the lock still names this run and this acquisition (called right
        before a stage publishes: the fencing token's check)."""
        record = self.holder()
        if record == {}:  # being rewritten this instant: read it once more
            time.sleep(SETTLE_SECONDS)
            record = self.holder()
        if not self._ours(record):
            found = "gone" if record is None else f"held by {_describe(record)}"
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


def _describe(record: dict) -> str:
    if not record:
        return "an unreadable record"
    return (
        f"pid {record.get('pid', '?')} on {record.get('host', '?')}, "
        f"generation {record.get('generation', '?')}"
    )


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
        while not self._stop.wait(self.lease / 3):
            with self._guard:
                locks = list(self.held.values())
            for lock in locks:
                lock.renew()
