"""`--plan` shows the keys a run will use: local model paths (relative, `pkg:`) are resolved before
the stages are keyed, as `specdraft run` and `specdraft compare` resolve them."""

from __future__ import annotations

import re

from specdraft.cli import main, shipped_job
from specdraft.pipeline.commands.compare_recipes import (
    build_comparison_stages,
    load_comparison,
    resolve_comparison_paths,
)
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.dag import plan
from specdraft.pipeline.engine.job import build_stages, resolve_local_paths, store_for


def _printed_keys(text: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S+)\s+([0-9a-f]{16})  ", text, flags=re.M))


def _packaged_model(tmp_path, monkeypatch) -> str:
    """A `pkg:` model reference to a file inside an importable package (as the SmolLM2 job's),
    which only resolution turns into a path that exists (and so into a content fingerprint)."""
    package = tmp_path / "site" / "modelpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.gguf").write_bytes(b"GGUF-bytes-the-plan-must-fingerprint")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "pkg:modelpkg/tiny.gguf"


def _overrides(tmp_path, monkeypatch) -> list[str]:
    """A job on the packaged model with a layer draft, run from `tmp_path`."""
    model = _packaged_model(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    return [f"store={tmp_path / 'store'}", f"target.model={model}", "draft.from_target_layers=1"]


def test_run_plan_keys_are_the_run_keys_for_a_packaged_model(tmp_path, monkeypatch, capsys):
    overrides = _overrides(tmp_path, monkeypatch)
    assert main(["run", str(shipped_job("demo.yaml")), *overrides, "--plan"]) == 0
    printed = _printed_keys(capsys.readouterr().out)
    job = load_job(shipped_job("demo.yaml"), overrides)
    resolve_local_paths(job)  # what run_job does before it keys the stages
    keys = {s.name: k for s, k, _ in plan(build_stages(job), store_for(job))}
    assert printed == keys and "target" in keys


def test_compare_plan_keys_are_the_comparison_keys(tmp_path, monkeypatch, capsys):
    overrides = _overrides(tmp_path, monkeypatch)
    assert main(["compare", str(shipped_job("compare.yaml")), *overrides, "--plan"]) == 0
    printed = _printed_keys(capsys.readouterr().out)
    comp = load_comparison(shipped_job("compare.yaml"), overrides)
    resolve_comparison_paths(comp)  # what run_comparison does before it keys the stages
    keys = {s.name: k for s, k, _ in plan(build_comparison_stages(comp), store_for(comp.base))}
    assert printed == keys and len(keys) > 3
