"""Target and draft heads padded to different sizes over one tokenizer (Qwen2.5-7B has 152 064
rows, Qwen2.5-0.5B 151 936, their tokenizer 151 665 tokens), in miniature: tiny random Qwen2 models
with 448 and 384 rows over a 320-token tokenizer, built here, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specdraft.cli import main, shipped_job
from specdraft.kernels import fused_kd_loss
from specdraft.pipeline.batches import Collator
from specdraft.pipeline.config import EvaluateConfig, TrainConfig, load_job
from specdraft.pipeline.decoding import (
    autoregressive_generate,
    speculative_generate,
    speculative_generate_batch,
)
from specdraft.pipeline.engine.job import check_models
from specdraft.pipeline.evaluation import evaluate_draft, prompt_sets, task_indices
from specdraft.pipeline.objectives import KDOptions
from specdraft.pipeline.stages.export import match_target_vocab_size, target_vocab_size
from specdraft.pipeline.trainer import KDTrainer, training_args

TOKENS, TARGET_ROWS, DRAFT_ROWS = 320, 448, 384


def word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # transformers loads it next to a Qwen2 config as a Qwen2Tokenizer, which adds <|endoftext|>
    # unless the vocabulary has it
    specials = ["<pad>", "<eos>", "<bos>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(TOKENS - 4)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def qwen(rows: int, hidden: int, layers: int, tied: bool, seed: int):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=rows,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,  # the Qwen job's data.max_length is 768
            tie_word_embeddings=tied,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    ).eval()
    with torch.no_grad():  # padding rows that would win every argmax if they were compared
        model.get_output_embeddings().weight[TOKENS:] *= 6
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("padded")
    target = qwen(TARGET_ROWS, 32, 2, tied=False, seed=0)
    draft = qwen(DRAFT_ROWS, 16, 1, tied=True, seed=1)  # Qwen2.5-0.5B ties its head
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(folder / name)
        word_level_tokenizer().save_pretrained(folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder / "target")  # as every stage loads it
    assert len(tokenizer) == TOKENS
    return folder, tokenizer, target, draft


def test_the_shipped_qwen_job_passes_the_pair_check_on_padded_heads(pair, capsys):
    folder, *_ = pair
    target, draft = str(folder / "target"), str(folder / "draft")
    job = load_job(shipped_job("qwen2.5-7b-gsm8k.yaml"), [f"target={target}", f"draft={draft}"])
    check_models(job)  # what `specdraft run` stops at: no PairError
    assert main(["check-pair", target, draft, "--context-length", str(job.data.max_length)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and f"only in padding past the tokenizer's {TOKENS} tokens" in out


def prompts(n: int, length: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[2, *torch.randint(4, TOKENS, (length,), generator=g).tolist()] for _ in range(n)]


def test_kd_loss_equals_the_loss_over_heads_cut_to_the_tokenizer(pair, tmp_path):
    _, _, target, draft = pair
    rows = [{"input_ids": p + p[1:4], "response_mask": [0] * len(p) + [1] * 3} for p in prompts(4)]
    batch = Collator(0)(rows)
    trainer = KDTrainer(
        model=draft,
        args=training_args(TrainConfig(steps=1, batch_size=4), tmp_path, 0, use_cpu=True),
        train_dataset=rows,
        data_collator=Collator(0),
        teacher=target,
        options=KDOptions(),
        vocab=TOKENS,
    )
    draft.zero_grad()
    loss = trainer.compute_loss(draft, batch)
    loss.backward()
    grad = draft.get_output_embeddings().weight.grad.clone()

    counted = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        t_hidden = target.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        t_hidden = t_hidden.last_hidden_state[:, :-1][counted]
    s_hidden = draft.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    s_head = draft.get_output_embeddings().weight
    expected = fused_kd_loss(
        s_hidden.last_hidden_state[:, :-1][counted],
        s_head[:TOKENS],
        t_hidden,
        target.get_output_embeddings().weight[:TOKENS],
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the draft's own padding rows take no part: no gradient reaches them through the head
    # (tied, the embedding rows of ids no sequence holds get none either)
    assert grad[TOKENS:].abs().max() == 0 and grad[:TOKENS].abs().max() > 0


def test_decoding_never_produces_a_padding_id(pair):
    _, _, target, draft = pair
    prompt = torch.tensor([prompts(1)[0]])
    plain = autoregressive_generate(target, prompt, max_new_tokens=12)
    assert plain.max() >= TOKENS  # the scaled padding rows win without the cut
    greedy = autoregressive_generate(target, prompt, max_new_tokens=12, vocab=TOKENS)
    spec, _ = speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=12, vocab=TOKENS)
    assert spec.tolist() == greedy.tolist() and greedy.max() < TOKENS  # lossless, real ids
    g = torch.Generator().manual_seed(0)
    outs, _ = speculative_generate_batch(
        target, draft, torch.tensor(prompts(3)), gamma=3, max_new_tokens=12,
        temperature=1.0, generator=g, vocab=TOKENS,
    )  # fmt: skip
    assert all(0 <= int(o.max()) < TOKENS for o in outs)


def test_evaluation_compares_and_samples_over_the_tokenizer(pair):
    _, tokenizer, target, draft = pair
    rows = [{"prompt": str(i), "prompt_ids": p, "task": "t"} for i, p in enumerate(prompts(4))]
    cfg = EvaluateConfig(gamma=3, temperature=1.0, max_new_tokens=8, batch_size=2)
    sets = prompt_sets(target, tokenizer, rows, task_indices(rows), cfg, seed=0, spec_prompts=2)
    assert sets[0].vocab == TOKENS
    assert all(max(s["input_ids"]) < TOKENS for s in sets[0].sequences)  # sampled continuations
    assert all(max(r, default=0) < TOKENS for r in sets[0].references)
    metrics = evaluate_draft(target, draft, sets, cfg, eos_id=1, pad_id=0, seed=0)
    assert metrics["lossless_greedy"] and 0 <= metrics["alpha"] <= 1


def test_export_pads_the_draft_to_the_targets_vocab_size(pair, tmp_path):
    folder, tokenizer, _, _ = pair
    draft = Qwen2ForCausalLM.from_pretrained(folder / "draft").eval()
    out = tmp_path / "exported"
    out.mkdir()
    tokenizer.save_pretrained(out)  # export copies the target's tokenizer files first
    rows = target_vocab_size(str(folder / "target"))
    assert rows == TARGET_ROWS
    match_target_vocab_size(draft, rows, out)
    draft.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == TARGET_ROWS

    exported = Qwen2ForCausalLM.from_pretrained(out).eval()
    trained = Qwen2ForCausalLM.from_pretrained(folder / "draft").eval()
    ids = torch.tensor(prompts(2))
    with torch.no_grad():
        new, old = exported(ids).logits, trained(ids).logits
    assert new.shape[-1] == TARGET_ROWS and old.shape[-1] == DRAFT_ROWS
    torch.testing.assert_close(new[..., :TOKENS], old[..., :TOKENS], rtol=0, atol=0)
    assert (new[..., DRAFT_ROWS:] == 0).all()  # the added rows: zero in the head and embedding
    assert (exported.get_input_embeddings().weight[DRAFT_ROWS:] == 0).all()
