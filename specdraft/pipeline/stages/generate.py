"""Stage `generate`: training sequences for distillation. Target-written by default: the target
samples responses to training prompts. `draft_fraction` of the prompts are answered by the draft
instead (on-policy) and `dataset_fraction` keep the dataset's responses.

Reads: `data` (prompts), `target` and `draft_init` (their models and the target's tokenizer;
`draft_init` only with draft_fraction > 0, else it is not an input: a draft-free generation is
shared by every draft)
Writes: `sequences/` (input_ids, response_mask, prompt, response, task, source); info `sequences`,
`from_draft`, `from_target`, `from_dataset`, `mean_response_tokens`
"""

from __future__ import annotations

import random
from pathlib import Path

from specdraft.drafts.models import device_for
from specdraft.errors import InputError
from specdraft.pipeline.batches import prompt_token_ids
from specdraft.pipeline.config import GenerateConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
)
from specdraft.pipeline.engine.parallel import map_shards, shard_bounds, worker_gpu_ids
from specdraft.pipeline.sequences import (
    chat_template_of,
    dataset_record,
    load_splits,
    max_length_of,
    sample_responses,
)


def sample_shard(
    model_dir: str,
    tokenizer_dir: str,
    prompts: list[list[int]],
    first_index: int,
    cfg: GenerateConfig,
    seed: int,
    desc: str,
    model_trusted: bool,
    tokenizer_trusted: bool,
) -> tuple[list[list[int]], list[int]]:
    """One worker's responses to `prompts` (prompts[first_index:...] of the whole list), and the
    GPUs it ran on. Model code runs per model: the sampling model's when `model_trusted`, the
    tokenizer's (the target's) when `tokenizer_trusted`."""
    device = device_for(cfg.resources.gpus)
    model = load_model_artifact(Path(model_dir), device, trust_remote_code=model_trusted)
    responses = sample_responses(
        model,
        load_tokenizer_artifact(Path(tokenizer_dir), trust_remote_code=tokenizer_trusted),
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=seed,
        desc=desc,
        first_index=first_index,
    )
    return responses, worker_gpu_ids()


def run(cfg: GenerateConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    from datasets import Dataset

    out, seed, trust = ctx.out, ctx.seed, ctx.trust
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    chat = chat_template_of(inputs["data"])
    max_length = max_length_of(inputs["data"])
    train = load_splits(inputs["data"])["train"]
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    rows = [train[i] for i in order[: cfg.num_prompts]]
    n_data = round(cfg.dataset_fraction * len(rows))
    n_draft = round(cfg.draft_fraction * len(rows))
    if n_data and not all(r["response"] for r in rows[:n_data]):
        raise InputError(
            "generate.dataset_fraction > 0 needs responses in the data; set data.response_field "
            "or generate.dataset_fraction=0"
        )
    records = [dataset_record(tokenizer, row, chat, max_length) for row in rows[:n_data]]
    parts = (("draft", rows[n_data : n_data + n_draft]), ("target", rows[n_data + n_draft :]))
    gpu_ids = []
    for source, part in parts:
        if not part:
            continue
        model_input = "draft_init" if source == "draft" else "target"
        model_dir = str(inputs[model_input])
        prompts = [prompt_token_ids(tokenizer, r["prompt"], chat) for r in part]
        shards = [
            (
                model_dir,
                str(inputs["target"]),
                prompts[a:b],
                a,
                cfg,
                seed,
                f"generate ({source})",
                trust.of_input(model_input),
                trust.target,
            )
            for a, b in shard_bounds(len(prompts), cfg.resources.workers, cfg.batch_size)
        ]
        results = map_shards(sample_shard, shards, cfg.resources, ctx)
        responses = [r for shard_responses, _ in results for r in shard_responses]
        gpu_ids.append([ids for _, ids in results])
        for row, prompt_ids, response in zip(part, prompts, responses, strict=True):
            ids = (prompt_ids + response)[:max_length]
            mask = ([0] * len(prompt_ids) + [1] * len(response))[:max_length]
            if sum(mask[1:]) == 0:
                continue
            records.append(
                {
                    "prompt": row["prompt"],
                    "response": tokenizer.decode(response, skip_special_tokens=True),
                    "task": row["task"],
                    "source": source,
                    "input_ids": ids,
                    "response_mask": mask,
                }
            )
    Dataset.from_list(records).save_to_disk(str(out / "sequences"))
    lengths = [sum(r["response_mask"]) for r in records]
    return {
        "sequences": len(records),
        "from_draft": sum(r["source"] == "draft" for r in records),
        "from_target": sum(r["source"] == "target" for r in records),
        "from_dataset": sum(r["source"] == "dataset" for r in records),
        "mean_response_tokens": round(sum(lengths) / max(1, len(lengths)), 1),
        "ended_with_eos": sum(r["input_ids"][-1] == tokenizer.eos_token_id for r in records),
        "workers": cfg.resources.workers,
        "worker_gpu_ids": gpu_ids,  # per sampled part, per shard: the GPUs Ray gave it
    }
