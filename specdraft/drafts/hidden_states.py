"""A causal LM's final hidden states and LM head, without building its (B, T, V) logits: what the
fused KD loss and the acceptance β (specdraft.kernels) take for the target, the draft and the
reference, in training and evaluation alike."""

from __future__ import annotations

import torch


def hidden_and_head(model, input_ids, attention_mask=None, position_ids=None, vocab=None):
    """Final hidden states (B, T, H) and the LM head weight (V, H), without building logits.
    Packed batches give `position_ids` and no `attention_mask` (see pipeline/batches.Collator).
    `vocab` (the tokenizer's length) keeps the head's first `vocab` rows: heads padded past the
    tokenizer (to different sizes in target and draft) are compared over the real ids only.

    A DistributedDataParallel model (Ray Train workers) must run its forward through the wrapper,
    which arms the gradient all-reduce: the whole model runs with no logits kept and a hook on the
    decoder takes its output."""
    inner = getattr(model, "module", model) if _is_ddp(model) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,  # a cache would hide packed sequences from transformers' mask builder
    }
    if inner is model:
        hidden = base.get_decoder()(**kwargs).last_hidden_state
    else:
        captured = []
        hook = base.get_decoder().register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state)
        )
        try:
            no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
            model(**kwargs, logits_to_keep=no_logits)  # (B, 0, V) logits: nothing materialised
        finally:
            hook.remove()
        hidden = captured[0]
    return hidden, real_rows(base.get_output_embeddings().weight, vocab)


def real_rows(head: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The first `vocab` rows of a (V, H) LM head (a view: gradients reach the parameter), or all
    of them when `vocab` is None. Rows past the tokenizer are padding no token id names."""
    return head if vocab is None else head[:vocab]


def _is_ddp(model) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)
