"""Output directories: the one writer of run directories (`specdraft run`, `specdraft compare`)
and of exported drafts (`specdraft export`), and the one reader of `run.json`.

An output directory is built whole in a scratch sibling (`.tmp-<name>-<host>-<pid>-<hex>`) and
renamed into place when complete: a reader sees the old directory or the new one, never a new draft
beside old metrics, and a write that fails (a full disk) leaves the old one as it was. Scratch left
by a killed process of this machine is removed by the next write to the same destination.

Every output directory holds MARKER. A destination that exists, is not empty and lacks it belongs
to someone else: it is refused unless the user says `--overwrite`. The working directory and the
directories above it are refused always (replacing them would delete what the user stands in).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from specdraft.errors import InputError
from specdraft.pipeline.engine.artifacts import commit_dir

MARKER = ".specdraft-output"
RUN_FILE = "run.json"
KINDS = ("run", "comparison")
# What a run directory of specdraft before MARKER held: such a directory is ours too.
LEGACY_ENTRIES = {"draft", "report", "metrics.json", "job.yaml", RUN_FILE, "results.json",
                  "results.md"}  # fmt: skip


class PublishError(RuntimeError):
    """An output directory could not be written (e.g. a full disk); the old one is unchanged."""


def _is_ours(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir() if not p.name.startswith((".tmp-", ".trash-"))}
    return (path / RUN_FILE).is_file() and names <= LEGACY_ENTRIES


def check_destination(path: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """Refuse `path` as an output directory (InputError, nothing touched) when it is a file, the
    working directory or above it, unwritable, or a non-empty directory specdraft did not write
    (unless `overwrite`)."""
    path = Path(path).expanduser().absolute()
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise InputError(
            f"{flag} {path}: that is the working directory or holds it, which specdraft never "
            "replaces; give a new directory"
        )
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: a file is there; give a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a directory")
    parent = existing if existing != path else path.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {parent} is not writable")
    try:
        foreign = path.is_dir() and any(path.iterdir()) and not _is_ours(path)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if foreign and not overwrite:
        raise InputError(
            f"{flag} {path}: the directory is not empty and specdraft did not write it (no "
            f"{MARKER}); give a new or empty directory, or add --overwrite to replace it whole"
        )


def _scratch_prefix(final: Path) -> str:
    return f".tmp-{final.name}-{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def clean_stale_scratch(final: Path) -> list[Path]:
    """Remove the scratch siblings of `final` whose process (on this machine) is gone, and the
    `.trash-*` a killed commit left; return what was removed."""
    removed = []
    if not final.parent.is_dir():
        return removed
    prefix = _scratch_prefix(final)
    for entry in final.parent.iterdir():
        name = entry.name
        stale = name.startswith(f".trash-{final.name}-")
        if name.startswith(prefix):
            pid = name[len(prefix) :].split("-", 1)[0]
            stale = pid.isdigit() and not _alive(int(pid))
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def building(final: Path, *, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh scratch directory beside `final`; when the block ends without an error, mark
    it as specdraft's and publish it as `final` in one rename (replacing the old directory). On an
    error the scratch is removed and `final` is untouched; an OSError becomes a PublishError."""
    final = Path(final).expanduser().absolute()
    check_destination(final, overwrite=overwrite, flag=flag)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_scratch(final)
        tmp = final.with_name(f"{_scratch_prefix(final)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()  # mode 0777 less the umask, like any directory the user makes
    except OSError as err:
        raise PublishError(f"cannot write {final}: {err}") from None
    try:
        yield tmp
        (tmp / MARKER).write_text("written by specdraft; replaced whole by its next write here\n")
        check_destination(final, overwrite=overwrite, flag=flag)  # nothing appeared meanwhile
        commit_dir(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PublishError(f"cannot write {final}: {err}; the previous one is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def made_seconds(result) -> float:
    """What a stage took its maker to run (its manifest's `seconds`): this run's, or for a reused
    stage the run that made it."""
    return float(result.manifest.get("seconds", result.seconds))


def stage_records(results: dict) -> list[dict]:
    """The `stages` list of run.json: one entry per executed or reused stage. `seconds` is what
    this run spent on it (0 when reused); `made_seconds` what making it took."""
    return [
        {
            "name": r.name,
            "key": r.key,
            "inputs": r.manifest.get("inputs", {}),
            "path": str(r.path),
            "reused": r.reused,
            "seconds": round(r.seconds, 2),
            "made_seconds": round(made_seconds(r), 2),
            **({"queued_seconds": round(r.queued, 1)} if r.queued >= 1 else {}),
        }
        for r in results.values()
    ]


def write_run_dir(
    out: Path,
    *,
    kind: str,
    job: dict,
    results: dict,
    copies: dict[str, Path],
    texts: dict[str, str],
    command: str,
    started: float,
    overwrite: bool,
) -> None:
    """Publish the run directory `out` whole: `copies` (name -> directory or file to copy),
    `texts` (name -> content), `job.yaml` and `run.json` (one shape for every kind)."""
    from specdraft.reports.machine import describe_machine

    assert kind in KINDS, kind
    with building(out, overwrite=overwrite) as tmp:
        for name, source in copies.items():
            if Path(source).is_dir():
                shutil.copytree(source, tmp / name)
            else:
                shutil.copyfile(source, tmp / name)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        (tmp / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        run = {
            "kind": kind,
            "job": job["name"],
            "command": command,
            "wall_seconds": round(time.time() - started, 1),  # with cached stages: only what ran
            "stages_run": sum(not r.reused for r in results.values()),
            "stages_reused": sum(r.reused for r in results.values()),
            # every stage's maker's run time, summed: the run from an empty store, one stage
            # after another (cached stages included, Ray's queue waits not)
            "made_seconds_total": round(sum(made_seconds(r) for r in results.values()), 1),
            "machine": describe_machine(),
            "stages": stage_records(results),
        }
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))


def read_run(run_dir: Path) -> dict:
    """A run directory's run.json, checked; InputError naming what is wrong otherwise. Run
    directories of specdraft before `kind` existed get it from their stages."""
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise InputError(
            f"{run_dir} is not a specdraft run directory (no {RUN_FILE}); give the --out of a run"
        )
    damaged = f"{run_file} is damaged"
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{damaged} ({err}); re-run the job to write it again") from None
    stages = run.get("stages") if isinstance(run, dict) else None
    if not isinstance(stages, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages
    ):
        raise InputError(f"{damaged} (no list of stages); re-run the job to write it again")
    if "kind" not in run:
        run["kind"] = "comparison" if any(s["name"] == "comparison" for s in stages) else "run"
    if run["kind"] not in KINDS:
        raise InputError(f"{damaged} (kind {run['kind']!r} is not one of {', '.join(KINDS)})")
    return run
