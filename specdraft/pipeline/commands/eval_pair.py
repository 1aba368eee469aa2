"""`specdraft eval`: acceptance and speculative decoding of one target/draft pair on a prompt set.

Any pair (HF ids or local directories, e.g. the `model/` directories of a specdraft run store) and
any prompt set (a data source `load_user_data` reads, or `builtin`, the toy eval split). The metrics
are the evaluate stage's, computed by the same functions (pipeline/evaluation.py), for a single draft.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.config import DataConfig, EvaluateConfig


class EvalInputError(InputError):
    """Bad arguments or prompts for `specdraft eval`."""


# The data loader's messages name job keys; `specdraft eval` names its flags instead.
DATA_FLAGS = {
    "data.source": "--data",
    "data.eval_split": "--split",
    "data.split": "--split",
    "data.prompt_field": "--prompt-field",
    "data.task_field": "--task-field",
}


@dataclass
class EvalRequest:
    """The arguments of `specdraft eval` (the CLI takes its defaults from here)."""

    target: str
    draft: str
    data: str
    gamma: int = 4
    temperature: float = 0.0
    drafting: str = "greedy"  # the serving engine's drafting rule: the `served` entry's
    max_new_tokens: int = 48
    num_prompts: int = 48
    batch_size: int = 8
    prompt_field: str = "prompt"
    task_field: str = "task"
    split: str = "train"  # every row of this split is a prompt
    chat_template: bool = False
    dtype: str = "float32"
    device: str = "auto"
    # whose model code may run: True/"both" (the one flag), "target", "draft" (drafts.pair.ModelTrust)
    trust_remote_code: bool | str = False
    # `intersection`: a draft with another tokenizer, judged as vLLM serves it (a job's
    # draft.vocabulary)
    vocabulary: str = "same"
    seed: int = 0


def check_request(req: EvalRequest) -> None:
    """Every problem with the numbers at once, before anything is loaded."""
    problems = []
    for name, lowest in (
        ("gamma", 1),
        ("max_new_tokens", 1),
        ("num_prompts", 1),
        ("batch_size", 1),
    ):
        if getattr(req, name) < lowest:
            problems.append(
                f"--{name.replace('_', '-')} must be >= {lowest}, got {getattr(req, name)}"
            )
    if not req.temperature >= 0:
        problems.append(f"--temperature must be >= 0, got {req.temperature}")
    if req.drafting not in ("greedy", "probabilistic"):
        problems.append(f"--drafting must be greedy or probabilistic, got {req.drafting!r}")
    if req.vocabulary not in ("same", "intersection"):
        problems.append(f"--vocabulary must be same or intersection, got {req.vocabulary!r}")
    if req.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"--dtype must be float32, bfloat16 or float16, got {req.dtype!r}")
    if problems:
        raise EvalInputError("invalid arguments:\n" + "\n".join(f"  - {p}" for p in problems))


def check_out(out: Path) -> None:
    """--out must be a file that can be written, checked before the evaluation spends its time."""
    if out.is_dir():
        raise EvalInputError(
            f"--out {out}: a directory; give a file name for the metrics, e.g. {out / 'eval.json'}"
        )
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise EvalInputError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalInputError(f"--out {out}: {existing} is not writable")


def resolve_device(name: str):
    """The torch device `--device` names, checked usable here (`auto`: cuda when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as err:  # RuntimeError, or AssertionError when torch was built without CUDA
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        here = "cpu" + (f", cuda:0 to cuda:{count - 1}" if count else "")
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalInputError(
            f"--device {name}: not usable on this machine ({why}); devices here: {here}"
        ) from None
    return device


def check_models(req: EvalRequest) -> float:
    """The pair check (drafts/pair.require_pair); returns the context both models cover."""
    from specdraft.drafts.pair import require_pair

    return require_pair(
        req.target,
        req.draft,
        trust_remote_code=req.trust_remote_code,
        vocabulary=req.vocabulary,
    ).context


def load_prompts(req: EvalRequest) -> list[dict]:
    """Up to num_prompts rows (prompt, task), taken round-robin over tasks."""
    if req.data == "builtin":
        from specdraft.drafts.toyworld import make_toy_dataset

        defaults = DataConfig()
        rows = list(
            make_toy_dataset(defaults.train_per_task, defaults.eval_per_task, req.seed)["eval"]
        )
    else:
        from specdraft.pipeline.data_sources import DataError, load_user_data

        cfg = DataConfig(
            source=req.data,
            prompt_field=req.prompt_field,
            response_field="",
            task_field=req.task_field,
            split=req.split,
            eval_split=req.split,  # the evaluation rows are the whole split
        )
        try:
            rows = list(load_user_data(cfg, req.seed)["eval"])
        except DataError as err:
            message = str(err)
            for key, flag in DATA_FLAGS.items():
                message = message.replace(key, flag)
            raise EvalInputError(message) from None
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append({"prompt": row["prompt"], "task": row["task"]})
    interleaved = [
        queue[i]
        for i in range(max((len(q) for q in by_task.values()), default=0))
        for queue in by_task.values()
        if i < len(queue)
    ]
    if not interleaved:
        raise EvalInputError(f"--data {req.data!r} gave no prompts to evaluate")
    return interleaved[: req.num_prompts]


def check_lengths(rows: list[dict], context: float, max_new_tokens: int) -> None:
    limit = context - max_new_tokens
    too_long = [r for r in rows if len(r["prompt_ids"]) > limit]
    if too_long:
        longest = max(len(r["prompt_ids"]) for r in too_long)
        raise EvalInputError(
            f"{len(too_long)} of {len(rows)} prompts are longer than the context allows: the models "
            f"cover {context} positions, so prompts may have at most {context} - {max_new_tokens} "
            f"(--max-new-tokens) = {limit} tokens; the longest has {longest} "
            f"(e.g. {too_long[0]['prompt'][:60]!r}). Lower --max-new-tokens or drop long prompts"
        )


def run_eval(req: EvalRequest) -> dict:
    """Check the request, the pair and the prompts, then evaluate; returns the metrics dict."""
    # Each check runs before the imports it does not need, so bad input fails fast.
    check_request(req)
    device = resolve_device(req.device)
    context = check_models(req)
    from specdraft.drafts.models import load_tokenizer
    from specdraft.drafts.pair import ModelTrust

    trust = ModelTrust.of(req.trust_remote_code)  # per model, as in the pair check
    tokenizer = load_tokenizer(req.target, trust_remote_code=trust.target)
    rows = load_prompts(req)
    from specdraft.pipeline.batches import prompt_token_ids

    try:
        for row in rows:
            row["prompt_ids"] = prompt_token_ids(tokenizer, row["prompt"], req.chat_template)
    except ValueError:  # prompt_token_ids' only complaint: no chat template to render with
        raise EvalInputError(
            f"--chat-template: the tokenizer of {req.target} has no chat template; drop the flag"
        ) from None
    check_lengths(rows, context, req.max_new_tokens)

    from specdraft.drafts.models import load_causal_lm
    from specdraft.pipeline.evaluation import (
        DEFINITIONS,
        evaluate_draft,
        prompt_sets,
        task_indices,
    )

    load = dict(dtype=req.dtype, device=device)
    target = load_causal_lm(req.target, trust_remote_code=trust.target, **load)
    draft = load_causal_lm(req.draft, trust_remote_code=trust.draft, **load)
    from specdraft.drafts.vocab_trim import served_view

    # its own vocabulary (trimmed, or another tokenizer): judged through the vocabulary map
    draft = served_view(
        draft, req.draft, tokenizer, target, mapped=req.vocabulary == "intersection"
    )
    cfg = EvaluateConfig(
        gamma=req.gamma,
        temperature=req.temperature,
        drafting=req.drafting,
        max_new_tokens=req.max_new_tokens,
        batch_size=req.batch_size,
    )
    # The evaluate stage's functions, every prompt decoded speculatively: a pair evaluated
    # here and in a run's evaluate stage on the same prompts and seed gets the same numbers.
    sets = prompt_sets(
        target, tokenizer, rows, task_indices(rows), cfg, seed=req.seed, spec_prompts=len(rows)
    )
    result = evaluate_draft(
        target,
        draft,
        sets,
        cfg,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=req.seed,
    )
    return {
        "target": req.target,
        "draft": req.draft,
        "data": req.data,
        "gamma": cfg.gamma,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "num_prompts": len(rows),
        **result,
        "request": asdict(req),
        "definitions": DEFINITIONS,
    }


def format_table(metrics: dict) -> str:
    """A short table: overall and per task, then speed and the lossless check."""

    def fmt(value, spec: str) -> str:
        return format(value, spec) if isinstance(value, int | float) else "n/a"

    head = f"{'task':<14} {'alpha':>6} {'alpha_greedy':>12} {'spec_alpha':>10} {'tau':>5} {'tau_greedy':>10}"
    served = metrics.get("served") or {}
    lines = [
        f"served ({served.get('drafting')} drafting, T = {fmt(served.get('temperature'), 'g')}): "
        f"acceptance {fmt(served.get('acceptance'), '.3f')}, acceptance length "
        f"{fmt(served.get('acceptance_length'), '.2f')}",
        head,
    ]
    rows = [("overall", metrics), *sorted(metrics["tasks"].items())]
    for name, m in rows:
        lines.append(
            f"{name[:14]:<14} {fmt(m.get('alpha'), '>6.3f')} {fmt(m.get('alpha_greedy'), '>12.3f')} "
            f"{fmt(m.get('spec_alpha'), '>10.3f')} {fmt(m.get('tau'), '>5.2f')} "
            f"{fmt(m.get('tau_greedy'), '>10.2f')}"
        )
    buckets = metrics["position_buckets"]
    lines += [
        "",
        f"alpha early/late half: {fmt(buckets['early']['alpha'], '.3f')} / "
        f"{fmt(buckets['late']['alpha'], '.3f')}",
        f"tau {fmt(metrics['tau'], '.2f')} measured, {fmt(metrics['tau_predicted'], '.2f')} "
        f"predicted from spec_alpha_verified {fmt(metrics['spec_alpha_verified'], '.3f')} "
        f"(gamma {metrics['gamma']}, temperature {metrics['temperature']:g})",
        f"cost ratio c {fmt(metrics['cost_ratio'], '.3f')}; greedy speedup over target-only "
        f"{fmt(metrics['speedup'], '.2f')}x measured, {fmt(metrics['speedup_predicted'], '.2f')}x "
        f"predicted (batch size {metrics['batch_size']}, {metrics['num_prompts']} prompts)",
        f"lossless greedy check: {'passed' if metrics['lossless_greedy'] else 'FAILED'}"
        + (
            f" ({metrics['lossless_near_tie_mismatches']} prompt(s) parted at a near tie of the "
            "target's top logits, within evaluate.tie_tolerance)"
            if metrics.get("lossless_near_tie_mismatches")
            else ""
        ),
    ]
    return "\n".join(lines)


def write_metrics(metrics: dict, out: Path) -> None:
    from specdraft.pipeline.engine.artifacts import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
