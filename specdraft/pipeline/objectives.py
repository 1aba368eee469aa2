"""What a distillation step minimises: token selection by loss gap (AdaSPEC), the KD options,
per-position weights from the draft's acceptance, and the summed loss over the kept tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specdraft.kernels import acceptance_from_tv, kd_divergence_from_logits, token_acceptance
from specdraft.kernels.kd_loss import (
    TopkTargets,
    fused_kd_loss,
    fused_topk_kd_loss,
    topk_overlap,
)


def kept_count(n: int, k: float) -> int:
    """How many of n tokens a top/bottom-k selection keeps: ceil(k * n), at most n."""
    return min(n, math.ceil(k * n - 1e-9))


def select_tokens_by_loss_gap(delta: torch.Tensor, k: float, mode: str = "top") -> torch.Tensor:
    """Boolean mask keeping ceil(k * N) tokens with the largest (`top`) or smallest (`bottom`) ΔL.

    Ties at the threshold are broken by position (a stable sort), so exactly ceil(k * N) are kept.
    """
    n = delta.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if n == 0:
        return keep
    count = kept_count(n, k)
    order = torch.sort(delta, descending=(mode == "top"), stable=True).indices
    keep[order[:count]] = True
    return keep


@dataclass
class KDOptions:
    """What a distillation loss is: divergence, token selection and normalisation."""

    divergence: str = "fkl"  # fkl | rkl | jsd | tvd | lk | ce (hard labels, no teacher)
    beta: float = 0.5  # JSD mixture weight
    temperature: float = 1.0
    lk_eta: float = 3.0  # LK hybrid: λ = exp(−η·sg(α))
    selection: str = "all"  # top | bottom | all
    k: float = 1.0  # fraction kept by top/bottom selection
    scope: str = "microbatch"  # microbatch | global
    normalize: str = "all"  # all | kept
    fused: bool = True  # False: full (N, V) logits of both models (the unfused baseline)
    lk_alpha: str = "token"  # LK hybrid's α: each token's β, or the window's mean β (`batch`)
    position_weighting: str = "none"  # none | reach | accept_length (see position_weights)
    block_size: int = 4  # γ of the blocks position weighting counts in


def response_block_offsets(counted: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N,) long: each response position's offset j = (t − start) mod γ in its γ-token block,
    `start` the first position of its response (a run of `counted` positions in a row; packed
    sequences are apart by their first token, never counted). `counted` (B, T-1) is
    response_positions; the order is the KD loss's (row by row)."""
    before = torch.zeros_like(counted[:, :1])
    previous = torch.cat([before, counted[:, :-1]], dim=1)  # (B, T-1)
    index = torch.arange(counted.shape[1], device=counted.device).expand_as(counted)
    starts = torch.where(counted & ~previous, index, torch.zeros_like(index))
    start = torch.cummax(starts, dim=1).values  # (B, T-1): the start of the run each t is in
    return ((index - start) % block_size)[counted]


def block_reach_weights(beta: torch.Tensor, offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    """w_t = Π_{i<j} β_{t−j+i} (N,): the chance that the draft, drafting the γ-token block of
    token t (offset j), has had its j earlier drafts accepted and so reaches t. 1 for a block's
    first token. `beta` (N,) is each position's acceptance Σ min(p, q)."""
    weights = torch.ones_like(beta)
    for shift in range(1, min(block_size, beta.numel())):
        in_block = offsets[shift:] >= shift  # token t − shift is in t's block
        weights[shift:] *= torch.where(in_block, beta[:-shift], torch.ones_like(beta[:-shift]))
    return weights


def acceptance_length_weights(
    beta: torch.Tensor, offsets: torch.Tensor, block_size: int
) -> torch.Tensor:
    """w_t = ∂τ/∂β_t (N,), τ = Σ_{j<m} Π_{i≤j} β_i the expected accepted drafts of t's block
    (m ≤ γ tokens): reach_t · (1 + β_{t+1} + β_{t+1}β_{t+2} + … to the block's end). With the
    tvd loss 1 − β the weighted gradient is −∇τ: training towards acceptance length."""
    follows = offsets[1:] != 0  # (N-1,): token t + 1 continues t's block
    rest = torch.ones_like(beta)  # 1 + expected accepted drafts after t, given t is accepted
    for _ in range(block_size - 1):
        longer = torch.ones_like(beta)
        longer[:-1] += torch.where(follows, beta[1:] * rest[1:], torch.zeros_like(rest[1:]))
        rest = longer
    return block_reach_weights(beta, offsets, block_size) * rest


def position_weights(
    beta: torch.Tensor, offsets: torch.Tensor, mode: str, block_size: int
) -> torch.Tensor:
    """Stop-gradient per-token weights (N,) of distil.position_weighting `mode` from the
    draft's acceptance estimates `beta` (N,) and block `offsets` (N,)."""
    beta = beta.detach().float()
    if mode == "reach":
        return block_reach_weights(beta, offsets, block_size)
    if mode == "accept_length":
        return acceptance_length_weights(beta, offsets, block_size)
    raise ValueError(f"position weighting must be reach or accept_length, got {mode!r}")


# The target of a batch is either (t_hidden (N, H), t_head (V, H)), its hidden states and head
# (run now, or stored with target_outputs.format=hidden), or (TopkTargets, None), its stored
# top-k (format=topk). The two functions below take either.
def target_kd_loss(s_hidden, s_head, t_hidden, t_head, **options) -> torch.Tensor:
    """fused_kd_loss against the target's hidden states and head, or fused_topk_kd_loss
    against its stored top-k (t_hidden a TopkTargets, t_head None); `options` as theirs."""
    if isinstance(t_hidden, TopkTargets):
        return fused_topk_kd_loss(s_hidden, s_head, t_hidden, **options)
    return fused_kd_loss(s_hidden, s_head, t_hidden, t_head, **options)


def target_acceptance(s_hidden, s_head, t_hidden, t_head, temperature: float) -> torch.Tensor:
    """β = Σ min(p, q) per position (N,) (kernels.token_acceptance); against a stored top-k,
    Σ min(p_i, q_i) over its ids (kernels.kd_loss.topk_overlap: a lower bound on β, exact at
    k = V; the tail's bucket would count min(p_r, q_r), as if the two agreed inside the tail)."""
    if not isinstance(t_hidden, TopkTargets):
        return token_acceptance(s_hidden, s_head, t_hidden, t_head, temperature)
    if temperature == 0:
        return (s_hidden @ s_head.T).argmax(-1).eq(t_hidden.ids[:, 0].long()).float()
    return topk_overlap(s_hidden.detach(), s_head.detach(), t_hidden, temperature)


def kd_loss_sum(
    s_hidden,
    s_head,
    t_hidden,
    t_head,
    keep,
    opts: KDOptions,
    labels=None,
    weights=None,
    batch_alpha=None,
) -> torch.Tensor:
    """Summed divergence over the kept tokens, exact over the vocabulary, without (N, V) logits;
    against a stored top-k (t_hidden a TopkTargets, t_head None) over its ids and one bucket.

    The LK hybrid per token is λ·KL(p‖q) + (1 − λ)·TV(p, q) with λ = exp(−η·sg(α)), α = 1 − TV:
    KL pulls from a cold start, TV (the acceptance itself) takes over as α grows.
    `ce` is cross-entropy on the data's next tokens `labels` (N,): no teacher, the SFT control.
    `weights` (N,), constants (position_weights), multiply each token's loss. With
    opts.lk_alpha="batch" λ = exp(−η·`batch_alpha`), one α for the whole batch (the trainer's:
    the mean β of its optimizer step's response tokens on all workers).
    """
    weights = None if weights is None else weights.detach()

    def weighted(per_row: torch.Tensor) -> torch.Tensor:  # (N,)
        return per_row if weights is None else per_row * weights

    if opts.divergence == "ce":
        per_row = torch.nn.functional.cross_entropy(
            (s_hidden @ s_head.T).float() / opts.temperature, labels, reduction="none"
        )  # (N,): the draft's logits only, as plain SFT builds them
        return weighted(per_row if keep is None else per_row * keep).sum()
    lk_alpha = None  # the LK hybrid's α: each row's own β, or the batch's (one λ for all)
    if opts.divergence == "lk" and opts.lk_alpha == "batch":
        if batch_alpha is None:
            raise ValueError("lk_alpha='batch' needs the batch's acceptance (batch_alpha)")
        lk_alpha = float(batch_alpha)
    if opts.fused:  # one pass over the kept rows: loss, weights and both LK terms together
        return target_kd_loss(
            s_hidden,
            s_head,
            t_hidden,
            t_head,
            mask=keep,
            divergence=opts.divergence,
            beta=opts.beta,
            temperature=opts.temperature,
            reduction="sum",
            weights=weights,
            lk_eta=opts.lk_eta,
            lk_alpha=lk_alpha,
        )

    if isinstance(t_hidden, TopkTargets):
        raise ValueError("the unfused KD loss builds the target's logits; a stored top-k has none")

    def rows(divergence: str) -> torch.Tensor:  # (N,), 0 where not kept
        per_row = kd_divergence_from_logits(  # (N, V) logits of both models: the unfused baseline
            s_hidden @ s_head.T, t_hidden @ t_head.T, divergence, opts.beta, opts.temperature
        )
        return per_row if keep is None else per_row * keep

    if opts.divergence != "lk":
        return weighted(rows(opts.divergence)).sum()
    kl, tv = rows("fkl"), rows("tvd")  # the LK hybrid composed from its two terms
    if lk_alpha is None:
        alpha = acceptance_from_tv(tv.detach())  # (N,): β read off the TV rows the loss has
    else:
        alpha = torch.as_tensor(lk_alpha, device=tv.device)  # (): one λ for all
    lam = torch.exp(-opts.lk_eta * alpha)  # masked rows have kl = tv = 0
    return weighted(lam * kl + (1.0 - lam) * tv).sum()
