"""Distillation in the served view, checked one way for every draft with a vocabulary of its own
(trimmed: tests/test_vocab_trim.py; another tokenizer: tests/test_cross_tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def full_topk_store(target, rows: list[dict], vocab: int):
    """The target's whole distribution over its first `vocab` ids at every position predicting a
    response token of `rows`, as a top-k store with k = V in fp32 (no storage rounding)."""
    from specdraft.kernels.kd_loss import TopkTargets
    from specdraft.pipeline.stored_target_outputs import StoredTopkOutputs

    ids = torch.tensor([r["input_ids"] for r in rows])  # (B, T)
    counted = torch.tensor([r["response_mask"] for r in rows])[:, 1:].bool()  # (B, T-1)
    with torch.no_grad():
        log_p = target(ids).logits[:, :-1, :vocab].float().log_softmax(-1)[counted]  # (N, V)
    top = log_p.sort(dim=-1, descending=True)
    stored = TopkTargets(top.indices.int(), top.values, torch.full((len(log_p),), -torch.inf))
    return StoredTopkOutputs(stored, counted.sum(1), vocab=vocab, temperature=1.0, device="cpu")


def check_distillation_through_the_map(
    target, draft, vmap, tokenizer, rows: list[dict], out: Path, steps: int, *, topk=False
) -> None:
    """Train `draft` (in train mode) towards `target` through `vmap` on `rows` (input_ids and
    response_mask, all of one length) and check: the first step's loss is KL(p‖q) over the
    intersection, p the target's distribution restricted to it and renormalised, q the draft's
    on the target's context mapped as the server maps it; training lowers it and moves the
    draft's weights. With `topk` the target is read from its stored top-k (k = V, fp32) mapped
    into the draft's rows, not run: the same loss."""
    from datasets import Dataset

    from specdraft.pipeline.config import TrainConfig
    from specdraft.pipeline.objectives import KDOptions
    from specdraft.pipeline.trainer import train_kd

    ids = torch.tensor([r["input_ids"] for r in rows])  # (B, T)
    mask = torch.tensor([r["response_mask"] for r in rows])
    drafts, targets = vmap.intersection_rows()
    with torch.no_grad():
        p = target(ids).logits[:, :-1][:, :, targets].log_softmax(-1)  # (B, T-1, I)
        q = draft(vmap.to_draft(ids)).logits[:, :-1][:, :, drafts].log_softmax(-1)
    counted = mask[:, 1:]  # positions that predict a response token
    expected = (p.exp() * (p - q)).sum(-1)[counted].mean().item()
    before = {n: w.detach().clone() for n, w in draft.named_parameters()}
    train_cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-2, log_every=1, packing="padded")
    data, teacher, stored = Dataset.from_list(rows), target, None
    if topk:
        stored, teacher = full_topk_store(target, rows, len(tokenizer)), None
        data = data.add_column("row", list(range(len(rows))))
    history, _ = train_kd(
        draft,
        teacher,
        data,
        tokenizer,
        train_cfg,
        out,
        0,
        options=KDOptions(divergence="fkl"),
        vocab_map=vmap,
        target_outputs=stored,
    )
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert history[-1]["loss"] < history[0]["loss"]
    assert any(not torch.equal(before[n], w) for n, w in draft.named_parameters())
