"""Acceptance of one drafted token under each drafting rule, with p = softmax(z_t / T) the target's
and q = softmax(z_s / T) the draft's next-token distribution:

- probabilistic drafting (the token sampled from q, verified by rejection sampling): accepted with
  probability β = Σ_v min(p_v, q_v) = 1 − TV(p, q); alpha is its mean over positions (DistillSpec's
  definition);
- greedy drafting (the draft's argmax, as vLLM's and SGLang's draft models propose by default;
  verification sees a one-hot q): accepted with probability min(1, p(x) / 1) = p_T(argmax q);
- at T = 0 verification is greedy and both rules are top-1 agreement.

The one implementation specdraft uses: the evaluate stage and `specdraft eval`, distil's held-out
alpha, and the LK hybrid's λ (which reads β off the TV rows its loss already has).
metrics/acceptance_rate keeps a numpy copy so that folder stands alone on the Hub;
tests/test_acceptance_metric.py holds the two together.
"""

from __future__ import annotations

import torch

from specdraft.kernels.kd_loss import fused_kd_loss


def acceptance_from_tv(tv: torch.Tensor) -> torch.Tensor:
    """β = 1 − TV(p, q) per row: the rejection-sampling acceptance of a drafted token."""
    return 1.0 - tv


ROWS_PER_CHUNK = 1024  # greedy_drafting_acceptance's (rows, V) logits: 1024 x 262k fp32 = 1 GiB


def greedy_drafting_acceptance(
    draft_hidden: torch.Tensor,
    draft_head: torch.Tensor,
    target_hidden: torch.Tensor,
    target_head: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """p_T(argmax q) per position (N,): the acceptance of the draft's argmax under rejection
    sampling at the target's temperature T; top-1 agreement at T = 0. Inputs as token_acceptance;
    logits are built ROWS_PER_CHUNK rows at a time."""
    if temperature == 0:
        return token_acceptance(draft_hidden, draft_head, target_hidden, target_head, 0)
    out = []
    for a in range(0, draft_hidden.shape[0], ROWS_PER_CHUNK):
        drafted = (draft_hidden[a : a + ROWS_PER_CHUNK] @ draft_head.T).argmax(-1, keepdim=True)
        logits = (target_hidden[a : a + ROWS_PER_CHUNK] @ target_head.T).float() / temperature
        picked = logits.gather(-1, drafted).squeeze(-1) - torch.logsumexp(logits, -1)
        out.append(picked.exp())
    if not out:
        return draft_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def token_acceptance(
    draft_hidden: torch.Tensor,
    draft_head: torch.Tensor,
    target_hidden: torch.Tensor,
    target_head: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """β per position (N,) from final hidden states (N, Hs), (N, Ht) and LM heads (V, Hs), (V, Ht),
    without (N, V) logits when temperature > 0; top-1 agreement (0. or 1.) at temperature 0."""
    if temperature == 0:
        agree = (draft_hidden @ draft_head.T).argmax(-1) == (target_hidden @ target_head.T).argmax(
            -1
        )
        return agree.float()  # (N,)
    tv = fused_kd_loss(
        draft_hidden,
        draft_head,
        target_hidden,
        target_head,
        divergence="tvd",
        temperature=temperature,
        reduction="none",
    )  # (N,)
    return acceptance_from_tv(tv)
