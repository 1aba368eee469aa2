"""The whole pipeline on a tiny toy job: every stage runs as a Ray task, the run directory holds a
servable draft, metrics and a report, and a re-run reuses every stage."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdraft.pipeline.engine.job import STAGES, run_job

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # every test reads the tiny job's run

METRIC_KEYS = {"alpha", "alpha_greedy", "spec_alpha", "tau", "tasks"}


def test_every_stage_ran_once_through_ray(tiny_run):
    _, out, results = tiny_run
    # vocab_trim is in the DAG only with draft.keep_vocab, which the tiny job leaves off
    expected = set(STAGES) - {"vocab_trim"} | {"generate_r2", "target_outputs_r2", "distil_r2"}
    assert set(results) == expected
    assert not any(r.reused for r in results.values())
    run_info = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in run_info["stages"]][:6] == [s for s in STAGES if s in expected][:6]


def test_second_round_is_on_policy_from_the_first(tiny_run):
    _, _, results = tiny_run
    generate_r2 = results["generate_r2"].manifest["inputs"]
    assert generate_r2["draft_init"] == str(results["distil"].path)
    distil_r2 = results["distil_r2"].manifest["inputs"]
    assert distil_r2["draft_init"] == str(results["distil"].path)
    assert distil_r2["generate"] == str(results["generate_r2"].path)
    for stage in ("evaluate", "export", "report"):
        assert results[stage].manifest["inputs"]["distil"] == str(results["distil_r2"].path)
    assert results["generate_r2"].key != results["generate"].key


def test_metrics_have_every_draft_and_task(tiny_run):
    job, out, results = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["gamma"] == job.evaluate.gamma
        and metrics["temperature"] == job.evaluate.temperature
    )
    assert metrics["draft"] == str((out / "draft").resolve())
    assert metrics["target"].startswith(str(results["target"].path))
    assert metrics["lossless_greedy"] is True
    for name in ("baseline", "reference", "final"):
        m = metrics[name]
        assert METRIC_KEYS <= set(m)
        assert 0.0 <= m["alpha"] <= 1.0 and 0.0 <= m["alpha_greedy"] <= 1.0
        assert 1.0 <= m["tau"] <= job.evaluate.gamma + 1
        assert m["lossless_greedy"] is True
        assert set(m["tasks"]) == {"arithmetic", "instruction", "code", "summary"}
        for task in m["tasks"].values():
            assert {"alpha", "alpha_greedy", "spec_alpha", "tau"} <= set(task)
        # the serving rule's headline, each rule's acceptance, and the target's free text
        by_rule = m["acceptance_by_rule"]
        assert by_rule["probabilistic"]["acceptance"] == m["alpha"]
        assert by_rule["agreement_t0"]["acceptance"] == m["alpha_greedy"]
        assert m["served"] == {
            "drafting": job.evaluate.drafting,
            "temperature": job.evaluate.temperature,
            **by_rule["greedy_drafting" if job.evaluate.drafting == "greedy" else "probabilistic"],
        }
        free = m["off_distribution"]["free_text"]
        assert free["num_sequences"] == job.evaluate.free_text_prompts and free["num_positions"]


def test_exported_draft_is_a_plain_hf_directory(tiny_run):
    _, out, results = tiny_run
    draft = out / "draft"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    ):
        assert (draft / name).exists(), name
    target_dir = results["target"].path / "model"
    assert (draft / "tokenizer.json").read_bytes() == (target_dir / "tokenizer.json").read_bytes()
    assert (draft / "adapter" / "adapter_model.safetensors").exists()
    card = (draft / "README.md").read_text()
    assert "base_model:" in card and "speculative-config" in card and "assistant_model" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"specdraft_job_hash: {metrics['job_hash']}" in card


def test_exported_draft_runs_assisted_generation_with_transformers_only(tiny_run):
    _, out, results = tiny_run
    tok = AutoTokenizer.from_pretrained(out / "draft")
    draft = AutoModelForCausalLM.from_pretrained(out / "draft")
    target = AutoModelForCausalLM.from_pretrained(results["target"].path / "model")
    assert draft.config.vocab_size == target.config.vocab_size
    ids = tok("Question: Tom has 3 apples.", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = target.generate(ids, max_new_tokens=8, do_sample=False)
        assisted = target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)


def test_report_is_rendered(tiny_run):
    _, out, _ = tiny_run
    html = (out / "report" / "index.html").read_text()
    assert "data:image/png;base64," in html and "tiny" in html


def test_rerun_reuses_every_stage_and_force_reruns_dependents(tiny_run):
    job, out, first = tiny_run
    again = run_job(job, out, use_ray=False)
    assert all(r.reused for r in again.values())
    assert {n: r.path for n, r in again.items()} == {n: r.path for n, r in first.items()}
    forced = run_job(job, out, use_ray=False, force={"export"})
    assert {n for n, r in forced.items() if not r.reused} == {"export"}
    assert (out / "draft" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", ["reference", "distil", "generate"])
def test_stage_outputs(tiny_run, stage):
    _, _, results = tiny_run
    path = results[stage].path
    info = results[stage].manifest["info"]
    if stage == "generate":
        assert (info["from_dataset"], info["from_draft"], info["from_target"]) == (3, 6, 3)
    else:
        assert (path / "model" / "model.safetensors").exists()
        history = json.loads((path / "history.json").read_text())
        assert history and all("loss" in row for row in history)
    if stage == "distil":
        selection = json.loads((path / "selection.json").read_text())
        assert selection["k"] == 0.4 and 0 < selection["kept"] < selection["total"]
        alphas = json.loads((path / "alpha_history.json").read_text())
        assert [a["step"] for a in alphas] == [0, 2, 3]
        assert info["best_alpha"] == max(a["alpha"] for a in alphas)
