"""Keeping a store in order: what killed runs leave in it, and `specdraft verify-store`.

A stage is made in scratch (`.tmp-<artifact>-<hex>.<pid>.<host>`, store.scratch) under its lock
(`.lock-<artifact>`), and a replaced artifact passes through `.trash-<artifact>-<hex>`
(artifacts.commit_dir). A run killed with SIGKILL, or a machine that lost power, leaves them
behind: scratch of a half-made model can be gigabytes. They are removed only when provably
abandoned:

- a lock when it is stale (lock.StageLock.stale: run out, claiming too much, its holder's process
  on this host dead, or not a lock record);
- scratch when its artifact's lock is gone or stale *and* no live process owns it: the process
  it names (this host) is dead; scratch of another host, or named by an older specdraft, counts
  as ownerless once nothing in it has changed for UNTOUCHED_SECONDS;
- trash always (nothing reads a directory by that name).

Every run removes them at its start (dag.execute); `verify-store` lists them and `--repair`
removes them. `.damaged-*` (set aside for a look) and `.ckpt-*` (a failed stage's checkpoints, for
its retry) are left alone.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.engine.lock import StageLock, _pid_alive, lease_seconds
from specdraft.pipeline.engine.store import SCRATCH, Store, host_tag

UNTOUCHED_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Leftover:
    kind: str  # "scratch", "trash" or "lock"
    name: str  # its name in the store's directory (scratch, trash) or in the store (lock)
    why: str


def _newest_change(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return newest


def _lock(store: Store, artifact: str, lease: float) -> StageLock:
    return StageLock(store, f".lock-{artifact}", "upkeep", lease)


def _scratch_owner_gone(folder: Path, match) -> str:
    """Why the scratch `folder` has no live owner; "" when one may still use it."""
    pid, host = match["pid"], match["host"]
    if pid is not None and host == host_tag():
        return "" if _pid_alive(int(pid)) else f"its process {pid} is gone"
    try:
        idle = time.time() - _newest_change(folder)
    except FileNotFoundError:
        return ""
    if idle <= UNTOUCHED_SECONDS:
        return ""
    maker = "another host's" if pid is not None else "an older specdraft's"
    return f"{maker} scratch, untouched for {idle / 3600:.0f} h"


def find_leftovers(store: Store, lease: float | None = None) -> list[Leftover]:
    """What killed runs left in `store` and nothing uses any more (module docstring)."""
    lease = lease_seconds() if lease is None else lease
    found = []
    entries = sorted(store.local.iterdir()) if store.local.is_dir() else []
    for entry in entries:
        name = entry.name
        if name.startswith(".trash-") and entry.is_dir():
            found.append(Leftover("trash", name, "a replaced artifact a killed commit left"))
            continue
        match = SCRATCH.match(name)
        if not match or not entry.is_dir():
            continue
        lock = _lock(store, match["name"], lease)
        state, record = lock.read()
        if not lock.stale(state, record):
            continue  # its stage is being made
        gone = _scratch_owner_gone(entry, match)
        if gone:
            found.append(Leftover("scratch", name, f"scratch of {match['name']}: {gone}"))
    for name in _lock_names(store):
        lock = _lock(store, name.removeprefix(".lock-"), lease)
        state, record = lock.read()
        if state != "missing" and lock.stale(state, record):
            found.append(Leftover("lock", name, f"a stale lock ({state} record)"))
    return found


def _lock_names(store: Store) -> list[str]:
    if not store.remote:
        if not store.local.is_dir():
            return []
        return sorted(p.name for p in store.local.iterdir() if p.name.startswith(".lock-"))
    store.fs.invalidate_cache()
    try:
        entries = store.fs.ls(store.url, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rstrip("/").rpartition("/")[2] for e in entries]
    return sorted(n for n in names if n.startswith(".lock-"))


def remove_leftovers(store: Store, leftovers: list[Leftover], lease: float | None = None) -> int:
    """Remove `leftovers` (find_leftovers), each looked at again first; how many were removed.
    InputError when the store cannot be written here."""
    lease = lease_seconds() if lease is None else lease
    removed = 0
    for item in leftovers:
        try:
            if item.kind == "lock":
                removed += _lock(store, item.name.removeprefix(".lock-"), lease).remove_if_stale()
                continue
            folder = store.local / item.name
            if not folder.exists():
                continue
            aside = folder.with_name(f".trash-{item.name.removeprefix('.')}")
            if item.kind == "scratch":
                os.replace(folder, aside)  # one step: a reader never sees half of it removed
                folder = aside
            shutil.rmtree(folder)
            removed += 1
        except FileNotFoundError:
            continue  # another run removed it first
        except OSError as err:
            raise InputError(
                f"cannot remove {store.local / item.name} ({item.why}): {err.strerror}; the store "
                "is not writable here. Clean it as a user who can write it "
                "(specdraft verify-store --repair)"
            ) from None
    return removed


def clean_store(store: Store, say: Callable[[str], None]) -> None:
    """Remove what killed runs left (a run's first step); one line when anything was removed.
    A store this process cannot clean is left as it is (the run may still read it)."""
    try:
        leftovers = find_leftovers(store)
        removed = remove_leftovers(store, leftovers)
    except (InputError, OSError):
        return
    if removed:
        kinds = sorted({item.kind for item in leftovers})
        say(f"removed {removed} leftovers of killed runs from the store ({', '.join(kinds)})")


def verify_store(store: Store, *, repair: bool, say: Callable[[str], None] = print) -> int:
    """`specdraft verify-store`: hash every artifact against its manifest, list what killed runs
    left; with `repair` set damaged artifacts aside and remove the leftovers. Exit code: 1 when
    an artifact is damaged, else 0. InputError for a store that is not there."""
    if not store.remote and not store.local.is_dir():
        raise InputError(f"store {store.local} is not a directory (give --store LOCATION)")
    counts = {"ok": 0, "damaged": 0}
    for name in store.artifact_names():
        result = store.verify(name, repair=repair)
        if result is None:
            continue  # no manifest: never published (a run's leftover), not an artifact
        status, what = result
        counts[status] += 1
        if status != "ok":
            say(f"{status:<9} {store.location(name)}: {what}")
    leftovers = find_leftovers(store)
    for item in leftovers:
        where = store.location(item.name) if item.kind == "lock" else store.local / item.name
        say(f"leftover  {where}: {item.why}")
    if repair and leftovers:
        remove_leftovers(store, leftovers)
    done = "removed" if repair else "to remove"
    say(
        f"{counts['ok']} artifacts intact, {counts['damaged']} damaged, {len(leftovers)} "
        f"leftovers of killed runs ({done})"
    )
    if (counts["damaged"] or leftovers) and not repair:
        say(
            "a run sets a damaged artifact aside and removes leftovers itself; --repair does it now"
        )
    return 1 if counts["damaged"] else 0
