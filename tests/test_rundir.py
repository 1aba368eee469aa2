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


# run.json as specdraft wrote it before the marker (012c9ba: the job's name and its stages)
LEGACY_RUN = {"job": "demo", "stages": [
    {"name": "data", "key": "9ae511cbfbc7fbed", "path": "/s/data-9ae511cbfbc7fbed", "reused": False,
     "seconds": 2.77},
]}  # fmt: skip


def test_a_legacy_run_directory_is_ours(tmp_path):
    old = tmp_path / "runs" / "demo"
    (old / "draft").mkdir(parents=True)
    for name in ("metrics.json", "job.yaml"):
        (old / name).write_text("{}")
    (old / "run.json").write_text(json.dumps(LEGACY_RUN))
    check_destination(old, overwrite=False)
    (old / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        check_destination(old, overwrite=False)


@pytest.mark.parametrize(
    "run_json",
    [
        '{"my": "log"}',
        "{}",
        '{"job": "demo", "stages": []}',
        '{"job": "demo", "stages": [{"name": "data", "key": "k", "reused": false, "seconds": 1}]}',
        json.dumps(LEGACY_RUN | {"accuracy": 0.91}),
        "not json",
    ],
)
def test_a_users_folder_holding_a_run_json_is_not_replaced(tmp_path, run_json):
    """Issue 28.1: a folder counted as specdraft's for holding a run.json and metrics.json."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.json").write_text(run_json)
    (results / "metrics.json").write_text('{"acc": 0.91}')
    with pytest.raises(InputError, match="specdraft did not write it"):
        check_destination(results, overwrite=False)
    with pytest.raises(InputError, match="specdraft did not write it"):
        with building(results, overwrite=False, flag="--to"):
            pass
    assert (results / "run.json").read_text() == run_json
    assert (results / "metrics.json").read_text() == '{"acc": 0.91}'


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


def _no_stage(*args, **kwargs):
    raise AssertionError("a stage ran")


def test_a_run_refuses_an_out_that_holds_or_lies_inside_its_store(tmp_path, monkeypatch):
    """Issue 28.2: `--out R` with the store at R/store deleted every artifact of the store."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine import job as job_module

    monkeypatch.setattr(job_module, "execute_logged", _no_stage)
    run_dir = tmp_path / "R"
    artifact = run_dir / "store" / "data-0123456789abcdef"
    artifact.mkdir(parents=True)
    (artifact / "manifest.json").write_text("{}")
    (run_dir / MARKER).write_text("")  # a run directory of specdraft: replaced without a word
    monkeypatch.setenv("SPECDRAFT_STORE", str(run_dir / "store"))
    for out, message in (
        (run_dir, f"--out {run_dir} holds the store {run_dir / 'store'}"),
        (run_dir / "store", "is the store|did not write it"),
        (run_dir / "store" / "runs" / "t", "lies inside the store"),
    ):
        for overwrite in (False, True):  # not even --overwrite deletes the store
            with pytest.raises(InputError, match=message):
                job_module.run_job(load_job(None, ["name=t"]), out, overwrite=overwrite)
    assert (artifact / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "store"]
    assert [p.name for p in (run_dir / "store").iterdir()] == [artifact.name]


def test_an_out_apart_from_what_the_run_reads(tmp_path):
    """Issue 28.2: the job's local models and data are kept apart from --out as the store is."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import read_places, resolve_local_paths
    from specdraft.pipeline.engine.rundir import check_apart

    for folder in ("models/target", "models/draft", "data"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    job = load_job(
        None,
        [
            f"target={tmp_path / 'models' / 'target'}",
            f"draft={tmp_path / 'models' / 'draft'}",
            f"data.source={tmp_path / 'data' / 'train.jsonl'}",
            f"store={tmp_path / 'store'}",
        ],
    )
    resolve_local_paths(job)
    places = read_places(job)
    assert set(places) == {"the store", "the data", "the target model", "the draft model"}
    for out, message in (
        (tmp_path / "models", "holds the target model"),
        (tmp_path / "models" / "draft", "is the draft model"),
        (tmp_path / "models" / "target" / "run", "lies inside the target model"),
        (tmp_path / "data", "holds the data"),
        (tmp_path, "holds the store"),
    ):
        with pytest.raises(InputError, match=message):
            check_apart(out, places)
    check_apart(tmp_path / "runs" / "t", places)  # apart from all of it


def test_a_dangling_out_symlink_is_refused(tmp_path):
    """Issue 28.11: every stage ran, then the final rename failed on the link."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="a symlink to .*nowhere, which does not exist"):
        check_destination(link, overwrite=True)


def test_an_out_symlink_is_written_where_it_points_and_leaves_no_trash(tmp_path):
    real = tmp_path / "disk" / "results"
    with building(real, overwrite=False) as tmp:
        (tmp / "old").write_text("x")
    link = tmp_path / "results"
    link.symlink_to(real)
    with building(link, overwrite=False) as tmp:
        (tmp / "new").write_text("y")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == [MARKER, "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "results"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["results"]


def test_a_trash_symlink_an_older_commit_left_is_removed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("x")
    trash = tmp_path / ".trash-out-0123abcd"
    trash.symlink_to(tmp_path / "elsewhere")
    assert clean_stale_scratch(tmp_path / "out") == [trash]
    assert not trash.is_symlink() and (tmp_path / "elsewhere" / "keep").read_text() == "x"


def test_a_run_directory_and_an_exported_draft_do_not_replace_each_other(tmp_path):
    run_dir, draft = tmp_path / "run", tmp_path / "draft"
    with building(run_dir, overwrite=False) as tmp:
        (tmp / "run.json").write_text(json.dumps(LEGACY_RUN))
    with building(draft, overwrite=False, flag="--to", kind="draft") as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(InputError, match="run directory of specdraft, .* an exported draft"):
        check_destination(run_dir, overwrite=False, flag="--to", kind="draft")
    with pytest.raises(InputError, match="exported draft of specdraft, .* a run directory"):
        check_destination(draft, overwrite=False)
    check_destination(run_dir, overwrite=False)  # each is replaced by its own kind
    check_destination(draft, overwrite=False, flag="--to", kind="draft")
    check_destination(run_dir, overwrite=True, flag="--to", kind="draft")
