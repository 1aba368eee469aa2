"""The artifact store: a local directory, or an fsspec URL (`s3://`, `gs://`, ...) the cluster shares.

Stages always read and write local directories. With a local store those are the store's own
directories. With a URL, every machine keeps a mirror (`$SPECDRAFT_CACHE`, default
`~/.cache/specdraft/mirror/<hash of the URL>/`): a stage's inputs are fetched into the mirror of the
machine it runs on (once; a mirror copy whose manifest differs from the store's is fetched again), and
its output is published file by file with `manifest.json` uploaded last. Object stores have no
directory rename, so the manifest is the commit: an artifact without one does not exist, and a
publication cut short is overwritten by the next attempt. Locks are created with an exclusive write
(`mode="xb"`: S3's If-None-Match, GCS's generation precondition, O_EXCL on local disks).

fsspec's own configuration gives the URL's options (`FSSPEC_S3_ENDPOINT_URL=http://minio:9000`,
`FSSPEC_GS_PROJECT=...`); they are read where the run starts and travel with the stages.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.engine import environment
from specdraft.pipeline.engine.artifacts import (
    MANIFEST,
    artifact_problem,
    atomic_write_text,
    commit_dir,
    fsync_dir,
    fsync_tree,
    parse_manifest,
    restore_mtimes,
)

LOCAL_PROTOCOLS = ("file", "local")
PROGRESS_BYTES = 64 * 2**20  # transfers larger than this show a progress bar


def default_location() -> str:
    return environment.store_location()


def mirror_root() -> Path:
    return environment.mirror_root()


def host_tag() -> str:
    """This machine, in 8 hex digits (scratch directory names carry it with the maker's pid)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# `.tmp-<artifact>-<8 hex>` (specdraft before it named the maker) or
# `.tmp-<artifact>-<8 hex>.<pid>.<host tag>`: scratch an artifact is made or fetched in.
SCRATCH = re.compile(
    r"^\.tmp-(?P<name>.+)-[0-9a-f]{8}"  # the artifact, a random tag
    r"(?:\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8}))?$"  # the maker's pid and host_tag()
)


def _protocol(location: str) -> str:
    return location.split("://", 1)[0] if "://" in location else "file"


class Store:
    """One artifact store. Pickles small (the filesystem is opened again where it is used), so a
    Store travels to Ray tasks; `local` is resolved on the machine that uses it."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.protocol = _protocol(location)
        self.remote = self.protocol not in LOCAL_PROTOCOLS
        self._fs = None
        if not self.remote:
            local = location.split("://", 1)[1] if "://" in location else location
            self.url, self.options = str(Path(local).expanduser().absolute()), {}
            return
        import fsspec
        import fsspec.config

        try:
            fsspec.get_filesystem_class(self.protocol)
        except ValueError:
            raise InputError(
                f"store {location}: fsspec knows no protocol {self.protocol!r}"
            ) from None
        except ImportError as err:  # fsspec says which package: "Please install s3fs ..."
            raise InputError(f"store {location}: {err}") from None
        self.url = location.rstrip("/")
        self.options = dict(fsspec.config.conf.get(self.protocol, {}))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem(self.protocol, **self.options)
        return self._fs

    @property
    def local(self) -> Path:
        """This machine's directory of the store: the store itself, or its mirror."""
        if not self.remote:
            return Path(self.url)
        return mirror_root() / hashlib.sha256(self.url.encode()).hexdigest()[:12]

    def path(self, name: str) -> Path:
        """Where artifact `name` lies (once fetched) on this machine."""
        return self.local / name

    def location(self, name: str) -> str:
        """Artifact `name` as other machines find it (recorded in manifests)."""
        return f"{self.url}/{name}" if self.remote else str(self.path(name))

    def _remote(self, name: str) -> str:
        return f"{self.url}/{name}"

    def committed(self, name: str) -> bool:
        if not self.remote:
            return (self.path(name) / MANIFEST).exists()
        self.fs.invalidate_cache()  # another machine may have published it since we listed
        return self.fs.exists(f"{self._remote(name)}/{MANIFEST}")

    def fetch(self, name: str) -> Path:
        """Artifact `name` on this machine (downloaded into the mirror unless already there)."""
        local = self.committed_path(name)
        if local is None:
            raise FileNotFoundError(f"{self.location(name)} has no {MANIFEST}")
        return local

    def committed_path(self, name: str) -> Path | None:
        """Artifact `name` on this machine if the store has it intact (fetched if need be), else
        None. A damaged one (see artifacts.artifact_problem) is reported, set aside and None."""
        if not self.remote:
            return self._checked_local(name)
        self.fs.invalidate_cache()  # another machine may have published it since we listed
        for _ in range(3):  # a forced re-run elsewhere may republish it while we fetch: look again
            try:
                data = self.fs.cat_file(f"{self._remote(name)}/{MANIFEST}")
            except FileNotFoundError:
                return None
            manifest, problem = parse_manifest(data)
            if manifest is not None:
                fetched = self._fetch_checked(name, data, manifest)
                if isinstance(fetched, Path):
                    return fetched
                problem = fetched
            if self._remote_manifest(name) == data:
                self._set_aside(name, problem, data)
                return None
        return None

    def _remote_manifest(self, name: str) -> bytes | None:
        """The store's manifest of artifact `name` as it is now; None when it has none."""
        self.fs.invalidate_cache()
        try:
            return self.fs.cat_file(f"{self._remote(name)}/{MANIFEST}")
        except FileNotFoundError:
            return None

    def _fetch_checked(self, name: str, data: bytes, manifest: dict) -> Path | str:
        """The mirror copy of artifact `name` whose manifest is `data`, fetched unless the mirror
        has it intact; what is wrong with the store's copy if that does not match its manifest."""
        local = self.path(name)
        mirrored = local / MANIFEST
        if mirrored.exists() and mirrored.read_bytes() == data:
            problem = _problem_or_vanished(local, manifest)
            if not problem:
                return local
            _say(f"the mirror copy {local} is damaged ({problem}): fetching it again")
        tmp = self.scratch(name)
        try:
            self.download(name, tmp, manifest=False)
            # hashed whole here: cheaper than a second fetch
            problem = artifact_problem(tmp, manifest, full=True)
            if problem:
                shutil.rmtree(tmp, ignore_errors=True)
                return problem
            restore_mtimes(tmp, manifest)
            (tmp / MANIFEST).write_bytes(data)  # the one read above: files and manifest agree
            commit_dir(tmp, local)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (mirrored.exists() and mirrored.read_bytes() == data):
                raise  # not another process of this machine fetching the same artifact
        return local

    def _checked_local(self, name: str) -> Path | None:
        folder = self.path(name)
        for _ in range(3):  # a forced re-run may replace the directory while we read it
            try:
                data = (folder / MANIFEST).read_bytes()
            except FileNotFoundError:
                return None
            manifest, problem = parse_manifest(data)
            if manifest is not None:
                problem = _problem_or_vanished(folder, manifest)
            if not problem:
                return folder
            try:
                again = (folder / MANIFEST).read_bytes()
            except FileNotFoundError:
                return None
            if again == data:
                self._set_aside(name, problem, data)
                return None
        return None

    def _set_aside(self, name: str, problem: str, data: bytes) -> None:
        """Report damaged artifact `name` in one line and take it out of use: locally its directory
        is renamed to `.damaged-<name>-*` (kept for a look); in a remote store its manifest, which
        is the commit, is removed (the next publication replaces the files)."""
        if not self.remote:
            aside = self.local / f".damaged-{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(self.path(name), aside)
            except FileNotFoundError:
                return  # another run set it aside first
            except OSError as err:  # a read-only store: say so, once, instead of a traceback
                raise InputError(
                    f"damaged artifact {self.path(name)}: {problem}; it cannot be set aside "
                    f"({err.strerror}): the store {self.local} is not writable here. Repair it as "
                    "a user who can write it (specdraft verify-store --repair)"
                ) from None
            where = f"moved aside to {aside}"
        else:
            if self._remote_manifest(name) != data:
                return  # replaced meanwhile: not the damaged one any more
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{self._remote(name)}/{MANIFEST}")
            where = "unpublished (its manifest removed)"
        _say(f"damaged artifact {self.location(name)}: {problem}; {where}, it is made again")

    def artifact_names(self) -> list[str]:
        """The artifacts the store holds (published or not yet: any directory not named `.*`)."""
        if not self.remote:
            if not self.local.is_dir():
                return []
            return sorted(p.name for p in self.local.iterdir() if p.is_dir() and p.name[0] != ".")
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.url, detail=True)
        except FileNotFoundError:
            return []
        names = [
            e["name"].rstrip("/").rpartition("/")[2] for e in entries if e["type"] == "directory"
        ]
        return sorted(n for n in names if n and n[0] != ".")

    def state(self, name: str) -> tuple[str, str]:
        """What a run would find of artifact `name`, changing nothing (`run --plan`): ("cached",
        ""), ("damaged", what: a run sets it aside and makes it again) or ("missing", ""). A
        remote artifact is judged by its manifest and, when this machine's mirror holds that
        manifest's copy, by the mirror's files; its files in the store are checked when fetched."""
        if self.remote:
            data = self._remote_manifest(name)
        else:
            try:
                data = (self.path(name) / MANIFEST).read_bytes()
            except FileNotFoundError:
                data = None
        if data is None:
            return "missing", ""
        manifest, problem = parse_manifest(data)
        local = self.path(name)
        mirrored = not self.remote or (
            (local / MANIFEST).is_file() and (local / MANIFEST).read_bytes() == data
        )
        if manifest is not None and mirrored:
            problem = _problem_or_vanished(local, manifest)
        return ("damaged", problem) if problem else ("cached", "")

    def verify(self, name: str, *, repair: bool = False) -> tuple[str, str] | None:
        """Hash every file of artifact `name`: ("ok" | "damaged", what), or None when it has no
        manifest (never published); `repair` sets a damaged one aside."""
        if not self.remote:
            try:
                data = (self.path(name) / MANIFEST).read_bytes()
            except FileNotFoundError:
                return None
        else:
            data = self._remote_manifest(name)
            if data is None:
                return None
        manifest, problem = parse_manifest(data)
        if manifest is not None and self.remote:
            problem = self._remote_problem(name, manifest)
        elif manifest is not None:
            problem = _problem_or_vanished(self.path(name), manifest, full=True)
        if not problem:
            return "ok", ""
        if repair:
            self._set_aside(name, problem, data)
        return "damaged", problem

    def _remote_problem(self, name: str, manifest: dict) -> str:
        """Artifact `name`'s files in the store checked against `manifest`, streamed, in full."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="specdraft-verify-") as tmp:
            self.download(name, Path(tmp), manifest=False)
            return artifact_problem(Path(tmp), manifest, full=True)

    def scratch(self, name: str) -> Path:
        """A fresh local directory to make artifact `name` in (publish it when complete). Its
        name carries this process's pid and host, so that scratch a killed process left is told
        from one still in use (upkeep.find_leftovers)."""
        tmp = self.local / f".tmp-{name}-{uuid.uuid4().hex[:8]}.{os.getpid()}.{host_tag()}"
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, tmp: Path, name: str, *, replace: bool = True) -> Path | None:
        """Commit the complete directory `tmp` (manifest included) as artifact `name` and return
        its local path. An existing artifact is replaced only with `replace` (a forced re-run);
        otherwise it stays, `tmp` is left as it is and the answer is None."""
        if self.remote:
            if self.committed(name):
                if not replace:
                    return None
                self.fs.rm_file(f"{self._remote(name)}/{MANIFEST}")  # unpublish: no one reads a mix
            self.delete(name)
            self.upload(tmp, name, manifest=False)
            self.fs.put_file(str(tmp / MANIFEST), f"{self._remote(name)}/{MANIFEST}")
        elif not replace:
            fsync_tree(tmp)
            try:
                os.rename(tmp, self.path(name))  # fails when the artifact exists (not empty)
                fsync_dir(self.local)
                return self.path(name)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if self.committed(name):
                    return None
                # a directory without a manifest is no artifact (a run's leftover): replaced
        commit_dir(tmp, self.path(name))
        return self.path(name)

    # Whole directories in a remote store, e.g. a DDP rank's output on its way to the stage.

    def upload(self, local: Path, name: str, manifest: bool = True) -> None:
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files = [p for p in files if manifest or p != local / MANIFEST]
        if files:
            self.fs.put(
                [str(p) for p in files],
                [f"{self._remote(name)}/{p.relative_to(local).as_posix()}" for p in files],
                **_progress(f"upload {name}", sum(p.stat().st_size for p in files)),
            )

    def download(self, name: str, local: Path, manifest: bool = True) -> None:
        self.fs.invalidate_cache()
        prefix = self.fs._strip_protocol(self._remote(name)).rstrip("/") + "/"
        files = [f for f in self.fs.find(self._remote(name)) if manifest or f != prefix + MANIFEST]
        targets = [local / f[len(prefix) :] for f in files]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        if files:
            size = sum(self.fs.sizes(files))
            self.fs.get(files, [str(t) for t in targets], **_progress(f"fetch {name}", size))

    def delete(self, name: str) -> None:
        self.fs.invalidate_cache()
        if self.fs.exists(self._remote(name)):
            self.fs.rm(self._remote(name), recursive=True)

    # Small files at the store's top level (locks), by name.

    def create_exclusive(self, name: str, text: str) -> bool:
        """Create file `name` with `text`; False when it exists already."""
        if not self.remote:
            try:
                fd = os.open(self.local / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        try:
            with self.fs.open(self._remote(name), "xb") as f:
                f.write(text.encode())
        except FileExistsError:
            return False
        return True

    def read_text(self, name: str) -> str | None:
        try:
            if not self.remote:
                return (self.local / name).read_text()
            return self.fs.cat_file(self._remote(name)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        """Replace file `name` in one step (rename locally, one PUT on an object store)."""
        if not self.remote:
            atomic_write_text(self.local / name, text)
        else:
            self.fs.pipe_file(self._remote(name), text.encode())

    def remove(self, name: str) -> None:
        """Delete file `name`; gone already is fine."""
        if not self.remote:
            (self.local / name).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._remote(name))

    def age(self, name: str) -> float | None:
        """Seconds since file `name` was last written; None when it is gone."""
        try:
            if not self.remote:
                return time.time() - (self.local / name).stat().st_mtime
            self.fs.invalidate_cache()
            modified = self.fs.modified(self._remote(name))
        except FileNotFoundError:
            return None
        return time.time() - modified.timestamp()


def _say(message: str) -> None:
    print(f"[specdraft] {message}", file=sys.stderr, flush=True)


def _problem_or_vanished(folder: Path, manifest: dict, *, full: bool = False) -> str:
    try:
        return artifact_problem(folder, manifest, full=full)
    except FileNotFoundError as err:  # replaced while we looked: the caller looks again
        return f"{Path(err.filename).name} vanished while it was checked"


def _progress(what: str, size: int) -> dict:
    """fsspec transfer arguments: a progress bar over the files (fsspec callbacks count files)
    when the transfer is big, none otherwise."""
    if size < PROGRESS_BYTES:
        return {}
    from fsspec.callbacks import TqdmCallback

    desc = f"{what} ({size / 2**20:.0f} MiB)"
    return {"callback": TqdmCallback(tqdm_kwargs={"desc": desc, "unit": "file"})}


def artifact_at(location: str) -> Path | None:
    """The artifact a manifest records at `location` (a directory, or `<store URL>/<name>`) on
    this machine, fetched if need be; None when it is no longer in its store."""
    root, _, name = location.rstrip("/").rpartition("/")
    return Store(root).committed_path(name)


def as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else Store(store)


class RemoteCheckpoints:
    """A training stage's checkpoints kept in a remote store as well (`<url>/.ckpt-<artifact>/`),
    so that a retry on another machine resumes too. Each `checkpoint-N` directory is uploaded
    whole, then marked complete; only complete ones are restored."""

    COMPLETE = ".complete"

    def __init__(self, store: Store, artifact: str):
        self.store, self.name = store, f".ckpt-{artifact}"

    def _complete(self) -> set[str]:
        self.store.fs.invalidate_cache()
        marks = self.store.fs.glob(f"{self.store._remote(self.name)}/checkpoint-*/{self.COMPLETE}")
        return {mark.split("/")[-2] for mark in marks}

    def save(self, folder: Path) -> None:
        """Upload the checkpoints in `folder` the store lacks; drop those `folder` no longer has."""
        stored = self._complete()
        local = {p.name for p in Path(folder).glob("checkpoint-*") if p.is_dir()}
        for name in sorted(local - stored):
            self.store.upload(Path(folder) / name, f"{self.name}/{name}")
            self.store.fs.pipe_file(f"{self.store._remote(self.name)}/{name}/{self.COMPLETE}", b"")
        for name in stored - local:
            self.store.delete(f"{self.name}/{name}")

    def restore(self, folder: Path) -> None:
        """Download the store's complete checkpoints that `folder` lacks."""
        folder = Path(folder)
        for name in sorted(self._complete()):
            if (folder / name).is_dir():
                continue
            tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            self.store.download(f"{self.name}/{name}", tmp)
            try:
                os.replace(tmp, folder / name)
            except OSError:  # another rank on this machine restored it first
                shutil.rmtree(tmp, ignore_errors=True)

    def clear(self) -> None:
        self.store.delete(self.name)
