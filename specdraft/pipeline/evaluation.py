"""The evaluation library: acceptance of a draft against its target on prompt sets, and the metric
definitions. The evaluate stage (stages/evaluate.py) and `specdraft eval` (commands/eval_pair.py)
judge drafts with these functions, so one pair gets one set of numbers; `specdraft serve-check`
replays the same speculative-decoding prompts (spec_prompt_rows) in a serving engine.

- `alpha`: β = Σ_v min(p_v, q_v) = 1 − TVD(p, q) at the evaluation temperature, averaged over the
  response positions of target-generated continuations of eval prompts (DistillSpec's definition);
  also per task and per position bucket (`early` / `late` half of each continuation).
- `alpha_greedy`: top-1 agreement of draft and target at the same positions.
- `spec_alpha` / `tau`: accepted / drafted tokens and tokens per target call (bonus included) from
  real speculative decoding with `gamma` drafted tokens at the evaluation temperature, in batches
  of `batch_size` prompts whose rows accept independently.
- `*_greedy`: the same at temperature 0, where the output must equal target-only greedy decoding
  token for token (`lossless_greedy`); a mismatch is a LosslessError, unless it is a near tie of
  the target's top logits (evaluate.tie_tolerance): those are counted. The greedy runs are timed
  against target-only decoding of the same prompts at the same batch size (`speedup`).

Real speculative decoding is measured in specdraft/pipeline/spec_runs.py.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from specdraft.drafts.hidden_states import hidden_and_head
from specdraft.kernels import token_acceptance
from specdraft.pipeline.batches import Collator
from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.sequences import sample_responses
from specdraft.pipeline.spec_runs import (
    SpecRuns,
    spec_runs,
    summarize_spec,
    target_only_greedy,
)

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


def spec_prompt_rows(rows: list[dict], spec_prompts: int) -> list[dict]:
    """The rows decoded speculatively: the first `spec_prompts` rows of each task of `rows`, task
    by task in task_indices order (what serve-check replays in an engine)."""
    return [r for _, task in task_indices(rows) for r in _rows_of(rows, task)[:spec_prompts]]


def _rows_of(rows: list[dict], task: str) -> list[dict]:
    return [r for r in rows if r["task"] == task]


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
        task_rows = _rows_of(rows, task)
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
        spec_rows = spec_prompt_rows(task_rows, spec_prompts)
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
