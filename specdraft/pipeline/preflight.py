"""Checks of a job's inputs that its config alone cannot answer, made before any stage runs
(`run` and `compare` call check_inputs after the pair check), so that bad data stops with one
message and exit code 2 instead of failing a stage after minutes of work:

- the user data loads as the data stage loads it (files there, UTF-8 text, fields, rows);
- every prompt, tokenised as the stages tokenise it, leaves room within the context both models
  cover for the tokens generated after it (generate.max_new_tokens and evaluate.max_new_tokens):
  a model with learned positions fails past its context (an IndexError deep in generation).
"""

from __future__ import annotations

import math

from specdraft.errors import InputError
from specdraft.pipeline.config import JobConfig


def check_inputs(job: JobConfig) -> None:
    """InputError (a DataError for the data) when the job's data cannot be used; see the module
    docstring. The toy world has nothing to check: the data stage makes it."""
    if job.data.source == "builtin":
        return
    from specdraft.pipeline.data_sources import load_user_data

    splits = load_user_data(job.data, job.seed)
    check_eval_prompts(job, splits["eval"])
    if job.target.model == "builtin":
        return  # refused by the config (the toy pair cannot train on user data)
    prompts = [row["prompt"] for split in ("train", "eval") for row in splits[split]]
    check_prompt_lengths(job, prompts)


def check_eval_prompts(job: JobConfig, eval_split) -> None:
    """InputError when evaluate.prompt_offset skips every eval prompt of some task."""
    offset = job.evaluate.prompt_offset
    counts: dict[str, int] = {}
    for row in eval_split:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    empty = sorted(task for task, n in counts.items() if n <= offset)
    if empty:
        raise InputError(
            f"evaluate.prompt_offset ({offset}) skips every eval prompt of task(s) "
            f"{', '.join(map(str, empty[:5]))} (they have {min(counts[t] for t in empty)} or "
            "fewer); lower it or give more eval data"
        )


def check_prompt_lengths(job: JobConfig, prompts: list[str]) -> None:
    """InputError when a prompt of `prompts` is too long for the pair's context (module
    docstring); prompts are tokenised with the target's tokenizer, as the stages do."""
    from specdraft.drafts.models import load_tokenizer
    from specdraft.drafts.pair import ModelTrust, check_pair
    from specdraft.pipeline.batches import prompt_token_ids

    trust = ModelTrust.for_job(
        job.target.trust_remote_code, job.draft.trust_remote_code, job.draft.from_target_layers
    )
    draft = job.target.model if job.draft.from_target_layers else job.draft.model
    context = check_pair(
        job.target.model, draft, trust_remote_code=trust, vocabulary=job.draft.vocabulary
    ).context
    if not math.isfinite(context):
        return  # no position limit given: nothing to check
    tokenizer = load_tokenizer(job.target.model, trust_remote_code=trust.target)
    new_tokens = max(job.generate.max_new_tokens, job.evaluate.max_new_tokens)
    limit = int(context) - new_tokens
    if limit < 1:
        raise InputError(
            f"generate.max_new_tokens and evaluate.max_new_tokens (up to {new_tokens}) leave no "
            f"room for a prompt within the {int(context)} positions the models cover; lower them"
        )
    try:
        lengths = [len(prompt_token_ids(tokenizer, p, job.data.chat_template)) for p in prompts]
    except ValueError:  # prompt_token_ids' only complaint: no chat template to render with
        raise InputError(
            f"data.chat_template: the tokenizer of {job.target.model} has no chat template; set "
            "data.chat_template=false"
        ) from None
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if not too_long:
        return
    longest = max(too_long, key=lengths.__getitem__)
    raise InputError(
        f"{len(too_long)} of {len(prompts)} prompts of data.source {job.data.source!r} are too "
        f"long: the models cover {int(context)} positions and up to {new_tokens} tokens are "
        f"generated after a prompt (generate.max_new_tokens, evaluate.max_new_tokens), so a "
        f"prompt may have at most {limit} tokens; the longest has {lengths[longest]} "
        f"({prompts[longest][:60]!r}...). Drop or shorten the long prompts, or lower the "
        "max_new_tokens settings"
    )
