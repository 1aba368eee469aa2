"""The data and sequence artifacts as later stages read them, and sampling responses to prompts.

The `data` stage writes `dataset/` (train/eval splits), `tokenizer/` and manifest info `max_length`,
`chat_template`; the `generate` stage writes `sequences/` (input_ids, response_mask, prompt, response,
task, source). Every stage that reads them goes through these functions."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdraft.pipeline.engine.artifacts import read_manifest
from specdraft.pipeline.training import encode_example


def load_splits(artifact: Path):
    from datasets import load_from_disk

    return load_from_disk(str(Path(artifact) / "dataset"))


def tokenizer_dir(artifact: Path) -> Path:
    return Path(artifact) / "tokenizer"


def max_length_of(artifact: Path) -> int:
    return int(read_manifest(artifact)["info"]["max_length"])


def chat_template_of(artifact: Path) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template."""
    return bool(read_manifest(artifact)["info"].get("chat_template", False))


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    desc: str,
    first_index: int = 0,
) -> list[list[int]]:
    """Token ids of one sampled response per tokenised prompt (eos included when reached).

    Each batch is seeded by its position `first_index + start` in the whole prompt list, so a shard
    of whole batches samples what the same batches sample in one pass (see pipeline/engine/parallel.py)."""
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, mininterval=2.0):
        torch.manual_seed(seed * 1_000_003 + first_index + start)
        batch = encoded[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, row in enumerate(batch):  # left padding, as generation needs
            ids[i, width - len(row) :] = torch.tensor(row)
            attn[i, width - len(row) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            responses.append(row)
    return responses


def dataset_record(tokenizer, row: dict, chat: bool, max_length: int) -> dict:
    encoded = encode_example(tokenizer, row["prompt"], row["response"], max_length, chat)
    return {
        "prompt": row["prompt"],
        "response": row["response"],
        "task": row["task"],
        "source": "dataset",
        **encoded,
    }


def load_sequences(artifact: Path):
    from datasets import load_from_disk

    return load_from_disk(str(Path(artifact) / "sequences"))
