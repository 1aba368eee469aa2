"""The loss kernels: the fused, chunked KD loss (`kd_loss`, with a Triton row kernel for CUDA in
`kd_loss_triton`) and, built on it, the acceptance of a drafted token under each drafting rule
(`acceptance`). The full-logits reference the KD loss is judged against is tests/kd_reference.py."""

from specdraft.kernels.acceptance import (
    acceptance_from_tv,
    greedy_drafting_acceptance,
    token_acceptance,
)
from specdraft.kernels.kd_loss import fused_kd_loss, kd_divergence_from_logits

__all__ = [
    "acceptance_from_tv",
    "fused_kd_loss",
    "greedy_drafting_acceptance",
    "kd_divergence_from_logits",
    "token_acceptance",
]
