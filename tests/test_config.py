"""Job configuration: defaults, YAML + overrides, and one message listing every problem."""

import subprocess
import sys
from pathlib import Path

import pytest

from specdraft.pipeline.config import ConfigError, JobConfig, describe, load_job, read_job_yaml

JOBS = sorted((Path(__file__).resolve().parents[1] / "specdraft" / "jobs").glob("*.yaml"))


def test_defaults_are_the_builtin_demo():
    job = load_job()
    assert job == JobConfig()
    assert (job.target.model, job.draft.model, job.data.source) == ("builtin", "builtin", "builtin")
    # the default recipe (its evidence: RESULTS.md): the LK hybrid with one λ per step
    # on all tokens, full fine-tuning, target-written responses
    assert job.distil.selection == "all" and job.distil.divergence == "lk"
    assert job.distil.lk_alpha == "batch"
    assert not job.distil.lora.enabled and job.generate.draft_fraction == 0.0


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_loads(path):
    if "compare" in read_job_yaml(path):
        from specdraft.pipeline.commands.compare_recipes import load_comparison

        with pytest.raises(ConfigError, match="specdraft compare"):
            load_job(path)  # `specdraft run` points at the right command
        job = load_comparison(path).base
    else:
        job = load_job(path)
    assert job.name


def test_overrides_win_over_yaml(tmp_path):
    job_file = tmp_path / "j.yaml"
    job_file.write_text("name: mine\ndistil:\n  k: 0.3\n  lora:\n    r: 4\ntarget: builtin\n")
    job = load_job(
        job_file, ["distil.k=0.6", "evaluate.gamma=3", "distil.lora.target_modules=q_proj,v_proj"]
    )
    assert job.name == "mine"
    assert job.distil.k == 0.6 and job.distil.lora.r == 4 and job.evaluate.gamma == 3
    assert job.distil.lora.target_modules == ["q_proj", "v_proj"]


def test_shorthand_sets_the_model_of_both_sides():
    job = load_job(None, ["target=org/big", "draft=/models/small"])
    assert job.target.model == "org/big" and job.draft.model == "/models/small"


def test_every_problem_is_reported_at_once(tmp_path):
    job_file = tmp_path / "bad.yaml"
    job_file.write_text("bogus: 1\ndistil:\n  k: 1.5\n  divergence: l2\nevaluate:\n  gamma: zero\n")
    with pytest.raises(ConfigError) as info:
        load_job(job_file, ["generate.draft_fraction=-0.1", "nope.key=3"])
    text = "\n".join(info.value.problems)
    for expected in (
        "bogus: unknown key",
        "distil.k: 1.5 is out of range",
        "distil.divergence: 'l2' is not one of",
        "evaluate.gamma: expected an integer",
        "generate.draft_fraction: -0.1 is out of range",
        "nope: unknown key",
    ):
        assert expected in text
    assert len(info.value.problems) == 6


def test_k_zero_is_rejected_and_one_accepted():
    with pytest.raises(ConfigError, match="distil.k: 0.0 is out of range, must be > 0"):
        load_job(None, ["distil.k=0"])
    assert load_job(None, ["distil.k=1"]).distil.k == 1.0


def test_cross_field_checks():
    with pytest.raises(ConfigError) as info:
        load_job(
            None,
            [
                "target.arch.hidden_size=100",
                "target.arch.num_heads=3",
                "distil.train.batch_size=10",
                "distil.train.grad_accum=4",
            ],
        )
    text = str(info.value)
    assert (
        "must be divisible by target.arch.num_heads" in text and "distil.train.grad_accum" in text
    )


def test_trained_stages_take_workers_and_split_batches_evenly_over_them():
    job = load_job(None, ["target.resources.workers=2", "reference.resources.workers=4"])
    assert (job.target.resources.workers, job.reference.resources.workers) == (2, 4)
    with pytest.raises(ConfigError) as info:
        load_job(
            None,
            [
                "reference.resources.workers=2",
                "reference.train.batch_size=6",
                "reference.train.grad_accum=2",
                "draft.resources.workers=3",  # batch_size 32
            ],
        )
    assert info.value.problems == [
        "draft.train.batch_size (32) must be divisible by draft.train.grad_accum x "
        "draft.resources.workers (1 x 3): each worker takes an equal share",
        "reference.train.batch_size (6) must be divisible by reference.train.grad_accum x "
        "reference.resources.workers (2 x 2): each worker takes an equal share",
    ]


def test_workers_on_a_given_model_are_rejected():
    """A given target or draft is recorded, not trained: there is nothing for workers to do."""
    with pytest.raises(ConfigError) as info:
        load_job(None, ["target=org/big", "draft=org/small", "draft.resources.workers=2"])
    assert info.value.problems == [
        "draft.resources.workers: draft.model 'org/small' is used as given, not trained "
        "(workers > 1 trains the builtin toy model with DDP); set it to 1"
    ]


def test_placement_needs_workers_and_a_known_strategy():
    with pytest.raises(ConfigError) as info:
        load_job(None, ["generate.resources.placement=STRICT_PACK"])
    assert info.value.problems == [
        "generate.resources.placement: STRICT_PACK places workers; with "
        "generate.resources.workers=1 there is nothing to place (set workers > 1, or clear it)"
    ]
    with pytest.raises(ConfigError, match="generate.resources.placement"):
        load_job(None, ["generate.resources.workers=2", "generate.resources.placement=TIGHT"])
    job = load_job(None, ["distil.resources.workers=2", "distil.resources.placement=SPREAD"])
    assert job.distil.resources.placement == "SPREAD"


def test_later_rounds_on_policy_after_a_warm_start():
    from specdraft.pipeline.engine.job import build_stages

    warm = ["generate.dataset_fraction=1", "generate.draft_fraction=0", "distil.rounds=3"]
    stages = {s.name: s for s in build_stages(load_job(None, [*warm, "distil.later_rounds=draft"]))}
    assert stages["generate"].config.dataset_fraction == 1.0
    for name in ("generate_r2", "generate_r3"):
        cfg = stages[name].config
        assert (cfg.draft_fraction, cfg.dataset_fraction) == (1.0, 0.0)
    same = {s.name: s for s in build_stages(load_job(None, warm))}
    assert same["generate_r2"].config.dataset_fraction == 1.0
    with pytest.raises(ConfigError, match="distil.later_rounds: draft sets how rounds 2..R"):
        load_job(None, ["distil.later_rounds=draft"])


def test_every_field_has_help():
    rows = describe()
    assert rows and all(help_ for _, _, help_ in rows)
    assert ("distil.k", "0.4", "Fraction of response tokens kept by top/bottom selection.") in rows


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "specdraft", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_rejects_a_bad_job_with_exit_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndistil:\n  k: 7\n  extra: 1\n")
    store = tmp_path / "store"
    result = _cli("run", str(bad), f"store={store}", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "distil.k: 7.0 is out of range" in result.stderr
        and "distil.extra: unknown key" in result.stderr
    )
    assert (
        not store.exists() and not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    )


def test_cli_validate(tmp_path):
    ok = _cli("validate", "evaluate.gamma=2", cwd=tmp_path)
    assert ok.returncode == 0 and "is valid" in ok.stdout
    missing = _cli("validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert (
        missing.returncode == 2
        and "does not exist" in missing.stderr
        and "Traceback" not in missing.stderr
    )


def test_floats_are_finite_and_counts_bounded_all_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_job(
            None,
            [
                "distil.k=nan",
                "distil.train.lr=nan",
                "evaluate.temperature=inf",
                "seed=100000000000000000000000",
                f"distil.train.steps={10**12}",
            ],
        )
    text = "\n".join(info.value.problems)
    for expected in (
        "distil.k: expected a finite number, got 'nan'",
        "distil.train.lr: expected a finite number, got 'nan'",
        "evaluate.temperature: expected a finite number, got 'inf'",
        "seed: 100000000000000000000000 is out of range, must be <= 2147483647",
        "distil.train.steps: 1000000000000 is out of range, must be <= 2147483647",
    ):
        assert expected in text
    assert len(info.value.problems) == 5


def test_yaml_nan_and_inf_are_rejected_too(tmp_path):
    job_file = tmp_path / "j.yaml"
    job_file.write_text("distil:\n  k: .nan\nevaluate:\n  temperature: .inf\n")
    with pytest.raises(ConfigError) as info:
        load_job(job_file)
    assert len(info.value.problems) == 2


def test_an_override_that_is_not_yaml_names_its_key():
    with pytest.raises(ConfigError, match=r"distil.k: expected a number, got '\[1,'"):
        load_job(None, ["distil.k=[1,"])


def test_a_file_that_is_not_utf8_is_one_problem(tmp_path):
    job_file = tmp_path / "latin1.yaml"
    job_file.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_job(job_file)


def test_nul_characters_are_rejected(tmp_path):
    job_file = tmp_path / "j.yaml"
    job_file.write_text('name: "a\\0b"\nstore: "s\\0"\n')
    with pytest.raises(ConfigError) as info:
        load_job(job_file)
    text = "\n".join(info.value.problems)
    assert "name: expected a string without NUL" in text and "store: expected a string" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["validate", "distil.k=[1,"], "distil.k: expected a number"),
        (["validate", "latin1.yaml"], "not UTF-8"),
        (["validate", "nul.yaml"], "NUL"),
        (["run", "distil.k=nan", "--out", "o"], "expected a finite number"),
    ],
    ids=["bad-override", "latin1", "nul", "run-nan"],
)
def test_cli_bad_jobs_exit_2_without_traceback(tmp_path, args, message):
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "nul.yaml").write_text('name: "a\\0b"\n')
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_lk_alpha_left_unset_reads_token_with_another_divergence():
    """lk_alpha's default (batch) belongs to the default divergence (lk): a job that picks another
    divergence without naming lk_alpha gets `token` (unused), not an error, and its stages keep
    the keys they had when `token` was the default."""
    assert load_job(None, ["distil.divergence=fkl"]).distil.lk_alpha == "token"
    assert load_job(None, ["distil.divergence=lk"]).distil.lk_alpha == "batch"
    assert (
        load_job(None, ["distil.divergence=lk", "distil.lk_alpha=token"]).distil.lk_alpha == "token"
    )
    with pytest.raises(ConfigError, match="distil.lk_alpha=batch with distil.divergence=fkl"):
        load_job(None, ["distil.divergence=fkl", "distil.lk_alpha=batch"])
