"""Bring-your-own models and data: a small Qwen2 pair with its own tokenizer and a JSONL file,
through `target=… draft=… data=…` overrides alone; the exported draft loads with transformers only."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import SMALL_PAIR
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

pytestmark = pytest.mark.integration  # whole jobs on a small real pair

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang songs of rain".split()


def make_tokenizer(texts, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_model(path, tokenizer, hidden, layers, seed):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        picks = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
        rows.append(
            {
                "question": f"Say {i}: " + " ".join(WORDS[j] for j in picks),
                "answer": " ".join(WORDS[j] for j in picks[:4]),
                "category": "echo" if i % 2 else "copy",
            }
        )
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tokenizer([r["question"] + " " + r["answer"] for r in rows])
    make_model(root / "target", tok, hidden=32, layers=2, seed=0)
    make_model(root / "draft", tok, hidden=16, layers=1, seed=1)
    return root


def specdraft(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "specdraft", *args], cwd=cwd, capture_output=True, text=True
    )


def test_byo_pair_runs_through_overrides_and_exports_a_servable_draft(real_pair):
    root = real_pair
    out = root / "run"
    result = specdraft(
        "run",
        f"target={root / 'target'}",
        f"draft={root / 'draft'}",
        f"data={root / 'data.jsonl'}",
        *SMALL_PAIR,
        f"store={root / 'store'}",
        "--out",
        str(out),
        "--no-ray",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target"] == str(root / "target")
    assert set(metrics["final"]["tasks"]) == {"echo", "copy"}
    assert metrics["lossless_greedy"] is True
    # transformers only: load the export and run assisted generation with the target
    tok = AutoTokenizer.from_pretrained(out / "draft")
    draft = AutoModelForCausalLM.from_pretrained(out / "draft")
    target = AutoModelForCausalLM.from_pretrained(root / "target")
    assert (
        draft.config.model_type == "qwen2" and draft.config.vocab_size == target.config.vocab_size
    )
    assert (out / "draft" / "tokenizer.json").read_bytes() == (
        root / "target" / "tokenizer.json"
    ).read_bytes()
    ids = tok("Say 3: the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = target.generate(
            ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assisted = target.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            assistant_model=draft,
            pad_token_id=tok.pad_token_id,
        )
    assert torch.equal(plain, assisted)

    # re-export to another dtype
    again = specdraft(
        "export", str(out), "--to", str(root / "bf16"), "--dtype", "bfloat16", cwd=root
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(root / "bf16").dtype == torch.bfloat16
    assert (root / "bf16" / "adapter" / "adapter_config.json").exists()


def test_mismatched_tokenizer_stops_the_run_with_exit_2(real_pair, tmp_path):
    other = make_tokenizer(
        ["completely different words here " * 5, "zebra quokka " * 9], vocab_size=290
    )
    make_model(tmp_path / "draft", other, hidden=16, layers=1, seed=2)
    store = tmp_path / "store"
    result = specdraft(
        "run",
        f"target={real_pair / 'target'}",
        f"draft={tmp_path / 'draft'}",
        f"data={real_pair / 'data.jsonl'}",
        *SMALL_PAIR,
        f"store={store}",
        "--out",
        str(tmp_path / "out"),
        "--no-ray",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "cannot be used together" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not store.exists() or not [p for p in store.iterdir() if p.name != "logs"]
    check = specdraft(
        "check-pair", str(real_pair / "target"), str(tmp_path / "draft"), cwd=tmp_path
    )
    assert check.returncode == 2 and "vocab" in check.stdout.lower()


@pytest.mark.parametrize(
    "data,expected", [("missing.jsonl", "does not exist"), ("data.jsonl", "prompt")]
)
def test_bad_data_gets_one_message_before_any_stage(real_pair, tmp_path, data, expected):
    store = tmp_path / "store"
    overrides = (
        [o for o in SMALL_PAIR if not o.startswith("data.prompt_field")]
        + ["data.prompt_field=nope"]
        if data == "data.jsonl"
        else SMALL_PAIR
    )
    result = specdraft(
        "run",
        f"target={real_pair / 'target'}",
        f"draft={real_pair / 'draft'}",
        f"data={real_pair / data}",
        *overrides,
        f"store={store}",
        "--out",
        str(tmp_path / "out"),
        "--no-ray",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    # refused by the checks before any stage: no log, no artifact
    assert list(store.iterdir()) == []
    assert not (tmp_path / "out").exists()
