"""Triton kernel for the per-row KD divergence and its gradient, over a chunk of logits (CUDA).

`fused_kd_loss` uses it in place of `_divergence_rows` when its inputs are on CUDA and triton is
importable (every divergence but the LK hybrid, which stays on the torch rows); the matmuls stay in torch (cuBLAS). Compared with the torch path it reads the two
(C, V) logit buffers and writes the gradient over the student's, with no fp32 (C, V) scratch.
Optional: triton is not a dependency of specdraft. Tested under TRITON_INTERPRET=1 with tiny shapes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_DIVERGENCE_IDS = {"fkl": 0, "rkl": 1, "jsd": 2, "tvd": 3}


# One program per row, three sweeps over vocabulary tiles of BLOCK_V.
#   1. online softmax: running max m and sum d of exp(z - m) for z_s/T and z_t/T -> lse_s, lse_t
#   2. row sums, with s = z_s/T - lse_s, t = z_t/T - lse_t, p = exp(.):
#        fkl  L = sum p_t (t - s)
#        rkl  L = sum p_s (s - t)
#        jsd  log m = logaddexp(t + log beta, s + log(1 - beta))
#             A = KL(p_t || m) = sum p_t (t - log m), B = KL(p_s || m) = sum p_s (s - log m)
#             L = beta A + (1 - beta) B        (beta = 0 / 1 are sent here as fkl / rkl)
#        tvd  L = 0.5 sum |p_t - p_s|, B = sum a with a = 0.5 p_s sign(p_s - p_t)
#   3. gradient w.r.t. z_s/T, times the row's scale, written over z_s:
#        fkl  p_s - p_t     rkl  p_s (s - t - L)
#        jsd  (1 - beta) p_s (s - log m - B)     tvd  a - p_s B
# The same math as kd_loss._divergence_rows (see the comment there).
@triton.jit
def _kd_rows_kernel(
    zs_ptr,  # (C, V) student logits, any float dtype; the gradient is written over it
    zt_ptr,  # (C, V) teacher logits
    loss_ptr,  # (C,) fp32
    scale_ptr,  # (C,) fp32: d total / d loss_row / T
    zs_stride,
    zt_stride,
    vocab,
    inv_temperature,
    beta,
    log_beta,
    log_one_minus_beta,
    DIVERGENCE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride

    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        keep = offs < vocab
        zs = tl.load(zs_row + offs, mask=keep, other=float("-inf")).to(tl.float32) * inv_temperature
        zt = tl.load(zt_row + offs, mask=keep, other=float("-inf")).to(tl.float32) * inv_temperature
        new_m_s = tl.maximum(m_s, tl.max(zs, axis=0))
        d_s = d_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(zs - new_m_s), axis=0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(zt, axis=0))
        d_t = d_t * tl.exp(m_t - new_m_t) + tl.sum(tl.exp(zt - new_m_t), axis=0)
        m_t = new_m_t
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    acc_a = 0.0  # L for fkl, rkl, tvd; A for jsd
    acc_b = 0.0  # B for jsd and tvd
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        keep = offs < vocab
        s = tl.load(zs_row + offs, mask=keep, other=0.0).to(tl.float32) * inv_temperature - lse_s
        t = tl.load(zt_row + offs, mask=keep, other=0.0).to(tl.float32) * inv_temperature - lse_t
        ps = tl.where(keep, tl.exp(s), 0.0)
        pt = tl.where(keep, tl.exp(t), 0.0)
        if DIVERGENCE == 0:
            acc_a += tl.sum(pt * (t - s), axis=0)
        elif DIVERGENCE == 1:
            acc_a += tl.sum(ps * (s - t), axis=0)
        elif DIVERGENCE == 2:
            a = t + log_beta
            b = s + log_one_minus_beta
            hi = tl.maximum(a, b)
            log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
            acc_a += tl.sum(pt * (t - log_m), axis=0)
            acc_b += tl.sum(ps * (s - log_m), axis=0)
        else:
            sign = tl.where(ps > pt, 1.0, tl.where(ps < pt, -1.0, 0.0))
            acc_a += tl.sum(tl.abs(pt - ps), axis=0)
            acc_b += tl.sum(ps * sign, axis=0)
    if DIVERGENCE == 2:
        loss = beta * acc_a + (1.0 - beta) * acc_b
    elif DIVERGENCE == 3:
        loss = 0.5 * acc_a
        acc_b = 0.5 * acc_b
    else:
        loss = acc_a
    tl.store(loss_ptr + row, loss)

    if NEED_GRAD:
        scale = tl.load(scale_ptr + row)
        for start in range(0, vocab, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            keep = offs < vocab
            zs = tl.load(zs_row + offs, mask=keep, other=0.0)
            s = zs.to(tl.float32) * inv_temperature - lse_s
            t = tl.load(zt_row + offs, mask=keep, other=0.0).to(tl.float32) * inv_temperature
            t = t - lse_t
            ps = tl.exp(s)
            if DIVERGENCE == 0:
                g = ps - tl.exp(t)
            elif DIVERGENCE == 1:
                g = ps * (s - t - loss)
            elif DIVERGENCE == 2:
                a = t + log_beta
                b = s + log_one_minus_beta
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                g = (1.0 - beta) * ps * (s - log_m - acc_b)
            else:
                pt = tl.exp(t)
                sign = tl.where(ps > pt, 1.0, tl.where(ps < pt, -1.0, 0.0))
                g = 0.5 * ps * sign - ps * acc_b
            tl.store(zs_row + offs, (g * scale).to(zs.dtype), mask=keep)


def divergence_rows_triton(
    student_logits: torch.Tensor,  # (C, V) raw logits, overwritten by the scaled gradient
    teacher_logits: torch.Tensor,  # (C, V) raw logits
    divergence: str,
    beta: float,
    temperature: float,
    grad_scale: torch.Tensor | None,  # (C,) fp32 d total / d loss_row / T; None: no gradient
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (C,) fp32 and the gradient w.r.t. the raw student logits, scaled per row.

    The gradient is written over `student_logits` (returned, its dtype) when grad_scale is given.
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "fkl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "rkl"
    rows, vocab = student_logits.shape
    assert student_logits.stride(1) == 1 and teacher_logits.stride(1) == 1
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    need_grad = grad_scale is not None
    scale = grad_scale if need_grad else loss  # a placeholder pointer, never read
    block_v = block_v or min(4096, triton.next_power_of_2(vocab))
    mix = 0.5 if divergence != "jsd" else beta  # keeps both logs finite when unused
    _kd_rows_kernel[(rows,)](
        student_logits,
        teacher_logits,
        loss,
        scale,
        student_logits.stride(0),
        teacher_logits.stride(0),
        vocab,
        1.0 / temperature,
        float(beta),
        math.log(mix),
        math.log1p(-mix),
        DIVERGENCE=_DIVERGENCE_IDS[divergence],
        NEED_GRAD=need_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss, student_logits if need_grad else None
