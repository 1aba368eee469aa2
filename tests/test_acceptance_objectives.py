"""Acceptance-aware objectives (issue 18): position weighting by block reach (D-PACE) and toward
acceptance length, the LK hybrid with one α per batch, and AdaSPEC's k chosen by held-out alpha.
Each is judged against a plain reference written here: loops over blocks, autograd for ∂τ/∂β,
full (N, V) logits for the losses."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from kd_reference import kd_divergence_reference
from test_training import Gradients, Tok, _train, sequences, tiny_llama

from specdraft.pipeline.batches import Collator
from specdraft.pipeline.config import ConfigError, TrainConfig, load_job
from specdraft.pipeline.objectives import (
    KDOptions,
    block_reach_weights,
    kd_loss_sum,
    position_weights,
    response_block_offsets,
)
from specdraft.pipeline.trainer import KDTrainer, training_args

# ---- the reference: one response at a time, one block at a time ----


def reference_weights(betas: list[list[float]], gamma: int, mode: str) -> torch.Tensor:
    """Per response (its tokens' β in order), per block of γ from its first token: reach is the
    product of the earlier βs of the block; accept_length is ∂τ/∂β_t by autograd, with
    τ = Σ_l Π_{i≤l} β_i over the block."""
    out = []
    for response in betas:
        for start in range(0, len(response), gamma):
            block = torch.tensor(response[start : start + gamma], dtype=torch.float64)
            for j in range(len(block)):
                if mode == "reach":
                    out.append(float(torch.prod(block[:j])))
                    continue
                b = block.clone().requires_grad_(True)
                tau = sum(torch.prod(b[: m + 1]) for m in range(len(b)))
                (grad,) = torch.autograd.grad(tau, b)
                out.append(float(grad[j]))
    return torch.tensor(out, dtype=torch.float64)


def test_block_offsets_count_from_each_response_start_padded_and_packed():
    rows = [
        {"input_ids": list(range(1, 10)), "response_mask": [0, 0, 0] + [1] * 6},
        {"input_ids": list(range(1, 6)), "response_mask": [0, 1, 1, 1, 1]},
    ]
    # position t predicts token t + 1: the responses give 6 and 4 counted positions
    expected = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for packed in (False, True):
        batch = Collator(0, packed=packed)(rows)
        counted = batch["labels"][:, 1:] != -100
        assert response_block_offsets(counted, 3).tolist() == expected


@pytest.mark.parametrize("mode", ["reach", "accept_length"])
@pytest.mark.parametrize("gamma", [1, 3, 4])
def test_position_weights_equal_the_block_reference(mode, gamma):
    g = torch.Generator().manual_seed(gamma)
    lengths = [7, 1, 4, 9]
    betas = [torch.rand(n, generator=g).tolist() for n in lengths]
    betas[2][1] = 0.0  # a certain failure: later tokens of the block are never reached
    betas[3][:4] = [1.0, 1.0, 1.0, 1.0]  # a certain block
    offsets = torch.cat([torch.arange(n) % gamma for n in lengths])
    flat = torch.tensor([b for r in betas for b in r])
    got = position_weights(flat, offsets, mode, gamma)
    torch.testing.assert_close(
        got.double(), reference_weights(betas, gamma, mode), atol=1e-6, rtol=1e-6
    )
    if mode == "reach":
        assert (got <= 1).all() and got[offsets == 0].eq(1).all()


def test_reach_weights_of_blocks_of_one_are_all_ones():
    beta = torch.rand(11)
    assert torch.equal(
        block_reach_weights(beta, torch.zeros(11, dtype=torch.long), 1), torch.ones(11)
    )


def _heads(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh, sw = torch.randn(n, 8, generator=g, requires_grad=True), torch.randn(24, 8, generator=g)
    th, tw = torch.randn(n, 6, generator=g), torch.randn(24, 6, generator=g)
    return sh, sw.requires_grad_(True), th, tw


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd", "lk", "ce"])
@pytest.mark.parametrize("fused", [True, False])
def test_weighted_loss_equals_full_logits_reference_values_and_gradients(divergence, fused):
    sh, sw, th, tw = _heads()
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    weights = torch.rand(10, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 24, (10,), generator=torch.Generator().manual_seed(4))
    opts = KDOptions(divergence=divergence, temperature=1.5, fused=fused)
    loss = kd_loss_sum(sh, sw, th, tw, keep, opts, labels, weights=weights.requires_grad_(True))
    s_logits, t_logits = sh @ sw.T, (th @ tw.T).detach()
    if divergence == "ce":
        per_row = torch.nn.functional.cross_entropy(s_logits / 1.5, labels, reduction="none")
    elif divergence == "lk":
        kl = kd_divergence_reference(s_logits, t_logits, "fkl", temperature=1.5)
        tv = kd_divergence_reference(s_logits, t_logits, "tvd", temperature=1.5)
        lam = torch.exp(-3.0 * (1 - tv)).detach()
        per_row = lam * kl + (1 - lam) * tv
    else:
        per_row = kd_divergence_reference(s_logits, t_logits, divergence, temperature=1.5)
    expected = (per_row * keep * weights.detach()).sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(loss, (sh, sw), retain_graph=True)
    want = torch.autograd.grad(expected, (sh, sw))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not loss.requires_grad or loss.grad_fn is not None
    # the weights are constants: no gradient reaches them
    assert torch.autograd.grad(loss, weights, allow_unused=True)[0] is None


@pytest.mark.parametrize("divergence", ["fkl", "lk", "ce"])
def test_all_ones_weights_reproduce_the_plain_loss(divergence):
    sh, sw, th, tw = _heads()
    keep = torch.tensor([True, False] * 5)
    labels = torch.randint(0, 24, (10,), generator=torch.Generator().manual_seed(4))
    opts = KDOptions(divergence=divergence)
    plain = kd_loss_sum(sh, sw, th, tw, keep, opts, labels)
    ones = kd_loss_sum(sh, sw, th, tw, keep, opts, labels, weights=torch.ones(10))
    torch.testing.assert_close(ones, plain, atol=0, rtol=1e-6)
    for a, b in zip(
        torch.autograd.grad(plain, (sh, sw)), torch.autograd.grad(ones, (sh, sw)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)


def test_lk_with_one_alpha_per_batch_is_one_lambda_for_all_tokens():
    sh, sw, th, tw = _heads()
    keep = torch.tensor([True, True, False] * 3 + [True])
    opts = KDOptions(divergence="lk", lk_alpha="batch", lk_eta=2.0)
    loss = kd_loss_sum(sh, sw, th, tw, keep, opts, batch_alpha=0.3)
    s_logits, t_logits = sh @ sw.T, th @ tw.T
    kl = kd_divergence_reference(s_logits, t_logits, "fkl")
    tv = kd_divergence_reference(s_logits, t_logits, "tvd")
    lam = math.exp(-2.0 * 0.3)
    expected = ((lam * kl + (1 - lam) * tv) * keep).sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        torch.autograd.grad(loss, (sh, sw)), torch.autograd.grad(expected, (sh, sw)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="batch_alpha"):
        kd_loss_sum(sh, sw, th, tw, keep, opts)


# ---- in the trainer: the draft's own β, stop-gradient, normalised like the plain loss ----


def _trainer(tmp_path, teacher, draft, opts, reference=None):
    return KDTrainer(
        model=draft,
        args=training_args(TrainConfig(steps=1, batch_size=4), tmp_path, 0, use_cpu=True),
        train_dataset=sequences(4),
        data_collator=Collator(0),
        teacher=teacher,
        reference=reference,
        options=opts,
        vocab=len(Tok()),
    )


@pytest.mark.parametrize("mode", ["reach", "accept_length"])
def test_trainer_loss_is_the_weighted_reference_with_stop_gradient_weights(tmp_path, mode):
    """Loss and draft gradients of compute_loss equal Σ w_t·KL_t / N from full logits, with
    w_t from the reference's blocks over β_t = Σ min(p, q) held constant."""
    teacher, draft = tiny_llama(1, hidden=32), tiny_llama(2)
    temperature, gamma = 1.3, 3
    opts = KDOptions(temperature=temperature, position_weighting=mode, block_size=gamma)
    trainer = _trainer(tmp_path, teacher, draft, opts)
    rows = list(sequences(4))
    batch = Collator(0)(rows)
    loss = trainer.compute_loss(draft, batch)
    got = torch.autograd.grad(loss, [p for p in draft.parameters()])

    counted = batch["labels"][:, 1:] != -100
    s_logits = draft(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = torch.softmax(t_logits[:, :-1] / temperature, -1)
    q = torch.softmax(s_logits / temperature, -1)
    beta = torch.minimum(p, q).sum(-1).detach()  # (B, T-1)
    betas = [beta[i][counted[i]].tolist() for i in range(len(rows))]
    weights = reference_weights(betas, gamma, mode).float()
    kl = kd_divergence_reference(
        s_logits[counted], t_logits[:, :-1][counted], "fkl", temperature=temperature
    )
    expected = (weights * kl).sum() / kl.numel()
    want = torch.autograd.grad(expected, [p for p in draft.parameters()])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(weights, torch.ones_like(weights))  # the weighting did something


def test_reach_weighting_with_blocks_of_one_trains_exactly_as_none(tmp_path):
    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    grads = {}
    for mode in ("none", "reach"):
        grads[mode] = Gradients()
        opts = KDOptions(position_weighting=mode, block_size=1)
        _train(
            copy.deepcopy(base),
            teacher,
            tmp_path / mode,
            steps=2,
            options=opts,
            callbacks=[grads[mode]],
        )
    for a, b in zip(grads["none"].steps, grads["reach"].steps, strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "opts",
    [
        KDOptions(position_weighting="reach"),
        KDOptions(position_weighting="accept_length", divergence="lk"),
        KDOptions(divergence="lk", lk_alpha="batch"),
        KDOptions(position_weighting="reach", selection="top", k=0.4, scope="global"),
    ],
    ids=["reach", "accept_length+lk", "lk-batch", "reach+adaspec-global"],
)
def test_micro_batch_8_equals_2_by_accumulation_4_with_the_objectives(tmp_path, opts):
    """Weights belong to sequences and the batch α to the whole window: how the window is cut
    into micro-batches does not change the step's gradient."""
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    grads = {}
    for accum in (1, 4):
        grads[accum] = Gradients()
        _train(
            copy.deepcopy(base),
            teacher,
            tmp_path / str(accum),
            steps=2,
            accum=accum,
            reference=reference if opts.selection != "all" else None,
            options=opts,
            callbacks=[grads[accum]],
        )
    for one, four in zip(grads[1].steps, grads[4].steps, strict=True):
        assert one.norm() > 0
        torch.testing.assert_close(four, one, atol=1e-7, rtol=1e-4)


def test_the_batch_alpha_is_the_mean_acceptance_of_the_window(tmp_path):
    teacher, draft = tiny_llama(1, hidden=32), tiny_llama(2)
    opts = KDOptions(divergence="lk", lk_alpha="batch", temperature=0.7)
    trainer = _trainer(tmp_path, teacher, draft, opts)
    rows = list(sequences(6))
    window = [Collator(0)(rows[:2]), Collator(0)(rows[2:])]
    alpha = trainer.window_acceptance(window, torch.device("cpu"))
    betas = []
    with torch.no_grad():
        for batch in window:
            counted = batch["labels"][:, 1:] != -100
            logits = [
                m(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
                    counted
                ]
                for m in (teacher, draft)
            ]
            p, q = (torch.softmax(z / 0.7, -1) for z in logits)
            betas.append(torch.minimum(p, q).sum(-1))
    assert alpha == pytest.approx(float(torch.cat(betas).mean()), abs=1e-6)


@pytest.mark.parametrize("mode", ["reach", "accept_length"])
def test_position_weighted_distillation_trains(tmp_path, mode):
    teacher, model = tiny_llama(1, hidden=32), tiny_llama(2)
    history, _ = _train(
        model, teacher, tmp_path, steps=8, options=KDOptions(position_weighting=mode)
    )
    assert history[-1]["loss"] < history[0]["loss"]


# ---- AdaSPEC's k chosen by held-out alpha ----


def test_k_search_keeps_the_k_with_the_best_held_out_alpha_and_trials_are_plain_runs(tmp_path):
    from specdraft.pipeline.stages.distil import BestAlphaCheckpoint, search_k

    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    held_out = list(sequences(6, seed=9))
    judge = BestAlphaCheckpoint(teacher, held_out, 0, every=1, temperature=1.0, vocab=40).alpha
    train_cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, log_every=1)
    opts = KDOptions(selection="top", k=0.4)
    chosen, trials = search_k(
        [0.2, 1.0], 0.25, train_cfg, opts, base, teacher, reference, sequences(), Tok(), judge,
        tmp_path / "trials", seed=0,
    )  # fmt: skip
    assert [t["k"] for t in trials] == [0.2, 1.0] and {t["steps"] for t in trials} == {2}
    best = max(trials, key=lambda t: t["alpha"])
    assert chosen.k == best["k"] and chosen.selection == "top"
    assert not (tmp_path / "trials").exists()
    assert trials[0]["alpha"] != trials[1]["alpha"]
    # each trial's alpha is that of a fixed-k run of the same steps from the same draft
    for trial in trials:
        model = copy.deepcopy(base)
        cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, log_every=1)
        from specdraft.pipeline.trainer import train_kd

        train_kd(model, teacher, sequences(), Tok(), cfg, tmp_path / "fixed", 0, reference=reference,
                 options=KDOptions(selection="top", k=trial["k"]))  # fmt: skip
        assert judge(model.eval()) == pytest.approx(trial["alpha"], abs=1e-6)


# ---- bad input: one message naming both settings, exit 2, nothing written ----


@pytest.mark.parametrize(
    "overrides,names",
    [
        (
            ["distil.position_weighting=reach", "distil.divergence=ce"],
            ("position_weighting", "divergence=ce"),
        ),
        (
            ["distil.position_weighting=accept_length", "distil.divergence=ce"],
            ("accept_length", "ce"),
        ),
        (["distil.lk_alpha=batch", "distil.divergence=fkl"], ("lk_alpha=batch", "divergence=fkl")),
        (["distil.k_search=[0.2,0.4]", "distil.selection=all"], ("k_search", "selection=all")),
        (
            ["distil.selection=top", "distil.k_search=[0.4]", "distil.eval_every=0"],
            ("k_search", "eval_every=0"),
        ),
        (["distil.selection=top", "distil.k_search=[0,0.4,1.5]"], ("k_search", "(0, 1]")),
        (["distil.selection=top", "distil.k_search=[]"], ("k_search=[]", "selection=top")),
        (["distil.selection=bottom", "distil.k_search="], ("k_search=[]", "selection=bottom")),
    ],
    ids=[
        "reach-ce",
        "length-ce",
        "lkbatch-fkl",
        "ksearch-all",
        "ksearch-noeval",
        "ksearch-range",
        "ksearch-empty",
        "ksearch-empty-cli",
    ],  # fmt: skip
)
def test_an_objective_with_a_setting_it_cannot_use_is_one_problem(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    assert len(info.value.problems) == 1
    assert all(name in info.value.problems[0] for name in names)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["distil.position_weighting=reach", "distil.divergence=ce"],
            "distil.position_weighting=reach with distil.divergence=ce",
        ),
        (
            ["distil.selection=top", "distil.k_search=[]"],
            "distil.k_search=[] with distil.selection=top",
        ),
    ],
    ids=["reach-ce", "ksearch-empty"],
)
def test_bad_objective_settings_exit_2_and_write_nothing(tmp_path, overrides, message):
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "specdraft", "run", *overrides, f"store={store}",
         "--out", str(tmp_path / "o")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not store.exists() and not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_an_unset_k_search_is_the_fixed_k_and_a_grid_parses_from_the_command_line():
    assert load_job(None, ["distil.selection=top"]).distil.k_search is None
    job = load_job(None, ["distil.selection=top", "distil.k_search=0.2,0.6,1"])
    assert job.distil.k_search == [0.2, 0.6, 1.0]
    assert load_job(None, ["distil.selection=top", "distil.k_search=null"]).distil.k_search is None


@pytest.mark.integration  # a whole (tiny) job
def test_the_distil_stage_trains_the_chosen_k_and_records_the_search(tmp_path):
    """The tiny job's stages up to distil, in this process, with a k-search over two values."""
    import json

    from conftest import TINY

    from specdraft.cli import shipped_job
    from specdraft.pipeline.engine.dag import execute
    from specdraft.pipeline.engine.job import build_stages

    wanted = {"data", "target", "draft_init", "generate", "target_outputs", "reference", "distil"}
    job = load_job(
        shipped_job("demo.yaml"),
        [
            *TINY,
            "distil.rounds=1",
            "distil.selection=top",
            "distil.k_search=[0.4,1.0]",
            "distil.train.steps=4",
        ],
    )
    stages = [s for s in build_stages(job) if s.name in wanted]
    result = execute(stages, tmp_path, use_ray=False, say=lambda line: None)["distil"]
    info = result.manifest["info"]
    assert [t["k"] for t in info["k_search"]] == [0.4, 1.0]
    assert {t["steps"] for t in info["k_search"]} == {1}  # ceil(0.25 x 4)
    assert info["k"] == max(info["k_search"], key=lambda t: t["alpha"])["k"]
    assert json.loads((result.path / "selection.json").read_text())["k"] == info["k"]
    assert json.loads((result.path / "k_search.json").read_text())["k"] == info["k"]
    assert not (result.path / "k_search").exists()  # the trials' Trainer output is gone
