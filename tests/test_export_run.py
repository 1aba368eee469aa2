"""`specdraft export RUN --to DIR` (commands/export_run.py) on a run whose artifacts are built here:
artifacts are found by name in the store used now, the run's own trust settings are honoured, and
`--to` never replaces what the export reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from specdraft.errors import InputError
from specdraft.pipeline.commands.export_run import export_run
from specdraft.pipeline.engine.rundir import MARKER

KEYS = {name: f"{i:016x}" for i, name in enumerate(("data", "target", "distil", "evaluate"), 1)}
CUSTOM = """
import os
from pathlib import Path

Path(os.environ["SPECDRAFT_CUSTOM_RAN"]).write_text("ran")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "specdraft_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def _artifact(store: Path, stage: str, manifest: dict) -> Path:
    folder = store / f"{stage}-{KEYS[stage]}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _seal(store: Path) -> None:
    """Give every artifact's manifest the list of its files, as a stage's publication does."""
    from specdraft.pipeline.engine.artifacts import file_records

    for folder in store.iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"] = file_records(folder)
        (folder / "manifest.json").write_text(json.dumps(manifest))


def make_store(store: Path, gamma: int = 4, users_target: Path | None = None) -> None:
    """A store with what the export stage reads: the data, a target (tokenizer and config; in the
    store, or the user's folder `users_target` that it records), a distilled draft with its own
    model code (a model type transformers lacks), the evaluation."""
    from test_pair import TEXT, save_model, train_bpe
    from transformers import LlamaConfig, LlamaForCausalLM

    _artifact(store, "data", {"info": {"source": "builtin"}})
    target = _artifact(store, "target", {"info": {"model": str(users_target or "model")}})
    save_model(users_target or target / "model", train_bpe(TEXT), vocab_size=512)
    distil = _artifact(
        store,
        "distil",
        {
            "info": {"model": "model"},
            "config": {"k": 0.5, "divergence": "fkl", "lora": {"enabled": False}},
        },
    )
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(distil / "model")
    config_file = distil / "model" / "config.json"
    custom = json.loads(config_file.read_text())
    custom["model_type"] = "specdraft_custom"
    custom["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomForCausalLM",
    }
    config_file.write_text(json.dumps(custom))
    (distil / "model" / "custom.py").write_text(CUSTOM)
    evaluate = _artifact(store, "evaluate", {})
    (evaluate / "metrics.json").write_text(json.dumps({"gamma": gamma}))
    _seal(store)


def make_run(root: Path, recorded_store: Path, *, draft_trusted: bool = True, inputs=None) -> Path:
    """A run directory as `specdraft run` leaves it, its run.json naming `recorded_store`."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    inputs = inputs or list(KEYS)
    stage = {
        "name": "export",
        "key": "f" * 16,
        "inputs": {name: str(recorded_store / f"{name}-{KEYS[name]}") for name in inputs},
        "path": str(recorded_store / f"export-{'f' * 16}"),
        "reused": False,
        "seconds": 1.0,
    }
    (run_dir / "run.json").write_text(json.dumps({"kind": "run", "job": "t", "stages": [stage]}))
    job = {"name": "t", "target": {"trust_remote_code": False}}
    job["draft"] = {"trust_remote_code": draft_trusted, "from_target_layers": 0}
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    (run_dir / MARKER).write_text("")
    return run_dir


@pytest.fixture
def code_runs(tmp_path, monkeypatch) -> Path:
    """The file the draft's module writes when it is imported (and transformers' module cache
    kept in tmp_path)."""
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "custom-code-ran"
    monkeypatch.setenv("SPECDRAFT_CUSTOM_RAN", str(marker))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return marker


def test_a_moved_store_exports_a_custom_code_draft_by_the_runs_trust(
    tmp_path, monkeypatch, code_runs
):
    """Issue 28.7 (a draft with its own code never exported: export loaded it untrusted) and 28.8
    (run.json's absolute paths named the store where it was)."""
    make_store(tmp_path / "moved")
    run_dir = make_run(tmp_path, tmp_path / "gone" / "store")
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "moved"))
    to = export_run(run_dir, tmp_path / "exported", dtype="bfloat16")
    assert code_runs.read_text() == "ran"  # the run trusted its draft: its code ran
    config = json.loads((to / "config.json").read_text())
    assert config["model_type"] == "specdraft_custom" and config["dtype"] == "bfloat16"
    assert (to / "custom.py").read_text() == CUSTOM  # served with its code
    assert (to / "tokenizer.json").is_file() and (to / MARKER).is_file()


def test_an_untrusted_draft_with_code_is_refused_before_it_loads(tmp_path, monkeypatch, code_runs):
    make_store(tmp_path / "store")
    run_dir = make_run(tmp_path, tmp_path / "store", draft_trusted=False)
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "store"))
    with pytest.raises(InputError, match=r"ships its own code \(custom.py\)") as info:
        export_run(run_dir, tmp_path / "exported")
    assert "does not trust it" in str(info.value)
    assert not code_runs.exists() and not (tmp_path / "exported").exists()


def test_a_copied_store_exports_from_the_copy(tmp_path, monkeypatch, code_runs):
    make_store(tmp_path / "original", gamma=4)
    make_store(tmp_path / "copy", gamma=7)  # told apart by its evaluation's gamma
    run_dir = make_run(tmp_path, tmp_path / "original")
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "copy"))
    to = export_run(run_dir, tmp_path / "exported")
    assert '"num_speculative_tokens": 7' in (to / "README.md").read_text()


def test_artifacts_missing_from_the_store_or_run_json_are_one_message(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "empty"))
    run_dir = make_run(tmp_path, tmp_path / "old")
    with pytest.raises(InputError, match="are not in \\$SPECDRAFT_STORE .*empty: point") as info:
        export_run(run_dir, tmp_path / "exported")
    assert f"distil-{KEYS['distil']}" in str(info.value) and str(tmp_path / "old") in str(
        info.value
    )
    lacking = make_run(tmp_path / "other", tmp_path / "old", inputs=["data", "target", "evaluate"])
    with pytest.raises(InputError, match="damaged .the export stage's inputs lack distil"):
        export_run(lacking, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_to_never_replaces_the_run_its_store_or_another_run(tmp_path, monkeypatch):
    """`export RUN --to RUN` replaced that run's results without a word."""
    make_store(tmp_path / "store", users_target=tmp_path / "models" / "target")
    run_dir = make_run(tmp_path, tmp_path / "store")
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "store"))
    other = make_run(tmp_path / "runs", tmp_path / "store")
    before = sorted(p.name for p in run_dir.iterdir())
    for to, overwrite, message in (
        (run_dir, True, "is the run directory"),
        (tmp_path, True, "holds the run directory"),
        (run_dir / "draft", True, "lies inside the run directory"),
        (tmp_path / "store" / "x", True, "lies inside the store"),
        (tmp_path / "models" / "target", True, "is the target model"),
        (tmp_path / "models", True, "holds the target model"),
        (other, False, "that is a run directory of specdraft"),
    ):
        with pytest.raises(InputError, match=message):
            export_run(run_dir, to, overwrite=overwrite)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (other / "run.json").is_file() and (tmp_path / "models" / "target").is_dir()


def test_serve_check_finds_a_moved_stores_artifacts_by_name(tmp_path, monkeypatch):
    """Issue 28.8 for serve-check: it read the report's and evaluation's artifacts at the paths
    run.json recorded."""
    from test_serve_check import _published_run

    from specdraft.pipeline.commands import serve_check as sc
    from specdraft.pipeline.engine.rundir import read_run, run_store

    run_dir = _published_run(tmp_path)
    _seal(tmp_path / "store")
    (tmp_path / "store").rename(tmp_path / "moved")
    monkeypatch.setenv("SPECDRAFT_STORE", str(tmp_path / "moved"))
    page = sc.report_page_input(read_run(run_dir), store=run_store({}))
    assert page  # drawn from the artifacts where the store is now
    assert sc._artifact(read_run(run_dir), "evaluate", run_store({})).parent == tmp_path / "moved"


def test_serve_check_runs_no_code_the_run_did_not_trust(tmp_path, monkeypatch):
    """vLLM has one trust_remote_code for target and draft: serve-check sets it only when the run
    trusts both, and refuses a model with code before the engine starts."""
    from specdraft.pipeline.commands import serve_check as sc

    run_dir = make_run(tmp_path, tmp_path / "store", draft_trusted=False)
    job = yaml.safe_load((run_dir / "job.yaml").read_text())
    job["target"]["trust_remote_code"] = True  # the target trusted, the draft not
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    draft = tmp_path / "served-draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.Config"}}))
    prompts = sc.Prompts(rows=[], max_new_tokens=1, eos_id=0, pad_id=0, gamma=1, temperature=0)
    monkeypatch.setattr(sc, "engine_python", lambda: Path("python"))
    monkeypatch.setattr(sc, "run_prompts", lambda *a, **k: (prompts, tmp_path, draft))
    monkeypatch.setattr(sc, "engine_side", lambda *a, **k: pytest.fail("the engine started"))
    with pytest.raises(InputError, match=r"draft .* ships its own code \(evil.py\); vLLM"):
        sc.serve_check(run_dir)
