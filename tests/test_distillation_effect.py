"""A round of on-policy distillation raises acceptance on the toy world (a small but real run),
and the distil stage's input checks fire before any training."""

import json
import warnings

import pytest

from specdraft.errors import InputError
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.job import run_job

pytestmark = pytest.mark.integration  # a small but real run

SMALL_TOY = [
    "name=effect",
    "data.train_per_task=120",
    "data.eval_per_task=6",
    "data.vocab_size=320",
    "target.arch.hidden_size=64",
    "target.arch.intermediate_size=192",
    "target.train.steps=150",
    "target.train.batch_size=16",
    "draft.arch.hidden_size=16",
    "draft.arch.num_heads=2",
    "draft.arch.intermediate_size=32",
    "draft.train.steps=40",
    "draft.train.batch_size=16",
    "generate.num_prompts=160",
    "generate.max_new_tokens=40",
    "reference.train.steps=1",
    "reference.train.batch_size=4",
    "distil.selection=all",
    "distil.lora.enabled=false",
    "distil.train.steps=60",
    "distil.train.batch_size=16",
    "distil.eval_every=0",
    "evaluate.prompts_per_task=6",
    "evaluate.spec_prompts_per_task=1",
    "evaluate.max_new_tokens=24",
]


def test_one_on_policy_round_raises_alpha(tmp_path):
    job = load_job(None, [*SMALL_TOY, f"store={tmp_path / 'store'}"])
    run_job(job, tmp_path / "out", use_ray=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["final"]["alpha"] > metrics["baseline"]["alpha"] + 0.02
    assert metrics["final"]["alpha_greedy"] >= metrics["baseline"]["alpha_greedy"]


def test_pure_tvd_warns_and_names_the_lk_hybrid(tmp_path):
    from specdraft.pipeline.engine.artifacts import StageContext
    from specdraft.pipeline.stages import distil

    job = load_job(None, ["distil.divergence=tvd"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(KeyError):
        warnings.simplefilter("always")
        # no inputs: stops right after the checks
        distil.run(job.distil, {}, StageContext(tmp_path, 0))
    assert any("distil.divergence=lk" in str(w.message) for w in caught)


def test_models_with_different_vocabularies_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdraft.pipeline.stages.distil import check_vocabularies

    def model(vocab):
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )

    check_vocabularies(model(40), model(40), model(40), vocab=40)
    # padded past the tokenizer's 40 ids, to different sizes: one vocabulary over the first 40
    check_vocabularies(model(48), model(40), model(44), vocab=40)
    with pytest.raises(InputError, match="target 40, draft 48, reference 44 rows, and target"):
        check_vocabularies(model(40), model(48), model(44), vocab=44)
