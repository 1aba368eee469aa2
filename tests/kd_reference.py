"""The plain full-logits KD loss: the reference `specdraft.kernels.fused_kd_loss` is judged against.

Materialises (N, V) logits for both models and lets autograd do the gradients. One copy, imported by
tests/test_kd_loss.py and benchmarks/bench_kd_loss.py. The divergences follow TRL's
`GKDTrainer.generalized_jsd_loss` (F.kl_div with log targets, logsumexp mixture), written
independently of the kernel's hand-derived gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_divergence_reference(
    student_logits: torch.Tensor,  # (N, V)
    teacher_logits: torch.Tensor,  # (N, V)
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    lk_eta: float = 3.0,
    lk_alpha: float | None = None,
) -> torch.Tensor:
    """Per-row divergence (N,) fp32; log-softmax in fp32. "lk" is the LK hybrid composed from
    the fkl and tvd rows with λ = exp(−η·α) detached: α = 1 − TV per row, or lk_alpha."""
    if divergence == "lk":
        args = (student_logits, teacher_logits)
        kl = kd_divergence_reference(*args, "fkl", temperature=temperature)
        tv = kd_divergence_reference(*args, "tvd", temperature=temperature)
        alpha = 1.0 - tv.detach() if lk_alpha is None else torch.full_like(tv, lk_alpha)
        lam = torch.exp(-lk_eta * alpha)
        return lam * kl + (1.0 - lam) * tv
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "fkl" or (divergence == "jsd" and beta == 0):
        per_elem = F.kl_div(s, t, reduction="none", log_target=True)  # p_t (t - s)
    elif divergence == "rkl" or (divergence == "jsd" and beta == 1):
        per_elem = F.kl_div(t, s, reduction="none", log_target=True)  # p_s (s - t)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
        kl_teacher = F.kl_div(log_m, t, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, s, reduction="none", log_target=True)
        per_elem = beta * kl_teacher + (1 - beta) * kl_student
    elif divergence == "tvd":
        per_elem = 0.5 * (t.exp() - s.exp()).abs()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return per_elem.sum(dim=-1)


def kd_loss_reference(
    student_hidden: torch.Tensor,  # (N, Hs)
    student_weight: torch.Tensor,  # (V, Hs)
    teacher_hidden: torch.Tensor,  # (N, Ht)
    teacher_weight: torch.Tensor,  # (V, Ht)
    mask: torch.Tensor | None = None,  # (N,) bool
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,  # (N,) constants multiplying each row's loss
    lk_eta: float = 3.0,
    lk_alpha: float | None = None,
) -> torch.Tensor:
    student_logits = student_hidden @ student_weight.T  # (N, V), input dtype
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T  # (N, V)
    per_row = kd_divergence_reference(
        student_logits, teacher_logits, divergence, beta, temperature, lk_eta, lk_alpha
    )
    if weights is not None:
        per_row = per_row * weights.detach().float()
    if mask is None:
        mask = torch.ones_like(per_row, dtype=torch.bool)
    per_row = torch.where(mask, per_row, torch.zeros_like(per_row))  # (N,)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(int(mask.sum()), 1)
