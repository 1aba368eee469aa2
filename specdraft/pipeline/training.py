"""Training on transformers' Trainer: cross-entropy for the toy models, selective KD for drafts.

Sequences are `[bos] prompt response [eos]`; `labels` hold the tokens a loss counts (-100 elsewhere),
so Trainer's `num_items_in_batch` is the count of predicted tokens across the accumulation window.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from specdraft.kernels import (
    acceptance_from_tv,
    fused_kd_loss,
    kd_divergence_from_logits,
    token_acceptance,
)
from specdraft.pipeline.engine.artifacts import StageContext, atomic_write_text


def prompt_token_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt: `[bos] prompt`, or the prompt as a user turn of the chat template."""
    if chat_template:
        if not tokenizer.chat_template:
            raise ValueError("data.chat_template is on but the tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer, prompt: str, response: str, max_length: int, chat_template: bool = False
) -> dict:
    """Token ids of prompt + response (+ eos) and a 0/1 mask of the response tokens."""
    p = prompt_token_ids(tokenizer, prompt, chat_template)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    mask = ([0] * len(p) + [1] * len(r))[:max_length]
    return {"input_ids": ids, "response_mask": mask}


def encode_dataset(dataset, tokenizer, max_length: int):
    """Map a prompt/response dataset to input_ids + response_mask, dropping rows with no response."""
    encoded = dataset.map(
        lambda row: encode_example(tokenizer, row["prompt"], row["response"], max_length),
        remove_columns=[c for c in dataset.column_names if c != "task"],
        desc="tokenize",
    )
    return encoded.filter(lambda row: sum(row["response_mask"][1:]) > 0)


class Collator:
    """Right-pads a batch; `labels` keep response tokens only, or every real token (`all_tokens`).

    `packed=True` lays the rows end to end in one row instead (no padding): `position_ids` restart
    at 0 for every sequence and there is no attention mask, which transformers turns into
    per-sequence attention (cu_seqlens for the varlen FlashAttention kernel, a block-diagonal mask
    for SDPA). The first token of each sequence is never a label, as in the padded layout.

    Rows with a `row` (their index in the generate stage's sequences) give `rows` (B,), which
    the stored target outputs are looked up by.
    """

    def __init__(self, pad_id: int, all_tokens: bool = False, packed: bool = False):
        self.pad_id = pad_id
        self.all_tokens = all_tokens
        self.packed = packed

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.packed:
            return self._pack(rows)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        resp = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            attn[i, :n] = 1
            resp[i, :n] = torch.tensor(r["response_mask"])
        counted = attn if self.all_tokens else resp
        labels = torch.where(counted.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, **_row_ids(rows)}

    def _pack(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, positions, labels = [], [], []
        for r in rows:
            n = len(r["input_ids"])
            counted = [1] * n if self.all_tokens else list(r["response_mask"])
            counted[0] = 0  # nothing in this sequence predicts its first token
            ids += r["input_ids"]
            positions += range(n)
            labels += [t if c else -100 for t, c in zip(r["input_ids"], counted, strict=True)]
        return {
            "input_ids": torch.tensor([ids]),  # (1, ΣT)
            "position_ids": torch.tensor([positions]),  # (1, ΣT)
            "labels": torch.tensor([labels]),  # (1, ΣT)
            **_row_ids(rows),
        }


def _row_ids(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"rows": torch.tensor([r["row"] for r in rows])} if "row" in rows[0] else {}


def packs_sequences(train_cfg, model) -> bool:
    """`packing: auto` packs when the model attends with FlashAttention (varlen kernels make packing
    free); SDPA and eager take padded batches."""
    if train_cfg.packing != "auto":
        return train_cfg.packing == "packed"
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


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


def hidden_and_head(model, input_ids, attention_mask=None, position_ids=None, vocab=None):
    """Final hidden states (B, T, H) and the LM head weight (V, H), without building logits.
    Packed batches give `position_ids` and no `attention_mask` (see Collator). `vocab` (the
    tokenizer's length) keeps the head's first `vocab` rows: heads padded past the tokenizer
    (to different sizes in target and draft) are compared over the real ids only.

    A DistributedDataParallel model (Ray Train workers) must run its forward through the wrapper,
    which arms the gradient all-reduce: the whole model runs with no logits kept and a hook on the
    decoder takes its output."""
    inner = getattr(model, "module", model) if _is_ddp(model) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,  # a cache would hide packed sequences from transformers' mask builder
    }
    if inner is model:
        hidden = base.get_decoder()(**kwargs).last_hidden_state
    else:
        captured = []
        hook = base.get_decoder().register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state)
        )
        try:
            no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
            model(**kwargs, logits_to_keep=no_logits)  # (B, 0, V) logits: nothing materialised
        finally:
            hook.remove()
        hidden = captured[0]
    return hidden, real_rows(base.get_output_embeddings().weight, vocab)


def real_rows(head: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The first `vocab` rows of a (V, H) LM head (a view: gradients reach the parameter), or all
    of them when `vocab` is None. Rows past the tokenizer are padding no token id names."""
    return head if vocab is None else head[:vocab]


# The target_outputs stage's files: hidden-<i>-of-<n>.safetensors shards, each with `hidden`
# (M_i, H), the rows' response-predicting positions end to end, and `tokens` (R_i,), how many
# positions each of its rows has; head.safetensors with the target's LM head `weight` (V, H).
HIDDEN_SHARD = "hidden-{index:05d}-of-{count:05d}.safetensors"
HEAD_FILE = "head.safetensors"
SHARD_BYTES = 2**30  # hidden-state bytes per shard file


def response_positions(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: the positions whose next token is a label, in the order the KD loss takes
    them (row by row); packed batches give the same order over their one row."""
    return batch["labels"][:, 1:] != -100


def write_target_outputs(folder: Path, rows: list[torch.Tensor], head: torch.Tensor) -> dict:
    """Save per-row hidden states `rows` ((n_r, H) each, in sequence order) as shards of at most
    SHARD_BYTES, and the LM head. Returns what the stage's manifest records."""
    from safetensors.torch import save_file

    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for hidden in rows:
        if groups[-1] and size + hidden.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(hidden)
        size += hidden.nbytes
    width = head.shape[1]
    files = []
    for index, group in enumerate(groups):
        name = HIDDEN_SHARD.format(index=index, count=len(groups))
        hidden = torch.cat(group) if group else torch.empty(0, width, dtype=head.dtype)
        tokens = torch.tensor([h.shape[0] for h in group], dtype=torch.long)
        save_file({"hidden": hidden.contiguous(), "tokens": tokens}, str(folder / name))
        files.append(name)
    save_file({"weight": head.detach().contiguous().cpu()}, str(folder / HEAD_FILE))
    return {"shards": files, "rows": len(rows), "tokens": sum(h.shape[0] for h in rows)}


class StoredTargetOutputs:
    """The frozen target's final hidden states (after its last norm, before the LM head) at the
    positions that predict a response token of each training sequence, and its LM head: what KD
    reads instead of running the target (the target_outputs stage makes them). The hidden
    states stay on the CPU in their stored dtype; a batch's rows come to the head's device and
    dtype, which is what the live path's hidden states have."""

    def __init__(self, hidden: torch.Tensor, tokens: torch.Tensor, head: torch.Tensor):
        self.hidden = hidden  # (M, H)
        self.offsets = [
            0,
            *torch.cumsum(tokens.long(), 0).tolist(),
        ]  # row r: offsets[r]..offsets[r+1]
        self.head = head  # (V, H)

    @classmethod
    def load(cls, folder: Path, device="cpu") -> StoredTargetOutputs:
        from safetensors.torch import load_file

        shards = sorted(Path(folder).glob("hidden-*-of-*.safetensors"))
        expected = int(shards[0].name.split("-of-")[1].split(".")[0]) if shards else 0
        if not shards or len(shards) != expected:
            raise FileNotFoundError(f"{folder}: {len(shards)} of {expected or '?'} hidden shards")
        parts = [load_file(str(p)) for p in shards]
        head = load_file(str(Path(folder) / HEAD_FILE))["weight"].to(device)
        return cls(
            torch.cat([p["hidden"] for p in parts]), torch.cat([p["tokens"] for p in parts]), head
        )

    def response_hidden(self, rows: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """(N, H): the stored rows `rows` (B,) end to end; `counted` (B, T-1) is the batch's
        response_positions, checked against what was stored for each row."""
        per_row = counted.sum(dim=1).tolist() if counted.shape[0] == rows.numel() else None
        parts = []
        for i, r in enumerate(rows.tolist()):
            start, end = self.offsets[r], self.offsets[r + 1]
            if per_row is not None and per_row[i] != end - start:
                raise RuntimeError(
                    f"stored target outputs of sequence {r} have {end - start} positions, the "
                    f"batch has {per_row[i]}: they were made from other sequences"
                )
            parts.append(self.hidden[start:end])
        hidden = torch.cat(parts) if parts else self.hidden[:0]
        if hidden.shape[0] != int(counted.sum()):
            raise RuntimeError(
                f"stored target outputs hold {hidden.shape[0]} positions for this batch, it has "
                f"{int(counted.sum())}: they were made from other sequences"
            )
        return hidden.to(device=self.head.device, dtype=self.head.dtype, non_blocking=True)


def _is_ddp(model) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def kept_count(n: int, k: float) -> int:
    """How many of n tokens a top/bottom-k selection keeps: ceil(k * n), at most n."""
    return min(n, math.ceil(k * n - 1e-9))


def select_tokens_by_loss_gap(delta: torch.Tensor, k: float, mode: str = "top") -> torch.Tensor:
    """Boolean mask keeping ceil(k * N) tokens with the largest (`top`) or smallest (`bottom`) ΔL.

    Ties at the threshold are broken by position (a stable sort), so exactly ceil(k * N) are kept.
    """
    n = delta.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if n == 0:
        return keep
    count = kept_count(n, k)
    order = torch.sort(delta, descending=(mode == "top"), stable=True).indices
    keep[order[:count]] = True
    return keep


@dataclass
class KDOptions:
    """What a distillation loss is: divergence, token selection and normalisation."""

    divergence: str = "fkl"  # fkl | rkl | jsd | tvd | lk | ce (hard labels, no teacher)
    beta: float = 0.5  # JSD mixture weight
    temperature: float = 1.0
    lk_eta: float = 3.0  # LK hybrid: λ = exp(−η·sg(α))
    selection: str = "all"  # top | bottom | all
    k: float = 1.0  # fraction kept by top/bottom selection
    scope: str = "microbatch"  # microbatch | global
    normalize: str = "all"  # all | kept
    fused: bool = True  # False: full (N, V) logits of both models (the unfused baseline)
    lk_alpha: str = "token"  # LK hybrid's α: each token's β, or the window's mean β (`batch`)
    position_weighting: str = "none"  # none | reach | accept_length (see position_weights)
    block_size: int = 4  # γ of the blocks position weighting counts in


def response_block_offsets(counted: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N,) long: each response position's offset j = (t − start) mod γ in its γ-token block,
    `start` the first position of its response (a run of `counted` positions in a row; packed
    sequences are apart by their first token, never counted). `counted` (B, T-1) is
    response_positions; the order is the KD loss's (row by row)."""
    before = torch.zeros_like(counted[:, :1])
    previous = torch.cat([before, counted[:, :-1]], dim=1)  # (B, T-1)
    index = torch.arange(counted.shape[1], device=counted.device).expand_as(counted)
    starts = torch.where(counted & ~previous, index, torch.zeros_like(index))
    start = torch.cummax(starts, dim=1).values  # (B, T-1): the start of the run each t is in
    return ((index - start) % block_size)[counted]


def block_reach_weights(beta: torch.Tensor, offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    """w_t = Π_{i<j} β_{t−j+i} (N,): the chance that the draft, drafting the γ-token block of
    token t (offset j), has had its j earlier drafts accepted and so reaches t. 1 for a block's
    first token. `beta` (N,) is each position's acceptance Σ min(p, q)."""
    weights = torch.ones_like(beta)
    for shift in range(1, min(block_size, beta.numel())):
        in_block = offsets[shift:] >= shift  # token t − shift is in t's block
        weights[shift:] *= torch.where(in_block, beta[:-shift], torch.ones_like(beta[:-shift]))
    return weights


def acceptance_length_weights(
    beta: torch.Tensor, offsets: torch.Tensor, block_size: int
) -> torch.Tensor:
    """w_t = ∂τ/∂β_t (N,), τ = Σ_{j<m} Π_{i≤j} β_i the expected accepted drafts of t's block
    (m ≤ γ tokens): reach_t · (1 + β_{t+1} + β_{t+1}β_{t+2} + … to the block's end). With the
    tvd loss 1 − β the weighted gradient is −∇τ: training towards acceptance length."""
    follows = offsets[1:] != 0  # (N-1,): token t + 1 continues t's block
    rest = torch.ones_like(beta)  # 1 + expected accepted drafts after t, given t is accepted
    for _ in range(block_size - 1):
        longer = torch.ones_like(beta)
        longer[:-1] += torch.where(follows, beta[1:] * rest[1:], torch.zeros_like(rest[1:]))
        rest = longer
    return block_reach_weights(beta, offsets, block_size) * rest


def position_weights(
    beta: torch.Tensor, offsets: torch.Tensor, mode: str, block_size: int
) -> torch.Tensor:
    """Stop-gradient per-token weights (N,) of distil.position_weighting `mode` from the
    draft's acceptance estimates `beta` (N,) and block `offsets` (N,)."""
    beta = beta.detach().float()
    if mode == "reach":
        return block_reach_weights(beta, offsets, block_size)
    if mode == "accept_length":
        return acceptance_length_weights(beta, offsets, block_size)
    raise ValueError(f"position weighting must be reach or accept_length, got {mode!r}")


def kd_loss_sum(
    s_hidden,
    s_head,
    t_hidden,
    t_head,
    keep,
    opts: KDOptions,
    labels=None,
    weights=None,
    batch_alpha=None,
) -> torch.Tensor:
    """Summed divergence over the kept tokens, exact over the vocabulary, without (N, V) logits.

    The LK hybrid per token is λ·KL(p‖q) + (1 − λ)·TV(p, q) with λ = exp(−η·sg(α)), α = 1 − TV:
    KL pulls from a cold start, TV (the acceptance itself) takes over as α grows.
    `ce` is cross-entropy on the data's next tokens `labels` (N,): no teacher, the SFT control.
    `weights` (N,), constants (position_weights), multiply each token's loss. With
    opts.lk_alpha="batch" λ = exp(−η·`batch_alpha`), one α for the whole batch (the trainer's:
    the mean β of its optimizer step's response tokens on all workers).
    """
    weights = None if weights is None else weights.detach()

    def weighted(per_row: torch.Tensor) -> torch.Tensor:  # (N,)
        return per_row if weights is None else per_row * weights

    if opts.divergence == "ce":
        per_row = torch.nn.functional.cross_entropy(
            (s_hidden @ s_head.T).float() / opts.temperature, labels, reduction="none"
        )  # (N,): the draft's logits only, as plain SFT builds them
        return weighted(per_row if keep is None else per_row * keep).sum()
    lk_alpha = None  # the LK hybrid's α: each row's own β, or the batch's (one λ for all)
    if opts.divergence == "lk" and opts.lk_alpha == "batch":
        if batch_alpha is None:
            raise ValueError("lk_alpha='batch' needs the batch's acceptance (batch_alpha)")
        lk_alpha = float(batch_alpha)
    if opts.fused:  # one pass over the kept rows: loss, weights and both LK terms together
        return fused_kd_loss(
            s_hidden,
            s_head,
            t_hidden,
            t_head,
            mask=keep,
            divergence=opts.divergence,
            beta=opts.beta,
            temperature=opts.temperature,
            reduction="sum",
            weights=weights,
            lk_eta=opts.lk_eta,
            lk_alpha=lk_alpha,
        )

    def rows(divergence: str) -> torch.Tensor:  # (N,), 0 where not kept
        per_row = kd_divergence_from_logits(  # (N, V) logits of both models: the unfused baseline
            s_hidden @ s_head.T, t_hidden @ t_head.T, divergence, opts.beta, opts.temperature
        )
        return per_row if keep is None else per_row * keep

    if opts.divergence != "lk":
        return weighted(rows(opts.divergence)).sum()
    kl, tv = rows("fkl"), rows("tvd")  # the LK hybrid composed from its two terms
    if lk_alpha is None:
        alpha = acceptance_from_tv(tv.detach())  # (N,): β read off the TV rows the loss has
    else:
        alpha = torch.as_tensor(lk_alpha, device=tv.device)  # (): one λ for all
    lam = torch.exp(-opts.lk_eta * alpha)  # masked rows have kl = tv = 0
    return weighted(lam * kl + (1.0 - lam) * tv).sum()


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
    the stored ones (batches carry `rows`) and its head from them too; `teacher` may be None.
    `vocab` (the tokenizer's length; train_kd passes it) keeps every head's first `vocab` rows,
    so heads padded to different sizes past the tokenizer are compared over its ids only.
    """

    def __init__(
        self,
        *args,
        teacher,
        reference=None,
        options: KDOptions | None = None,
        target_outputs: StoredTargetOutputs | None = None,
        vocab: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.vocab = vocab  # the tokenizer's length: heads are compared over their first rows
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

    def _response_hidden(self, model, inputs, grad: bool):
        counted = inputs["labels"][:, 1:] != -100  # (B, T-1): positions predicting a response token
        # hidden_and_head calls the decoder directly, past the autocast accelerate wraps around
        # the model's forward: bf16 has to be asked for here, for all three models.
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            hidden, head = hidden_and_head(
                model,
                inputs["input_ids"],
                inputs.get("attention_mask"),
                inputs.get("position_ids"),
                vocab=self.vocab,
            )
        return hidden[:, :-1][counted], head  # (N, H), (V, H)

    def _target_hidden(self, inputs):
        """The teacher's (N, H) response hidden states and (V, H) head: stored, or run now."""
        if self.target_outputs is None:
            return self._response_hidden(self.teacher, inputs, grad=False)
        counted = response_positions(inputs)
        stored = self.target_outputs
        return stored.response_hidden(inputs["rows"], counted), real_rows(stored.head, self.vocab)

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
        kl_draft = fused_kd_loss(
            s_hidden.detach(),
            s_head.detach(),
            t_hidden,
            t_head,
            temperature=temperature,
            reduction="none",
        )
        kl_ref = fused_kd_loss(
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
            beta = token_acceptance(s_hidden, s_head, t_hidden, t_head, self.opts.temperature)
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
            beta = token_acceptance(
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
    target_outputs: StoredTargetOutputs | None = None,
):
    """KD training of `model` on `teacher`, or on the teacher's `target_outputs` (then the
    sequences carry a `row` column: their index in what was stored); `ctx` as in
    train_cross_entropy."""
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
        )
        _train(trainer, train_cfg, out, ctx)
    model.config.use_cache = cached  # the saved model generates with its cache
    return history.rows, trainer.selection_log


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
