"""The built-in toy world: deterministic data, four task families, a working tokenizer."""

from specdraft.drafts.toyworld import TASKS, make_examples, make_toy_dataset, train_toy_tokenizer


def test_examples_are_deterministic_and_cover_every_task():
    a, b = make_examples(20, seed=3), make_examples(20, seed=3)
    assert a == b
    assert make_examples(20, seed=4) != a
    assert {row["task"] for row in a} == set(TASKS) and len(TASKS) >= 4


def test_arithmetic_answers_are_correct():
    for row in make_examples(50, seed=0):
        if row["task"] == "arithmetic":
            answer = int(row["response"].rsplit("The answer is ", 1)[1].rstrip("."))
            steps = row["response"].split(". ")
            last_eq = [s for s in steps if "=" in s][-1]
            lhs, rhs = last_eq.split("=")
            assert eval(lhs) == int(rhs) == answer  # noqa: S307 - our own generated arithmetic


def test_splits_are_disjoint_with_fields():
    splits = make_toy_dataset(30, 5, seed=0)
    assert set(splits) == {"train", "eval"}
    assert splits["train"].column_names == ["prompt", "response", "task"]
    assert len(splits["eval"]) == 5 * len(TASKS)
    assert all(splits["eval"]["task"].count(t) == 5 for t in TASKS)
    assert not set(splits["train"]["prompt"]) & set(splits["eval"]["prompt"])


def test_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    rows = make_examples(40, seed=0)
    tok = train_toy_tokenizer([r["prompt"] + r["response"] for r in rows], 400, tmp_path / "tok")
    assert (
        tok.pad_token_id is not None
        and tok.eos_token_id is not None
        and tok.pad_token_id != tok.eos_token_id
    )
    text = rows[2]["prompt"] + rows[2]["response"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tmp_path / "tok" / "tokenizer.json").exists()


def test_attention_auto_is_sdpa_without_cuda_or_flash_attn():
    from specdraft.drafts.models import resolve_attention

    assert resolve_attention("auto") == "sdpa"  # this test machine has no CUDA device
    assert resolve_attention("eager") == "eager"


def test_default_draft_is_at_least_8x_smaller_than_the_target(tmp_path):
    from specdraft.drafts.models import count_parameters, toy_llama
    from specdraft.pipeline.config import JobConfig

    rows = make_examples(40, seed=0)
    tok = train_toy_tokenizer([r["prompt"] + r["response"] for r in rows], 512, tmp_path / "tok")
    job = JobConfig()
    target = toy_llama(job.target.arch, tok, 128, seed=0)
    draft = toy_llama(job.draft.arch, tok, 128, seed=0)
    assert count_parameters(target) >= 8 * count_parameters(draft)
