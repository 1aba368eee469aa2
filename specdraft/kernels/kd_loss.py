"""Fused, chunked knowledge-distillation loss over the student's and the teacher's LM heads.

The plain way to distil, `log_softmax(h_s @ W_s.T)` against `log_softmax(h_t @ W_t.T)`, holds several
(N, V) fp32 tensors for both models at once, plus their autograd copies. `fused_kd_loss` loops over
chunks of rows instead: per chunk it computes both models' logits, the per-row divergence and,
analytically, its gradient w.r.t. the student logits, turns that into the gradient w.r.t. the chunk's
student hidden rows and accumulates the gradient w.r.t. the student LM head, then frees the chunk.
Peak extra memory is a few (rows, V) buffers plus the gradients themselves.

On CUDA with triton installed, the per-row divergence and gradient come from the Triton kernel in
`kd_loss_triton.py` instead of `_divergence_rows` (same math; the LK hybrid has no Triton rows and
runs the torch ones); the matmuls stay in torch. The pure-PyTorch full-logits reference lives in
`tests/kd_reference.py`; the benchmarks are `benchmarks/bench_kd_loss.py` and
`bench_lk_loss.py`.

`fused_topk_kd_loss` is the same loss against a target stored as its top-k log-probabilities
(target_outputs.format=topk): the target's side is read, not computed, and the tail outside the
stored ids is one bucket (`_topk_divergence_rows`); it always runs the torch rows.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import NamedTuple

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "lk")
REDUCTIONS = ("mean", "sum", "none")
# A chunk's fp32 (rows, V) scratch buffers stay within this budget when chunk_size is None.
# 256 MiB is 512 rows at V = 32k: CPU GEMMs lose speed with fewer rows (each chunk re-packs the
# whole (V, H) head), while the peak stays ~10% of the full-logits reference's (see the benchmark).
CHUNK_BUDGET_BYTES = 256 * 2**20
# (rows, V) fp32 buffers alive at once inside `_divergence_rows` (the worst case, "jsd").
_FP32_BUFFERS_PER_CHUNK = 4


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product (C, V), (C, V) -> (C,) without a (C, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


# The math, per row, with z_s, z_t the temperature-scaled logits (V,), s = log_softmax(z_s),
# t = log_softmax(z_t), p_s = exp(s), p_t = exp(t). Each divergence comes with its gradient
# g = d loss / d z_s, derived by hand so that no autograd graph over (C, V) tensors is kept:
#   fkl  KL(p_t || p_s) = sum p_t (t - s)                      g = p_s - p_t
#   rkl  KL(p_s || p_t) = sum p_s (s - t) =: L                 g = p_s (s - t - L)
#   jsd  TRL's generalized JSD (GKDTrainer.generalized_jsd_loss, Eq. 1 of arXiv:2306.13649):
#        m = beta p_t + (1 - beta) p_s, log m = logaddexp(t + log beta, s + log(1 - beta))
#        L = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
#        g = (1 - beta) p_s (s - log m - KL(p_s || m))
#        beta = 0 is fkl and beta = 1 is rkl exactly, as TRL special-cases them (the mixture
#        itself tends to 0 at both ends, so the loss is discontinuous there by convention).
#   tvd  0.5 sum |p_t - p_s|                                   a = 0.5 p_s sign(p_s - p_t)
#                                                              g = a - p_s sum(a)
#   lk   the LK hybrid, lam KL(p_t || p_s) + (1 - lam) TV     g = lam g_fkl + (1 - lam) g_tvd
#        with lam = exp(-eta alpha) a constant (stop-gradient): alpha = 1 - TV of the row itself
#        (per token) or one given alpha for every row (`lk_alpha`). One pass for both terms.
# (For any loss of s, g = dL/ds - p_s sum(dL/ds), the log-softmax Jacobian.)
def _divergence_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    divergence: str,
    beta: float,
    need_grad: bool,
    lk: tuple[float, float | torch.Tensor | None] = (0.0, None),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence (C,) and its gradient (C, V) w.r.t. z_s, or None without need_grad.

    s, t: (C, V) fp32 log-probabilities of student and teacher. They are scratch: overwritten in
    place, so that at most four (C, V) buffers (s and t included) are alive at once.
    lk: (eta, alpha) of divergence "lk"; alpha None reads each row's own 1 - TV, a (C,) tensor
    gives each row's.
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "fkl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "rkl"
    grad = None
    if divergence == "fkl":
        pt = t.exp()
        loss = _row_dot(pt, t.sub_(s))
        if need_grad:
            grad = s.exp_().sub_(pt)
    elif divergence == "rkl":
        ps = s.exp()
        d = s.sub_(t)  # s - t
        loss = _row_dot(ps, d)
        if need_grad:
            grad = d.sub_(loss.unsqueeze(1)).mul_(ps)
    elif divergence == "jsd":
        log_m = torch.add(s, math.log1p(-beta))
        torch.logaddexp(log_m, t + math.log(beta), out=log_m)
        kl_t = _row_dot(t.exp(), t.sub_(log_m))  # KL(p_t || m)
        del t
        ps = s.exp()
        ds = s.sub_(log_m)  # s - log m
        del log_m
        kl_s = _row_dot(ps, ds)  # KL(p_s || m)
        loss = beta * kl_t + (1.0 - beta) * kl_s
        if need_grad:
            grad = ds.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(1.0 - beta)
    elif divergence == "tvd":
        ps = s.exp_()
        diff = t.exp_().sub_(ps).neg_()  # p_s - p_t
        loss = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
        if need_grad:
            a = diff.sign_().mul_(ps).mul_(0.5)
            grad = a.addcmul_(ps, a.sum(dim=-1, keepdim=True), value=-1.0)
    elif divergence == "lk":
        eta, alpha = lk
        pt = t.exp()
        kl = _row_dot(pt, t.sub_(s))
        ps = s.exp_()
        diff = torch.sub(ps, pt, out=t)  # p_s - p_t (t - s is spent)
        tv = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
        beta_rows = 1.0 - tv if alpha is None else torch.as_tensor(alpha).to(tv).expand_as(tv)
        lam = torch.exp(-eta * beta_rows)  # (C,), a constant of the gradient
        loss = lam * kl + (1.0 - lam) * tv
        if need_grad:
            a = diff.sign_().mul_(ps).mul_(0.5)  # TV's dL/ds
            keep = (1.0 - lam).unsqueeze(1)
            grad = pt.neg_().add_(ps).mul_(lam.unsqueeze(1))  # lam (p_s - p_t)
            grad.addcmul_(a, keep).addcmul_(ps, a.sum(dim=-1, keepdim=True) * keep, value=-1.0)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return loss, grad


class TopkTargets(NamedTuple):
    """The target's next-token distribution at N tokens as target_outputs.format=topk stores it:
    its k most likely ids, their log-probabilities at the distillation temperature, and the log
    of the mass outside them (-inf when k = V)."""

    ids: torch.Tensor  # (N, k) int32 or int64
    logprobs: torch.Tensor  # (N, k) fp16, bf16 or fp32
    log_rest: torch.Tensor  # (N,)


# Floor of the bucket log-probabilities: a bucket of mass 0 (log -inf, e.g. a tail that underflowed
# in fp16) would make 0 * (-inf - s) = nan; exp(-1e4) is 0 in fp32, so the floor changes nothing else.
_LOG_FLOOR = -1e4


# Top-k targets: the target is known on its k stored ids S and as one bucket r for the rest (mass
# p_r = exp(log_rest)). Both distributions are compared on the k + 1 outcomes (S, r). The draft's
# bucket log-probabilities are exactly log_softmax of its bucket logits
#   ẑ = (z_S, logsumexp_{j∉S} z_j)                 (log q_S and log q_r = log Σ_{j∉S} q_j),
# the target's are (t_S, log_rest) renormalised (fp16 storage rounds their sum away from 1).
# Any divergence of _divergence_rows on the buckets gives ĝ = dL/dẑ, and ∂ẑ_r/∂z_j = q_j / q_r for
# j ∉ S, so over the vocabulary
#   g_j = ĝ_j (j ∈ S),      g_j = ĝ_r · q_j / q_r (j ∉ S).
# For fkl that is g = q − p̃ with p̃ the target on S and p_r spread over the tail in the draft's
# own proportions. Merging outcomes never increases KL or TV (data processing), so each bucketed
# divergence is at most the full one; at k = V there is no bucket and it is the full one.
# The LK hybrid's per-row α is not the buckets' 1 − TV = Σ_S min(p, q) + min(p_r, q_r), which
# counts the tail as if the two agreed inside it, but β_S = Σ_S min(p_i, q_i) (topk_overlap):
# short of β by Σ_{j∉S} min(p_j, q_j) only, which is small where the tail is spread thin.
def _topk_divergence_rows(
    s: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    log_rest: torch.Tensor,
    divergence: str,
    beta: float,
    need_grad: bool,
    lk: tuple[float, float | None] = (0.0, None),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row bucketed divergence (C,) and its gradient (C, V) w.r.t. z_s, or None.

    s: (C, V) fp32 draft log-probabilities, scratch (overwritten in place; it becomes the
    gradient). ids (C, k), logprobs (C, k), log_rest (C,): the target's stored top-k.
    """
    ids = ids.long()
    vocab, k = s.shape[1], ids.shape[1]
    outside = ids < 0  # (C, k): stored ids the draft's vocabulary lacks (TopkTargets)
    mapped = bool(outside.any())
    if mapped:
        ids, first, empty = _outside_filled(ids, outside)
    s_hat = s.gather(1, ids)  # (C, k)
    t_hat = logprobs.float()
    if mapped:  # an id outside is no outcome: both sides -inf (floored below), 0 in every sum
        s_hat.masked_fill_(outside, -math.inf)
        t_hat = t_hat.masked_fill(outside, -math.inf)
    if k < vocab or mapped:  # the tail bucket
        kept_first = s[empty, 0].clone() if mapped else None  # a row with no id inside: no S
        s.scatter_(1, ids, -math.inf)  # s: the tail's log q_j, -inf on S
        if mapped:
            s[empty, 0] = kept_first
        s_rest = torch.logsumexp(s, dim=1, keepdim=True).clamp_(min=_LOG_FLOOR)  # (C, 1) log q_r
        s_hat = torch.cat([s_hat, s_rest], dim=1)  # (C, k + 1)
        t_hat = torch.cat([t_hat, log_rest.float().unsqueeze(1)], dim=1)
    s_hat = s_hat.clamp_(min=_LOG_FLOOR)
    t_hat = t_hat.clamp(min=_LOG_FLOOR)
    t_hat = t_hat - torch.logsumexp(t_hat, dim=1, keepdim=True)
    if divergence == "lk" and lk[1] is None:  # α = β_S per row (see above)
        overlap = torch.minimum(s_hat[:, :k], t_hat[:, :k]).exp_().sum(dim=1)  # (C,)
        lk = (lk[0], overlap)
    loss, g_hat = _divergence_rows(s_hat, t_hat, divergence, beta, need_grad, lk)
    if not need_grad:
        return loss, None
    if k < vocab or mapped:  # the tail: ĝ_r · q_j / q_r = ĝ_r · exp(s_j − log q_r); 0 on S
        grad = s.sub_(s_rest).exp_().mul_(g_hat[:, k:])
    else:
        grad = s.zero_()
    g_stored = g_hat[:, :k]
    if mapped:  # a filled slot writes what its id's own slot writes (or, with none, the tail's)
        fill = torch.where(empty.unsqueeze(1), grad[:, :1], g_stored.gather(1, first))  # (C, 1)
        g_stored = torch.where(outside, fill, g_stored)
    return loss, grad.scatter_(1, ids, g_stored)


def _outside_filled(
    ids: torch.Tensor, outside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored ids with each one outside the draft's vocabulary (-1) replaced by the row's first
    id inside it, so gathers and scatters stay in range and a scatter writes one value per id;
    (ids (C, k), the first inside slot (C, 1), rows with no id inside (C,), whose ids become 0)."""
    first = (~outside).int().argmax(dim=1, keepdim=True)  # (C, 1); 0 where none is inside
    empty = outside.all(dim=1)  # (C,)
    filled = torch.where(outside, ids.gather(1, first), ids).masked_fill_(empty.unsqueeze(1), 0)
    return filled, first, empty


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk when chunk_size is None: the chunk's fp32 buffers fit CHUNK_BUDGET_BYTES."""
    return max(1, CHUNK_BUDGET_BYTES // (vocab * 4 * _FP32_BUFFERS_PER_CHUNK))


def _check_options(
    divergence: str, beta: float, temperature: float, lk_eta: float = 3.0, lk_alpha=None
) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not (math.isfinite(lk_eta) and lk_eta >= 0.0):
        raise ValueError(f"lk_eta must be a finite number >= 0, got {lk_eta}")
    if lk_alpha is not None and not math.isfinite(lk_alpha):
        raise ValueError(
            f"lk_alpha must be a finite number (an acceptance) or None, got {lk_alpha}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 -> fkl, 1 -> rkl), got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _KDFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, divergence, beta, temperature, need_grad, lk):
        s = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V) fp32
        t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V) fp32
        loss, grad = _divergence_rows(s, t, divergence, beta, need_grad, lk)
        if grad is not None:
            ctx.save_for_backward(grad.div_(temperature))
        ctx.logits_dtype = student_logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # grad_output: (N,)
        (grad,) = ctx.saved_tensors
        grad_logits = (grad * grad_output.unsqueeze(1)).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None, None, None


def kd_divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    lk_eta: float = 3.0,
    lk_alpha: float | None = None,
) -> torch.Tensor:
    """Per-row divergence (N,) fp32 between (N, V) student and teacher logits.

    The same math as `fused_kd_loss`, for callers that already hold full logits. Differentiable
    w.r.t. `student_logits`; the teacher is a constant (no gradient flows to it).
    """
    _check_options(divergence, beta, temperature, lk_eta, lk_alpha)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (N, V) with equal shapes, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _KDFromLogits.apply(
        student_logits,
        teacher_logits.detach(),
        divergence,
        beta,
        temperature,
        need_grad,
        (float(lk_eta), None if lk_alpha is None else float(lk_alpha)),
    )


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(tensor: torch.Tensor) -> bool:
    """CUDA inputs go through the Triton row kernel when triton is installed."""
    return tensor.is_cuda and _triton_importable()


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax((C, H) @ (V, H).T / T) -> (C, V) fp32; the matmul runs in the input dtype."""
    logits = torch.mm(hidden, weight.t()).float()  # (C, V)
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


def _chunked_kd(
    sh: torch.Tensor,  # (N, Hs)
    sw: torch.Tensor,  # (V, Hs)
    teacher: tuple,  # (th (N, Ht), tw (V, Ht)), or a TopkTargets (N rows)
    rows: torch.Tensor | None,  # (K,) indices of kept rows; None keeps all N
    divergence: str,
    beta: float,
    temperature: float,
    chunk_size: int,
    row_weight: float | torch.Tensor,  # d total / d loss_i: a float, or (K,) per kept row
    lk: tuple[float, float | None],  # (eta, alpha) of divergence "lk"
    want_grad_h: bool,
    want_grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss per kept row (K,) fp32, grad w.r.t. sh (N, Hs) and w.r.t. sw (V, Hs), chunk by chunk.

    The gradients are those of sum_i row_weight_i * loss_i; masked rows get exactly zero.
    """
    n_kept = sh.shape[0] if rows is None else rows.numel()
    need_grad = want_grad_h or want_grad_w
    topk = isinstance(teacher, TopkTargets)
    # the Triton kernel has no LK rows and reads no stored top-k
    use_triton = _use_triton(sh) and divergence != "lk" and not topk
    if not topk:
        th, tw = teacher
    if use_triton:
        from specdraft.kernels import kd_loss_triton
    loss = torch.empty(n_kept, dtype=torch.float32, device=sh.device)
    grad_h = torch.zeros_like(sh) if want_grad_h else None
    # fp32 accumulator across chunks; cast to sw.dtype once at the end.
    grad_w = torch.zeros(sw.shape, dtype=torch.float32, device=sw.device) if want_grad_w else None
    for start in range(0, n_kept, chunk_size):
        end = min(start + chunk_size, n_kept)
        if rows is None:  # views, no copy
            hs, chunk = sh[start:end], [x[start:end] for x in (teacher if topk else (th,))]
        else:
            idx = rows[start:end]
            hs = sh.index_select(0, idx)
            chunk = [x.index_select(0, idx) for x in (teacher if topk else (th,))]
        # d total / d(h W^T) = g * row_weight / T, with g = d loss_i / d z_s and z_s = h W^T / T.
        if isinstance(row_weight, torch.Tensor):
            scale = row_weight[start:end] / temperature  # (C,)
        else:
            scale = sh.new_full((end - start,), row_weight / temperature, dtype=torch.float32)
        if use_triton:
            loss[start:end], g = kd_loss_triton.divergence_rows_triton(
                torch.mm(hs, sw.t()), torch.mm(chunk[0], tw.t()), divergence, beta, temperature,
                scale if need_grad else None,
            )  # fmt: skip
        else:
            s = _log_probs(hs, sw, temperature)  # (C, V)
            if topk:  # the stored log-probabilities are at the temperature already
                rows_loss, g = _topk_divergence_rows(s, *chunk, divergence, beta, need_grad, lk)
            else:
                t = _log_probs(chunk[0], tw, temperature)  # (C, V)
                rows_loss, g = _divergence_rows(s, t, divergence, beta, need_grad, lk)
                del t
            loss[start:end] = rows_loss
            del s
            if need_grad:
                g = g.mul_(scale.unsqueeze(1)).to(sw.dtype)  # (C, V), no copy for fp32
        if not need_grad:
            continue
        if want_grad_h:
            if rows is None:
                torch.mm(g, sw, out=grad_h[start:end])
            else:
                grad_h.index_copy_(0, idx, torch.mm(g, sw))
        if want_grad_w:
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), hs)
            else:
                grad_w.add_(torch.mm(g.t(), hs))
        del g
    if grad_w is not None:
        grad_w = grad_w.to(sw.dtype)
    return loss, grad_h, grad_w


class _FusedKDLoss(torch.autograd.Function):
    """Forward computes the loss and, for "mean"/"sum", the gradients too (backward only scales
    them by the scalar grad_output). For "none" the upstream gradient is a (N,) vector: scaling
    stored grad_h rows would be exact, but grad_w sums over rows, so backward instead recomputes
    the chunks with the per-row weights (one extra pass of the matmuls, exact, no (N, V) storage).
    `weights` (K,) fp32 per kept row, or None: constants that multiply each row's loss.
    """

    @staticmethod
    def forward(ctx, sh, sw, rows, weights, opts, want_grad_h, want_grad_w, *teacher):
        # teacher: (th, tw), or the three tensors of a TopkTargets (opts[-1] says which)
        divergence, beta, temperature, reduction, chunk_size, lk, topk = opts
        teacher = TopkTargets(*teacher) if topk else teacher
        n_kept = sh.shape[0] if rows is None else rows.numel()
        ctx.opts, ctx.rows_none, ctx.weights_none = opts, rows is None, weights is None
        precompute = reduction != "none" and (want_grad_h or want_grad_w)
        scale = 1.0 / max(n_kept, 1) if reduction == "mean" else 1.0
        row_weight = scale if weights is None else weights * scale
        loss, grad_h, grad_w = _chunked_kd(
            sh, sw, teacher, rows, divergence, beta, temperature, chunk_size, row_weight, lk,
            want_grad_h and precompute, want_grad_w and precompute,
        )  # fmt: skip
        if weights is not None:
            loss.mul_(weights)
        ctx.n_teacher = len(teacher)
        if reduction == "none":
            ctx.save_for_backward(sh, sw, rows, weights, *teacher)
            ctx.want = (want_grad_h, want_grad_w)
            if rows is None:
                return loss
            return torch.zeros(sh.shape[0], dtype=loss.dtype, device=loss.device).index_copy_(
                0, rows, loss
            )
        # Kept on ctx, not saved tensors: backward hands them over (no copy) and drops them.
        ctx.grads = (grad_h, grad_w)
        total = loss.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        divergence, beta, temperature, reduction, chunk_size, lk, topk = ctx.opts
        unused = (None,) * (5 + ctx.n_teacher)  # rows, weights, opts, the two flags, teacher
        if reduction != "none":  # grad_output: () scalar
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_kd_loss hands its precomputed gradients over on the first backward; "
                    "backward through it twice (retain_graph=True) is not supported: recompute "
                    "the loss instead"
                )
            grad_h, grad_w = ctx.grads
            ctx.grads = None
            # Scale in place: these buffers are ours alone, and autograd takes them without a copy.
            if grad_h is not None:
                grad_h.mul_(grad_output.to(grad_h.dtype))
            if grad_w is not None:
                grad_w.mul_(grad_output.to(grad_w.dtype))
            return grad_h, grad_w, *unused
        sh, sw, rows, weights, *teacher = ctx.saved_tensors  # grad_output: (N,)
        teacher = TopkTargets(*teacher) if topk else teacher
        rows = None if ctx.rows_none else rows
        row_weight = grad_output.float() if rows is None else grad_output.float()[rows]
        if not ctx.weights_none:
            row_weight = row_weight * weights
        _, grad_h, grad_w = _chunked_kd(
            sh, sw, teacher, rows, divergence, beta, temperature, chunk_size, row_weight, lk,
            *ctx.want,
        )  # fmt: skip
        return grad_h, grad_w, *unused


def _check_inputs(
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask, reduction, weights=None
):
    shapes = (
        f"student_hidden {tuple(student_hidden.shape)}, student_weight {tuple(student_weight.shape)}, "
        f"teacher_hidden {tuple(teacher_hidden.shape)}, teacher_weight {tuple(teacher_weight.shape)}"
    )
    tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    if any(t.dim() != 2 for t in tensors):
        raise ValueError(f"all four inputs must be 2-D (N, H) / (V, H); got {shapes}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student and teacher hidden states differ in N (tokens): {shapes}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher LM heads differ in V (vocabulary): {shapes}")
    if student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError(f"student hidden size differs from its LM head's: {shapes}")
    if teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher hidden size differs from its LM head's: {shapes}")
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise ValueError(
            "each model's hidden states and LM head must share a dtype; got student "
            f"{student_hidden.dtype}/{student_weight.dtype}, teacher "
            f"{teacher_hidden.dtype}/{teacher_weight.dtype}"
        )
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != student_hidden.shape[0]):
        raise ValueError(
            f"mask must be (N,) = ({student_hidden.shape[0]},) bool, got {tuple(mask.shape)}"
        )
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != student_hidden.shape[0]):
        raise ValueError(
            f"weights must be (N,) = ({student_hidden.shape[0]},), got {tuple(weights.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
    lk_eta: float = 3.0,
    lk_alpha: float | None = None,
) -> torch.Tensor:
    """Distillation loss between two LM heads without materialising (N, V) logits.

    Args:
        student_hidden: (N, Hs) the draft's final hidden states.
        student_weight: (V, Hs) the draft's LM head; gets a gradient only if it requires one.
        teacher_hidden: (N, Ht) and teacher_weight: (V, Ht): constants, no gradient flows to them.
        mask: (N,) bool, the tokens that count; None keeps all. Masked rows are never computed.
        divergence: "fkl" KL(p_t||p_s), "rkl" KL(p_s||p_t), "jsd" TRL's generalized JSD, "tvd",
            or "lk" the LK hybrid λ·KL(p_t||p_s) + (1 − λ)·TV with λ = exp(−lk_eta·α) held
            constant: α = 1 − TV of each row (lk_alpha None) or lk_alpha for every row. Both
            terms come from one pass (on CUDA it runs in torch: the Triton kernel has no LK).
        beta: JSD mixture weight; 0 gives fkl and 1 gives rkl.
        temperature: both logits are divided by it (no T^2 rescaling).
        reduction: "mean" over kept tokens (0 if none), "sum", or "none" -> (N,), 0 where masked.
        chunk_size: rows per chunk; None keeps a chunk's fp32 (rows, V) buffers near 256 MiB.
        weights: (N,) constants (no gradient) that multiply each row's loss, in every reduction
            ("mean" still divides by the number of kept rows); None weighs every row 1.

    Returns:
        fp32 loss: a scalar, or (N,) for reduction="none". Gradients come in the input dtypes.
    """
    _check_options(divergence, beta, temperature, lk_eta, lk_alpha)
    _check_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, reduction, weights
    )
    teacher = (teacher_hidden.detach(), teacher_weight.detach())
    return _apply_fused(
        student_hidden, student_weight, teacher, False, mask, divergence, beta, temperature,
        reduction, chunk_size, weights, lk_eta, lk_alpha,
    )  # fmt: skip


def _apply_fused(
    student_hidden, student_weight, teacher: tuple, topk: bool, mask, divergence, beta,
    temperature, reduction, chunk_size, weights, lk_eta, lk_alpha,
) -> torch.Tensor:  # fmt: skip
    """fused_kd_loss and fused_topk_kd_loss after their checks: the kept rows, the chunk size
    and the autograd function. `teacher`: (th, tw), or a TopkTargets when `topk`."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    n_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    rows = None
    if mask is not None:
        rows = torch.nonzero(mask.to(device=student_hidden.device, dtype=torch.bool)).view(-1)
        if rows.numel() == n_tokens:
            rows = None
    n_kept = n_tokens if rows is None else rows.numel()
    if chunk_size is None:
        chunk_size = default_chunk_rows(vocab)
    chunk_size = max(1, min(chunk_size, n_kept))
    grad_on = torch.is_grad_enabled()
    lk = (float(lk_eta), None if lk_alpha is None else float(lk_alpha))
    opts = (divergence, float(beta), float(temperature), reduction, chunk_size, lk, topk)
    if weights is not None:
        weights = weights.detach().to(device=student_hidden.device, dtype=torch.float32)
        weights = weights if rows is None else weights[rows]  # (K,) per kept row
    return _FusedKDLoss.apply(
        student_hidden,
        student_weight,
        rows,
        weights,
        opts,
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        *teacher,
    )


def fused_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target: TopkTargets,
    mask: torch.Tensor | None = None,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
    lk_eta: float = 3.0,
    lk_alpha: float | None = None,
) -> torch.Tensor:
    """fused_kd_loss against the target's stored top-k (target_outputs.format=topk) instead of
    its hidden states and head: each divergence over the k stored ids plus one bucket for the
    rest of the vocabulary (the draft's mass outside the ids vs the target's `log_rest`); exact
    at k = V. `target`'s log-probabilities are at the distillation temperature already:
    `temperature` divides the draft's logits only. The draft's logits are chunked as in
    fused_kd_loss; the target side is (N, k), never (N, V). Other arguments as fused_kd_loss;
    the LK hybrid's per-row α is the bucketed 1 − TV.
    """
    _check_options(divergence, beta, temperature, lk_eta, lk_alpha)
    ids, logprobs, log_rest = target
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    k = ids.shape[-1] if ids.dim() == 2 else -1
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError(
            "student_hidden and student_weight must be (N, H) and (V, H), got "
            f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}"
        )
    if ids.shape != (n, k) or logprobs.shape != (n, k) or log_rest.shape != (n,) or not 0 < k:
        raise ValueError(
            f"target must hold ids and logprobs (N, k) = ({n}, k) with k > 0 and log_rest (N,); "
            f"got {tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(log_rest.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"target ids must be integers, got {ids.dtype}")
    if n and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
        raise ValueError(
            f"target ids must lie in [0, {vocab}) (the draft head's rows), or be -1 (not in the "
            f"draft's vocabulary); got [{int(ids.min())}, {int(ids.max())}]"
        )
    if k > vocab and not bool((ids < 0).any()):
        raise ValueError(f"k = {k} stored ids cannot all be rows of a {vocab}-row head")
    _check_inputs(student_hidden, student_weight, student_hidden, student_weight, mask, reduction,
                  weights)  # fmt: skip
    teacher = TopkTargets(ids.detach(), logprobs.detach(), log_rest.detach())
    return _apply_fused(
        student_hidden, student_weight, teacher, True, mask, divergence, beta, temperature,
        reduction, chunk_size, weights, lk_eta, lk_alpha,
    )  # fmt: skip


@torch.no_grad()
def topk_overlap(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target: TopkTargets,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """β_S = Σ_{i∈S} min(p_i, q_i) per row (N,) over the target's stored ids S: the acceptance β
    less the tail's overlap Σ_{j∉S} min(p_j, q_j) (exact at k = V). q = softmax(h W^T / T)
    from (N, H) and (V, H), chunked; the target's log-probabilities are renormalised with their
    rest as _topk_divergence_rows does."""
    ids, logprobs, log_rest = target
    vocab = student_weight.shape[0]
    chunk = chunk_size or default_chunk_rows(vocab)
    out = []
    for start in range(0, student_hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        s = _log_probs(student_hidden[rows], student_weight, temperature)  # (C, V)
        chunk_ids = ids[rows].long()
        outside = chunk_ids < 0  # not in the draft's vocabulary: no overlap there
        t = logprobs[rows].float().masked_fill(outside, -math.inf)
        if ids.shape[1] < vocab or bool(outside.any()):
            t_all = torch.cat([t, log_rest[rows].float().unsqueeze(1)], dim=1)
        else:
            t_all = t
        t = t - torch.logsumexp(t_all.clamp(min=_LOG_FLOOR), dim=1, keepdim=True)
        overlap = torch.minimum(s.gather(1, chunk_ids.clamp(min=0)), t).exp_()
        out.append(overlap.masked_fill_(outside, 0.0).sum(dim=1))
    if not out:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)
