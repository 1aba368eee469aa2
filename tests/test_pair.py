"""The target/draft pair check: tokenizers and configs built in tmp_path, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

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
    """A model directory: a fast tokenizer, a tiny Llama config and a safetensors file whose
    embedding has the config's rows (the pair check reads its header, never the tensors)."""
    import torch
    from safetensors.torch import save_file
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
    weights = {"model.embed_tokens.weight": torch.randn(vocab_size, 16), "x": torch.ones(3)}
    save_file(weights, str(Path(path) / "model.safetensors"))
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


# --------------------------------------------------------------------------- weights (headers)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _zero_all(file: Path) -> None:
    file.write_bytes(bytes(file.stat().st_size))


def _zero_tensors(file: Path) -> None:
    """Keep the header, zero every tensor's bytes."""
    data = file.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    file.write_bytes(data[:start] + bytes(len(data) - start))


def _delete(file: Path) -> None:
    file.unlink()


def _index_names_a_missing_shard(file: Path) -> None:
    index = {"weight_map": {"x": file.name, "y": "model-00002-of-00002.safetensors"}}
    (file.parent / "model.safetensors.index.json").write_text(json.dumps(index))


def _rows_differ_from_config(file: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.randn(100, 16)}, str(file))


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate, "model.safetensors is truncated"),
        (_zero_all, "model.safetensors has no valid header"),
        (_zero_tensors, "its weights were zeroed"),
        (_delete, "has no weight files (*.safetensors)"),
        (_index_names_a_missing_shard, "index.json is missing ('model-00002-of-00002.safe"),
        (_rows_differ_from_config, "with 100 rows, but config.json says vocab_size 512"),
    ],
)
def test_damaged_or_missing_weights_are_a_problem_of_the_pair(tmp_path, bpe, damage, message):
    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", bpe)
    assert check_pair(target, draft).ok
    damage(Path(draft) / "model.safetensors")
    report = check_pair(target, draft)
    assert len(report.problems) == 1 and message in report.problems[0], report.problems
    assert report.problems[0].startswith(draft) and "restore the model" in report.problems[0]


def test_a_run_and_check_pair_stop_at_damaged_weights(tmp_path, bpe, capsys):
    from specdraft.cli import main
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import check_models

    target = save_model(tmp_path / "target", bpe)
    draft = save_model(tmp_path / "draft", bpe)
    _truncate(Path(target) / "model.safetensors")
    with pytest.raises(PairError, match="model.safetensors is truncated"):
        check_models(load_job(None, [f"target={target}", f"draft={draft}"]))
    with pytest.raises(PairError, match="cannot be distilled: .* is truncated"):
        check_models(load_job(None, [f"target={target}", "draft.from_target_layers=1"]))
    assert main(["check-pair", target, draft]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().out


# --------------------------------------------------------------------------- trust, per model

PLANTED = """
import os
from pathlib import Path

Path(os.environ["SPECDRAFT_PLANTED_RAN"]).write_text("ran")

from transformers import LlamaConfig


class PlantedConfig(LlamaConfig):
    model_type = "planted"
"""


def _planted_draft(tmp_path, bpe) -> str:
    """A draft folder whose config names a model type transformers lacks and an auto_map to a
    module beside it that leaves a marker file when imported."""
    draft = save_model(tmp_path / "draft", bpe)
    config = json.loads((Path(draft) / "config.json").read_text())
    config["model_type"] = "planted"
    config["auto_map"] = {"AutoConfig": "planted.PlantedConfig"}
    (Path(draft) / "config.json").write_text(json.dumps(config))
    (Path(draft) / "planted.py").write_text(PLANTED)
    return draft


@pytest.mark.parametrize("draft_trusted", [False, True])
def test_trusting_the_target_never_runs_the_drafts_code(tmp_path, bpe, monkeypatch, draft_trusted):
    import transformers.dynamic_module_utils as dynamic

    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import check_models

    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("SPECDRAFT_PLANTED_RAN", str(marker))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    target = save_model(tmp_path / "target", bpe)
    draft = _planted_draft(tmp_path, bpe)
    overrides = [f"target={target}", f"draft={draft}", "target.trust_remote_code=true"]
    job = load_job(None, overrides + [f"draft.trust_remote_code={str(draft_trusted).lower()}"])
    if draft_trusted:  # the draft's own setting runs it: the marker shows the test can fail
        check_models(job)
        assert marker.read_text() == "ran"
        return
    with pytest.raises(PairError) as info:
        check_models(job)
    message = str(info.value)
    assert not marker.exists()
    assert message.startswith(f"cannot load the config of {draft!r}: it ships its own code")
    assert "(planted.py)" in message and "draft.trust_remote_code=true" in message
    assert "\n" not in message


def test_model_trust_is_per_model():
    from specdraft.drafts.pair import ModelTrust
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import job_trust

    given = ["target=/m/t", "draft=/m/d", "target.trust_remote_code=true"]
    assert job_trust(load_job(None, given)) == ModelTrust(target=True, draft=False)
    both = given + ["draft.trust_remote_code=true"]
    assert job_trust(load_job(None, both)) == ModelTrust(target=True, draft=True)
    # a draft cut from the target's layers is the target's code: trusted as the target is
    layers = ["target=/m/t", "draft.from_target_layers=1"]
    assert job_trust(load_job(None, layers)) == ModelTrust()
    trusted = layers + ["target.trust_remote_code=true"]
    assert job_trust(load_job(None, trusted)) == ModelTrust(target=True, draft=True)
    assert ModelTrust.of(True) == ModelTrust.of("both") == ModelTrust(True, True)
    assert ModelTrust.of("draft") == ModelTrust(draft=True) and ModelTrust.of(False) == ModelTrust()
    assert ModelTrust(True, False).of_input("target") and not ModelTrust(True).of_input("distil")
