"""Acceptance of one drafted token: β = Σ_v min(p_v, q_v) = 1 − TV(p, q), with p = softmax(z_t / T)
the target's and q = softmax(z_s / T) the draft's next-token distribution. A token drafted from q
and verified by rejection sampling is accepted with probability β; alpha is its mean over positions
(DistillSpec's definition). At T = 0 verification is greedy: β is top-1 agreement.

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
