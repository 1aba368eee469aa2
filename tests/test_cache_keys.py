"""Cache keys change when what a stage computes changes, and not otherwise.

Each test edits one module's source as `git pull` would (through `code_version.module_source`,
nothing on disk changes) and compares the demo job's stage keys before and after."""

from __future__ import annotations

import pytest

from specdraft.cli import shipped_job
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine import code_version as cv
from specdraft.pipeline.engine.dag import plan
from specdraft.pipeline.engine.job import build_stages


def _keys(tmp_path) -> dict[str, str]:
    cv.code_version.cache_clear()
    cv._parse.cache_clear()
    # round 2 on-policy: its sequences are the first round's draft's (a target-written round 2
    # would not read that draft, and shares nothing with it)
    job = load_job(shipped_job("demo.yaml"), ["distil.rounds=2", "distil.later_rounds=draft"])
    return {stage.name: key for stage, key, _ in plan(build_stages(job), tmp_path)}


def _changed(tmp_path, monkeypatch, module: str, old: str, new: str) -> set[str]:
    before = _keys(tmp_path)
    real = cv.module_source

    def edited(name: str):
        source = real(name)
        if name == module:
            assert old in source, f"{old!r} is not in {module}: the test needs updating"
            return source.replace(old, new, 1)
        return source

    monkeypatch.setattr(cv, "module_source", edited)
    after = _keys(tmp_path)
    monkeypatch.undo()
    cv.code_version.cache_clear()
    cv._parse.cache_clear()
    return {name for name in before if before[name] != after[name]}


ALL_AFTER_DISTIL = {
    "distil",
    "generate_r2",
    "target_outputs_r2",  # the target's outputs for round 2's sequences, which distil's draft wrote
    "distil_r2",
    "evaluate",
    "export",
    "report",
}


def test_a_config_help_string_reruns_nothing(tmp_path, monkeypatch):
    changed = _changed(
        tmp_path,
        monkeypatch,
        "specdraft.pipeline.config",
        '"Drafted tokens per speculative round."',
        '"Drafted tokens per speculative round (γ)."',
    )
    assert changed == set()
    # what makes it so: the config module's code is not hashed (its values are in the keys);
    # hashed like other modules, the same edit would re-run every stage that reads a config
    monkeypatch.setattr(cv, "NOT_FOLLOWED", ())
    followed = _changed(
        tmp_path,
        monkeypatch,
        "specdraft.pipeline.config",
        '"Drafted tokens per speculative round."',
        '"Drafted tokens per speculative round (γ)."',
    )
    assert followed


def test_comments_and_docstrings_rerun_nothing(tmp_path, monkeypatch):
    assert (
        _changed(
            tmp_path,
            monkeypatch,
            "specdraft.kernels.kd_loss",
            "def fused_kd_loss(",
            "# a comment a reader needed\ndef fused_kd_loss(",
        )
        == set()
    )
    source = cv.module_source("specdraft.pipeline.sequences")
    docstring = source.split('"""')[1]
    assert (
        _changed(
            tmp_path, monkeypatch, "specdraft.pipeline.sequences", docstring, docstring + " More."
        )
        == set()
    )


def test_the_kd_loss_reruns_the_stages_that_train_with_it_and_their_dependents(
    tmp_path, monkeypatch
):
    changed = _changed(
        tmp_path,
        monkeypatch,
        "specdraft.kernels.kd_loss",
        "CHUNK_BUDGET_BYTES = 256 * 2**20",
        "CHUNK_BUDGET_BYTES = 128 * 2**20",
    )
    # reference is AdaSPEC's all-token distillation: it runs the KD loss too
    assert changed == {"reference"} | ALL_AFTER_DISTIL
    assert "generate" not in changed and "target" not in changed and "data" not in changed
    assert "target_outputs" not in changed  # the stored target outputs do not use the loss


def test_the_sampler_reruns_generation_and_what_reads_it(tmp_path, monkeypatch):
    changed = _changed(
        tmp_path,
        monkeypatch,
        "specdraft.pipeline.sequences",
        "torch.manual_seed(seed * 1_000_003 + first_index + start)",
        "torch.manual_seed(seed * 1_000_033 + first_index + start)",
    )
    assert {"generate", "reference", "distil", "generate_r2", "evaluate"} <= changed
    assert not changed & {"data", "target", "draft_init"}


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("specdraft.reports.render", "specdraft run report: ", "specdraft run report - "),
        ("specdraft.reports.page", "<title>", "<title>specdraft: "),  # the pages' primitives
    ],
)
def test_the_report_renderer_reruns_the_report_only(tmp_path, monkeypatch, module, old, new):
    source = cv.module_source(module)
    line = next(ln for ln in source.splitlines() if old in ln)
    assert _changed(tmp_path, monkeypatch, module, line, line + "  ") == set()
    assert _changed(tmp_path, monkeypatch, module, old, new) == {"report"}


@pytest.mark.parametrize(
    "module",
    [f"specdraft.pipeline.stages.{s}" for s in ("generate", "distil", "evaluate", "export")],
)
def test_a_stage_reaches_its_own_run_and_not_the_config_module(module):
    reached = cv.reached(module)
    assert f"{module}:run" in reached
    assert not [r for r in reached if r.startswith("specdraft.pipeline.config:")]


def _job_keys(tmp_path, *overrides) -> dict[str, str]:
    job = load_job(shipped_job("demo.yaml"), list(overrides))
    return {stage.name: key for stage, key, _ in plan(build_stages(job), tmp_path)}


def test_a_draft_free_generation_is_shared_by_every_draft(tmp_path):
    """With draft_fraction=0 the draft writes nothing: another draft reuses the sequences and the
    target's outputs for them; with a draft share it does not."""
    for fraction, shared in (("0", True), ("0.5", False)):
        a, b = (
            _job_keys(tmp_path, f"generate.draft_fraction={fraction}", f"draft.train.steps={n}")
            for n in (10, 20)
        )
        assert a["draft_init"] != b["draft_init"] and a["distil"] != b["distil"]
        assert (a["generate"] == b["generate"]) is shared
        assert (a["target_outputs"] == b["target_outputs"]) is shared
