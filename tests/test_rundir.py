"""Output directories: foreign directories are never replaced, a run directory is published whole
or not at all, scratch of killed runs is cleaned up, and run.json has one shape."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from specdraft.errors import InputError
from specdraft.pipeline.engine.rundir import (
    MARKER,
    PublishError,
    building,
    check_destination,
    clean_stale_scratch,
    read_run,
    write_run_dir,
)


def test_a_foreign_non_empty_directory_is_refused_unless_overwrite(tmp_path):
    mine = tmp_path / "p"
    mine.mkdir()
    (mine / "t.txt").write_text("thesis")
    with pytest.raises(InputError, match="specdraft did not write it"):
        check_destination(mine, overwrite=False)
    check_destination(mine, overwrite=True)
    check_destination(tmp_path / "new" / "dir", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", overwrite=False)
    (mine / MARKER).write_text("")
    check_destination(mine, overwrite=False)  # ours: replaced by the next write


def test_files_and_the_working_directory_are_refused_even_with_overwrite(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    for path, message in (
        (tmp_path / "f", "a file is there"),
        (tmp_path / "f" / "sub", "is a file, not a directory"),
        (tmp_path, "working directory"),
        (tmp_path.parent, "working directory"),
        (Path("."), "working directory"),
    ):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(InputError, match=message):
            check_destination(path, overwrite=True)


def test_a_legacy_run_directory_is_ours(tmp_path):
    old = tmp_path / "runs" / "demo"
    (old / "draft").mkdir(parents=True)
    for name in ("run.json", "metrics.json", "job.yaml"):
        (old / name).write_text("{}")
    check_destination(old, overwrite=False)
    (old / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        check_destination(old, overwrite=False)


def test_a_failed_write_leaves_the_old_directory_and_no_scratch(tmp_path):
    out = tmp_path / "out"
    with building(out, overwrite=False) as tmp:
        (tmp / "metrics.json").write_text("old")
        (tmp / "draft").mkdir()
        (tmp / "draft" / "w").write_text("old draft")
    with pytest.raises(PublishError, match="No space left on device; the previous one"):
        with building(out, overwrite=False) as tmp:
            (tmp / "draft").mkdir()
            (tmp / "draft" / "w").write_text("new draft")
            raise OSError(28, "No space left on device")
    assert (out / "metrics.json").read_text() == "old"
    assert (out / "draft" / "w").read_text() == "old draft"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_published_directory_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "out"
    with building(out, overwrite=False) as tmp:
        (tmp / "old-only").write_text("x")
    with building(out, overwrite=False) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_scratch_of_dead_processes_is_removed(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "out"
    stale = tmp_path / f".tmp-out-{host}-{dead.pid}-0123abcd"
    live = tmp_path / f".tmp-out-{host}-{os.getpid()}-0123abcd"
    trash = tmp_path / ".trash-out-0123abcd"
    other = tmp_path / f".tmp-outer-{host}-{dead.pid}-0123abcd"
    for d in (stale, live, trash, other):
        (d / "report").mkdir(parents=True)
    assert set(clean_stale_scratch(out)) == {stale, trash}
    assert live.exists() and other.exists() and not stale.exists()


def _result(name: str, reused: bool, inputs: dict) -> SimpleNamespace:
    """What rundir reads of a dag.StageResult."""
    return SimpleNamespace(
        name=name,
        key="k" * 64,
        path=Path(f"/store/{name}-x"),
        reused=reused,
        seconds=0.0 if reused else 1.234,
        manifest={"inputs": inputs, "seconds": 60.25 if reused else 1.234},
        queued=0.0,
    )


def test_run_json_has_one_shape_for_runs_and_comparisons(tmp_path):
    src = tmp_path / "src"
    (src / "report").mkdir(parents=True)
    (src / "report" / "index.html").write_text("<html>")
    (src / "results.md").write_text("| a |")
    results = {
        "export": _result("export", True, {"distil": "/store/distil-x"}),
        "report": _result("report", False, {}),
    }
    for kind in ("run", "comparison"):
        out = tmp_path / kind
        write_run_dir(
            out,
            kind=kind,
            job={"name": "demo", "seed": 0},
            results=results,
            copies={"report": src / "report", "results.md": src / "results.md"},
            texts={"metrics.json": "{}"},
            command="specdraft run",
            started=0.0,
            overwrite=False,
        )
        run = read_run(out)
        assert run["kind"] == kind and run["job"] == "demo" and run["command"] == "specdraft run"
        assert (run["stages_run"], run["stages_reused"]) == (1, 1)
        assert run["stages"][0] == {
            "name": "export",
            "key": "k" * 64,
            "inputs": {"distil": "/store/distil-x"},
            "path": "/store/export-x",
            "reused": True,
            "seconds": 0.0,  # this run spent nothing on it
            "made_seconds": 60.25,  # its maker did
        }
        assert run["stages"][1]["made_seconds"] == run["stages"][1]["seconds"] == 1.23
        assert run["made_seconds_total"] == 61.5
        assert (out / "report" / "index.html").read_text() == "<html>"
        assert {p.name for p in out.iterdir()} == {
            MARKER, "report", "results.md", "metrics.json", "job.yaml", "run.json",
        }  # fmt: skip


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "is damaged"),
        ('["a list"]', "no list of stages"),
        ('{"kind": "party", "stages": []}', "kind 'party'"),
        ("\xff", "is damaged"),
    ],
)
def test_a_damaged_run_json_is_one_message(tmp_path, text, message):
    (tmp_path / "run.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=message):
        read_run(tmp_path)


def test_legacy_run_json_gets_its_kind():
    repo = Path(__file__).resolve().parents[1]
    assert read_run(repo / "results" / "compare")["kind"] == "comparison"


def specdraft(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "specdraft", *args], cwd=cwd, capture_output=True, text=True
    )


def _fake_run(root: Path, stages: list[dict] | None = None, kind: str | None = None) -> Path:
    run_dir = root / "run"
    run_dir.mkdir()
    stages = stages or [{"name": "export", "inputs": {"distil": str(root / "store" / "d")}}]
    run = {"job": "demo", "stages": stages} | ({"kind": kind} if kind else {})
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


@pytest.mark.parametrize("to", ["p", ".", ".."])
def test_export_never_replaces_a_foreign_directory_or_the_working_directory(tmp_path, to):
    run_dir = _fake_run(tmp_path)
    work = tmp_path / "p"
    work.mkdir()
    (work / "t.txt").write_text("thesis")
    result = specdraft("export", str(run_dir), "--to", to, cwd=work if to != "p" else tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ("did not write it" if to == "p" else "working directory") in result.stderr
    assert (work / "t.txt").read_text() == "thesis"
    if to != "p":  # not even --overwrite replaces the working directory
        again = specdraft("export", str(run_dir), "--to", to, "--overwrite", cwd=work)
        assert again.returncode == 2 and (work / "t.txt").read_text() == "thesis"


@pytest.mark.parametrize(
    "case,message",
    [
        ("comparison", "run directory of a comparison"),
        ("corrupt", "run.json is damaged"),
        ("no-export", "no export stage"),
    ],
)
def test_export_of_a_comparison_or_a_damaged_run_is_one_message(tmp_path, case, message):
    if case == "comparison":
        repo = Path(__file__).resolve().parents[1]
        run_dir = repo / "results" / "compare"
    elif case == "corrupt":
        run_dir = _fake_run(tmp_path)
        (run_dir / "run.json").write_text('{"stages": [')
    else:
        run_dir = _fake_run(tmp_path, stages=[{"name": "data"}], kind="run")
    result = specdraft("export", str(run_dir), "--to", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_run_refuses_bad_destinations_and_stores_before_any_stage(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "t.txt").write_text("thesis")
    (tmp_path / "file").write_text("x")
    store = tmp_path / "store"
    cases = [
        (["--out", str(foreign)], {}, "did not write it"),
        (["--out", str(tmp_path / "file")], {}, "a file is there"),
        (["--out", str(tmp_path / "o")], {"SPECDRAFT_STORE": str(tmp_path / "file")}, "is a file"),
    ]
    for args, env, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "specdraft", "run", "name=t"]
            + ([] if env else [f"store={store}"])
            + [*args, "--no-ray"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "[specdraft]" not in result.stderr
    assert not store.exists() and not (tmp_path / "o").exists()
    assert (foreign / "t.txt").read_text() == "thesis"
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_store_is_one_message(tmp_path):
    # /proc takes no new directories, not even from root (who may write anywhere else)
    result = subprocess.run(
        [sys.executable, "-m", "specdraft", "run", "--out", str(tmp_path / "o"), "--no-ray"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "SPECDRAFT_STORE": "/proc/self/specdraft-store"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "$SPECDRAFT_STORE /proc/self/specdraft-store: not a writable directory" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_exported_files_are_readable_like_other_files(tmp_path):
    """safetensors writes 0600; an exported draft is for a serving account to read."""
    import os

    import torch
    from safetensors.torch import save_file

    from specdraft.pipeline.stages.export import readable_like_other_files

    draft = tmp_path / "draft"
    (draft / "adapter").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(draft / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(draft / "adapter" / "adapter_model.safetensors"))
    (draft / "config.json").write_text("{}")
    assert os.stat(draft / "model.safetensors").st_mode & 0o777 == 0o600  # what it fixes
    old = os.umask(0o022)
    try:
        readable_like_other_files(draft)
    finally:
        os.umask(old)
    for path in (draft / "model.safetensors", draft / "adapter" / "adapter_model.safetensors"):
        assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.stat(draft / "adapter").st_mode & 0o777 == 0o755
