"""The target's stored top-k (target_outputs.format=topk): the KD losses over its ids and one tail
bucket equal the full-distribution losses at k = V (values and gradients) and are worked by hand
on a small vocabulary below it; training, ΔL and held-out alpha read it; the stage is keyed by
format and k and shared across drafts; a damaged shard is caught like any artifact."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from test_target_outputs import stored_outputs, train
from test_training import Gradients, Tok, sequences, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_reference import kd_loss_reference  # noqa: E402

from specdraft.cli import shipped_job  # noqa: E402
from specdraft.kernels import token_acceptance  # noqa: E402
from specdraft.kernels.kd_loss import TopkTargets, fused_topk_kd_loss, topk_overlap  # noqa: E402
from specdraft.pipeline.config import ConfigError, load_job  # noqa: E402
from specdraft.pipeline.engine.dag import plan  # noqa: E402
from specdraft.pipeline.engine.job import build_stages  # noqa: E402
from specdraft.pipeline.objectives import KDOptions, target_acceptance  # noqa: E402
from specdraft.pipeline.stages.distil import BestAlphaCheckpoint  # noqa: E402
from specdraft.pipeline.stages.target_outputs import target_topk_rows  # noqa: E402
from specdraft.pipeline.stored_target_outputs import (  # noqa: E402
    StoredTopkOutputs,
    load_target_outputs,
    mapped_topk,
    topk_bytes_per_token,
    topk_log_probs,
    topk_prefix,
    write_topk_outputs,
)

ODD = (37, 1001, 24, 40)  # (N, V, Hs, Ht): odd, non-power-of-two
DIVERGENCES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("tvd", 0.5), ("lk", 0.5)]


def make_inputs(shape=ODD, seed=0):
    n, v, hs, ht = shape
    gen = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=gen)
    sw = torch.randn(v, hs, generator=gen) * (3 / hs**0.5)
    th = torch.randn(n, ht, generator=gen)
    tw = torch.randn(v, ht, generator=gen) * (3 / ht**0.5)
    mask = torch.rand(n, generator=gen) < 0.7
    return sh, sw, th, tw, mask


def exact_topk(th, tw, k, temperature=1.0) -> TopkTargets:
    """The target's top-k in fp32 (no storage rounding): what the loss is judged on."""
    log_p = torch.log_softmax((th @ tw.T).float() / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    rest = log_p.scatter(1, top.indices, -math.inf).logsumexp(dim=-1)
    return TopkTargets(top.indices.int(), top.values, rest)


def grads(fn, sh, sw, upstream=None):
    a, b = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    loss = fn(a, b)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_at_k_equal_v_the_topk_loss_is_the_full_loss(divergence, beta, reduction, temperature):
    sh, sw, th, tw, mask = make_inputs()
    target = exact_topk(th, tw, ODD[1], temperature)
    weights = torch.rand(ODD[0], generator=torch.Generator().manual_seed(3)) + 0.5
    upstream = torch.randn(ODD[0]) if reduction == "none" else None
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction)
    got = grads(
        lambda a, b: fused_topk_kd_loss(
            a, b, target, mask=mask, weights=weights, chunk_size=8, **opts
        ),
        sh,
        sw,
        upstream,
    )
    want = grads(
        lambda a, b: kd_loss_reference(a, b, th, tw, mask=mask, weights=weights, **opts),
        sh,
        sw,
        upstream,
    )
    assert want[1].abs().max() > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lk_alpha", [None, 0.35])
def test_lk_at_k_equal_v_with_a_batch_alpha(lk_alpha):
    sh, sw, th, tw, _ = make_inputs((20, 96, 8, 8), seed=1)
    target = exact_topk(th, tw, 96)
    opts = dict(divergence="lk", lk_eta=3.0, lk_alpha=lk_alpha, reduction="sum")
    got = grads(lambda a, b: fused_topk_kd_loss(a, b, target, chunk_size=7, **opts), sh, sw)
    want = grads(lambda a, b: kd_loss_reference(a, b, th, tw, **opts), sh, sw)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_a_topk_mapped_into_a_drafts_rows_at_k_equal_v_is_the_restricted_full_loss(
    divergence, beta, temperature
):
    """k = V mapped into a draft that holds a third of the target's ids (a trimmed or foreign
    vocabulary, rows in its own order): values and gradients equal the full loss against the
    target restricted to those ids and renormalised, what the hidden-state path compares."""
    sh, sw, th, tw, mask = make_inputs()
    vocab = ODD[1]
    into = torch.randperm(vocab, generator=torch.Generator().manual_seed(5))[: vocab // 3]
    target = mapped_topk(exact_topk(th, tw, vocab, temperature), into, vocab)
    assert (target.ids < 0).any() and target.ids.shape[1] > len(into)
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, reduction="sum")
    draft_w = sw[into]  # (I, Hs)
    got = grads(
        lambda a, b: fused_topk_kd_loss(a, b, target, mask=mask, chunk_size=8, **opts), sh, draft_w
    )
    want = grads(lambda a, b: kd_loss_reference(a, b, th, tw[into], mask=mask, **opts), sh, draft_w)
    assert want[1].abs().max() > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    beta_got = topk_overlap(sh, draft_w, target, temperature)
    beta_want = token_acceptance(sh, draft_w, th, tw[into], temperature)
    torch.testing.assert_close(beta_got, beta_want, atol=1e-5, rtol=1e-4)


def test_a_mapped_topk_on_hand_made_distributions():
    """Target p = (.5, .3, .15, .05) over ids 0..3, stored top-2 {0, 1} and tail .2; a draft that
    holds ids 1, 2, 3 only (rows 0, 1, 2), q = (.5, .3, .2). Id 0 is dropped: buckets p (.3 | .2)
    renormalised to (.6 | .4), q (.5 | .5): fkl .6 log(.6/.5) + .4 log(.4/.5). A row whose stored
    ids the draft lacks entirely has nothing to compare: loss 0, gradient 0."""
    stored = TopkTargets(
        torch.tensor([[0, 1], [0, 0]]),
        torch.tensor([[0.5, 0.3], [0.5, 0.5]]).log(),
        torch.tensor([0.2, 1e-9]).log(),
    )
    target = mapped_topk(stored, torch.tensor([1, 2, 3]), 4)
    assert target.ids.tolist() == [[-1, 0], [-1, -1]]
    sh, sw = _one_hot_draft(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    loss, grad_h, _ = grads(lambda a, b: fused_topk_kd_loss(a, b, target, reduction="none"), sh, sw)
    want = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert loss.tolist() == pytest.approx([want, 0.0], abs=1e-6)
    # fkl's gradient q − p̃: row 0 (.5 − .6, then the tail's .4 spread as q's tail is, .6/.4)
    expected = torch.tensor([[0.5 - 0.6, 0.3 - 0.24, 0.2 - 0.16], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grad_h, expected, atol=1e-6, rtol=0)
    overlap = topk_overlap(sh, sw, target)
    assert overlap.tolist() == pytest.approx([0.5, 0.0], abs=1e-6)  # min(.6, .5) on id 1


def rel_err(got, truth) -> float:
    return float((got.float() - truth.float()).norm() / truth.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("divergence", ["fkl", "lk"])
def test_a_bf16_draft_errs_no_more_than_the_naive_bf16_loss(divergence):
    """A bf16 draft against the stored top-k at k = V, judged on the fp32 ground truth."""
    sh, sw, th, tw, mask = (x.bfloat16() if x.is_floating_point() else x for x in make_inputs())
    target = exact_topk(th.float(), tw.float(), ODD[1])
    opts = dict(divergence=divergence, mask=mask, reduction="sum")
    truth = grads(
        lambda a, b: kd_loss_reference(a, b, th.float(), tw.float(), **opts), sh.float(), sw.float()
    )
    naive = grads(lambda a, b: kd_loss_reference(a, b, th.float(), tw.float(), **opts), sh, sw)
    fused = grads(lambda a, b: fused_topk_kd_loss(a, b, target, chunk_size=8, **opts), sh, sw)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    for name, f, n, t in zip(
        ("loss", "grad hidden", "grad weight"), fused, naive, truth, strict=True
    ):
        assert rel_err(f, t) <= rel_err(n, t) + 2e-3, name


def _one_hot_draft(q: torch.Tensor):
    """Draft hidden states log q (N, V) and an identity head: its logits are log q."""
    return q.log(), torch.eye(q.shape[1])


def test_the_tail_bucket_on_hand_made_distributions():
    """p = (.5, .3, .15, .05), q = (.4, .2, .3, .1), k = 2: buckets p (.5, .3 | .2) and
    q (.4, .2 | .4). fkl's gradient is q − p̃ with the tail's .2 spread as q's tail is (.75/.25)."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    q = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    target = TopkTargets(torch.tensor([[0, 1]]), p[:, :2].log(), torch.tensor([0.2]).log())
    sh, sw = _one_hot_draft(q)
    kl = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    loss, grad_h, _ = grads(lambda a, b: fused_topk_kd_loss(a, b, target, reduction="sum"), sh, sw)
    assert float(loss) == pytest.approx(kl, abs=1e-6)
    expected = torch.tensor([[0.4 - 0.5, 0.2 - 0.3, 0.3 - 0.15, 0.1 - 0.05]])
    torch.testing.assert_close(grad_h, expected, atol=1e-6, rtol=0)
    tv = fused_topk_kd_loss(sh, sw, target, divergence="tvd", reduction="sum")
    assert float(tv) == pytest.approx(0.5 * (0.1 + 0.1 + 0.2), abs=1e-6)
    # the full distributions: TV 0.5 (.1 + .1 + .15 + .05) = 0.2 as well; KL is larger
    full_kl = float((p * (p / q).log()).sum())
    assert full_kl > kl


def test_acceptance_over_the_stored_ids_is_a_lower_bound_exact_at_k_equal_v():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    q = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    target = TopkTargets(torch.tensor([[0, 1]]), p[:, :2].log(), torch.tensor([0.2]).log())
    assert float(topk_overlap(*_one_hot_draft(q), target)) == pytest.approx(0.6, abs=1e-6)
    sh, sw, th, tw, _ = make_inputs((30, 200, 12, 12), seed=4)
    full = token_acceptance(sh, sw, th, tw, 1.3)
    for k in (4, 50):
        part = target_acceptance(sh, sw, exact_topk(th, tw, k, 1.3), None, 1.3)
        assert (part <= full + 1e-6).all() and part.mean() > 0
    whole = target_acceptance(sh, sw, exact_topk(th, tw, 200, 1.3), None, 1.3)
    torch.testing.assert_close(whole, full, atol=1e-5, rtol=1e-5)


def test_lk_per_token_lambda_reads_the_acceptance_over_the_stored_ids():
    """Below k = V the LK hybrid's λ = exp(−η β_S), β_S = Σ_S min(p, q), on the bucketed terms."""
    sh, sw, th, tw, _ = make_inputs((25, 120, 8, 8), seed=5)
    target = exact_topk(th, tw, 10)

    def composed(a, b):
        kl = fused_topk_kd_loss(a, b, target, divergence="fkl", reduction="none")
        tv = fused_topk_kd_loss(a, b, target, divergence="tvd", reduction="none")
        lam = torch.exp(-3.0 * topk_overlap(a, b, target))
        return lam * kl + (1 - lam) * tv

    upstream = torch.rand(25) + 0.5
    got = grads(
        lambda a, b: fused_topk_kd_loss(a, b, target, divergence="lk", reduction="none"),
        sh,
        sw,
        upstream,
    )
    want = grads(composed, sh, sw, upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_bucketed_divergences_never_exceed_the_full_ones():
    sh, sw, th, tw, _ = make_inputs((30, 200, 12, 12), seed=2)
    for divergence in ("fkl", "tvd", "rkl"):
        full = kd_loss_reference(sh, sw, th, tw, divergence=divergence, reduction="none")
        previous = torch.zeros_like(full)
        for k in (1, 8, 64, 199, 200):
            part = fused_topk_kd_loss(
                sh, sw, exact_topk(th, tw, k), divergence=divergence, reduction="none"
            )
            assert (part <= full + 1e-5).all(), (divergence, k)
            if divergence != "rkl":  # finer buckets only add (data processing, nested supports)
                assert (part >= previous - 1e-5).all(), (divergence, k)
            previous = part
        torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


def test_all_masked_gives_zero_loss_and_zero_grads():
    sh, sw, th, tw, _ = make_inputs((9, 50, 6, 6))
    target = exact_topk(th, tw, 5)
    mask = torch.zeros(9, dtype=torch.bool)
    loss, gh, gw = grads(lambda a, b: fused_topk_kd_loss(a, b, target, mask=mask), sh, sw)
    assert float(loss) == 0 and not gh.any() and not gw.any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t._replace(ids=t.ids + 50), r"ids must lie in \[0, 50\)"),
        (lambda t: t._replace(ids=t.ids.float()), "ids must be integers"),
        (lambda t: t._replace(log_rest=t.log_rest[:-1]), "log_rest"),
    ],
    ids=["out-of-range", "float-ids", "short-rest"],
)
def test_bad_targets_are_refused(change, message):
    sh, sw, th, tw, _ = make_inputs((9, 50, 6, 6))
    with pytest.raises(ValueError, match=message):
        fused_topk_kd_loss(sh, sw, change(exact_topk(th, tw, 5)))


def test_stored_values_are_fp16_and_the_tail_is_the_rest_of_the_mass():
    _, _, th, tw, _ = make_inputs((40, 300, 8, 16))
    stored = topk_log_probs(th, tw, 16, temperature=1.3)
    exact = exact_topk(th, tw, 16, temperature=1.3)
    assert stored.ids.dtype == torch.int32 and stored.logprobs.dtype == torch.float16
    assert torch.equal(stored.ids, exact.ids)
    mass = stored.logprobs.float().exp().sum(1) + stored.log_rest.float().exp()
    torch.testing.assert_close(mass, torch.ones(40), atol=2e-3, rtol=0)
    torch.testing.assert_close(stored.log_rest.float(), exact.log_rest, atol=1e-2, rtol=1e-3)
    whole = topk_log_probs(th, tw, 300, temperature=1.0)
    assert torch.isneginf(whole.log_rest).all()  # k = V: nothing left outside


def test_a_store_read_at_a_smaller_k_is_the_store_made_at_it():
    _, _, th, tw, _ = make_inputs((40, 300, 8, 16))
    stored = topk_log_probs(th, tw, 64, temperature=1.3)
    for k in (1, 8, 32):
        read, made = topk_prefix(stored, k), topk_log_probs(th, tw, k, temperature=1.3)
        assert torch.equal(read.ids, made.ids) and torch.equal(read.logprobs, made.logprobs)
        assert read.log_rest.dtype == torch.float16
        # the folded tail sums fp16 values: within their rounding of the directly stored one
        torch.testing.assert_close(read.log_rest.float(), made.log_rest.float(), atol=4e-3, rtol=0)
    assert topk_prefix(stored, 64) is stored and topk_prefix(stored, 500) is stored
    whole = topk_log_probs(th, tw, 300, temperature=1.0)  # k = V: the tail is empty until folded
    assert torch.isfinite(topk_prefix(whole, 299).log_rest).all()


def test_a_store_is_read_in_part_and_refused_beyond_what_it_holds(tmp_path):
    teacher, data = tiny_llama(1, hidden=32, layers=2), sequences(7)
    stored, _ = topk_outputs(teacher, data, tmp_path / "topk", k=8)
    part = load_target_outputs(tmp_path / "topk", temperature=1.0, k=3)
    assert part.k == 3 and torch.equal(part.target.ids, stored.target.ids[:, :3])
    mass = part.target.logprobs.float().exp().sum(1) + part.target.log_rest.float().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=3e-3, rtol=0)
    assert load_target_outputs(tmp_path / "topk", temperature=1.0, k=8).k == 8
    with pytest.raises(ValueError, match="holds 8 ids a token"):
        load_target_outputs(tmp_path / "topk", temperature=1.0, k=9)
    stored_outputs(teacher, data, tmp_path / "hidden")
    with pytest.raises(ValueError, match="this one holds hidden states"):
        load_target_outputs(tmp_path / "hidden", temperature=1.0, k=3)


def topk_outputs(teacher, data, folder, k, temperature=1.0):
    class Cfg:
        batch_size, precision = 5, "fp32"

    Cfg.k, Cfg.temperature = k, temperature
    rows = target_topk_rows(teacher, data, Tok.pad_token_id, Cfg, vocab=len(Tok()))
    folder.mkdir(parents=True, exist_ok=True)
    info = write_topk_outputs(folder, rows, k=min(k, 40), vocab=len(Tok()), temperature=temperature)
    return StoredTopkOutputs.load(folder), info


def test_the_stage_rows_and_manifest(tmp_path):
    teacher, data = tiny_llama(1, hidden=32, layers=2), sequences(11)
    stored, info = topk_outputs(teacher, data, tmp_path, k=8)
    assert info["bytes_per_token"] == topk_bytes_per_token(8) == 50
    assert info["k"] == 8 and info["vocab"] == 40 and info["rows"] == 11
    assert 0 < info["tail_mass_mean"] <= info["tail_mass_max"] < 1
    hidden = stored_outputs(teacher, data, tmp_path / "hidden")
    r = 6
    rows = hidden.hidden[hidden.offsets[r] : hidden.offsets[r + 1]]
    expected = topk_log_probs(rows, hidden.head[:40], 8, 1.0)
    got = stored.target.ids[stored.offsets[r] : stored.offsets[r + 1]]
    assert torch.equal(got, expected.ids)
    assert load_target_outputs(tmp_path, temperature=1.0).k == 8
    with pytest.raises(ValueError, match="at temperature 1.0, this stage distils at 2.0"):
        load_target_outputs(tmp_path, temperature=2.0)
    assert load_target_outputs(tmp_path, temperature=None).temperature == 1.0  # its own


def test_a_k_above_the_vocabulary_stores_all_of_it(tmp_path):
    teacher, data = tiny_llama(1, hidden=32), sequences(5)
    stored, info = topk_outputs(teacher, data, tmp_path, k=1000)
    assert stored.k == info["k"] == 40
    assert torch.isneginf(stored.target.log_rest).all()


def test_topk_shards_split_by_size_and_load_whole(tmp_path, monkeypatch):
    import specdraft.pipeline.stored_target_outputs as stored_target_outputs

    teacher, data = tiny_llama(1, hidden=32), sequences(12)
    whole, info = topk_outputs(teacher, data, tmp_path / "one", k=8)
    monkeypatch.setattr(stored_target_outputs, "SHARD_BYTES", info["tokens"] * 50 // 3)
    sharded, _ = topk_outputs(teacher, data, tmp_path / "many", k=8)
    files = sorted(p.name for p in (tmp_path / "many").glob("topk-*"))
    assert len(files) >= 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert sharded.offsets == whole.offsets
    for a, b in zip(sharded.target, whole.target, strict=True):
        assert torch.equal(a, b)
    (tmp_path / "many" / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match="topk shards"):
        StoredTopkOutputs.load(tmp_path / "many")


@pytest.mark.parametrize(
    "options",
    [{"divergence": "fkl"}, {"selection": "top", "k": 0.4}, {"divergence": "lk"}],
    ids=["fkl", "top", "lk"],
)
def test_training_on_the_full_topk_follows_training_on_hidden_states(tmp_path, options):
    """k = V: the stored top-k is the target's whole distribution, rounded to fp16, so training,
    the selection's ΔL and the LK's λ follow the hidden-state store's within that rounding."""
    teacher, base, reference = tiny_llama(1, hidden=32, layers=2), tiny_llama(2), tiny_llama(3)
    data = sequences(16)
    hidden = stored_outputs(teacher, data, tmp_path / "hidden")
    stores = {
        "hidden": hidden,
        "topk": full_topk_in_fp32(hidden),
        "topk-fp16": topk_outputs(teacher, data, tmp_path / "topk", k=40)[0],
    }
    results = {}
    for how, stored in stores.items():
        steps = Gradients()
        history, selection = train(
            copy.deepcopy(base),
            teacher,
            data,
            tmp_path / how,
            stored=stored,
            reference=reference if options.get("selection") else None,
            options=KDOptions(**options),
            callbacks=[steps],
        )
        results[how] = (history, selection, steps.steps)
    (h_hist, h_sel, h_grads), (t_hist, t_sel, t_grads) = results["hidden"], results["topk"]
    assert [h["loss"] for h in t_hist] == pytest.approx([h["loss"] for h in h_hist], rel=1e-5)
    assert t_sel["kept"] == h_sel["kept"]
    for got, want in zip(t_grads, h_grads, strict=True):
        assert want.norm() > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # as stored (fp16 log-probabilities): the same losses within fp16's rounding
    fp16 = [h["loss"] for h in results["topk-fp16"][0]]
    assert fp16 == pytest.approx([h["loss"] for h in h_hist], rel=2e-3)


def full_topk_in_fp32(hidden) -> StoredTopkOutputs:
    """A hidden-state store's whole distribution (k = V) as a top-k store, without fp16."""
    head = hidden.head[: len(Tok())]
    tokens = torch.tensor(hidden.offsets).diff()
    target = exact_topk(hidden.hidden, head, head.shape[0])
    return StoredTopkOutputs(target, tokens, vocab=head.shape[0], temperature=1.0, device="cpu")


def test_training_on_a_small_k_raises_alpha(tmp_path):
    teacher, model, data = tiny_llama(1, hidden=32, layers=2), tiny_llama(2), sequences(16)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a peaked target: the untrained draft's alpha is low
    stored, _ = topk_outputs(teacher, data, tmp_path / "topk", k=4)
    hidden = stored_outputs(teacher, data, tmp_path / "hidden")
    rows = list(data.add_column("row", list(range(len(data)))))
    judge = BestAlphaCheckpoint(None, rows, 0, 1, 1.0, target_outputs=hidden)
    before = judge.alpha(model)
    assert before < 0.6
    train(model, teacher, data, tmp_path / "run", stored=stored, steps=24)
    assert judge.alpha(model) > before + 0.05


def test_held_out_alpha_from_the_full_topk_equals_the_hidden_one(tmp_path):
    teacher, model, data = tiny_llama(1, hidden=32, layers=2), tiny_llama(2), sequences(9)
    hidden = stored_outputs(teacher, data, tmp_path / "hidden")
    topk, _ = topk_outputs(teacher, data, tmp_path / "topk", k=40, temperature=1.5)
    rows = list(data.add_column("row", list(range(len(data)))))
    from_hidden = BestAlphaCheckpoint(None, rows, 0, 1, 1.5, target_outputs=hidden).alpha(model)
    from_topk = BestAlphaCheckpoint(None, rows, 0, 1, 1.5, target_outputs=topk).alpha(model)
    assert 0 < from_hidden < 1
    assert from_topk == pytest.approx(from_hidden, abs=2e-3)


def _keys(tmp_path, *overrides) -> dict[str, str]:
    job = load_job(shipped_job("demo.yaml"), ["generate.draft_fraction=0", *overrides])
    return {stage.name: key for stage, key, _ in plan(build_stages(job), tmp_path)}


def test_the_stage_is_keyed_by_format_and_k_and_shared_across_drafts(tmp_path):
    hidden = _keys(tmp_path)
    topk = _keys(tmp_path, "target_outputs.format=topk")
    other_k = _keys(tmp_path, "target_outputs.format=topk", "target_outputs.k=32")
    assert len({hidden["target_outputs"], topk["target_outputs"], other_k["target_outputs"]}) == 3
    # k means nothing to the hidden states: it does not split their store
    assert _keys(tmp_path, "target_outputs.k=32")["target_outputs"] == hidden["target_outputs"]
    # other draft shapes, recipes and seeds of distil read the same top-k store
    for change in (
        "draft.arch.hidden_size=96",
        "draft.arch.num_layers=4",
        "draft.from_target_layers=1",
        "distil.divergence=fkl",
        "distil.selection=top",
        "draft.keep_vocab=200",
    ):
        other = _keys(tmp_path, "target_outputs.format=topk", change)
        assert other["target_outputs"] == topk["target_outputs"]
        assert other["distil"] != topk["distil"]


def test_reading_a_store_in_part_keys_distil_only(tmp_path):
    full = _keys(tmp_path, "target_outputs.format=topk")
    part = _keys(tmp_path, "target_outputs.format=topk", "distil.stored_k=32")
    assert part["target_outputs"] == full["target_outputs"] and part["distil"] != full["distil"]


@pytest.mark.parametrize("kind", ["hidden", "topk"])
def test_workers_share_out_the_parts_and_store_the_same_rows(tmp_path, monkeypatch, kind):
    """target_outputs.resources.workers=3 over parts of 4 of the tiny job's sequences (run here,
    one shard after another, as map_shards runs them outside a Ray cluster): every part once, in
    order, and the same stored tensors as one worker."""
    from conftest import TINY

    from specdraft.pipeline.engine.dag import execute
    from specdraft.pipeline.stages import target_outputs as stage

    monkeypatch.setattr(stage, "PART_SEQUENCES", 4)
    shards: list[list] = []
    monkeypatch.setattr(
        stage,
        "map_shards",
        lambda fn, args, resources, ctx: [shards.append(a[2]) or fn(*a) for a in args],
    )  # a[2]: the shard's parts
    wanted = ("data", "target", "generate", "target_outputs")
    settings = [*TINY, "generate.draft_fraction=0", f"target_outputs.format={kind}"]
    stored = []
    for workers in (1, 3):
        change = f"target_outputs.workers={workers}"
        job = load_job(shipped_job("demo.yaml"), [*settings, change])
        stages = [s for s in build_stages(job) if s.name in wanted]
        made = execute(stages, tmp_path / f"store-{workers}", use_ray=False, say=lambda _: None)
        stored.append(made["target_outputs"])
    one, three = stored
    assert three.manifest["info"]["workers"] == 3
    parts = [bounds for shard in shards[1:] for bounds in shard]
    assert len(shards) == 4 and shards[0] == parts  # one worker's parts == three's, in order
    assert parts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    files = [sorted(p.name for p in s.path.glob("*.safetensors")) for s in stored]
    assert files[0] == files[1] and files[0]
    from safetensors.torch import load_file

    for name in files[0]:
        a, b = load_file(one.path / name), load_file(three.path / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distil.stored_target_outputs=false"], "runs the target live instead"),
        (["distil.fused_loss=false"], "a top-k store does not have"),
        (["target_outputs.k=16", "distil.stored_k=17"], "above target_outputs.k=16"),
    ],
    ids=["live", "unfused", "more-than-stored"],
)
def test_settings_a_topk_store_cannot_serve_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job(shipped_job("demo.yaml"), ["target_outputs.format=topk", *overrides])


def test_reading_part_of_a_hidden_state_store_is_refused():
    with pytest.raises(ConfigError, match="stored_k reads part of a top-k store"):
        load_job(shipped_job("demo.yaml"), ["distil.stored_k=8"])


@pytest.mark.integration  # tiny jobs' stages, twice, in this process
def test_two_draft_shapes_read_one_store_and_a_damaged_shard_is_made_again(tmp_path, capsys):
    """A draft-free generation: the second draft shape reuses data, target, generate and the
    top-k store and runs its own draft, reference and distil; so does a draft with a trimmed
    vocabulary (the stored ids mapped into its rows); a truncated shard is then caught on reuse,
    set aside and made again."""
    from conftest import TINY

    from specdraft.pipeline.engine.dag import execute

    wanted = (
        "data",
        "target",
        "draft_init",
        "generate",
        "target_outputs",
        "vocab_trim",
        "reference",
        "distil",
    )
    settings = [
        *TINY,
        "distil.rounds=1",
        "generate.draft_fraction=0",
        "target_outputs.format=topk",
        "target_outputs.k=16",
    ]
    runs = []
    for change in (
        "draft.arch.hidden_size=16",
        "draft.arch.hidden_size=24",
        "draft.keep_vocab=200",
    ):
        job = load_job(shipped_job("demo.yaml"), [*settings, change])
        log: list[str] = []
        stages = [s for s in build_stages(job) if s.name in wanted]
        runs.append((execute(stages, tmp_path, use_ray=False, say=log.append), log, stages))
    (first, first_log, stages), (second, second_log, _), (trimmed, trimmed_log, _) = runs

    def made(log):
        return {line.split()[0] for line in log if " started" in line}

    assert made(first_log) == set(wanted) - {"vocab_trim"}
    assert made(second_log) == {"draft_init", "reference", "distil"}
    assert made(trimmed_log) == {"vocab_trim", "reference", "distil"}
    store = first["target_outputs"].path
    assert second["target_outputs"].path == store == trimmed["target_outputs"].path
    info = first["target_outputs"].manifest["info"]
    assert info["format"] == "topk" and info["bytes_per_token"] == topk_bytes_per_token(16)
    for run in (first, second, trimmed):
        assert run["distil"].manifest["inputs"]["target_outputs"] == str(store)
    assert trimmed["distil"].manifest["info"]["intersection"] == 199  # and an added unk
    shard = next(store.glob("topk-*.safetensors"))
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 7)
    log = []
    again = execute(stages, tmp_path, use_ray=False, say=log.append, force=set())
    assert f"{shard.name} has" in capsys.readouterr().err
    assert made(log) >= {"target_outputs"}
    assert StoredTopkOutputs.load(again["target_outputs"].path).k == 16


@pytest.mark.parametrize("kind", ["hidden", "topk"])
def test_the_stage_resumes_from_its_finished_parts_and_runs_a_damaged_one_again(
    tmp_path, monkeypatch, kind
):
    """rows_in_parts, as the target_outputs stage runs it (parts of 4 of 11 sequences): killed in
    its second part, a second attempt reads the first part back and runs only the other two; a
    truncated part is run again; the rows equal a run without checkpoints."""
    from specdraft.pipeline.stages import target_outputs as stage

    monkeypatch.setattr(stage, "PART_SEQUENCES", 4)
    teacher, data = tiny_llama(1, hidden=32, layers=2), sequences(11)

    class Cfg:
        batch_size, precision, k, temperature = 5, "fp32", 8, 1.0

    def rows_of(part):
        if kind == "topk":
            return stage.target_topk_rows(teacher, part, Tok.pad_token_id, Cfg, vocab=40)
        return stage.target_hidden_rows(teacher, part, Tok.pad_token_id, 5, "fp32")[0]

    calls: list[int] = []

    def compute(part, fail_at=None):
        calls.append(len(part))
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        return rows_of(part)

    whole = stage.rows_in_parts(data, rows_of, None)
    folder = tmp_path / ".ckpt-target_outputs"
    with pytest.raises(KeyboardInterrupt):
        stage.rows_in_parts(data, lambda part: compute(part, fail_at=2), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["part-0000000-0000004.safetensors"]
    calls.clear()
    resumed = stage.rows_in_parts(data, compute, folder)
    assert calls == [4, 3]  # the first part read back, not run

    def flat(rows):
        return [t for row in rows for t in (row if isinstance(row, tuple) else (row,))]

    assert len(resumed) == len(whole) == 11
    for got, want in zip(flat(resumed), flat(whole), strict=True):
        torch.testing.assert_close(got, want)
    part = folder / "part-0000004-0000008.safetensors"
    part.write_bytes(part.read_bytes()[:-9])
    calls.clear()
    again = stage.rows_in_parts(data, compute, folder)
    assert calls == [4]
    for got, want in zip(flat(again), flat(whole), strict=True):
        torch.testing.assert_close(got, want)


def test_the_reference_distils_at_the_temperature_of_the_store_it_reads(tmp_path):
    """A top-k store made at distil.temperature 0.5 (the gemma3 job's): the reference stage reads
    it at 0.5, where the store's log-probabilities are; a hidden-state store leaves it at 1."""
    from conftest import TINY

    from specdraft.pipeline.engine.dag import execute

    wanted = ("data", "target", "generate", "target_outputs", "draft_init", "reference")
    for kind, expected in (("topk", 0.5), ("hidden", 1.0)):
        settings = ["generate.draft_fraction=0", f"target_outputs.format={kind}"]
        job = load_job(shipped_job("demo.yaml"), [*TINY, *settings, "distil.temperature=0.5"])
        stages = [s for s in build_stages(job) if s.name in wanted]
        made = execute(stages, tmp_path / "store", use_ray=False, say=lambda _: None)
        assert made["reference"].manifest["info"]["temperature"] == expected
