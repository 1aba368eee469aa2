"""Loss and attention kernels, each with its pure-PyTorch reference under tests/."""

from specdraft.kernels.acceptance import acceptance_from_tv, token_acceptance
from specdraft.kernels.kd_loss import fused_kd_loss, kd_divergence_from_logits

__all__ = ["acceptance_from_tv", "fused_kd_loss", "kd_divergence_from_logits", "token_acceptance"]
