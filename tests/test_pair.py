"""The target/draft pair check: tokenizers and configs built in tmp_path, nothing downloaded."""

from __future__ import annotations

import json

import pytest

from specdraft.drafts.pair import PairError, check_pair, format_report

PAD, EOS, IM_END = "<|pad|>", "<|eos|>", "<|im_end|>"
TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a speculative draft proposes tokens and the target verifies them",
    "seven small birds sang on the old stone wall in the morning",
] * 4
OTHER_TEXT = [
    "zebras quietly vex jumping wizards with mixed crowds",
    "python functions return lists of integers from loops",
    "purple kettles whistle while hungry cooks bake warm pies",
] * 4
VOCAB = 300  # 256 bytes + 3 specials + 41 merges: both corpora have enough pairs to fill it


def train_bpe(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[PAD, EOS, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def save_model(
    path,
    tok,
    *,
    eos: str = EOS,
    added: tuple[str, ...] = (),
    vocab_size: int = 512,
    max_positions: int = 256,
):
    """A model directory: a fast tokenizer and a tiny Llama config, no weights."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    # A copy, so adding tokens to one side leaves the other untouched.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()), eos_token=eos, pad_token=PAD
    )
    fast.add_tokens(list(added))
    fast.save_pretrained(path)
    LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXT)


def test_identical_pair_is_ok(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", bpe, max_positions=128)
    report = check_pair(target, draft, context_length=128)
    assert report.ok, report.problems
    assert report.problems == []
    assert "vocab_size (embedding rows): target 512, draft 512" in report.notes
    assert "max_position_embeddings: target 256, draft 128" in report.notes
    assert format_report(report, target, draft).splitlines()[-1].startswith("OK")


def test_same_size_but_different_tokenizer(tmp_path, bpe):
    other = train_bpe(OTHER_TEXT)
    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", other)
    target_vocab, draft_vocab = bpe.get_vocab(), other.get_vocab()
    only_target = set(target_vocab) - set(draft_vocab)
    first_only_target = min(only_target, key=target_vocab.get)

    report = check_pair(target, draft)
    assert not report.ok
    vocab_line = next(p for p in report.problems if p.startswith("vocabulary differs"))
    assert f"target {VOCAB} tokens, draft {VOCAB}" in vocab_line
    assert f"{len(only_target)} tokens only in the target ({first_only_target!r}" in vocab_line
    assert any(p.startswith("merges differ") for p in report.problems)
    # Specials and config agree: nothing else is blamed.
    assert not any("eos_token" in p or "vocab_size" in p for p in report.problems)
    summary = format_report(report, target, draft)
    assert "NOT OK" in summary and vocab_line in summary


def test_merges_differ_only(tmp_path, bpe):
    spec = json.loads(bpe.to_str())
    merges = spec["model"]["merges"]
    # Swap two merges that build unrelated tokens: the vocabulary stays the same, the order not.
    i = next(
        i
        for i in range(len(merges) - 1)
        if not set("".join(merges[i])) & set("".join(merges[i + 1]))
    )
    merges[i], merges[i + 1] = merges[i + 1], merges[i]
    from tokenizers import Tokenizer

    swapped = Tokenizer.from_str(json.dumps(spec))
    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", swapped)

    report = check_pair(target, draft)
    first, second = " ".join(merges[i + 1]), " ".join(merges[i])
    assert report.problems == [f"merges differ (first at index {i}: {first!r} vs {second!r})"]


def test_different_eos_token(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe, eos=EOS)
    draft = save_model(tmp_path / "draft", bpe, eos=IM_END)
    report = check_pair(target, draft)
    assert report.problems == [f"eos_token differs: target '{EOS}' (1), draft '{IM_END}' (2)"]


def test_extra_added_token_in_the_target(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe, added=("<tool>",))
    draft = save_model(tmp_path / "draft", bpe)
    report = check_pair(target, draft)
    # Reported once, by the added-token check, not again as a vocabulary difference.
    assert report.problems == [f"1 added token only in the target: '<tool>' ({VOCAB})"]


def test_heads_padded_to_different_sizes_are_a_pair(tmp_path, bpe):
    """Qwen2.5-7B (152 064 rows) and -0.5B (151 936) over one tokenizer: padding differs only."""
    target = save_model(tmp_path / "target", bpe, vocab_size=512)
    draft = save_model(tmp_path / "draft", bpe, vocab_size=576)
    report = check_pair(target, draft)
    assert report.ok, report.problems
    assert any(
        n.startswith(f"vocab_size differs (target 512, draft 576) only in padding past the "
                     f"tokenizer's {VOCAB} tokens")
        for n in report.notes
    )  # fmt: skip


def test_vocab_size_below_the_tokenizer_is_refused(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe, vocab_size=512)
    draft = save_model(tmp_path / "draft", bpe, vocab_size=VOCAB - 1)
    report = check_pair(target, draft)
    assert report.problems == [
        f"vocab_size differs: target 512, draft {VOCAB - 1}, and draft {VOCAB - 1} rows do not "
        f"cover the tokenizer's {VOCAB} tokens (padded embeddings included)"
    ]


def test_context_longer_than_the_draft_supports(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe, max_positions=1024)
    draft = save_model(tmp_path / "draft", bpe, max_positions=128)
    assert check_pair(target, draft, context_length=128).ok
    report = check_pair(target, draft, context_length=512)
    assert len(report.problems) == 1
    assert "max_position_embeddings 128 is below context_length 512" in report.problems[0]


def test_unknown_hub_id_offline_is_one_clear_line(tmp_path, bpe, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub reads the variable once at import; pin the constant it already read as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    target = save_model(tmp_path / "target", bpe)
    missing = "no-such-org/no-such-draft-model"
    with pytest.raises(PairError) as info:
        check_pair(target, missing)
    message = str(info.value)
    assert message.startswith(f"cannot load the tokenizer of {missing!r}: ")
    assert "not in the Hugging Face cache (offline)" in message
    assert "\n" not in message and "Traceback" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_local_directory(tmp_path, bpe):
    target = save_model(tmp_path / "target", bpe)
    missing = str(tmp_path / "nowhere" / "draft")
    with pytest.raises(PairError, match=r"no such directory\.$") as info:
        check_pair(target, missing)
    assert repr(missing) in str(info.value)


def test_pre_tokenizer_differs(tmp_path, bpe):
    spec = json.loads(bpe.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    from tokenizers import Tokenizer

    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", Tokenizer.from_str(json.dumps(spec)))
    report = check_pair(target, draft)
    assert report.problems == [
        "pre_tokenizer differs at 'add_prefix_space': target false, draft true"
    ]
