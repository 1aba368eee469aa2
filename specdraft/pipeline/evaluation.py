"""The evaluation library: acceptance of a draft against its target on prompt sets, and the metric
definitions. The evaluate stage (stages/evaluate.py) and `specdraft eval` (commands/eval_pair.py)
judge drafts with these functions, so one pair gets one set of numbers; `specdraft serve-check`
replays the same speculative-decoding prompts (spec_prompt_rows) in a serving engine.

- `alpha`: β = Σ_v min(p_v, q_v) = 1 − TVD(p, q) at the evaluation temperature, averaged over the
  response positions of target-generated continuations of eval prompts (DistillSpec's definition);
  also per task and per position bucket (`early` / `late` half of each continuation).
- `alpha_greedy`: top-1 agreement of draft and target at the same positions.
- `acceptance_by_rule`: the acceptance of a drafted token at the same positions under each drafting
  rule (kernels/acceptance.py): `probabilistic` (= alpha), `greedy_drafting` (E[p_T(argmax q)],
  what vLLM's and SGLang's draft models deliver by default) and `agreement_t0` (= alpha_greedy);
  beside each, the acceptance length a serving engine would report (expected_rounds).
- `off_distribution.free_text`: the same acceptance on text the target writes freely from its bos
  token alone (sampled at T = 1): traffic unlike the job's prompts, where a draft narrowed to one
  prompt format shows the drop.
- `served`: the rule the job serves with (evaluate.drafting, evaluate.temperature): its acceptance
  and acceptance length, the headline of reports and the history.
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
from typing import NamedTuple

import torch

from specdraft.drafts.hidden_states import hidden_and_head
from specdraft.drafts.vocab_map import ServedDraft
from specdraft.kernels import greedy_drafting_acceptance, token_acceptance
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
    "acceptance_by_rule": "acceptance of a drafted token at alpha's positions under each drafting "
    "rule: probabilistic = sum_v min(p_v, q_v) (= alpha), greedy_drafting = p_T(argmax q) (the "
    "draft proposes its argmax; rejection sampling at temperature T accepts it with probability "
    "p_T), agreement_t0 = [argmax q == argmax p] (= alpha_greedy; both rules at T = 0)",
    "acceptance_length": "expected tokens per verification round as vLLM reports it (pooled: 1 + "
    "accepted / rounds over all continuations), predicted from the per-position acceptance: "
    "rounds of gamma drafted tokens start after the first generated token (the engine's prefill "
    "makes it), a round accepts a prefix of its drafts position by position and restarts after "
    "the first rejection",
    "off_distribution": "free_text: the acceptance on evaluate.free_text_prompts continuations "
    "the target samples at T = 1 from its bos token alone (no prompt): text unlike the job's "
    "prompts",
    "served": "the acceptance and acceptance_length of the rule the job serves with "
    "(evaluate.drafting at evaluate.temperature; agreement at T = 0): the headline",
    "lossless_near_tie_mismatches": "spec prompts whose greedy output left the target-only one at "
    "a near tie (bf16 rounding breaks exact ties either way); lossless_near_tie_rate: their share",
}


class PositionAcceptance(NamedTuple):
    """A drafted token's acceptance at every counted position (N,) under each drafting rule."""

    probabilistic: torch.Tensor  # β = Σ min(p, q) at the temperature
    greedy_drafting: torch.Tensor  # p_T(argmax q)
    agreement: torch.Tensor  # [argmax q == argmax p]


RULES = {  # acceptance_by_rule key -> PositionAcceptance field
    "probabilistic": "probabilistic",
    "greedy_drafting": "greedy_drafting",
    "agreement_t0": "agreement",
}


@torch.no_grad()
def position_acceptance(
    target, draft, batch: dict, temperature: float, vocab: int | None = None
) -> PositionAcceptance:
    """The acceptance at every response position of a padded batch under each rule, over the
    first `vocab` (the tokenizer's length) logits of both heads."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = labels[:, 1:] != -100
    t_hidden, t_head = hidden_and_head(target, ids, attn, vocab=vocab)
    if isinstance(draft, ServedDraft):  # another vocabulary: judged in the engine's view
        return _served_view_acceptance(draft, ids, attn, counted, t_hidden, t_head, temperature)
    d_hidden, d_head = hidden_and_head(draft, ids, attn, vocab=vocab)
    t_hidden, d_hidden = t_hidden[:, :-1][counted], d_hidden[:, :-1][counted]  # (N, H)
    agree = token_acceptance(d_hidden, d_head, t_hidden, t_head, temperature=0)  # (N,)
    if temperature == 0:
        return PositionAcceptance(agree, agree, agree)
    return PositionAcceptance(
        token_acceptance(d_hidden, d_head, t_hidden, t_head, temperature),
        greedy_drafting_acceptance(d_hidden, d_head, t_hidden, t_head, temperature),
        agree,
    )


def _served_view_acceptance(
    draft: ServedDraft, ids, attn, counted, t_hidden, t_head, temperature: float
) -> PositionAcceptance:
    """position_acceptance for a draft with another vocabulary: its logits over the target's ids
    (ServedDraft: -inf outside the intersection) against the target's, ROWS_PER_CHUNK rows at a
    time. Greedy drafting proposes the masked argmax; a sampled draft token lies in the
    intersection, so β = Σ over the intersection of min(p, q)."""
    from specdraft.kernels.acceptance import ROWS_PER_CHUNK

    d_logits = draft(input_ids=ids, attention_mask=attn).logits[:, :-1][counted]  # (N, V)
    t_hidden = t_hidden[:, :-1][counted]
    parts: dict[str, list[torch.Tensor]] = {"beta": [], "greedy": [], "agree": []}
    for a in range(0, d_logits.shape[0], ROWS_PER_CHUNK):
        d = d_logits[a : a + ROWS_PER_CHUNK].float()[:, : t_head.shape[0]]
        t = (t_hidden[a : a + ROWS_PER_CHUNK] @ t_head.T).float()
        drafted = d.argmax(-1, keepdim=True)
        agree = (drafted.squeeze(-1) == t.argmax(-1)).float()
        parts["agree"].append(agree)
        if temperature == 0:
            continue
        p, q = torch.softmax(t / temperature, -1), torch.softmax(d / temperature, -1)
        parts["beta"].append(torch.minimum(p, q).sum(-1))
        parts["greedy"].append(p.gather(-1, drafted).squeeze(-1))
    agree = torch.cat(parts["agree"]) if parts["agree"] else d_logits.new_zeros(0)
    if temperature == 0:
        return PositionAcceptance(agree, agree, agree)
    return PositionAcceptance(torch.cat(parts["beta"]), torch.cat(parts["greedy"]), agree)


def expected_rounds(acceptance: list[float], gamma: int, first: int = 1) -> tuple[float, float]:
    """(expected accepted drafts, expected rounds) of speculative decoding along one continuation
    whose drafted token at position j is accepted with probability acceptance[j], independently
    given the context: each round drafts `gamma` tokens, accepts the longest prefix the verifier
    accepts and emits one token more; rounds start at position `first` (1: the engine's prefill
    emits position 0) and go on while positions remain. Positions past the end accept nothing."""
    n = len(acceptance)
    acc, rounds = [0.0] * (n + gamma + 2), [0.0] * (n + gamma + 2)
    for t in range(n - 1, first - 1, -1):
        reach, e_acc, e_rounds = 1.0, 0.0, 1.0  # reach: P(the first k drafts were accepted)
        for k in range(gamma + 1):
            a = acceptance[t + k] if k < gamma and t + k < n else 0.0
            stop = reach * (1.0 - a)  # P(exactly k accepted)
            e_acc += stop * (k + acc[t + k + 1])
            e_rounds += stop * rounds[t + k + 1]
            reach *= a
        acc[t], rounds[t] = e_acc, e_rounds
    return (acc[first], rounds[first]) if first < n else (0.0, 0.0)


def acceptance_length(accepted: float, rounds: float) -> float | None:
    """vLLM's mean acceptance length, pooled: 1 + accepted / rounds (None without a round)."""
    return 1.0 + accepted / rounds if rounds else None


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def position_bucket(j: int, n: int) -> str:
    """`early` for the first half of a continuation's n response positions (0-based j), else `late`."""
    return "early" if 2 * j < n else "late"


def _acceptance_summary(cell: dict[str, list[float]]) -> dict:
    return {
        "alpha": _mean(cell["probabilistic"]),
        "alpha_greedy": _mean(cell["agreement_t0"]),
        "num_positions": len(cell["probabilistic"]),
    }


def analytic_values(
    target, draft, sequences: list[dict], pad_id: int, temperature: float, vocab=None, gamma=4
) -> tuple[dict, list[dict]]:
    """The acceptance under each rule at every response position, by (task, position bucket), and
    per sequence their means and expected rounds under each rule (the rows paired comparisons
    read)."""
    collate = Collator(pad_id)
    # (task, bucket) -> rule -> the acceptances at the positions there
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
        lambda: {rule: [] for rule in RULES}
    )
    per_prompt = []
    for start in range(0, len(sequences), 16):
        chunk = sequences[start : start + 16]
        batch = collate(chunk)
        measured = position_acceptance(target, draft, batch, temperature, vocab)
        by_rule = {rule: getattr(measured, name).tolist() for rule, name in RULES.items()}
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        offset = 0
        for row, n in zip(chunk, counts, strict=True):
            mine = {rule: v[offset : offset + n] for rule, v in by_rule.items()}
            for j in range(n):
                cell = values[(row["task"], position_bucket(j, n))]
                for rule in RULES:
                    cell[rule].append(mine[rule][j])
            per_prompt.append(
                {
                    "prompt": row.get("prompt", ""),
                    "task": row["task"],
                    "alpha": _mean(mine["probabilistic"]),
                    "alpha_greedy": _mean(mine["agreement_t0"]),
                    "greedy_drafting": _mean(mine["greedy_drafting"]),
                    # expected (accepted, rounds) per rule: pooled into acceptance lengths
                    "rounds": {rule: expected_rounds(v, gamma) for rule, v in mine.items()},
                }
            )
            offset += n
    return dict(values), per_prompt


def rule_summary(cells: list[dict], rows: list[dict]) -> dict:
    """acceptance_by_rule over the positions of `cells` and the rounds of `rows`."""
    summary = {}
    for rule in RULES:
        accepted = sum(r["rounds"][rule][0] for r in rows)
        rounds = sum(r["rounds"][rule][1] for r in rows)
        summary[rule] = {
            "acceptance": _mean([x for c in cells for x in c[rule]]),
            "acceptance_length": acceptance_length(accepted, rounds),
        }
    return summary


DRAFTING = {"greedy": "greedy_drafting", "probabilistic": "probabilistic"}  # evaluate.drafting


def served_rule(drafting: str, temperature: float) -> str:
    """The acceptance_by_rule key a job serving with `drafting` (evaluate.drafting) at
    `temperature` is judged by: agreement at T = 0, whatever the drafting rule."""
    return "agreement_t0" if temperature == 0 else DRAFTING[drafting]


def summarize_analytic(
    values: dict, per_prompt: list[dict], drafting: str = "greedy", temperature=1.0
) -> dict:
    """alpha and alpha_greedy overall, per task and per position bucket; the acceptance under each
    rule and the served rule's (`drafting` at `temperature`) overall and per task."""
    rule = served_rule(drafting, temperature)

    def cells(task: str | None = None, bucket: str | None = None) -> list[dict]:
        return [
            v
            for (t, b), v in values.items()
            if (task is None or t == task) and (bucket is None or b == bucket)
        ]

    def summary(task: str | None = None, bucket: str | None = None) -> dict:
        chosen = cells(task, bucket)
        return _acceptance_summary({r: [x for c in chosen for x in c[r]] for r in RULES})

    def with_rules(task: str | None) -> dict:
        rows = [r for r in per_prompt if task is None or r["task"] == task]
        by_rule = rule_summary(cells(task), rows)
        buckets = {b: summary(task, b) for b in ("early", "late")}
        return {
            **summary(task),
            "served": {
                "drafting": drafting,
                "temperature": temperature,
                **by_rule[rule],
            },
            "acceptance_by_rule": by_rule,
            "position_buckets": buckets,
        }

    return {
        **with_rules(None),
        "tasks": {task: with_rules(task) for task in sorted({t for t, _ in values})},
        "per_prompt": per_prompt,
    }


def analytic_acceptance(
    target,
    draft,
    sequences: list[dict],
    pad_id: int,
    temperature: float,
    *,
    gamma: int = 4,
    drafting: str = "greedy",
) -> dict:
    """alpha and alpha_greedy overall, per task and per position bucket over tokenised sequences,
    with the acceptance under each rule."""
    values, per_prompt = analytic_values(target, draft, sequences, pad_id, temperature, None, gamma)
    return summarize_analytic(values, per_prompt, drafting, temperature)


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
FREE_TEXT = "free_text"  # off_distribution's prompt set: the target writing from its bos token
FREE_TEXT_FIRST_INDEX = 7 * TASK_SEED_STRIDE  # its sampling seeded apart from every task's


def free_text_sequences(target, tokenizer, n: int, max_new_tokens: int, seed: int) -> list[dict]:
    """`n` continuations the target samples (T = 1) from its bos token alone (eos where it has
    none), as the sequences analytic_values reads: text unlike the job's prompts."""
    start = tokenizer.bos_token_id
    start = tokenizer.eos_token_id if start is None else start
    rows = [{"prompt": "", "prompt_ids": [start], "task": FREE_TEXT} for _ in range(n)]
    continuations = sample_responses(
        target,
        tokenizer,
        [r["prompt_ids"] for r in rows],
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        batch_size=32,
        seed=seed,
        desc="target free text",
        first_index=FREE_TEXT_FIRST_INDEX,
    )
    return continuation_sequences(rows, continuations)


def off_distribution_acceptance(
    target, draft, sequences: list[dict], pad_id: int, cfg: EvaluateConfig, vocab=None
) -> dict:
    """alpha, alpha_greedy, served and acceptance_by_rule of `draft` on `sequences` (e.g.
    free_text_sequences), without per-task or per-prompt detail."""
    values, rows = analytic_values(
        target, draft, sequences, pad_id, cfg.temperature, vocab, cfg.gamma
    )
    summary = summarize_analytic(values, rows, cfg.drafting, cfg.temperature)
    keep = ("alpha", "alpha_greedy", "num_positions", "served", "acceptance_by_rule")
    return {k: summary[k] for k in keep} | {"num_sequences": len(sequences)}


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
            target, draft, s.sequences, pad_id, cfg.temperature, s.vocab, cfg.gamma
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
        summarize_analytic(runs.values, runs.alpha_rows, cfg.drafting, cfg.temperature),
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
