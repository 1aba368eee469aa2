"""Stage `evaluate`: acceptance of the baseline (draft init), reference and final drafts on the
job's eval prompts, task by task; `resources.workers` > 1 spreads the tasks over Ray workers.
The metrics and their definitions are pipeline/evaluation.py's (`specdraft eval` computes the
same for one pair); a greedy output that leaves target-only greedy decoding fails the stage.

Reads: `data`, `target`, `draft_init`, `reference`, `distil`
Writes: `metrics.json` (the metrics with their definitions), `per_prompt.json`
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from specdraft.drafts.models import device_for
from specdraft.drafts.pair import ModelTrust
from specdraft.drafts.vocab_trim import served_view
from specdraft.pipeline.batches import prompt_token_ids
from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    model_location,
)
from specdraft.pipeline.engine.parallel import map_shards, shard_bounds
from specdraft.pipeline.evaluation import (
    DEFINITIONS,
    FREE_TEXT,
    DraftRuns,
    draft_metrics,
    free_text_sequences,
    judge_draft,
    off_distribution_acceptance,
    prompt_sets,
    task_indices,
)
from specdraft.pipeline.sequences import chat_template_of, load_splits, pick_eval_prompts

DRAFTS = {"baseline": "draft_init", "reference": "reference", "final": "distil"}


def _num(value) -> float:
    """A metric for the log line: NaN where it is None (no position to measure it on)."""
    return math.nan if value is None else value


def evaluate_tasks(
    inputs: dict[str, str],
    cfg: EvaluateConfig,
    rows: list[dict],
    tasks: list[tuple[int, str]],
    seed: int,
    trust: ModelTrust,
    free_text: bool = False,
) -> dict:
    """One worker's share: every draft's DraftRuns on the eval rows of `tasks`, and with
    `free_text` its acceptance on the target's free text (evaluate.free_text_prompts)."""
    inputs = {k: Path(v) for k, v in inputs.items()}
    device = device_for(cfg.resources.gpus)
    # the running job's settings, per model
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    target = load_model_artifact(inputs["target"], device, trust_remote_code=trust.target)
    sets = prompt_sets(
        target, tokenizer, rows, tasks, cfg, seed=seed, spec_prompts=cfg.spec_prompts_per_task
    )
    result: dict = {"target_only_seconds": sum(s.target_only_seconds for s in sets), "drafts": {}}
    free = []
    if free_text and cfg.free_text_prompts:
        free = free_text_sequences(
            target, tokenizer, cfg.free_text_prompts, cfg.max_new_tokens, seed
        )
        result["free_text"] = {}
    for name, stage in DRAFTS.items():
        if stage not in inputs:
            continue
        draft = load_model_artifact(inputs[stage], device, trust_remote_code=trust.draft)
        # a draft with its own vocabulary is judged as the engine serves it: through the map
        draft = served_view(draft, model_location(inputs[stage]), tokenizer, target)
        result["drafts"][name] = judge_draft(
            target,
            draft,
            sets,
            cfg,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            seed=seed,
            desc=f"speculative ({name})",
        )
        if free:
            result["free_text"][name] = off_distribution_acceptance(
                target, draft, free, tokenizer.pad_token_id, cfg, len(tokenizer)
            )
        del draft
    return result


def run(cfg: EvaluateConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    """Evaluation task by task; `resources.workers` > 1 spreads the tasks over Ray workers."""
    out, seed, trust = ctx.out, ctx.seed, ctx.trust
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    chat = chat_template_of(inputs["data"])
    eval_rows = pick_eval_prompts(
        load_splits(inputs["data"])["eval"], cfg.prompts_per_task, cfg.prompt_offset
    )
    for row in eval_rows:
        row["prompt_ids"] = prompt_token_ids(tokenizer, row["prompt"], chat)
    tasks = task_indices(eval_rows)
    paths = {k: str(v) for k, v in inputs.items()}
    shards = []
    for a, b in shard_bounds(len(tasks), cfg.resources.workers, 1):
        names = {task for _, task in tasks[a:b]}
        chosen = [r for r in eval_rows if r["task"] in names]
        shards.append((paths, cfg, chosen, tasks[a:b], seed, trust, not shards))
    parts = map_shards(evaluate_tasks, shards, cfg.resources, ctx)
    target_only_seconds = sum(part["target_only_seconds"] for part in parts)
    metrics: dict = {
        "gamma": cfg.gamma,
        "temperature": cfg.temperature,
        "drafting": cfg.drafting,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "workers": len(parts),
        "target": model_location(inputs["target"]),
        "definitions": DEFINITIONS,
    }
    per_prompt = {}
    for name in parts[0]["drafts"]:
        runs = DraftRuns()
        for part in parts:  # shards hold whole tasks, in task order
            runs.merge(part["drafts"][name])
        result = draft_metrics(runs, cfg, target_only_seconds)
        per_prompt[name] = result.pop("per_prompt")
        result["model"] = model_location(inputs[DRAFTS[name]])
        if "free_text" in parts[0]:
            result["off_distribution"] = {FREE_TEXT: parts[0]["free_text"][name]}
        metrics[name] = result
        served = result["served"]
        print(
            f"evaluate {name:<9} served ({served['drafting']} drafting, T={served['temperature']:g}): "
            f"acceptance={_num(served['acceptance']):.3f} length={_num(served['acceptance_length']):.2f}; "
            f"alpha={result['alpha']:.3f} alpha_greedy={result['alpha_greedy']:.3f} "
            f"spec_alpha={result['spec_alpha']:.3f} tau={result['tau']:.2f} "
            f"speedup={result['speedup'] or math.nan:.2f}"
            + (
                f"; free text: served acceptance "
                f"{_num(result['off_distribution'][FREE_TEXT]['served']['acceptance']):.3f}"
                if "off_distribution" in result
                else ""
            )
        )
    metrics["lossless_greedy"] = all(metrics[n]["lossless_greedy"] for n in per_prompt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (out / "per_prompt.json").write_text(json.dumps(per_prompt, allow_nan=False))
    return {
        n: {
            "served": metrics[n]["served"]["acceptance"],
            "alpha": metrics[n]["alpha"],
            "tau": metrics[n]["tau"],
        }
        for n in per_prompt
    }
