"""From prompt/response text to model batches: token ids and response masks, the collator, and
the positions a loss counts.

Sequences are `[bos] prompt response [eos]`; `labels` hold the tokens a loss counts (-100 elsewhere),
so Trainer's `num_items_in_batch` is the count of predicted tokens across the accumulation window.
"""

from __future__ import annotations

import torch


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


def response_positions(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: the positions whose next token is a label, in the order the KD loss takes
    them (row by row); packed batches give the same order over their one row."""
    return batch["labels"][:, 1:] != -100
