"""The data and sequence artifacts as later stages read them, and sampling responses to prompts.

The `data` stage writes `dataset/` (train/eval splits), `tokenizer/` and manifest info `max_length`,
`chat_template`; the `generate` stage writes `sequences/` (input_ids, response_mask, prompt, response,
task, source). Every stage that reads them goes through these functions."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from specdraft.pipeline.batches import encode_example
from specdraft.pipeline.decoding import left_padded
from specdraft.pipeline.engine.artifacts import read_manifest


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


def plain_generation_config(
    temperature: float, max_new_tokens: int, pad_token_id: int, eos_token_id
) -> GenerationConfig:
    """Sampling from exactly softmax(logits / T), greedy at T = 0. top_k is turned off by hand:
    `generate` otherwise defaults it to 50."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **sampling,
    )


def generate_plain(
    model, input_ids, attention_mask, *, temperature: float, vocab: int | None = None, **settings
):
    """`model.generate` sampling from softmax(logits / T) alone. `generate` fills every setting a
    config leaves unset from the checkpoint's generation_config (repetition_penalty, min_p,
    no_repeat_ngram_size, num_beams, suppress_tokens, ...), which would bias the sequences and
    alpha; an empty generation_config stands in for the checkpoint's during the call.
    `vocab` (the tokenizer's length) leaves out the head's padding rows past it: softmax over the
    real ids, as the decoder and alpha take it."""
    config = plain_generation_config(temperature, **settings)
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab is not None and rows > vocab:
        config.suppress_tokens = list(range(vocab, rows))  # their logits become -inf
    checkpoint_config = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    finally:
        model.generation_config = checkpoint_config


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
    of whole batches samples what the same batches sample in one pass (see specdraft/pipeline/engine/parallel.py)."""
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, mininterval=2.0):
        torch.manual_seed(seed * 1_000_003 + first_index + start)
        batch = encoded[start : start + batch_size]
        ids, attn = left_padded(batch, tokenizer.pad_token_id, device)
        width = ids.shape[1]
        out = generate_plain(
            model,
            ids,
            attn,
            temperature=temperature,
            vocab=len(tokenizer),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
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


def pick_eval_prompts(eval_split, per_task: int, offset: int = 0) -> list[dict]:
    """`per_task` rows of each task after its first `offset`, in the split's order: the evaluation
    prompts of the evaluate stage and `specdraft serve-check` (evaluate.prompt_offset)."""
    counts: dict[str, int] = {}
    chosen = []
    for row in eval_split:
        seen = counts.get(row["task"], 0)
        counts[row["task"]] = seen + 1
        if offset <= seen < offset + per_task:
            chosen.append(row)
    return chosen
