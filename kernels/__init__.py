"""Loss and attention kernels, each with its pure-PyTorch reference under tests/."""

from specdraft.kernels.kd_loss import fused_kd_loss, kd_divergence_from_logits

__all__ = ["fused_kd_loss", "kd_divergence_from_logits"]
