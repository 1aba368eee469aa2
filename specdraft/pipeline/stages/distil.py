"""Stage `distil`: knowledge distillation of the draft init towards the target on the generate
stage's sequences. By default every response token counts (selection=all) and the loss is the LK
hybrid λ·KL + (1 − λ)·TV with one λ per optimizer step, from the step's mean acceptance
(divergence=lk, lk_alpha=batch); all of the draft's weights train. selection=top/bottom is
AdaSPEC's selective KD: tokens are scored by ΔL = KL(p‖q_draft) − KL(p‖q_ref) against the
`reference` model and only the top (or bottom) k fraction counts (k fixed, or chosen by k_search).
With lora.enabled LoRA adapters train instead, merged into the saved model. With eval_every > 0
the weights with the best held-out alpha are kept. With a `target_outputs` input
(distil.stored_target_outputs) the target model is not loaded: its stored hidden states and head
are, for the loss, ΔL and the held-out alpha, or its stored top-k (target_outputs.format=topk:
every divergence over the stored ids and one bucket for the rest, alpha over the stored ids;
docs/objectives.md; with distil.stored_k only each token's first stored_k ids). A draft init with its own vocabulary (the `vocab_trim` stage's, read as
`draft_init`, or one with another tokenizer, draft.vocabulary=intersection) reads its inputs
mapped as a server maps them (target ids outside the intersection become its unk) and every
divergence and alpha is taken over the intersection: the target's distribution restricted to it
and renormalised (trainer.KDTrainer).

Reads: `data`, `target` (its tokenizer; its model unless `target_outputs` is an input),
`draft_init`, `reference` (its model with selection top/bottom), `generate`
Writes: `model/` (adapters merged), `adapter/` (LoRA), `history.json`, `alpha_history.json`
(eval_every), `selection.json` (top/bottom), `k_search.json` (distil.k_search); info `model`,
`adapter`, `best_alpha`, `best_step`, `kept_fraction`, `k` and `k_search` (the k trained with,
each trial's alpha), `intersection` and `intersection_coverage` (a draft with its own vocabulary:
the token strings both vocabularies hold, and the share of the training responses' target tokens
among them)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from specdraft.drafts.hidden_states import hidden_and_head, real_rows
from specdraft.drafts.models import device_for
from specdraft.drafts.vocab_map import VocabularyMap
from specdraft.drafts.vocab_trim import (
    count_tokens,
    draft_vocabulary_map,
    save_draft_vocabulary,
)
from specdraft.errors import InputError
from specdraft.pipeline.batches import Collator, response_positions
from specdraft.pipeline.config import DistilConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    model_location,
    write_json,
)
from specdraft.pipeline.engine.parallel import replica_checksum, train_data_parallel
from specdraft.pipeline.objectives import KDOptions, target_acceptance
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stored_target_outputs import (
    StoredTargetOutputs,
    StoredTopkOutputs,
    load_target_outputs,
)
from specdraft.pipeline.trainer import train_kd


def with_lora(model, lora_cfg):
    """Wrap `model` with PEFT LoRA adapters; fail clearly when the target modules match nothing."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora_cfg.target_modules if m not in names]
    if len(missing) == len(lora_cfg.target_modules):
        raise InputError(
            f"distil.lora.target_modules {lora_cfg.target_modules} match no module of the draft; "
            f"linear layers here include: {sorted(n for n in names if n.endswith('proj'))[:12]}"
        )
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=[m for m in lora_cfg.target_modules if m in names],
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def delta_histogram(deltas: list[float], bins: int = 40) -> dict:
    if not deltas:
        return {"edges": [], "counts": []}
    values = torch.tensor(deltas)
    lo, hi = torch.quantile(values, 0.005).item(), torch.quantile(values, 0.995).item()
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(values.clamp(lo, hi), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


class BestAlphaCheckpoint(TrainerCallback):
    """Every `every` optimizer steps, alpha = mean Σ min(p, q) on held-out sequences; the weights
    with the best alpha are restored at the end (validation loss and acceptance disagree). The best
    so far goes into each Trainer checkpoint (`best_alpha.pt`), so a resumed attempt still knows
    the checks made before it."""

    FILE = "best_alpha.pt"

    def __init__(
        self,
        teacher,
        held_out: list[dict],
        pad_id: int,
        every: int,
        temperature: float,
        target_outputs: StoredTargetOutputs | StoredTopkOutputs | None = None,
        vocab: int | None = None,
        vocab_map: VocabularyMap | None = None,
    ):
        self.vocab = vocab  # the tokenizer's length: heads compared over their first rows
        self.vocab_map = vocab_map  # its own vocabulary: inputs mapped, heads over the intersection
        self.rows = None if vocab_map is None else vocab_map.intersection_rows()
        self.teacher, self.held_out, self.every, self.temperature = (
            teacher,
            held_out,
            every,
            temperature,
        )
        self.target_outputs = target_outputs
        self.collate = Collator(pad_id)
        self.history: list[dict] = []
        self.best: tuple[float, int, dict] | None = None

    @torch.no_grad()
    def alpha(self, model) -> float:
        total, count = 0.0, 0
        for start in range(0, len(self.held_out), 16):
            batch = self.collate(self.held_out[start : start + 16])
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            counted = response_positions(batch)
            if isinstance(self.target_outputs, StoredTopkOutputs):  # mapped into its rows
                into = None if self.rows is None else self.rows[1]
                t_hidden, t_head = self.target_outputs.targets(
                    batch["rows"], counted, self.vocab, into
                )
            elif self.target_outputs is None:
                t_hidden, t_head = hidden_and_head(
                    self.teacher, batch["input_ids"], batch["attention_mask"], vocab=self.vocab
                )
                t_hidden = t_hidden[:, :-1][counted]
            else:
                t_hidden = self.target_outputs.response_hidden(batch["rows"], counted)
                t_head = real_rows(self.target_outputs.head, self.vocab)
            draft_ids, draft_vocab = batch["input_ids"], self.vocab
            if self.vocab_map is not None:
                draft_ids, draft_vocab = self.vocab_map.to_draft(draft_ids), None  # its own rows
                if t_head is not None:
                    t_head = t_head[self.rows[1].to(t_head.device)]  # (I, H)
            s_hidden, s_head = hidden_and_head(
                model, draft_ids, batch["attention_mask"], vocab=draft_vocab
            )
            if self.vocab_map is not None:
                s_head = s_head[self.rows[0].to(s_head.device)]  # (I, H)
            beta = target_acceptance(
                s_hidden[:, :-1][counted], s_head, t_hidden, t_head, self.temperature
            )  # (N,)
            total += float(beta.sum())
            count += beta.numel()
        return total / max(1, count)

    def _check(self, model, step: int) -> None:
        was_training = model.training
        model.eval()
        alpha = self.alpha(model)
        model.train(was_training)
        self.history.append({"step": step, "alpha": alpha})
        if self.best is None or alpha > self.best[0]:
            weights = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
            self.best = (alpha, step, weights)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
        if state.global_step and saved.is_file():  # resumed from that checkpoint
            kept = torch.load(saved, map_location=next(model.parameters()).device)
            self.history, self.best = (
                kept["history"],
                (kept["alpha"], kept["step"], kept["weights"]),
            )
        else:
            self._check(model, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.best is not None:
            alpha, step, weights = self.best
            kept = {"alpha": alpha, "step": step, "weights": weights, "history": self.history}
            torch.save(kept, Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._check(model, state.global_step)

    def restore(self, model) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best[2].items():
                params[name].copy_(value)


def run(cfg: DistilConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    return train_data_parallel(distil, cfg, inputs, ctx, stage="distil")


def distil(cfg: DistilConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    out, seed, trust = ctx.out, ctx.seed, ctx.trust
    if cfg.divergence == "tvd":
        warnings.warn(
            "distil.divergence=tvd from a cold start: TV has a vanishing gradient and can leave the "
            "draft where it started. Use distil.divergence=lk, the LK hybrid λ·KL + (1 − λ)·TV, "
            "which warms up with KL by itself (or distil from an fkl-trained draft). Silence with "
            "PYTHONWARNINGS=ignore::UserWarning.",
            UserWarning,
            stacklevel=2,
        )
    set_seed(seed)  # LoRA's initial adapters come from the global RNG: same seed, same draft
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    stored = teacher = None
    if "target_outputs" in inputs:
        stored = load_target_outputs(
            inputs["target_outputs"], device, temperature=cfg.temperature, k=cfg.stored_k
        )
    else:
        teacher = load_model_artifact(inputs["target"], device, trust_remote_code=trust.target)
    selective = cfg.selection != "all"
    reference = (
        load_model_artifact(inputs["reference"], device, trust_remote_code=trust.draft)
        if selective
        else None
    )
    model = load_model_artifact(inputs["draft_init"], device, trust_remote_code=trust.draft)
    model = model.train()
    draft_dir = model_location(inputs["draft_init"])
    target_head = stored.head if stored is not None else teacher
    vocab_map = draft_vocabulary_map(draft_dir, tokenizer, target_head)
    if vocab_map is None:  # a draft with its own vocabulary is mapped by token string
        check_vocabularies(target_head, model, reference, vocab=len(tokenizer))
    if cfg.lora.enabled:
        model = with_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"distil: LoRA r={cfg.lora.r} on {cfg.lora.target_modules}: {trainable} trainable parameters"
        )
    sequences = load_sequences(inputs["generate"]).select_columns(["input_ids", "response_mask"])
    info: dict = {}
    if vocab_map is not None:
        response, _ = count_tokens(sequences, len(vocab_map.target_to_draft))
        info["intersection"] = vocab_map.intersection
        info["intersection_coverage"] = vocab_map.coverage(response)
        print(
            f"distil: the intersection ({vocab_map.intersection} tokens) holds "
            f"{info['intersection_coverage']:.1%} of the target's tokens in the training responses"
        )
    if isinstance(stored, StoredTopkOutputs):
        info["stored_k"] = stored.k  # the ids a token training read (distil.stored_k or all)
    if stored is not None:  # each sequence's index in what was stored (kept through the split)
        sequences = sequences.add_column("row", list(range(len(sequences))))
    callbacks = []
    if cfg.eval_every:
        split = sequences.train_test_split(test_size=cfg.holdout, seed=seed)
        sequences = split["train"]
        checkpoint = BestAlphaCheckpoint(
            teacher,
            list(split["test"]),
            tokenizer.pad_token_id,
            cfg.eval_every,
            cfg.temperature,
            target_outputs=stored,
            vocab=len(tokenizer),
            vocab_map=vocab_map,
        )
        callbacks.append(checkpoint)
    options = KDOptions(
        divergence=cfg.divergence,
        beta=cfg.beta,
        temperature=cfg.temperature,
        lk_eta=cfg.lk_eta,
        selection=cfg.selection,
        k=cfg.k,
        scope=cfg.scope,
        normalize=cfg.normalize,
        fused=cfg.fused_loss,
        lk_alpha=cfg.lk_alpha,
        position_weighting=cfg.position_weighting,
        block_size=cfg.block_size,
    )
    trials: list[dict] = []
    if cfg.k_search:  # the config check ensures eval_every > 0: `checkpoint` judges the trials
        options, trials = search_k(
            cfg.k_search,
            cfg.k_search_fraction,
            cfg.train,
            options,
            model,
            teacher,
            reference,
            sequences,
            tokenizer,
            checkpoint.alpha,
            out / "k_search",
            seed,
            stored,
            vocab_map,
        )
        write_json(out / "k_search.json", {"k": options.k, "trials": trials})
    history, selection = train_kd(
        model,
        teacher,
        sequences,
        tokenizer,
        cfg.train,
        out,
        seed,
        reference=reference,
        options=options,
        callbacks=callbacks,
        ctx=ctx,
        target_outputs=stored,
        vocab_map=vocab_map,
    )
    if selective:
        info.update({"k": options.k, "k_search": trials})
    if cfg.eval_every:
        checkpoint.restore(model)
        info["best_step"], info["best_alpha"] = checkpoint.best[1], checkpoint.best[0]
        write_json(out / "alpha_history.json", checkpoint.history)
        print(
            f"distil: kept the weights of step {checkpoint.best[1]} (held-out alpha {checkpoint.best[0]:.3f})"
        )
    if cfg.lora.enabled:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    save_draft_vocabulary(draft_dir, tokenizer, out / "model")
    info.update(replica_checksum(model))
    deltas = selection["deltas"]
    write_json(out / "history.json", history)
    if selective:
        write_json(
            out / "selection.json",
            {
                "k": options.k,
                "selection": cfg.selection,
                "scope": cfg.scope,
                "threshold": selection_threshold(deltas, options.k, cfg.selection),
                "kept": selection["kept"],
                "total": selection["total"],
                "delta_histogram": delta_histogram(deltas),
            },
        )
    return {
        "model": "model",
        "adapter": "adapter" if cfg.lora.enabled else None,
        "final_loss": history[-1]["loss"] if history else None,
        "kept_fraction": selection["kept"] / max(1, selection["total"]) if selective else 1.0,
        **info,
    }


def search_k(
    grid: list[float],
    fraction: float,
    train_cfg,
    options: KDOptions,
    model,
    teacher,
    reference,
    sequences,
    tokenizer,
    judge,
    folder: Path,
    seed: int,
    stored: StoredTargetOutputs | StoredTopkOutputs | None = None,
    vocab_map: VocabularyMap | None = None,
) -> tuple[KDOptions, list[dict]]:
    """AdaSPEC's k chosen by held-out alpha: for each k of `grid`, a copy of the initial `model`
    trains ceil(fraction · steps) steps (its own schedule, no checkpoints) and `judge(model)`
    gives its held-out alpha. Returns `options` with the best k (ties: the first listed) and
    the trials [{k, steps, alpha}]. `folder` holds the trials' Trainer output and is removed."""
    steps = max(1, math.ceil(fraction * train_cfg.steps))
    trial_cfg = dataclasses.replace(train_cfg, steps=steps, save_every=0)
    trials = []
    for k in grid:
        trial = copy.deepcopy(model)
        train_kd(
            trial,
            teacher,
            sequences,
            tokenizer,
            trial_cfg,
            folder / f"k{k}",
            seed,
            reference=reference,
            options=dataclasses.replace(options, k=k),
            target_outputs=stored,
            vocab_map=vocab_map,
        )
        trial.eval()
        trials.append({"k": k, "steps": steps, "alpha": judge(trial)})
        print(f"distil: k={k} after {steps} steps: held-out alpha {trials[-1]['alpha']:.4f}")
        del trial
    shutil.rmtree(folder, ignore_errors=True)
    best = max(trials, key=lambda t: t["alpha"])  # the first of equals
    print(f"distil: k_search chose k={best['k']}")
    return dataclasses.replace(options, k=best["k"]), trials


def selection_threshold(deltas: list[float], k: float, selection: str) -> float | None:
    """The ΔL at the k-quantile over all scored tokens (for the report's histogram)."""
    if not deltas:
        return None
    ordered = sorted(deltas, reverse=selection == "top")
    return ordered[max(0, min(len(ordered), math.ceil(k * len(ordered))) - 1)]


def check_vocabularies(teacher, draft, reference=None, *, vocab: int) -> None:
    """The loss compares distributions token by token over the tokenizer's `vocab` ids: every
    model's head needs a row for each (rows past them are padding, and may differ in number).
    `teacher` is the target, or its (V, H) LM head weight when its outputs are stored."""
    sizes = {
        "target": (
            teacher if isinstance(teacher, torch.Tensor) else teacher.get_output_embeddings().weight
        ).shape[0],
        "draft": draft.get_output_embeddings().weight.shape[0],
    }
    if reference is not None:
        sizes["reference"] = reference.get_output_embeddings().weight.shape[0]
    short = {k: v for k, v in sizes.items() if v < vocab}
    if short:
        raise InputError(
            "the models' LM heads have "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f" rows, and {', '.join(short)} fewer than the tokenizer's {vocab} tokens: "
            "distillation compares next-token distributions over the tokenizer's vocabulary"
        )
