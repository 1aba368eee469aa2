"""Stage `evaluate`: acceptance of the baseline (draft init), reference and final drafts.

- `alpha`: β = Σ_v min(p_v, q_v) = 1 − TVD(p, q) at the evaluation temperature, averaged over the
  response positions of target-generated continuations of eval prompts (DistillSpec's definition);
  also per task and per position bucket (`early` / `late` half of each continuation).
- `alpha_greedy`: top-1 agreement of draft and target at the same positions.
- `spec_alpha` / `tau`: accepted / drafted tokens and tokens per target call (bonus included) from
  real speculative decoding with `gamma` drafted tokens at the evaluation temperature, in batches
  of `batch_size` prompts whose rows accept independently.
- `*_greedy`: the same at temperature 0, where the output must equal target-only greedy decoding
  token for token (`lossless_greedy`); a mismatch fails the stage, unless it is a near tie of the
  target's top logits (evaluate.tie_tolerance): those are counted. The greedy runs are timed
  against target-only decoding of the same prompts at the same batch size (`speedup`).

Real speculative decoding is measured in specdraft/pipeline/spec_runs.py; `specdraft eval`
(specdraft/pipeline/commands/eval_pair.py) evaluates one target/draft pair with the same functions.

Reads: `data`, `target`, `draft_init`, `reference`, `distil`
Writes: `metrics.json` (the definitions below), `per_prompt.json`
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdraft.drafts.models import device_for
from specdraft.kernels import token_acceptance
from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    model_location,
)
from specdraft.pipeline.engine.parallel import map_shards, shard_bounds
from specdraft.pipeline.sequences import (
    chat_template_of,
    load_splits,
    pick_eval_prompts,
    sample_responses,
)
from specdraft.pipeline.spec_runs import (
    SpecRuns,
    spec_runs,
    summarize_spec,
    target_only_greedy,
)
from specdraft.pipeline.training import Collator, hidden_and_head, prompt_token_ids

DRAFTS = {"baseline": "draft_init", "reference": "reference", "final": "distil"}

DEFINITIONS = {
    "alpha": "mean over response positions of target-generated continuations of sum_v min(p_v, q_v) "
    "(= 1 - TVD) at `temperature`",
    "alpha_greedy": "top-1 agreement of draft and target at the same positions",
    "position_buckets": "alpha and alpha_greedy over the `early` half of each continuation's "
    "response positions (position j of n with 2j < n, 0-based: the middle one when n is odd) and "
    "the `late` rest; halves of each continuation, not fixed token ranges",
    "spec_alpha": "accepted / drafted tokens in real speculative decoding at `temperature` "
    "(greedy verification at 0, rejection sampling above)",
    "tau": "tokens emitted per target forward pass, bonus token included (block efficiency)",
    "per_position": "acceptance rate of drafted position i = 1..gamma, given it was reached",
    "spec_alpha_verified": "accepted / verified drafted tokens (drafts after a rejection are never "
    "verified): the per-token acceptance rate, the alpha of tau_predicted",
    "tau_predicted": "(1 - a^(gamma+1)) / (1 - a) with a = spec_alpha_verified of the same run: "
    "tau if acceptance were i.i.d. across positions and every round drafted gamma tokens",
    "cost_ratio": "c = seconds per draft forward pass / seconds per target forward pass, measured "
    "in the greedy speculative decoding (batched passes shared evenly by their rows)",
    "speedup": "wall seconds of target-only greedy decoding / wall seconds of greedy speculative "
    "decoding, same prompts, same batch_size, same machine",
    "speedup_predicted": "tau_greedy / (cost_ratio * gamma + 1)",
    "lossless_greedy": "greedy speculative output equals target-only greedy output token for "
    "token, or leaves it only at a near tie (both tokens' target logits within tie_tolerance * "
    "max(1, |top logit|) of the top logit)",
    "lossless_near_tie_mismatches": "spec prompts whose greedy output left the target-only one at "
    "a near tie (bf16 rounding breaks exact ties either way); lossless_near_tie_rate: their share",
}


@torch.no_grad()
def position_acceptance(
    target, draft, batch: dict, temperature: float, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """β (N,) and top-1 agreement (N,) at every response position of a padded batch, over the
    first `vocab` (the tokenizer's length) logits of both heads."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = labels[:, 1:] != -100
    t_hidden, t_head = hidden_and_head(target, ids, attn, vocab=vocab)
    d_hidden, d_head = hidden_and_head(draft, ids, attn, vocab=vocab)
    t_hidden, d_hidden = t_hidden[:, :-1][counted], d_hidden[:, :-1][counted]  # (N, H)
    agree = token_acceptance(d_hidden, d_head, t_hidden, t_head, temperature=0)  # (N,)
    if temperature == 0:
        return agree, agree
    return token_acceptance(d_hidden, d_head, t_hidden, t_head, temperature), agree


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def position_bucket(j: int, n: int) -> str:
    """`early` for the first half of a continuation's n response positions (0-based j), else `late`."""
    return "early" if 2 * j < n else "late"


def _acceptance_summary(beta: list[float], agree: list[float]) -> dict:
    return {"alpha": _mean(beta), "alpha_greedy": _mean(agree), "num_positions": len(beta)}


def analytic_values(
    target, draft, sequences: list[dict], pad_id: int, temperature: float, vocab=None
) -> tuple[dict, list[dict]]:
    """β and agreement at every response position, by (task, position bucket), and per sequence
    their means (the rows paired comparisons read)."""
    collate = Collator(pad_id)
    # (task, bucket) -> lists of β and agreement at the positions there
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
        lambda: {"beta": [], "agree": []}
    )
    per_prompt = []
    for start in range(0, len(sequences), 16):
        chunk = sequences[start : start + 16]
        batch = collate(chunk)
        beta, agree = position_acceptance(target, draft, batch, temperature, vocab)
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        beta, agree = beta.tolist(), agree.tolist()
        offset = 0
        for row, n in zip(chunk, counts, strict=True):
            for j in range(n):
                cell = values[(row["task"], position_bucket(j, n))]
                cell["beta"].append(beta[offset + j])
                cell["agree"].append(agree[offset + j])
            per_prompt.append(
                {
                    "prompt": row.get("prompt", ""),
                    "task": row["task"],
                    "alpha": _mean(beta[offset : offset + n]),
                    "alpha_greedy": _mean(agree[offset : offset + n]),
                }
            )
            offset += n
    return dict(values), per_prompt


def summarize_analytic(values: dict, per_prompt: list[dict]) -> dict:
    """alpha and alpha_greedy overall, per task and per position bucket."""

    def summary(task: str | None = None, bucket: str | None = None) -> dict:
        cells = [
            v
            for (t, b), v in values.items()
            if (task is None or t == task) and (bucket is None or b == bucket)
        ]
        return _acceptance_summary(
            [x for c in cells for x in c["beta"]], [x for c in cells for x in c["agree"]]
        )

    def with_buckets(task: str | None) -> dict:
        buckets = {b: summary(task, b) for b in ("early", "late")}
        return {**summary(task), "position_buckets": buckets}

    return {
        **with_buckets(None),
        "tasks": {task: with_buckets(task) for task in sorted({t for t, _ in values})},
        "per_prompt": per_prompt,
    }


def analytic_acceptance(
    target, draft, sequences: list[dict], pad_id: int, temperature: float
) -> dict:
    """alpha and alpha_greedy overall, per task and per position bucket over tokenised sequences."""
    return summarize_analytic(*analytic_values(target, draft, sequences, pad_id, temperature))


def merge_metrics(analytic: dict, spec: dict) -> dict:
    """One draft's metrics: the analytic acceptance with the speculative decoding's merged in
    (per-task entries under `tasks`), both per-prompt lists under `per_prompt` (`alpha`, `spec`)."""
    per_prompt = {"alpha": analytic.pop("per_prompt"), "spec": spec.pop("per_prompt")}
    for task, entry in spec.pop("tasks").items():
        analytic["tasks"].setdefault(task, {}).update(entry)
    analytic.update(spec)
    analytic["per_prompt"] = per_prompt
    return analytic


def continuation_sequences(rows: list[dict], continuations: list[list[int]]) -> list[dict]:
    """Prompt + target continuation as the tokenised sequences `analytic_acceptance` reads."""
    return [
        {
            "input_ids": r["prompt_ids"] + c,
            "response_mask": [0] * len(r["prompt_ids"]) + [1] * len(c),
            "task": r["task"],
            "prompt": r["prompt"],
        }
        for r, c in zip(rows, continuations, strict=True)
        if c
    ]


TASK_SEED_STRIDE = 1_000_003  # task i's sampling is seeded apart from every other task's


def task_indices(rows: list[dict]) -> list[tuple[int, str]]:
    """(index, task) of every task of `rows`, sorted: the index seeds the task's sampling, so a
    task draws the same numbers whichever shard or command evaluates it."""
    return list(enumerate(sorted({r["task"] for r in rows})))


@dataclass
class PromptSet:
    """One task's eval prompts made ready to judge drafts on: prompt + target continuation
    sequences (where alpha is measured), the prompts decoded speculatively and their target-only
    greedy outputs (the lossless reference) with its wall seconds."""

    index: int  # the task's index in task_indices
    sequences: list[dict]
    spec_rows: list[dict]
    references: list[list[int]]
    target_only_seconds: float
    vocab: int | None = None  # the tokenizer's length: logits compared over its ids only


def prompt_sets(
    target,
    tokenizer,
    rows: list[dict],
    tasks: list[tuple[int, str]],
    cfg: EvaluateConfig,
    *,
    seed: int,
    spec_prompts: int,
) -> list[PromptSet]:
    """A PromptSet per (index, task) of `tasks` from `rows` (dicts with prompt, prompt_ids, task):
    continuations sampled from the target at the evaluation temperature, the first `spec_prompts`
    rows of each task decoded speculatively."""
    sets = []
    for index, task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        continuations = sample_responses(
            target,
            tokenizer,
            [r["prompt_ids"] for r in task_rows],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            batch_size=32,
            seed=seed,
            desc=f"target continuations ({task})",
            first_index=index * TASK_SEED_STRIDE,
        )
        spec_rows = task_rows[:spec_prompts]
        references, seconds = target_only_greedy(
            target,
            [r["prompt_ids"] for r in spec_rows],
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            vocab=len(tokenizer),
        )
        sequences = continuation_sequences(task_rows, continuations)
        sets.append(PromptSet(index, sequences, spec_rows, references, seconds, len(tokenizer)))
    return sets


@dataclass
class DraftRuns:
    """What judging one draft on some prompt sets left, before summarising: β and agreement by
    (task, position bucket), a per-sequence alpha row each, the speculative decoding's SpecRuns.
    Runs over disjoint tasks (data-parallel shards) merge into one."""

    values: dict = field(default_factory=dict)
    alpha_rows: list[dict] = field(default_factory=list)
    spec: SpecRuns = field(default_factory=SpecRuns)

    def merge(self, other: DraftRuns) -> None:
        self.values.update(other.values)  # disjoint tasks: no (task, bucket) in both
        self.alpha_rows += other.alpha_rows
        self.spec.merge(other.spec)


def judge_draft(
    target,
    draft,
    sets: list[PromptSet],
    cfg: EvaluateConfig,
    *,
    eos_id,
    pad_id: int,
    seed: int,
    desc: str = "speculative",
) -> DraftRuns:
    """Analytic acceptance on each set's sequences and speculative decoding of its spec rows (seeded
    by seed and the set's task index)."""
    runs = DraftRuns()
    for s in sets:
        values, alpha_rows = analytic_values(
            target, draft, s.sequences, pad_id, cfg.temperature, s.vocab
        )
        spec = spec_runs(
            target,
            draft,
            s.spec_rows,
            cfg,
            eos_id=eos_id,
            pad_id=pad_id,
            seed=seed * TASK_SEED_STRIDE + s.index,
            greedy_references=s.references,
            desc=desc,
            vocab=s.vocab,
        )
        runs.merge(DraftRuns(values, alpha_rows, spec))
    return runs


def draft_metrics(runs: DraftRuns, cfg: EvaluateConfig, target_only_seconds: float) -> dict:
    """Every metric of one draft from its (merged) runs; LosslessError if a greedy output differed."""
    return merge_metrics(
        summarize_analytic(runs.values, runs.alpha_rows),
        summarize_spec(runs.spec, cfg, target_only_seconds),
    )


def evaluate_draft(
    target,
    draft,
    sets: list[PromptSet],
    cfg: EvaluateConfig,
    *,
    eos_id,
    pad_id: int,
    seed: int,
    desc: str = "speculative",
) -> dict:
    """Every metric of one draft on prompt sets, in one process: what `specdraft eval` reports. The
    evaluate stage computes the same (judge_draft per shard, merged, then draft_metrics)."""
    runs = judge_draft(target, draft, sets, cfg, eos_id=eos_id, pad_id=pad_id, seed=seed, desc=desc)
    return draft_metrics(runs, cfg, sum(s.target_only_seconds for s in sets))


def evaluate_tasks(
    inputs: dict[str, str],
    cfg: EvaluateConfig,
    rows: list[dict],
    tasks: list[tuple[int, str]],
    seed: int,
    trust_remote_code: bool,
) -> dict:
    """One worker's share: every draft's DraftRuns on the eval rows of `tasks`."""
    inputs = {k: Path(v) for k, v in inputs.items()}
    device = device_for(cfg.resources.gpus)
    trust = {"trust_remote_code": trust_remote_code}  # the running job's setting
    tokenizer = load_tokenizer_artifact(inputs["target"], **trust)
    target = load_model_artifact(inputs["target"], device, **trust)
    sets = prompt_sets(
        target, tokenizer, rows, tasks, cfg, seed=seed, spec_prompts=cfg.spec_prompts_per_task
    )
    result: dict = {"target_only_seconds": sum(s.target_only_seconds for s in sets), "drafts": {}}
    for name, stage in DRAFTS.items():
        if stage not in inputs:
            continue
        draft = load_model_artifact(inputs[stage], device, **trust)
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
        del draft
    return result


def run(cfg: EvaluateConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    """Evaluation task by task; `resources.workers` > 1 spreads the tasks over Ray workers."""
    out, seed, trust = ctx.out, ctx.seed, ctx.trust_remote_code
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust)
    chat = chat_template_of(inputs["data"])
    eval_rows = pick_eval_prompts(load_splits(inputs["data"])["eval"], cfg.prompts_per_task)
    for row in eval_rows:
        row["prompt_ids"] = prompt_token_ids(tokenizer, row["prompt"], chat)
    tasks = task_indices(eval_rows)
    paths = {k: str(v) for k, v in inputs.items()}
    shards = []
    for a, b in shard_bounds(len(tasks), cfg.resources.workers, 1):
        names = {task for _, task in tasks[a:b]}
        chosen = [r for r in eval_rows if r["task"] in names]
        shards.append((paths, cfg, chosen, tasks[a:b], seed, trust))
    parts = map_shards(evaluate_tasks, shards, cfg.resources, ctx)
    target_only_seconds = sum(part["target_only_seconds"] for part in parts)
    metrics: dict = {
        "gamma": cfg.gamma,
        "temperature": cfg.temperature,
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
        metrics[name] = result
        print(
            f"evaluate {name:<9} alpha={result['alpha']:.3f} alpha_greedy={result['alpha_greedy']:.3f} "
            f"spec_alpha={result['spec_alpha']:.3f} tau={result['tau']:.2f} "
            f"speedup={result['speedup'] or math.nan:.2f}"
        )
    metrics["lossless_greedy"] = all(metrics[n]["lossless_greedy"] for n in per_prompt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (out / "per_prompt.json").write_text(json.dumps(per_prompt, allow_nan=False))
    return {n: {"alpha": metrics[n]["alpha"], "tau": metrics[n]["tau"]} for n in per_prompt}
