"""The loss kernels: the fused, chunked KD loss (`kd_loss`, with a Triton row kernel for CUDA in
`kd_loss_triton`) and the acceptance β = Σ min(p, q) built on it (`acceptance`). The full-logits
reference the KD loss is judged against is tests/kd_reference.py."""

from specdraft.kernels.acceptance import acceptance_from_tv, token_acceptance
from specdraft.kernels.kd_loss import fused_kd_loss, kd_divergence_from_logits

__all__ = ["acceptance_from_tv", "fused_kd_loss", "kd_divergence_from_logits", "token_acceptance"]
