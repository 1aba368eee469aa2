"""Training on transformers' Trainer: cross-entropy for the toy models, selective KD for drafts.

Sequences are `[bos] prompt response [eos]`; `labels` hold the tokens a loss counts (-100 elsewhere),
so Trainer's `num_items_in_batch` is the count of predicted tokens across the accumulation window.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from specdraft.kernels import fused_kd_loss


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
    """Right-pads a batch; `labels` keep response tokens only, or every real token (`all_tokens`)."""

    def __init__(self, pad_id: int, all_tokens: bool = False):
        self.pad_id = pad_id
        self.all_tokens = all_tokens

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
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
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


class LossHistory(TrainerCallback):
    """Keeps Trainer's logged losses (and extras such as kept_fraction) as a list of dicts."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def training_args(train_cfg, out: Path, seed: int, use_cpu: bool) -> TrainingArguments:
    micro = train_cfg.batch_size // train_cfg.grad_accum
    return TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=train_cfg.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=train_cfg.grad_accum,
        learning_rate=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, math.ceil(0.05 * train_cfg.steps)),
        logging_steps=min(train_cfg.log_every, train_cfg.steps),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",  # less padding: batches of similar lengths
        disable_tqdm=False,
    )


def train_cross_entropy(
    model, encoded, tokenizer, train_cfg, out: Path, seed: int, all_tokens: bool
) -> list[dict]:
    """Plain cross-entropy (SFT on response tokens, or LM pre-training on all tokens)."""
    history = LossHistory()
    trainer = Trainer(
        model=model,
        args=training_args(train_cfg, out, seed, use_cpu=not torch.cuda.is_available()),
        train_dataset=encoded,
        data_collator=Collator(tokenizer.pad_token_id, all_tokens=all_tokens),
        callbacks=[history],
    )
    trainer.train()
    return history.rows


def hidden_and_head(model, input_ids, attention_mask):
    """Final hidden states (B, T, H) and the LM head weight (V, H), without building logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state
    return hidden, base.get_output_embeddings().weight


def select_tokens_by_loss_gap(delta: torch.Tensor, k: float, mode: str = "top") -> torch.Tensor:
    """Boolean mask keeping ceil(k * N) tokens with the largest (`top`) or smallest (`bottom`) ΔL.

    Ties at the threshold are broken by position (a stable sort), so exactly ceil(k * N) are kept.
    """
    n = delta.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if n == 0:
        return keep
    count = min(n, math.ceil(k * n - 1e-9))
    order = torch.sort(delta, descending=(mode == "top"), stable=True).indices
    keep[order[:count]] = True
    return keep


class KDTrainer(Trainer):
    """Distils `model` towards `teacher` with the fused KD loss on response tokens.

    With a `reference` model, tokens are scored by ΔL = KL(p‖q_draft) − KL(p‖q_ref) and only the
    top-k fraction per micro-batch counts (AdaSPEC). `normalize="all"` divides the summed loss by
    every response token of the accumulation window (the public AdaSPEC code), `"kept"` by the kept.
    """

    def __init__(
        self,
        *args,
        teacher,
        reference=None,
        k=1.0,
        divergence="fkl",
        beta=0.5,
        temperature=1.0,
        normalize="all",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.k, self.divergence, self.beta = k, divergence, beta
        self.temperature, self.normalize = temperature, normalize
        self.model_accepts_loss_kwargs = (
            True  # compute_loss normalises by num_items_in_batch itself
        )
        self.selection_log: dict = {"kept": 0, "total": 0, "deltas": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attn, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        counted = labels[:, 1:] != -100  # (B, T-1): positions whose next token is a response token
        n_all = counted.sum()
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(self.teacher, ids, attn)
            t_hidden = t_hidden[:, :-1][counted]  # (N, Ht)
        s_hidden, s_head = hidden_and_head(model, ids, attn)
        s_hidden = s_hidden[:, :-1][counted]  # (N, Hs)
        keep = None
        if self.reference is not None and self.k < 1.0:
            with torch.no_grad():
                r_hidden, r_head = hidden_and_head(self.reference, ids, attn)
                r_hidden = r_hidden[:, :-1][counted]
                kl_draft = fused_kd_loss(
                    s_hidden.detach(), s_head.detach(), t_hidden, t_head, reduction="none"
                )
                kl_ref = fused_kd_loss(r_hidden, r_head, t_hidden, t_head, reduction="none")
            delta = kl_draft - kl_ref  # (N,)
            keep = select_tokens_by_loss_gap(delta, self.k)
            self.selection_log["kept"] += int(keep.sum())
            self.selection_log["total"] += int(keep.numel())
            if len(self.selection_log["deltas"]) < 200_000:
                self.selection_log["deltas"].extend(delta.float().cpu().tolist())
        loss_sum = fused_kd_loss(
            s_hidden,
            s_head,
            t_hidden,
            t_head,
            mask=keep,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            reduction="sum",
        )
        if self.normalize == "kept" and keep is not None:
            loss = loss_sum / keep.sum().clamp(min=1) / self.current_gradient_accumulation_steps
        elif num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
        else:
            loss = loss_sum / n_all.clamp(min=1)
        return loss


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
    k=1.0,
    divergence="fkl",
    beta=0.5,
    temperature=1.0,
    normalize="all",
):
    history = LossHistory()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*label_names.*")
        trainer = KDTrainer(
            model=model,
            args=training_args(train_cfg, out, seed, use_cpu=not torch.cuda.is_available()),
            train_dataset=encoded,
            data_collator=Collator(tokenizer.pad_token_id),
            callbacks=[history],
            teacher=teacher,
            reference=reference,
            k=k,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            normalize=normalize,
        )
        trainer.train()
    return history.rows, trainer.selection_log


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))
