"""Output directories: the one writer of run directories (`specdraft run`, `specdraft compare`)
and of exported drafts (`specdraft export`), and the one reader of `run.json`.

An output directory is built whole in a scratch sibling (`.tmp-<name>-<host>-<pid>-<hex>`) and
renamed into place when complete: a reader sees the old directory or the new one, never a new draft
beside old metrics, and a write that fails (a full disk) leaves the old one as it was. Scratch left
by a killed process of this machine is removed by the next write to the same destination.

Every output directory holds MARKER. A destination that exists, is not empty and lacks it belongs
to someone else: it is refused unless the user says `--overwrite`. So is one of specdraft's of
another kind (a run directory where a draft is exported, an exported draft where a run writes). The
working directory and the directories above it are refused always (replacing them would delete
what the user stands in), and so is a destination that is, holds or lies inside something the
command reads (check_apart: the store, the job's models and data, the run directory exported).
A destination that is a symlink to a directory is written where it points (the link stays).
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
# What a run directory of specdraft before MARKER held: such a directory is ours too when its
# run.json is one specdraft wrote (_legacy_run_json), never for the name alone.
LEGACY_ENTRIES = {"draft", "report", "metrics.json", "job.yaml", RUN_FILE, "results.json",
                  "results.md"}  # fmt: skip
# Every key a run.json of specdraft before MARKER had at its top level.
LEGACY_RUN_KEYS = {"job", "stages", "kind", "command", "wall_seconds", "wall_note", "stages_run",
                   "stages_reused", "made_seconds_total", "machine", "code"}  # fmt: skip


class PublishError(RuntimeError):
    """An output directory could not be written (e.g. a full disk); the old one is unchanged."""


def _is_ours(path: Path) -> bool:
    """Whether specdraft wrote the directory `path`: it holds MARKER, or it is a run directory of
    specdraft before MARKER (only LEGACY_ENTRIES, and a run.json specdraft wrote)."""
    if (path / MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir() if not p.name.startswith((".tmp-", ".trash-"))}
    return names <= LEGACY_ENTRIES and _legacy_run_json(path / RUN_FILE)


def _legacy_run_json(run_file: Path) -> bool:
    """Whether `run_file` is a run.json as every specdraft before MARKER wrote it: an object of
    LEGACY_RUN_KEYS with the job's name and a non-empty list of stages, each with its name, its
    hex cache key, whether it was reused and its seconds. A user's own run.json is not that."""
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(run, dict) or not set(run) <= LEGACY_RUN_KEYS:
        return False
    stages = run.get("stages")
    if not isinstance(run.get("job"), str) or not isinstance(stages, list) or not stages:
        return False
    return all(
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and isinstance(s.get("key"), str)
        and s["key"] != ""
        and all(c in "0123456789abcdef" for c in s["key"])
        and isinstance(s.get("reused"), bool)
        and isinstance(s.get("seconds"), int | float)
        for s in stages
    )


def _kind_of(path: Path) -> str | None:
    """What one of specdraft's output directories holds: a run ("run", a comparison too: both
    have run.json), an exported draft ("draft": a model's config.json), or None when neither."""
    if (path / RUN_FILE).is_file():
        return "run"
    return "draft" if (path / "config.json").is_file() else None


def check_destination(
    path: Path, *, overwrite: bool, flag: str = "--out", kind: str = "run"
) -> None:
    """Refuse `path` as an output directory (InputError, nothing touched) when it is a file, a
    dangling symlink, the working directory or above it, unwritable, or a non-empty directory
    specdraft did not write or wrote as another `kind` ("run" or "draft"; unless `overwrite`)."""
    path = Path(path).expanduser().absolute()
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise InputError(
            f"{flag} {path}: that is the working directory or holds it, which specdraft never "
            "replaces; give a new directory"
        )
    if path.is_symlink() and not path.exists():
        raise InputError(
            f"{flag} {path}: a symlink to {os.readlink(path)}, which does not exist; make that "
            "directory, remove the link, or give another directory"
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
        occupied = path.is_dir() and any(path.iterdir())
        foreign = occupied and not _is_ours(path)
        other_kind = occupied and not foreign and _kind_of(path) not in (None, kind)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if foreign and not overwrite:
        raise InputError(
            f"{flag} {path}: the directory is not empty and specdraft did not write it (no "
            f"{MARKER}); give a new or empty directory, or add --overwrite to replace it whole"
        )
    if other_kind and not overwrite:
        held = {"run": "a run directory", "draft": "an exported draft"}
        raise InputError(
            f"{flag} {path}: that is {held[_kind_of(path)]} of specdraft, and this would replace "
            f"it with {held[kind]}; give another directory, or add --overwrite to replace it whole"
        )


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_apart(path: Path, read: dict[str, Path], *, flag: str = "--out") -> None:
    """Refuse `path` as an output directory (InputError) when it is, holds or lies inside one of
    `read` (what it is -> where): what the command reads or writes besides its output (the store,
    the job's local models and data). Publishing replaces `path` whole, so a store inside it
    would be deleted with it; an output inside a model folder changes the model. Links are
    followed: the places are compared where they really are."""
    real = Path(path).expanduser().absolute().resolve()
    for what, where in read.items():
        where = Path(where).expanduser().absolute().resolve()
        if _contains(real, where):
            held = "is" if real == where else "holds"
            raise InputError(
                f"{flag} {path} {held} {what} {where}, which this command reads; replacing "
                f"{path} would delete it: give {flag} a directory outside it"
            )
        if _contains(where, real):
            raise InputError(
                f"{flag} {path} lies inside {what} {where}, which this command reads; give "
                f"{flag} a directory outside it"
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
        if stale and entry.is_symlink():  # a link set aside by a commit of older specdraft
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def building(
    final: Path, *, overwrite: bool, flag: str = "--out", kind: str = "run"
) -> Iterator[Path]:
    """Yield a fresh scratch directory beside `final`; when the block ends without an error, mark
    it as specdraft's and publish it as `final` in one rename (replacing the old directory). On an
    error the scratch is removed and `final` is untouched; an OSError becomes a PublishError.
    A `final` that is a symlink to a directory is published where it points; the link stays."""
    final = Path(final).expanduser().absolute()
    check_destination(final, overwrite=overwrite, flag=flag, kind=kind)
    if final.is_symlink():
        final = final.resolve()  # rename the scratch over the directory, never over the link
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
        # nothing appeared meanwhile
        check_destination(final, overwrite=overwrite, flag=flag, kind=kind)
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
    from specdraft.pipeline.engine.machine import describe_machine

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


def read_run_job(run_dir: Path) -> dict:
    """The job a run directory records (job.yaml, as the run resolved it); {} when it has none
    (a run of specdraft before job.yaml) or it does not parse: nothing is then taken from it."""
    try:
        job = yaml.safe_load((Path(run_dir) / "job.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return job if isinstance(job, dict) else {}


def run_trust(job: dict):
    """Whose model code a command on a run may run (drafts.pair.ModelTrust): the run's own
    per-model settings, from its job."""
    from specdraft.drafts.pair import ModelTrust

    def section(name: str) -> dict:
        value = job.get(name)
        return value if isinstance(value, dict) else {}

    target, draft = section("target"), section("draft")
    return ModelTrust.for_job(
        target.get("trust_remote_code") is True,
        draft.get("trust_remote_code") is True,
        draft.get("from_target_layers") or 0,
    )


def run_store(job: dict, given: str | None = None):
    """The store a command on a finished run reads, and where that choice came from: `given`
    (the command's), else $SPECDRAFT_STORE, else the store the run's job named, else the default.
    The run's artifacts are looked up in it by name (stored_artifact), so a store that was moved
    or copied since is read where it is now."""
    from specdraft.pipeline.engine.store import Store, default_location

    if given:
        return Store(given), "the store given"
    if os.environ.get("SPECDRAFT_STORE"):
        return Store(os.environ["SPECDRAFT_STORE"]), "$SPECDRAFT_STORE"
    if isinstance(job.get("store"), str) and job["store"]:
        return Store(job["store"]), "the store the run's job names"
    return Store(default_location()), "the default store"


def recorded_inputs(run: dict, run_dir: Path, stage: str, required: tuple[str, ...]) -> dict:
    """{input: recorded location} of `stage` in run.json; InputError when run.json lacks the
    stage, its inputs, or one of `required`."""
    recorded = {s["name"]: s for s in run["stages"]}.get(stage, {}).get("inputs")
    damaged = f"{Path(run_dir) / RUN_FILE} is damaged"
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise InputError(f"{damaged} (no {stage} stage with its inputs); re-run the job")
    missing = [name for name in required if name not in recorded]
    if missing:
        raise InputError(
            f"{damaged} (the {stage} stage's inputs lack {', '.join(missing)}); re-run the job"
        )
    return recorded


def artifact_name(location: str) -> str | None:
    """The artifact's name (`<stage>-<key>`) in a location a manifest or run.json recorded (a
    directory, or `<store URL>/<name>`); None when it names none."""
    name = location.rstrip("/").rpartition("/")[2]
    if not name or not name[0].isalnum() or "/" in name or "\\" in name:
        return None
    return name


def stored_artifacts(store, recorded: dict[str, str], source: str) -> dict[str, Path]:
    """{input: the artifact on this machine} of `recorded` ({input: location}), each found by its
    name in `store` (run_store; `source` says where that store came from), never at the recorded
    path. InputError naming what the store lacks and how to point at the right one."""
    found, missing = {}, []
    for key, location in recorded.items():
        name = artifact_name(location)
        path = store.committed_path(name) if name else None
        if path is None:
            missing.append(name or location)
        found[key] = path
    if missing:
        recorded_root = next(iter(recorded.values())).rstrip("/").rpartition("/")[0]
        raise InputError(
            f"the run's artifacts {', '.join(missing)} are not in {source} {store.url}: point "
            f"SPECDRAFT_STORE at the store the run used (it was {recorded_root} then), or re-run "
            "the job there to make them again"
        )
    return found
