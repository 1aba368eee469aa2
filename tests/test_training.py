"""Training math: token selection, KD training with LoRA, gradient-accumulation invariance."""

import copy
import math
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from specdraft.pipeline.config import LoraConfig, TrainConfig
from specdraft.pipeline.objectives import KDOptions, select_tokens_by_loss_gap
from specdraft.pipeline.stages.distil import with_lora
from specdraft.pipeline.trainer import train_kd


class Tok:
    pad_token_id = 0

    def __len__(self) -> int:  # KD compares the heads over the tokenizer's ids
        return 40


def tiny_llama(seed, hidden=16, layers=1):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def sequences(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(8, 20, (1,), generator=g))
        prompt = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(1, 40, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "response_mask": [0] * prompt + [1] * (length - prompt)})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("n,k", [(10, 0.4), (37, 0.4), (5, 1.0), (7, 0.01), (1, 0.5)])
def test_selection_keeps_ceil_k_n_largest(n, k):
    delta = torch.randn(n, generator=torch.Generator().manual_seed(n))
    keep = select_tokens_by_loss_gap(delta, k)
    count = math.ceil(k * n)
    assert int(keep.sum()) == count
    assert delta[keep].min() >= delta[~keep].max() if count < n else True
    bottom = select_tokens_by_loss_gap(delta, k, mode="bottom")
    assert int(bottom.sum()) == count and (
        count == n or delta[bottom].max() <= delta[~bottom].min()
    )


def test_selection_with_ties_keeps_exact_count():
    delta = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    keep = select_tokens_by_loss_gap(delta, 0.4)
    assert keep.tolist() == [False, True, True, False, False]


def _train(model, teacher, tmp_path, steps=3, batch=8, accum=1, packing="auto", **kw):
    cfg = TrainConfig(
        steps=steps, batch_size=batch, grad_accum=accum, lr=1e-2, log_every=1, packing=packing
    )
    history, selection = train_kd(model, teacher, sequences(), Tok(), cfg, tmp_path, seed=0, **kw)
    return history, selection


@pytest.mark.parametrize("save", [[], ["lm_head"]], ids=["adapters", "adapters+head"])
def test_lora_distillation_lowers_loss_and_changes_only_adapters(tmp_path, save):
    teacher, base = tiny_llama(1, hidden=32, layers=2), tiny_llama(2)
    reference = copy.deepcopy(base)
    model = with_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, modules_to_save=save))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history, selection = _train(
        model,
        teacher,
        tmp_path,
        steps=12,
        reference=reference,
        options=KDOptions(selection="top", k=0.4),
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.35 < selection["kept"] / selection["total"] < 0.5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("lm_head" in n for n in changed) == bool(save)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    ids = torch.tensor([sequences(1, seed=9)[0]["input_ids"]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_lora_with_unknown_modules_fails_clearly():
    with pytest.raises(ValueError, match="match no module of the draft"):
        with_lora(tiny_llama(0), LoraConfig(target_modules=["c_attn"]))


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    one, four = copy.deepcopy(base), copy.deepcopy(base)
    _train(one, teacher, tmp_path / "a", steps=2, batch=8, accum=1)
    _train(four, teacher, tmp_path / "b", steps=2, batch=8, accum=4)
    moved = False
    for (name, p1), (_, p4), (_, p0) in zip(
        one.named_parameters(), four.named_parameters(), base.named_parameters(), strict=True
    ):
        assert torch.allclose(p1, p4, atol=1e-6, rtol=1e-4), name
        moved |= not torch.equal(p1, p0)
    assert moved


def test_packed_batches_match_padded_ones_token_for_token():
    """Packing is a layout only: per-token hidden states, labels and the CE loss are unchanged."""
    from specdraft.drafts.hidden_states import hidden_and_head
    from specdraft.pipeline.batches import Collator

    model = tiny_llama(2).eval()
    rows = list(sequences(5))
    padded, packed = Collator(0)(rows), Collator(0, packed=True)(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)
    h_pad, _ = hidden_and_head(model, padded["input_ids"], padded["attention_mask"])
    h_pack, _ = hidden_and_head(model, packed["input_ids"], None, packed["position_ids"])
    counted_pad = padded["labels"][:, 1:] != -100
    counted_pack = packed["labels"][:, 1:] != -100
    assert torch.equal(padded["labels"][:, 1:][counted_pad], packed["labels"][:, 1:][counted_pack])
    assert torch.allclose(
        h_pad[:, :-1][counted_pad], h_pack[:, :-1][counted_pack], atol=1e-5
    )  # tokens attend within their own sequence only
    # whole-sequence labels (pre-training): a sequence's first token is never predicted
    lm_pad, lm_pack = Collator(0, all_tokens=True)(rows), Collator(0, True, packed=True)(rows)
    loss_pad = model(**lm_pad, use_cache=False).loss
    loss_pack = model(**lm_pack, use_cache=False).loss  # a KV cache would hide the packing
    assert torch.allclose(loss_pad, loss_pack, atol=1e-5)


@pytest.mark.parametrize("selection", ["all", "top"])
def test_packed_and_padded_training_give_the_same_update(tmp_path, selection):
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    models = {}
    for packing in ("padded", "packed"):
        models[packing] = copy.deepcopy(base)
        opts = KDOptions(selection=selection, k=0.4)
        _train(
            models[packing],
            teacher,
            tmp_path / packing,
            steps=3,
            packing=packing,
            reference=reference,
            options=opts,
        )
    moved = False
    for (name, p1), (_, p2), (_, p0) in zip(
        models["padded"].named_parameters(),
        models["packed"].named_parameters(),
        base.named_parameters(),
        strict=True,
    ):
        assert torch.allclose(p1, p2, atol=1e-5), name
        moved |= not torch.equal(p1, p0)
    assert moved


def test_packed_and_padded_cross_entropy_training_give_the_same_update(tmp_path):
    from specdraft.pipeline.trainer import train_cross_entropy

    base = tiny_llama(2)
    models = {}
    for packing in ("padded", "packed"):
        models[packing] = copy.deepcopy(base)
        cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, log_every=1, packing=packing)
        train_cross_entropy(
            models[packing], sequences(), Tok(), cfg, tmp_path / packing, seed=0, all_tokens=True
        )
        assert models[packing].config.use_cache  # restored for generation after training
    for (name, p1), (_, p2), (_, p0) in zip(
        models["padded"].named_parameters(),
        models["packed"].named_parameters(),
        base.named_parameters(),
        strict=True,
    ):
        assert torch.allclose(p1, p2, atol=1e-5), name
        assert not torch.equal(p1, p0), name


def test_global_scope_equals_microbatch_with_one_microbatch(tmp_path):
    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    reference = tiny_llama(3)
    models = {}
    for scope in ("microbatch", "global"):
        models[scope] = copy.deepcopy(base)
        opts = KDOptions(selection="top", k=0.4, scope=scope)
        _train(models[scope], teacher, tmp_path / scope, steps=3, reference=reference, options=opts)
    for (name, p1), (_, p2) in zip(
        models["microbatch"].named_parameters(), models["global"].named_parameters(), strict=True
    ):
        assert torch.allclose(p1, p2, atol=1e-6), name


def test_global_scope_thresholds_the_whole_accumulation_window(tmp_path):
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    opts = KDOptions(selection="top", k=0.25, scope="global")
    _, sel = _train(
        copy.deepcopy(base), teacher, tmp_path, steps=2, accum=4, reference=reference, options=opts
    )
    # one threshold per window: the kept share is k over the window, not per micro-batch
    assert abs(sel["kept"] / sel["total"] - 0.25) < 0.02


class Gradients(TrainerCallback):
    """The flattened gradient of every optimizer step, as the optimizer sees it."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        self.steps.append(torch.cat(grads).detach().clone())


@pytest.mark.parametrize("normalize", ["kept", "all"])
def test_micro_batch_8_equals_2_by_accumulation_4(tmp_path, normalize):
    """One threshold per window (scope=global), one denominator per window: the gradient of the
    step does not depend on how the window is cut into micro-batches."""
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    opts = KDOptions(selection="top", k=0.4, scope="global", normalize=normalize)
    grads = {}
    for accum in (1, 4):
        grads[accum] = Gradients()
        _train(
            copy.deepcopy(base),
            teacher,
            tmp_path / str(accum),
            steps=2,
            accum=accum,
            reference=reference,
            options=opts,
            callbacks=[grads[accum]],
        )
    for one, four in zip(grads[1].steps, grads[4].steps, strict=True):
        assert one.norm() > 0
        torch.testing.assert_close(four, one, atol=1e-7, rtol=1e-4)


def test_the_kd_forward_runs_in_bf16_when_asked(tmp_path):
    """precision=bf16 reaches every model's forward with one worker, as it does under DDP."""
    teacher, model, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    seen: dict[str, set] = {"draft": set(), "teacher": set(), "reference": set()}
    for name, m in (("draft", model), ("teacher", teacher), ("reference", reference)):
        layer = m.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda mod, args, out, name=name: seen[name].add(out.dtype))
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-2, log_every=1, precision="bf16")
    history, _ = train_kd(
        model,
        teacher,
        sequences(),
        Tok(),
        cfg,
        tmp_path,
        seed=0,
        reference=reference,
        options=KDOptions(selection="top", k=0.4),
    )
    assert seen == {name: {torch.bfloat16} for name in seen}
    assert math.isfinite(history[-1]["loss"])
    assert model.dtype == torch.float32  # autocast: the weights stay fp32


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_loss_gap_uses_the_distillation_temperature(tmp_path, temperature):
    from specdraft.pipeline.batches import Collator
    from specdraft.pipeline.trainer import KDTrainer, training_args

    teacher, draft, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    trainer = KDTrainer(
        model=draft,
        args=training_args(TrainConfig(steps=1, batch_size=4), tmp_path, 0, use_cpu=True),
        train_dataset=sequences(4),
        data_collator=Collator(0),
        teacher=teacher,
        reference=reference,
        options=KDOptions(selection="top", k=0.5, temperature=temperature),
    )
    batch = Collator(0)(list(sequences(4)))
    counted = batch["labels"][:, 1:] != -100

    def log_probs(model):  # (N, V) at the distillation temperature
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.log_softmax(logits[:, :-1][counted] / temperature, dim=-1)

    p, q_draft, q_ref = log_probs(teacher), log_probs(draft), log_probs(reference)
    kl_draft = (p.exp() * (p - q_draft)).sum(-1)
    kl_ref = (p.exp() * (p - q_ref)).sum(-1)
    torch.testing.assert_close(trainer.loss_gap(batch), kl_draft - kl_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("divergence", ["rkl", "jsd", "tvd", "lk", "ce"])
def test_every_divergence_trains(tmp_path, divergence):
    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    model = copy.deepcopy(base)
    history, _ = _train(model, teacher, tmp_path, steps=8, options=KDOptions(divergence=divergence))
    assert history[-1]["loss"] < history[0]["loss"]


def test_lk_hybrid_matches_its_formula():
    from specdraft.pipeline.objectives import kd_loss_sum

    g = torch.Generator().manual_seed(0)
    sh, sw = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(20, 8, generator=g)
    th, tw = torch.randn(9, 6, generator=g), torch.randn(20, 6, generator=g)
    keep = torch.tensor([True, False] * 4 + [True])
    loss = kd_loss_sum(sh, sw, th, tw, keep, KDOptions(divergence="lk", lk_eta=3.0))
    p, q = torch.softmax(th @ tw.T, -1), torch.softmax(sh @ sw.T, -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    lam = torch.exp(-3.0 * (1 - tv)).detach()
    expected = ((lam * kl + (1 - lam) * tv) * keep).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    (g1,) = torch.autograd.grad(loss, sh)
    (g2,) = torch.autograd.grad(expected, sh)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_ce_is_cross_entropy_on_the_kept_next_tokens_without_a_teacher():
    from specdraft.pipeline.objectives import kd_loss_sum

    g = torch.Generator().manual_seed(0)
    sh, sw = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (9,), generator=g)
    keep = torch.tensor([True, False] * 4 + [True])
    loss = kd_loss_sum(sh, sw, None, None, keep, KDOptions(divergence="ce"), labels)
    per_row = torch.nn.functional.cross_entropy(sh @ sw.T, labels, reduction="none")
    assert torch.allclose(loss, (per_row * keep).sum(), atol=1e-5)


@pytest.mark.parametrize("where", ["here", "remote store"])
def test_a_failed_attempt_resumes_from_its_last_checkpoint(tmp_path, request, where):
    from transformers import TrainerCallback

    from specdraft.pipeline.engine.artifacts import StageContext
    from specdraft.pipeline.engine.store import RemoteCheckpoints, Store

    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, log_every=1, save_every=2)
    store = Store(request.getfixturevalue("s3_store")) if where == "remote store" else None

    def attempt(model, folder, callbacks=()):
        mirror = RemoteCheckpoints(store, folder.name) if store else None
        ctx = StageContext(tmp_path / "out", 0, checkpoints=folder, checkpoint_mirror=mirror)
        return train_kd(
            model, teacher, sequences(), Tok(), cfg, ctx.out, 0, callbacks=callbacks, ctx=ctx
        )

    uninterrupted = copy.deepcopy(base)
    attempt(uninterrupted, tmp_path / "ckpt_a")

    class WorkerDies(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        attempt(copy.deepcopy(base), tmp_path / "ckpt_b", [WorkerDies()])
    assert (tmp_path / "ckpt_b" / "checkpoint-4").is_dir()
    if store is not None:  # the retry runs on another machine: nothing local, the store's copy
        shutil.rmtree(tmp_path / "ckpt_b")
    resumed = copy.deepcopy(base)  # a retried task starts from the stage's inputs again
    history, _ = attempt(resumed, tmp_path / "ckpt_b")
    assert [row["step"] for row in history] == [5, 6]
    for (name, p1), (_, p2) in zip(
        uninterrupted.named_parameters(), resumed.named_parameters(), strict=True
    ):
        assert torch.allclose(p1, p2, atol=1e-5), name


def test_a_resumed_attempt_keeps_the_best_alpha_found_before_the_failure(tmp_path):
    """distil's best-alpha weights ride along in each checkpoint: the best check (step 2, before
    the failure) still wins after the resume, whose own checks (4, 6) score lower."""
    from transformers import TrainerCallback

    from specdraft.pipeline.engine.artifacts import StageContext
    from specdraft.pipeline.stages.distil import BestAlphaCheckpoint

    class ScriptedAlpha(BestAlphaCheckpoint):  # alpha by step, instead of a held-out set
        def __init__(self):
            super().__init__(None, [], 0, every=2, temperature=1.0)
            self.step = 0

        def alpha(self, model):
            return {0: 0.1, 2: 0.9}.get(self.step, 0.5)

        def _check(self, model, step):
            self.step = step
            super()._check(model, step)

    class WorkerDies(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("worker died")

    teacher, base = tiny_llama(1, hidden=32), tiny_llama(2)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, log_every=1, save_every=2)
    ctx = StageContext(tmp_path / "out", 0, checkpoints=tmp_path / "ckpt")
    first, model = ScriptedAlpha(), copy.deepcopy(base)
    callbacks = [first, WorkerDies()]
    with pytest.raises(RuntimeError, match="worker died"):
        train_kd(model, teacher, sequences(), Tok(), cfg, ctx.out, 0, callbacks=callbacks, ctx=ctx)
    step2 = first.best[2]
    resumed, model = ScriptedAlpha(), copy.deepcopy(base)
    train_kd(model, teacher, sequences(), Tok(), cfg, ctx.out, 0, callbacks=[resumed], ctx=ctx)
    assert [c["step"] for c in resumed.history] == [0, 2, 4, 6]
    assert resumed.best[:2] == (0.9, 2)
    assert all(torch.equal(resumed.best[2][n], w) for n, w in step2.items())


@pytest.mark.parametrize("divergence", ["fkl", "lk"])
def test_fused_and_plain_logits_losses_give_the_same_update(tmp_path, divergence):
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    models = {}
    for fused in (True, False):
        models[fused] = copy.deepcopy(base)
        opts = KDOptions(divergence=divergence, selection="top", k=0.5, fused=fused)
        _train(
            models[fused],
            teacher,
            tmp_path / str(fused),
            steps=3,
            reference=reference,
            options=opts,
        )
    moved = False
    for (name, p1), (_, p2), (_, p0) in zip(
        models[True].named_parameters(),
        models[False].named_parameters(),
        base.named_parameters(),
        strict=True,
    ):
        assert torch.allclose(p1, p2, atol=1e-5), name
        moved |= not torch.equal(p1, p0)
    assert moved
