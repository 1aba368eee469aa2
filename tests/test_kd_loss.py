"""fused_kd_loss against the plain full-logits reference: values and gradients, edge cases, errors."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_reference import kd_divergence_reference, kd_loss_reference  # noqa: E402

from specdraft.kernels import fused_kd_loss, kd_divergence_from_logits  # noqa: E402
from specdraft.kernels import kd_loss as kd_loss_module  # noqa: E402

# (N, V, Hs, Ht): one odd, non-power-of-two shape with a teacher wider than the student.
ODD = (37, 1001, 24, 40)
SHAPES = [ODD, (64, 256, 32, 32)]
# (divergence, beta); beta only matters for "jsd".
CASES = [
    ("fkl", 0.5),
    ("rkl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.5),
    ("jsd", 0.3),  # asymmetric: catches beta applied to the wrong side of the mixture
    ("jsd", 1.0),
    ("tvd", 0.5),
    ("lk", 0.5),  # the LK hybrid, λ per row (η = 3); the batch α and weights have their own test
]
IDS = [f"{d}-b{b}" if d == "jsd" else d for d, b in CASES]


def make_inputs(shape, dtype=torch.float32, seed=0, weight_grad=True):
    n, v, hs, ht = shape
    gen = torch.Generator().manual_seed(seed)
    # Logits with a std of about 3: peaked but not one-hot distributions.
    student_hidden = torch.randn(n, hs, generator=gen)
    student_weight = torch.randn(v, hs, generator=gen) * (3 / hs**0.5)
    teacher_hidden = torch.randn(n, ht, generator=gen)
    teacher_weight = torch.randn(v, ht, generator=gen) * (3 / ht**0.5)
    mask = torch.rand(n, generator=gen) < 0.7
    return (
        student_hidden.to(dtype).requires_grad_(True),
        student_weight.to(dtype).requires_grad_(weight_grad),
        teacher_hidden.to(dtype),
        teacher_weight.to(dtype),
        mask,
    )


def loss_and_grads(fn, inputs, mask=None, upstream=None, **kwargs):
    """Loss and the gradients of sum(upstream * loss) w.r.t. the student's hidden and head."""
    sh, sw, th, tw = (x.detach().clone().requires_grad_(x.requires_grad) for x in inputs[:4])
    loss = fn(sh, sw, th, tw, mask=mask, **kwargs)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), sh.grad, sw.grad


def rel_err(actual, expected):
    """max |actual - expected| over max |expected|, in fp32."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_all_close(got, want, tol=2e-5):
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.2e} > {tol}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, divergence, beta, use_mask, reduction):
    inputs = make_inputs(shape)
    mask = inputs[4] if use_mask else None
    kw = dict(divergence=divergence, beta=beta, reduction=reduction)
    got = loss_and_grads(fused_kd_loss, inputs, mask, chunk_size=5, **kw)
    want = loss_and_grads(kd_loss_reference, inputs, mask, **kw)
    assert_all_close(got, want)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_temperature_matches_reference(divergence, beta, temperature):
    inputs = make_inputs(ODD, seed=1)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    got = loss_and_grads(fused_kd_loss, inputs, inputs[4], **kw)
    want = loss_and_grads(kd_loss_reference, inputs, inputs[4], **kw)
    assert_all_close(got, want)
    # Temperature must actually change the loss (no silent no-op).
    base = fused_kd_loss(*inputs[:4], mask=inputs[4], divergence=divergence, beta=beta)
    assert not torch.allclose(got[0], base.detach(), rtol=1e-3)


@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_bf16_error_within_naive_bf16_error(divergence, beta):
    inputs = make_inputs(ODD, dtype=torch.bfloat16, seed=2)
    upcast = tuple(x.float().requires_grad_(x.requires_grad) for x in inputs[:4]) + inputs[4:]
    kw = dict(divergence=divergence, beta=beta, mask=inputs[4])
    truth = loss_and_grads(kd_loss_reference, upcast, **kw)  # fp32 ground truth, same values
    fused = loss_and_grads(fused_kd_loss, inputs, chunk_size=8, **kw)
    naive = loss_and_grads(kd_loss_reference, inputs, **kw)
    assert fused[0].dtype == torch.float32
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    for name, f, n, t in zip(
        ("loss", "grad hidden", "grad weight"), fused, naive, truth, strict=True
    ):
        fused_err, naive_err = rel_err(f, t), rel_err(n, t)
        assert fused_err <= naive_err + 2e-3, f"{name}: {fused_err:.2e} vs naive {naive_err:.2e}"


def test_jsd_beta_endpoints_are_fkl_and_rkl():
    inputs = make_inputs(ODD, seed=3)
    for beta, plain in ((0.0, "fkl"), (1.0, "rkl")):
        jsd = loss_and_grads(fused_kd_loss, inputs, divergence="jsd", beta=beta)
        assert_all_close(jsd, loss_and_grads(fused_kd_loss, inputs, divergence=plain), tol=1e-6)
    # Strictly inside (0, 1) the mixture is used: a different, bounded loss.
    mid = fused_kd_loss(*inputs[:4], divergence="jsd", beta=0.5)
    fkl = fused_kd_loss(*inputs[:4], divergence="fkl")
    assert mid.item() < min(fkl.item(), math.log(2) + 1e-6)


def test_known_values_on_two_token_vocabulary():
    # logits = log p exactly: hidden [[1]], a (V=2, H=1) head holding log p.
    p_t, p_s = (0.5, 0.5), (0.9, 0.1)
    m = tuple(0.3 * a + 0.7 * b for a, b in zip(p_t, p_s, strict=True))  # beta = 0.3

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    expected = {
        ("fkl", 0.5): kl(p_t, p_s),
        ("rkl", 0.5): kl(p_s, p_t),
        ("jsd", 0.3): 0.3 * kl(p_t, m) + 0.7 * kl(p_s, m),
        ("tvd", 0.5): 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s, strict=True)),
    }
    one = torch.ones(1, 1)
    student_head = torch.tensor(p_s).log().view(2, 1)
    teacher_head = torch.tensor(p_t).log().view(2, 1)
    for (divergence, beta), value in expected.items():
        fused = fused_kd_loss(
            one, student_head, one, teacher_head, divergence=divergence, beta=beta
        )
        from_logits = kd_divergence_from_logits(
            student_head.T, teacher_head.T, divergence=divergence, beta=beta
        )
        assert fused.item() == pytest.approx(value, rel=1e-5), divergence
        assert from_logits.item() == pytest.approx(value, rel=1e-5), divergence


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_all_masked_gives_zero_loss_and_zero_grads(divergence, beta, reduction):
    sh, sw, th, tw, _ = make_inputs(ODD, seed=4)
    mask = torch.zeros(ODD[0], dtype=torch.bool)
    loss = fused_kd_loss(sh, sw, th, tw, mask, divergence, beta, reduction=reduction)
    assert loss.dtype == torch.float32
    assert torch.equal(loss.detach(), torch.zeros_like(loss))  # 0, not NaN
    (loss * 2.0).sum().backward()
    assert torch.equal(sh.grad, torch.zeros_like(sh))
    assert torch.equal(sw.grad, torch.zeros_like(sw))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_rows_are_never_computed(reduction):
    sh, sw, th, tw, mask = make_inputs(ODD, seed=5)
    want = loss_and_grads(kd_loss_reference, (sh, sw, th, tw), mask, reduction=reduction)
    # Poison the masked rows: a kernel that computes them would return NaN.
    with torch.no_grad():
        sh[~mask] = float("nan")
        th[~mask] = float("nan")
    got = loss_and_grads(fused_kd_loss, (sh, sw, th, tw), mask, reduction=reduction)
    assert_all_close(got, want)
    assert torch.equal(got[1][~mask], torch.zeros_like(got[1][~mask]))
    if reduction == "none":
        assert torch.equal(got[0][~mask], torch.zeros_like(got[0][~mask]))


@pytest.fixture
def grads_asked_for(monkeypatch):
    """(want_grad_h, want_grad_w) of every chunked pass the kernel runs."""
    calls = []
    chunked_kd = kd_loss_module._chunked_kd

    def spy(*args):
        calls.append(args[-2:])
        return chunked_kd(*args)

    monkeypatch.setattr(kd_loss_module, "_chunked_kd", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_lm_head_gets_no_gradient(reduction, grads_asked_for):
    sh, sw, th, tw, mask = make_inputs(ODD, seed=6, weight_grad=False)
    loss = fused_kd_loss(sh, sw, th, tw, mask, "rkl", reduction=reduction)
    loss.sum().backward()
    assert any(h for h, _ in grads_asked_for)
    assert not any(w for _, w in grads_asked_for)  # never computed, not computed and dropped
    assert sw.grad is None and th.grad is None and tw.grad is None
    want = loss_and_grads(
        kd_loss_reference, (sh, sw, th, tw), mask, divergence="rkl", reduction=reduction
    )
    assert rel_err(sh.grad, want[1]) <= 2e-5


def test_no_grad_mode_computes_no_gradients(grads_asked_for):
    sh, sw, th, tw, mask = make_inputs(ODD, seed=7)
    with torch.no_grad():
        loss = fused_kd_loss(sh, sw, th, tw, mask)
    assert loss.grad_fn is None
    assert grads_asked_for == [(False, False)]
    assert rel_err(loss, kd_loss_reference(sh, sw, th, tw, mask).detach()) <= 2e-5


def test_second_backward_through_precomputed_gradients_raises():
    sh, sw, th, tw, mask = make_inputs(ODD, seed=12)
    loss = fused_kd_loss(sh, sw, th, tw, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute the loss"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_scalar_grad_output(divergence, beta, reduction):
    inputs = make_inputs(ODD, seed=8)
    kw = dict(divergence=divergence, beta=beta, reduction=reduction, upstream=3.7)
    got = loss_and_grads(fused_kd_loss, inputs, inputs[4], **kw)
    want = loss_and_grads(kd_loss_reference, inputs, inputs[4], **kw)
    assert_all_close(got, want)


@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_per_row_grad_output_for_reduction_none(divergence, beta):
    inputs = make_inputs(ODD, seed=9)
    upstream = torch.randn(ODD[0], generator=torch.Generator().manual_seed(0))
    kw = dict(divergence=divergence, beta=beta, reduction="none", upstream=upstream)
    got = loss_and_grads(fused_kd_loss, inputs, inputs[4], chunk_size=4, **kw)
    want = loss_and_grads(kd_loss_reference, inputs, inputs[4], **kw)
    assert_all_close(got, want)


@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_chunk_sizes_agree(divergence, beta):
    inputs = make_inputs(ODD, seed=10)
    runs = [
        loss_and_grads(
            fused_kd_loss, inputs, inputs[4], divergence=divergence, beta=beta, chunk_size=c
        )
        for c in (1, 5, None, 1000)
    ]
    for other in runs[1:]:
        assert_all_close(other, runs[0], tol=1e-5)


@pytest.mark.parametrize(("divergence", "beta"), CASES, ids=IDS)
def test_divergence_from_logits_matches_reference(divergence, beta):
    gen = torch.Generator().manual_seed(11)
    student = (3 * torch.randn(13, 101, generator=gen)).requires_grad_(True)
    teacher = 3 * torch.randn(13, 101, generator=gen)
    upstream = torch.randn(13, generator=gen)
    results = []
    for fn in (kd_divergence_from_logits, kd_divergence_reference):
        student.grad = None
        loss = fn(student, teacher, divergence, beta, 1.5)
        (loss * upstream).sum().backward()
        results.append((loss.detach(), student.grad.clone()))
    for got, want in zip(*results, strict=True):
        assert rel_err(got, want) <= 2e-5


def _good():
    sh, sw, th, tw, mask = make_inputs(ODD)
    return dict(
        student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw, mask=mask
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(teacher_hidden=torch.randn(36, 40)), r"differ in N .*\(37, 24\).*\(36, 40\)"),
        (dict(teacher_weight=torch.randn(1000, 40)), r"differ in V .*\(1001, 24\).*\(1000, 40\)"),
        (dict(student_weight=torch.randn(1001, 25)), r"student hidden size .*\(1001, 25\)"),
        (dict(mask=torch.ones(36, dtype=torch.bool)), r"mask must be \(N,\) = \(37,\).*\(36,\)"),
        (dict(divergence="kl"), r"divergence must be one of .*'kl'"),
        (dict(divergence="jsd", beta=1.5), r"beta must lie in \[0, 1\].*1.5"),
        (dict(beta=-0.1), r"beta must lie in \[0, 1\]"),
        (dict(temperature=0.0), r"temperature must be > 0, got 0.0"),
        (dict(temperature=-1.0), r"temperature must be > 0"),
        (dict(reduction="batchmean"), r"reduction must be one of"),
        (dict(chunk_size=0), r"chunk_size must be a positive"),
        (dict(weights=torch.ones(36)), r"weights must be \(N,\) = \(37,\).*\(36,\)"),
        (dict(divergence="lk", lk_eta=-1.0), r"lk_eta must be a finite number >= 0"),
        (dict(divergence="lk", lk_alpha=float("nan")), r"lk_alpha must be a finite"),
    ],
)
def test_invalid_arguments_raise_value_error(override, message):
    with pytest.raises(ValueError, match=message):
        fused_kd_loss(**{**_good(), **override})


def _triton_interpreter_checks() -> None:
    """The Triton kernel against the torch path; run in a child process by the test below."""
    from specdraft.kernels import kd_loss_triton

    gen = torch.Generator().manual_seed(13)
    student = 3 * torch.randn(5, 1001, generator=gen)  # (C, V): three 256-wide tiles and a tail
    teacher = 3 * torch.randn(5, 1001, generator=gen)
    scale = torch.randn(5, generator=gen)
    for divergence, beta in [case for case in CASES if case[0] != "lk"]:  # the kernel has no LK
        s = torch.log_softmax(student / 1.5, dim=-1)
        t = torch.log_softmax(teacher / 1.5, dim=-1)
        want_loss, want_grad = kd_loss_module._divergence_rows(s, t, divergence, beta, True)
        loss, grad = kd_loss_triton.divergence_rows_triton(
            student.clone(), teacher, divergence, beta, 1.5, scale, block_v=256
        )
        assert rel_err(loss, want_loss) <= 1e-5, divergence
        assert rel_err(grad, want_grad * scale.unsqueeze(1)) <= 1e-5, divergence

    # The whole loss with the Triton path selected, as it would be for CUDA inputs.
    kd_loss_module._use_triton = lambda tensor: True
    inputs = make_inputs((9, 300, 8, 12), seed=14)
    upstream = torch.randn(9, generator=torch.Generator().manual_seed(1))
    for reduction in ("mean", "none"):
        kw = dict(divergence="jsd", beta=0.3, temperature=2.0, reduction=reduction)
        got = loss_and_grads(fused_kd_loss, inputs, inputs[4], upstream, chunk_size=4, **kw)
        want = loss_and_grads(kd_loss_reference, inputs, inputs[4], upstream, **kw)
        assert_all_close(got, want)
    kw = dict(divergence="lk", temperature=2.0, reduction="sum")  # LK falls back to torch rows
    got = loss_and_grads(fused_kd_loss, inputs, inputs[4], chunk_size=4, **kw)
    assert_all_close(got, loss_and_grads(kd_loss_reference, inputs, inputs[4], **kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lk_alpha", [None, 0.3], ids=["alpha-per-row", "alpha-given"])
@pytest.mark.parametrize(("divergence", "beta"), [("fkl", 0.5), ("lk", 0.5)], ids=["fkl", "lk"])
def test_row_weights_and_the_lk_alpha_match_reference(divergence, beta, lk_alpha, reduction):
    """Per-row weights (the position weighting's) and a given LK α (the batch's) in one pass."""
    inputs = make_inputs(ODD, seed=15)
    weights = torch.rand(ODD[0], generator=torch.Generator().manual_seed(2)) * 2
    upstream = torch.randn(ODD[0], generator=torch.Generator().manual_seed(3))
    upstream = upstream if reduction == "none" else None
    kw = dict(divergence=divergence, beta=beta, reduction=reduction, weights=weights)
    kw |= dict(lk_eta=2.0, lk_alpha=lk_alpha)
    got = loss_and_grads(fused_kd_loss, inputs, inputs[4], upstream, chunk_size=5, **kw)
    want = loss_and_grads(kd_loss_reference, inputs, inputs[4], upstream, **kw)
    assert_all_close(got, want)
    plain = fused_kd_loss(*inputs[:4], mask=inputs[4], divergence=divergence, reduction=reduction)
    assert not torch.allclose(got[0], plain.detach(), rtol=1e-3)  # the weights count


def test_lk_is_kl_at_eta_0_and_leans_to_tv_as_alpha_grows():
    inputs = make_inputs(ODD, seed=16)
    kl = loss_and_grads(fused_kd_loss, inputs, divergence="fkl", reduction="sum")
    tv = loss_and_grads(fused_kd_loss, inputs, divergence="tvd", reduction="sum")
    assert_all_close(
        loss_and_grads(fused_kd_loss, inputs, divergence="lk", lk_eta=0.0, reduction="sum"), kl
    )
    lam = math.exp(-3.0 * 0.8)  # λ of a given α = 0.8 with η = 3: mostly TV
    mixed = loss_and_grads(fused_kd_loss, inputs, divergence="lk", lk_alpha=0.8, reduction="sum")
    assert_all_close(mixed, [lam * k + (1 - lam) * t for k, t in zip(kl, tv, strict=True)])


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
def test_token_acceptance_is_the_overlap_of_the_two_distributions(temperature):
    """β = Σ_v min(p_v, q_v) per row (agreement of the argmaxes at T = 0), on an odd V; 1 for a
    draft equal to the target."""
    from specdraft.kernels import token_acceptance

    g = torch.Generator().manual_seed(3)
    th, tw = 2 * torch.randn(16, 6, generator=g), torch.randn(301, 6, generator=g)  # (N, H), (V, H)
    # a draft near the target: some argmaxes agree, and the distributions overlap in part
    dh, dw = th + 0.5 * torch.randn(16, 6, generator=g), tw + 0.3 * torch.randn(301, 6, generator=g)
    beta = token_acceptance(dh, dw, th, tw, temperature)  # (N,)
    if temperature == 0:
        want = ((dh @ dw.T).argmax(-1) == (th @ tw.T).argmax(-1)).float()
    else:
        q, p = (
            torch.softmax(dh @ dw.T / temperature, -1),
            torch.softmax(th @ tw.T / temperature, -1),
        )
        want = torch.minimum(p, q).sum(-1)
    torch.testing.assert_close(beta, want, atol=1e-5, rtol=1e-5)
    assert 0 < float(want.mean()) < 1  # the rows are neither identical nor disjoint
    same = token_acceptance(th, tw, th, tw, temperature)
    torch.testing.assert_close(same, torch.ones(16), atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_under_interpreter():
    # TRITON_INTERPRET must be set before triton is first imported, hence a fresh process.
    code = "import test_kd_loss as t; t._triton_interpreter_checks()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
