"""Training on transformers' Trainer: cross-entropy for the toy models, KD for drafts (KDTrainer),
the Trainer arguments, checkpoint resumption and the data-parallel helpers they need.

Batches come from pipeline/batches.py: `labels` hold the tokens a loss counts (-100 elsewhere), so
Trainer's `num_items_in_batch` is the count of predicted tokens across the accumulation window.
What the KD loss is (divergence, token selection, position weights) is pipeline/objectives.py's.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from specdraft.drafts.hidden_states import hidden_and_head, real_rows
from specdraft.drafts.vocab_map import VocabularyMap
from specdraft.pipeline.batches import Collator, packs_sequences, response_positions
from specdraft.pipeline.engine.artifacts import StageContext
from specdraft.pipeline.objectives import (
    KDOptions,
    kd_loss_sum,
    kept_count,
    position_weights,
    response_block_offsets,
    select_tokens_by_loss_gap,
    target_acceptance,
    target_kd_loss,
)
from specdraft.pipeline.stored_target_outputs import StoredTargetOutputs, StoredTopkOutputs


class LossHistory(TrainerCallback):
    """Keeps Trainer's logged losses (and extras such as kept_fraction) as a list of dicts."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def trainer_dir(train_cfg, out: Path, ctx: StageContext | None) -> Path:
    """Where Trainer writes: the stage's checkpoint directory (kept across failed attempts) when
    checkpointing is on, else inside the stage's temporary output."""
    ckpt = ctx.checkpoints if ctx is not None else None
    return ckpt if train_cfg.save_every and ckpt is not None else out / "trainer"


class UploadCheckpoints(TrainerCallback):
    """Copies each checkpoint Trainer saves into the remote store (from the main process)."""

    def __init__(self, mirror, folder: Path):
        self.mirror, self.folder = mirror, folder

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.mirror.save(self.folder)


def _train(trainer, train_cfg, out: Path, ctx: StageContext | None) -> None:
    """Run Trainer, resuming from the last checkpoint a failed attempt left (here, or in a
    remote store's copy of the checkpoints)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = trainer_dir(train_cfg, out, ctx)
    mirror = ctx.checkpoint_mirror if ctx is not None else None
    if mirror is not None and train_cfg.save_every and folder == ctx.checkpoints:
        mirror.restore(folder)
        trainer.add_callback(UploadCheckpoints(mirror, folder))
    last = get_last_checkpoint(str(folder)) if folder.is_dir() and train_cfg.save_every else None
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    if train_cfg.report_to == "none" and folder == out / "trainer":
        shutil.rmtree(folder, ignore_errors=True)  # holds only tracker logs: keep them when on


def training_args(
    train_cfg, out: Path, seed: int, use_cpu: bool, ctx: StageContext | None = None
) -> TrainingArguments:
    micro = train_cfg.batch_size // train_cfg.grad_accum // _world_size()  # per device
    saving = {"save_strategy": "no"}
    if train_cfg.save_every:
        saving = {
            "save_strategy": "steps",
            "save_steps": train_cfg.save_every,
            "save_total_limit": 1,
        }
    return TrainingArguments(
        output_dir=str(trainer_dir(train_cfg, out, ctx)),
        **saving,
        max_steps=train_cfg.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=train_cfg.grad_accum,
        learning_rate=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, math.ceil(0.05 * train_cfg.steps)),
        logging_steps=min(train_cfg.log_every, train_cfg.steps),
        report_to=train_cfg.report_to,
        bf16=train_cfg.precision == "bf16",
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length",  # less padding: batches of similar lengths
        disable_tqdm=False,
    )


def train_cross_entropy(
    model,
    encoded,
    tokenizer,
    train_cfg,
    out: Path,
    seed: int,
    all_tokens: bool,
    ctx: StageContext | None = None,
) -> list[dict]:
    """Plain cross-entropy (SFT on response tokens, or LM pre-training on all tokens). `ctx` (the
    running stage's) says where checkpoints survive a failed attempt; None: nowhere."""
    history = LossHistory()
    cached = model.config.use_cache  # Trainer turns the KV cache off (packing needs that too)
    trainer = Trainer(
        model=model,
        args=training_args(train_cfg, out, seed, not torch.cuda.is_available(), ctx),
        train_dataset=encoded,
        data_collator=Collator(
            tokenizer.pad_token_id, all_tokens=all_tokens, packed=packs_sequences(train_cfg, model)
        ),
        callbacks=[history],
    )
    _train(trainer, train_cfg, out, ctx)
    model.config.use_cache = cached  # the saved model generates with its cache
    return history.rows


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gathered(values: torch.Tensor) -> torch.Tensor:
    """All workers' values (data-parallel), or these ones."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts).to(values.device)


class KDTrainer(Trainer):
    """Distils `model` towards `teacher` with the fused KD loss on response tokens.

    With a `reference` model and `selection` top/bottom, tokens are scored by
    ΔL = KL(p‖q_draft) − KL(p‖q_ref) (both at the distillation temperature) and only the top (or
    bottom) k fraction counts (AdaSPEC): per micro-batch (`scope="microbatch"`, the public AdaSPEC
    code) or with one threshold per optimizer step across the accumulation window and
    data-parallel workers (`"global"`).
    `normalize="all"` divides the summed loss by every response token of the accumulation window
    on all workers (the public AdaSPEC code), `"kept"` by the kept ones of the window on all
    workers: every token of an optimizer step weighs the same, so W workers x micro-batch m x
    accumulation a give the gradient of one worker with batch W·m·a.
    The forward passes of all three models run under Trainer's autocast (`precision`), with one
    worker as with many.
    With `target_outputs` the teacher is not run: its hidden states for each batch are read from
    the stored ones (batches carry `rows`) and its head from them too, or its stored top-k
    (every loss, ΔL and β then over the stored ids and one bucket; for a draft with a
    vocabulary map, the ids it holds, see StoredTopkOutputs.targets); `teacher` may be None.
    `vocab` (the tokenizer's length; train_kd passes it) keeps every head's first `vocab` rows,
    so heads padded to different sizes past the tokenizer are compared over its ids only.
    With a `vocab_map` (a draft whose vocabulary differs: trimmed, or another tokenizer) the draft
    and the reference read the batch mapped as a server maps it (target ids outside the
    intersection are their unk) and every divergence is taken over the intersection's rows of both heads: the
    target's distribution restricted to the ids the draft can propose, renormalised.
    """

    def __init__(
        self,
        *args,
        teacher,
        reference=None,
        options: KDOptions | None = None,
        target_outputs: StoredTargetOutputs | StoredTopkOutputs | None = None,
        vocab: int | None = None,
        vocab_map: VocabularyMap | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.vocab = vocab  # the tokenizer's length: heads are compared over their first rows
        self.vocab_map = vocab_map
        self._rows = None if vocab_map is None else vocab_map.intersection_rows()  # (I,), (I,)
        if teacher is None and target_outputs is None:
            raise ValueError("KD needs the teacher or its stored outputs")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.target_outputs = target_outputs
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.opts = options or KDOptions()
        if self.opts.selection != "all" and self.reference is None:
            raise ValueError("token selection needs a reference model")
        if self.opts.divergence == "ce" and self.opts.position_weighting != "none":
            raise ValueError("position weighting needs the teacher's distributions, ce has none")
        self.model_accepts_loss_kwargs = (
            True  # compute_loss normalises by num_items_in_batch itself
        )
        self.selection_log: dict = {"kept": 0, "total": 0, "deltas": []}
        self._threshold: float | None = None
        self._kept_in_window: int | None = None  # kept tokens of the window on all workers
        self._window_alpha: float | None = None  # mean β of the window (lk_alpha="batch")

    def _response_hidden(self, model, inputs, grad: bool, draft: bool = True):
        """(N, H) response hidden states and (V, H) head of `model`: the draft or the reference
        (`draft`, read through vocab_map when there is one), or the teacher."""
        counted = inputs["labels"][:, 1:] != -100  # (B, T-1): positions predicting a response token
        input_ids, vocab = inputs["input_ids"], self.vocab
        if draft and self.vocab_map is not None:
            input_ids = self.vocab_map.to_draft(input_ids)  # (B, T) as the server feeds the draft
            vocab = None  # its own rows, indexed by the intersection's draft ids below
        # hidden_and_head calls the decoder directly, past the autocast accelerate wraps around
        # the model's forward: bf16 has to be asked for here, for all three models.
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            hidden, head = hidden_and_head(
                model,
                input_ids,
                inputs.get("attention_mask"),
                inputs.get("position_ids"),
                vocab=vocab,
            )
        if self._rows is not None:
            head = head[self._rows[0 if draft else 1].to(head.device)]  # (I, H)
        return hidden[:, :-1][counted], head  # (N, H), (V, H)

    def _target_hidden(self, inputs):
        """The teacher of a batch: its (N, H) response hidden states and (V, H) head, stored or
        run now; or its stored top-k, (TopkTargets, None) (objectives.target_kd_loss)."""
        if isinstance(self.target_outputs, StoredTopkOutputs):  # mapped into the draft's rows
            into = None if self._rows is None else self._rows[1]
            return self.target_outputs.targets(
                inputs["rows"], response_positions(inputs), self.vocab, into
            )
        if self.target_outputs is None:
            return self._response_hidden(self.teacher, inputs, grad=False, draft=False)
        counted = response_positions(inputs)
        stored = self.target_outputs
        head = real_rows(stored.head, self.vocab)
        if self._rows is not None:
            head = head[self._rows[1].to(head.device)]  # (I, H): the intersection's target rows
        return stored.response_hidden(inputs["rows"], counted), head

    @torch.no_grad()
    def loss_gap(
        self, inputs, s_hidden=None, s_head=None, t_hidden=None, t_head=None
    ) -> torch.Tensor:
        """ΔL = KL(p‖q_draft) − KL(p‖q_ref) per response token, (N,), with p and q at the
        distillation temperature (the distributions the loss compares)."""
        if s_hidden is None:
            s_hidden, s_head = self._response_hidden(self.model, inputs, grad=False)
            t_hidden, t_head = self._target_hidden(inputs)
        r_hidden, r_head = self._response_hidden(self.reference, inputs, grad=False)
        temperature = self.opts.temperature
        kl_draft = target_kd_loss(
            s_hidden.detach(),
            s_head.detach(),
            t_hidden,
            t_head,
            temperature=temperature,
            reduction="none",
        )
        kl_ref = target_kd_loss(
            r_hidden, r_head, t_hidden, t_head, temperature=temperature, reduction="none"
        )
        return kl_draft - kl_ref

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The window's micro-batches; with token selection also the global threshold and the
        window's kept-token count on all workers (the `normalize="kept"` denominator)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._kept_in_window = None
        if self.opts.divergence == "lk" and self.opts.lk_alpha == "batch" and batch_samples:
            self._window_alpha = self.window_acceptance(batch_samples, device)
        if self.opts.selection == "all" or not batch_samples:
            return batch_samples, num_items
        if self.opts.scope == "global":
            deltas = _gathered(
                torch.cat([self.loss_gap(self._prepare_inputs(b)) for b in batch_samples])
            )
            count = max(1, kept_count(deltas.numel(), self.opts.k))
            ordered = torch.sort(deltas, descending=self.opts.selection == "top").values
            self._threshold = float(ordered[min(count, deltas.numel()) - 1])
            self._kept_in_window = int(self._select(deltas).sum())  # ties at the threshold count
        else:
            counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batch_samples]
            kept = torch.tensor(sum(kept_count(n, self.opts.k) for n in counts), device=device)
            self._kept_in_window = int(self.accelerator.gather(kept).sum())
        return batch_samples, num_items

    def _select(self, delta: torch.Tensor) -> torch.Tensor:
        if self.opts.scope == "global":
            return (
                delta >= self._threshold
                if self.opts.selection == "top"
                else delta <= self._threshold
            )
        return select_tokens_by_loss_gap(delta, self.opts.k, self.opts.selection)

    @torch.no_grad()
    def window_acceptance(self, batch_samples, device) -> float:
        """Mean β = Σ min(p, q) at the distillation temperature over every response token of
        the window's micro-batches on all workers: the LK hybrid's α with lk_alpha="batch", the
        same for any cut of the window into micro-batches and workers."""
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (Σβ, count)
        for batch in batch_samples:
            inputs = self._prepare_inputs(batch)
            s_hidden, s_head = self._response_hidden(self.model, inputs, grad=False)
            t_hidden, t_head = self._target_hidden(inputs)
            beta = target_acceptance(s_hidden, s_head, t_hidden, t_head, self.opts.temperature)
            total[0] += beta.double().sum().to(device)
            total[1] += beta.numel()
        total = self.accelerator.gather(total).view(-1, 2).sum(dim=0)
        return float(total[0] / total[1].clamp(min=1))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        t_hidden = t_head = None
        if self.opts.divergence != "ce" or self.opts.selection != "all":
            t_hidden, t_head = self._target_hidden(inputs)
        s_hidden, s_head = self._response_hidden(model, inputs, grad=True)
        labels = inputs["labels"][:, 1:][inputs["labels"][:, 1:] != -100]  # (N,) next tokens
        keep = None
        if self.opts.selection != "all":
            delta = self.loss_gap(inputs, s_hidden, s_head, t_hidden, t_head)
            keep = self._select(delta)
            self.selection_log["kept"] += int(keep.sum())
            self.selection_log["total"] += int(keep.numel())
            if len(self.selection_log["deltas"]) < 200_000:
                self.selection_log["deltas"].extend(delta.float().cpu().tolist())
        weights = None
        if self.opts.position_weighting != "none":
            beta = target_acceptance(
                s_hidden.detach(), s_head.detach(), t_hidden, t_head, self.opts.temperature
            )  # (N,): every response token's, kept or not: the block reaches past them all
            offsets = response_block_offsets(response_positions(inputs), self.opts.block_size)
            weights = position_weights(
                beta, offsets, self.opts.position_weighting, self.opts.block_size
            )
        loss_sum = kd_loss_sum(
            s_hidden,
            s_head,
            t_hidden,
            t_head,
            keep,
            self.opts,
            labels,
            weights=weights,
            batch_alpha=self._window_alpha,
        )
        # DDP averages the workers' gradients: a loss divided by a count over all workers is
        # multiplied back by their number (as transformers' own compute_loss does).
        workers = self.accelerator.num_processes
        if self.opts.normalize == "kept" and keep is not None:
            return loss_sum * workers / max(1, self._kept_in_window)
        if num_items_in_batch is not None:
            summed_over_workers = self.args.average_tokens_across_devices
            return loss_sum * (workers if summed_over_workers else 1) / num_items_in_batch
        return loss_sum / max(1, s_hidden.shape[0])


def train_kd(
    model,
    teacher,
    encoded,
    tokenizer,
    train_cfg,
    out: Path,
    seed: int,
    *,
    reference=None,
    options: KDOptions | None = None,
    callbacks=(),
    ctx: StageContext | None = None,
    target_outputs: StoredTargetOutputs | StoredTopkOutputs | None = None,
    vocab_map: VocabularyMap | None = None,
):
    """KD training of `model` on `teacher`, or on the teacher's `target_outputs` (then the
    sequences carry a `row` column: their index in what was stored); `ctx` as in
    train_cross_entropy; `vocab_map` as in KDTrainer."""
    history = LossHistory()
    cached = model.config.use_cache  # Trainer turns the KV cache off (packing needs that too)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*label_names.*")
        trainer = KDTrainer(
            model=model,
            args=training_args(train_cfg, out, seed, not torch.cuda.is_available(), ctx),
            train_dataset=encoded,
            data_collator=Collator(
                tokenizer.pad_token_id, packed=packs_sequences(train_cfg, model)
            ),
            callbacks=[history, *callbacks],
            teacher=teacher,
            reference=reference,
            options=options,
            target_outputs=target_outputs,
            vocab=len(tokenizer),
            vocab_map=vocab_map,
        )
        _train(trainer, train_cfg, out, ctx)
    model.config.use_cache = cached  # the saved model generates with its cache
    return history.rows, trainer.selection_log
