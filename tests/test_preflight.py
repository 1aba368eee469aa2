"""Bad data stops before any stage with one message (exit code 2): user data with the toy pair, a
data file that is not UTF-8, prompts longer than the models' context."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdraft.errors import InputError
from specdraft.pipeline.config import ConfigError, load_job
from specdraft.pipeline.data_sources import DataError
from specdraft.pipeline.preflight import check_inputs

CONTEXT = 64  # max_position_embeddings of the pair below
WORDS = "the cat sat on a mat and the dog ran to the park".split()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from specdraft.drafts.toyworld import train_toy_tokenizer

    root = tmp_path_factory.mktemp("preflight")
    tok = train_toy_tokenizer([" ".join(WORDS)] * 4, 300, root / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    for name in ("target", "draft"):
        LlamaForCausalLM(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def data_file(path, prompts):
    rows = [{"prompt": p, "response": "the cat"} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(pair, data, *extra):
    return load_job(
        None,
        [
            f"target={pair / 'target'}",
            f"draft={pair / 'draft'}",
            f"data={data}",
            "data.max_length=32",
            "generate.max_new_tokens=16",
            "evaluate.max_new_tokens=8",
            *extra,
        ],
    )


def test_user_data_with_the_toy_pair_is_a_config_error(tmp_path):
    """It failed in the target stage, after the data stage had run (exit 1)."""
    data = data_file(tmp_path / "d.jsonl", ["the cat", "the dog"])
    with pytest.raises(ConfigError, match=r"data.source \(.*\) with the builtin toy pair"):
        load_job(None, [f"data={data}"])


def test_a_data_file_that_is_not_utf8_is_refused_naming_line_and_byte(pair, tmp_path):
    """It failed inside the data stage with a UnicodeDecodeError (exit 1)."""
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "ok", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(DataError, match=r"is not UTF-8 text \(line 2, byte 49: 0xe9\)"):
        check_inputs(job(pair, data))


def test_prompts_longer_than_the_context_are_refused(pair, tmp_path):
    """`run` generated for minutes, then an IndexError; eval checked, run did not."""
    long = " ".join(WORDS * 6)  # ~70 tokens: with 16 new tokens past 64 positions
    data = data_file(tmp_path / "d.jsonl", ["the cat sat", long, "the dog ran"])
    with pytest.raises(InputError) as caught:
        check_inputs(job(pair, data))
    message = str(caught.value)
    assert "1 of 3 prompts of data.source" in message
    assert f"the models cover {CONTEXT} positions and up to 16 tokens" in message
    assert f"at most {CONTEXT - 16} tokens" in message
    check_inputs(job(pair, data_file(tmp_path / "ok.jsonl", ["the cat sat", "the dog ran"])))


def test_max_new_tokens_past_the_context_is_refused(pair, tmp_path):
    data = data_file(tmp_path / "d.jsonl", ["the cat sat", "the dog ran"])
    with pytest.raises(InputError, match="leave no room for a prompt within the 64 positions"):
        check_inputs(job(pair, data, "generate.max_new_tokens=64"))


def test_run_refuses_long_prompts_before_any_stage(pair, tmp_path, monkeypatch):
    from specdraft.pipeline.engine import job as job_module

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage was about to run")

    monkeypatch.setattr(job_module, "execute_logged", no_stage)
    long = " ".join(WORDS * 6)
    data = data_file(tmp_path / "d.jsonl", ["the cat sat", long, "the dog ran"])
    with pytest.raises(InputError, match="prompts of data.source"):
        job_module.run_job(job(pair, data, f"store={tmp_path / 'store'}"), tmp_path / "out")


def test_an_offset_past_a_tasks_eval_prompts_is_refused_before_any_stage():
    from specdraft.pipeline.preflight import check_eval_prompts
    from specdraft.pipeline.sequences import pick_eval_prompts

    rows = [{"task": t, "prompt": f"{t}{i}"} for t in "ab" for i in range(3)] + [
        {"task": "c", "prompt": "c0"}
    ]
    # a confirmation run skips what a screen saw: prompts 1-2 of each task after an offset of 1
    assert [r["prompt"] for r in pick_eval_prompts(rows, 2, offset=1)] == ["a1", "a2", "b1", "b2"]
    assert [r["prompt"] for r in pick_eval_prompts(rows, 1)] == ["a0", "b0", "c0"]
    check_eval_prompts(load_job(overrides=["evaluate.prompt_offset=0"]), rows)
    with pytest.raises(
        InputError, match=r"prompt_offset \(1\) skips every eval prompt of task\(s\) c"
    ):
        check_eval_prompts(load_job(overrides=["evaluate.prompt_offset=1"]), rows)


def test_an_offset_past_the_toy_worlds_eval_prompts_is_a_config_error():
    with pytest.raises(ConfigError, match=r"evaluate.prompt_offset \(24\) leaves none"):
        load_job(overrides=["evaluate.prompt_offset=24"])
    assert load_job(overrides=["evaluate.prompt_offset=8"]).evaluate.prompt_offset == 8
