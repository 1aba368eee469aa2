"""Stage `generate`: training sequences for distillation. Target-written by default: the target
samples responses to training prompts. `draft_fraction` of the prompts are answered by the draft
instead (on-policy) and `dataset_fraction` keep the dataset's responses.

The sampled prompts run in parts of whole batches (PART_PROMPTS prompts, rounded up to
batch_size); each finished part's responses are saved in the stage's checkpoint directory (kept
across a failed attempt, removed once the artifact is published), so a stage killed mid-way
resumes from its last finished part. Each batch is seeded by its position in the prompt list, so
the responses are the same however the prompts are cut into parts and shards (`resources.workers`
Ray workers, each with its own copy of the model); a worker on a machine without the checkpoint
directory keeps no parts.

Reads: `data` (prompts), `target` and `draft_init` (their models and the target's tokenizer;
`draft_init` only with draft_fraction > 0, else it is not an input: a draft-free generation is
shared by every draft)
Writes: `sequences/` (input_ids, response_mask, prompt, response, task, source); info `sequences`,
`from_draft`, `from_target`, `from_dataset`, `mean_response_tokens`
"""

from __future__ import annotations

import json
import os
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

PART_PROMPTS = 128  # prompts per resumable part, rounded up to whole batches


def part_bounds(start: int, end: int, batch_size: int) -> list[tuple[int, int]]:
    """(a, b) of the resumable parts covering prompts start..end (start a batch boundary, as
    shard_bounds cuts them): whole batches, so every batch keeps its position and its seed."""
    size = max(1, -(-PART_PROMPTS // batch_size)) * batch_size
    return [(a, min(a + size, end)) for a in range(start, end, size)]


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
    folder: str | None = None,
    source: str = "target",
) -> tuple[list[list[int]], list[int]]:
    """One worker's responses to `prompts` (prompts[first_index:...] of the whole list), and the
    GPUs it ran on, part after part (part_bounds); each part is read from or saved to `folder`
    (the stage's checkpoint directory, as `<source>-<first>-<end>.json`) when this machine has
    it, and the model is loaded only when a part has to be sampled. Model code runs per model:
    the sampling model's when `model_trusted`, the tokenizer's (the target's) when
    `tokenizer_trusted`."""
    here = Path(folder) if folder is not None and Path(folder).is_dir() else None
    paths = {
        (a, b): None if here is None else here / f"{source}-{a:07d}-{b:07d}.json"
        for a, b in part_bounds(first_index, first_index + len(prompts), cfg.batch_size)
    }
    done = {bounds: _read_part(path, bounds[1] - bounds[0]) for bounds, path in paths.items()}
    reused = sum(len(part) for part in done.values() if part is not None)
    if reused:
        print(f"{desc}: {reused} of {len(prompts)} responses read back from a previous attempt")
    loaded: list = []
    responses: list[list[int]] = []
    for (a, b), path in paths.items():
        part = done[a, b]
        if part is None:
            if not loaded:
                device = device_for(cfg.resources.gpus)
                loaded = [
                    load_model_artifact(Path(model_dir), device, trust_remote_code=model_trusted),
                    load_tokenizer_artifact(
                        Path(tokenizer_dir), trust_remote_code=tokenizer_trusted
                    ),
                ]
            part = sample_responses(
                *loaded,
                prompts[a - first_index : b - first_index],
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                batch_size=cfg.batch_size,
                seed=seed,
                desc=f"{desc} {a}-{b}",
                first_index=a,
            )
            if path is not None:
                _write_part(path, part)
        responses += part
    return responses, worker_gpu_ids()


def _write_part(path: Path, responses: list[list[int]]) -> None:
    """One part's responses, written atomically (a temporary name, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"responses": responses}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_part(path: Path | None, n: int) -> list[list[int]] | None:
    """A saved part's `n` responses, or None when there is none or it cannot be read whole."""
    if path is None or not path.is_file():
        return None
    try:
        responses = json.loads(path.read_text())["responses"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"generate: {path.name} cannot be read ({e}): sampling it again")
        return None
    if len(responses) != n or not all(
        isinstance(r, list) and all(isinstance(t, int) for t in r) for r in responses
    ):
        print(f"generate: {path.name} does not hold {n} responses: sampling it again")
        return None
    return responses


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
    folder = None
    if ctx.checkpoints is not None:  # finished parts are kept here until the stage publishes
        ctx.checkpoints.mkdir(parents=True, exist_ok=True)
        folder = str(ctx.checkpoints)
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
                folder,
                source,
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
