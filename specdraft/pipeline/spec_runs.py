"""Real speculative decoding measured on a prompt set: per-row acceptance in batches, the lossless
check against target-only greedy decoding, the cost ratio c and the wall-clock speedup.

Used by the evaluate stage and `specdraft eval`; definitions in `evaluate.DEFINITIONS`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.decoding import (
    SpecStats,
    autoregressive_generate,
    autoregressive_generate_batch,
    left_padded,
    speculative_generate,
    speculative_generate_batch,
)


class LosslessError(RuntimeError):
    pass


@torch.no_grad()
def near_tie(
    target, prompt: list[int], ours: list[int], reference: list[int], tolerance: float, vocab=None
) -> bool:
    """Whether greedy output `ours` leaves the target-only `reference` at a near tie: at the first
    token where they differ both tokens' target logits (one uncached pass over the shared prefix)
    lie within tolerance * max(1, |top logit|) of the top logit. bf16 logits differ by a few
    steps of 2^-8 between batch shapes and cached or uncached passes, which breaks exact ties
    either way; the two outputs part there and nothing after it can be compared."""
    i = next((j for j, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), None)
    if i is None:  # one output is a prefix of the other: a length, not a token, differs
        return False
    ids = torch.tensor([prompt + reference[:i]], device=_device_of(target))
    logits = target(input_ids=ids).logits[0, -1, :vocab].float()  # (V,)
    top = float(logits.max())
    allowed = tolerance * max(1.0, abs(top))
    return all(top - float(logits[t]) <= allowed for t in (ours[i], reference[i]))


def _finite(value):
    """NaN (e.g. a drafted position never reached) as None, so metrics.json stays strict JSON."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def tau_predicted(alpha: float, gamma: int) -> float:
    """Block efficiency (1 − α^(γ+1)) / (1 − α) for i.i.d. acceptance α (γ + 1 at α = 1)."""
    if math.isnan(alpha):
        return math.nan
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def length_sorted_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of similar length (less left padding)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [[order[i] for i in batch] for batch in _batches(len(order), batch_size)]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def target_only_greedy(
    target,
    prompt_ids: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    eos_id,
    pad_id: int,
    vocab: int | None = None,
) -> tuple[list[list[int]], float]:
    """Target-only greedy decoding in batches of `batch_size` (KV-cached, as the speculative
    decoder): the lossless reference and the speedup's baseline. Returns tokens per prompt and the
    wall seconds of the decoding calls. `vocab`: the tokenizer's length (see decoding.py)."""
    device = _device_of(target)
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    seconds = 0.0
    batches = length_sorted_batches(prompt_ids, batch_size)
    for batch in tqdm(batches, desc="target-only greedy", mininterval=2.0):
        start = time.perf_counter()
        if batch_size == 1:
            ids = torch.tensor([prompt_ids[batch[0]]], device=device)
            outs = [
                autoregressive_generate(
                    target, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_id, vocab=vocab
                )
            ]
        else:
            ids, mask = left_padded([prompt_ids[i] for i in batch], pad_id, device)
            outs = autoregressive_generate_batch(
                target, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id, vocab=vocab
            )
        seconds += time.perf_counter() - start
        for i, out in zip(batch, outs, strict=True):
            outputs[i] = out.tolist()
    return outputs, seconds


def _speculative(
    target, draft, rows, cfg: EvaluateConfig, temperature, eos_id, pad_id, generator, vocab
) -> tuple[list[list[int]], list[SpecStats]]:
    """One batch of prompts: the batch-1 decoder when batch_size is 1, else the batched one."""
    device = _device_of(target)
    kwargs = dict(
        gamma=cfg.gamma,
        max_new_tokens=cfg.max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_id,
        generator=generator,
        vocab=vocab,
    )
    if cfg.batch_size == 1:
        out, stats = speculative_generate(
            target, draft, torch.tensor([rows[0]], device=device), **kwargs
        )
        return [out.tolist()], [stats]
    ids, mask = left_padded(rows, pad_id, device)
    outs, stats = speculative_generate_batch(target, draft, ids, mask, **kwargs)
    return [o.tolist() for o in outs], stats


def _spec_summary(stats: SpecStats, suffix: str) -> dict:
    return {
        f"spec_alpha{suffix}": _finite(stats.spec_alpha),
        f"tau{suffix}": _finite(stats.tau),
        f"per_position{suffix}": _finite(stats.per_position),
        f"spec_alpha_verified{suffix}": _finite(stats.alpha_verified),
        f"tau_predicted{suffix}": _finite(tau_predicted(stats.alpha_verified, stats.gamma)),
    }


@dataclass
class SpecRuns:
    """What real speculative decoding of some prompts left, before summarising: counters per
    (task, mode), a row per prompt, the prompts whose greedy output differed (beyond a near tie,
    and at one), the greedy seconds. Runs over disjoint prompt sets (e.g. data-parallel shards)
    merge into one."""

    by_task: dict[tuple[str, str], SpecStats] = field(default_factory=dict)
    per_prompt: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    near_ties: list[str] = field(default_factory=list)
    spec_seconds: float = 0.0

    def merge(self, other: SpecRuns) -> None:
        for key, stats in other.by_task.items():
            if key in self.by_task:
                self.by_task[key].merge(stats)
            else:
                self.by_task[key] = stats
        self.per_prompt += other.per_prompt
        self.mismatches += other.mismatches
        self.near_ties += other.near_ties
        self.spec_seconds += other.spec_seconds


def spec_runs(
    target,
    draft,
    prompts: list[dict],
    cfg: EvaluateConfig,
    *,
    eos_id,
    pad_id: int,
    seed: int,
    greedy_references: list[list[int]],
    desc: str = "speculative",
    vocab: int | None = None,
) -> SpecRuns:
    """Real speculative decoding of `prompts` in batches of cfg.batch_size: greedy (timed, checked
    against `greedy_references`, near ties within cfg.tie_tolerance set apart) and at
    cfg.temperature. `vocab`: the tokenizer's length (see decoding.py)."""
    runs = SpecRuns()
    modes: list[dict] = [{} for _ in prompts]  # each prompt's SpecStats by mode
    generator = torch.Generator(device=_device_of(target)).manual_seed(seed)
    prompt_ids = [row["prompt_ids"] for row in prompts]
    for batch in tqdm(
        length_sorted_batches(prompt_ids, cfg.batch_size), desc=desc, mininterval=2.0
    ):
        rows = [prompt_ids[i] for i in batch]
        start = time.perf_counter()
        outs, greedy = _speculative(target, draft, rows, cfg, 0.0, eos_id, pad_id, None, vocab)
        runs.spec_seconds += time.perf_counter() - start
        sampled = {"greedy": greedy}
        if cfg.temperature > 0:
            _, sampled["sampled"] = _speculative(
                target, draft, rows, cfg, cfg.temperature, eos_id, pad_id, generator, vocab
            )
        for k, i in enumerate(batch):
            if outs[k] != greedy_references[i]:
                tie = near_tie(
                    target, rows[k], outs[k], greedy_references[i], cfg.tie_tolerance, vocab
                )
                (runs.near_ties if tie else runs.mismatches).append(prompts[i]["prompt"][:60])
            for mode, stats in sampled.items():
                runs.by_task.setdefault((prompts[i]["task"], mode), SpecStats(gamma=cfg.gamma))
                runs.by_task[(prompts[i]["task"], mode)].merge(stats[k])
                modes[i][mode] = stats[k]
    sampled_mode = "sampled" if cfg.temperature > 0 else "greedy"
    runs.per_prompt = [
        {
            "prompt": row["prompt"],
            "task": row["task"],
            "tau": _finite(by_mode[sampled_mode].tau),
            "tau_greedy": _finite(by_mode["greedy"].tau),
            "spec_alpha": _finite(by_mode[sampled_mode].spec_alpha),
            "spec_alpha_greedy": _finite(by_mode["greedy"].spec_alpha),
        }
        for row, by_mode in zip(prompts, modes, strict=True)
    ]
    return runs


def summarize_spec(runs: SpecRuns, cfg: EvaluateConfig, target_only_seconds: float) -> dict:
    """Overall and per-task metrics of `runs`; LosslessError if any greedy output differed
    beyond a near tie (those are counted: lossless_near_tie_mismatches and _rate)."""
    if runs.mismatches:
        raise LosslessError(
            f"greedy speculative decoding differed from target-only greedy decoding on "
            f"{len(runs.mismatches)} prompt(s), e.g. {runs.mismatches[0]!r}, where the target's "
            f"top logits are not within evaluate.tie_tolerance={cfg.tie_tolerance} of each other: "
            "the decoder is not lossless"
        )
    sampled_mode = "sampled" if cfg.temperature > 0 else "greedy"
    result: dict = {"tasks": {}, "per_prompt": runs.per_prompt}
    for mode, suffix in ((sampled_mode, ""), ("greedy", "_greedy")):
        total = SpecStats(gamma=cfg.gamma)
        for (task, m), st in sorted(runs.by_task.items()):
            if m == mode:
                total.merge(st)
                result["tasks"].setdefault(task, {}).update(_spec_summary(st, suffix))
        result.update(_spec_summary(total, suffix))
        if mode == "greedy":
            greedy_total = total
    cost = greedy_total.cost_ratio
    spec_seconds = runs.spec_seconds
    result.update(
        {
            "cost_ratio": _finite(cost),
            "speedup": target_only_seconds / spec_seconds if spec_seconds else None,
            "speedup_predicted": _finite(greedy_total.tau / (cost * cfg.gamma + 1)),
            "target_only_seconds": target_only_seconds,
            "spec_seconds_greedy": spec_seconds,
            "draft_seconds": greedy_total.draft_seconds,
            "target_seconds": greedy_total.target_seconds,
            "batch_size": cfg.batch_size,
            "lossless_greedy": True,
            "lossless_near_tie_mismatches": len(runs.near_ties),
            "lossless_near_tie_rate": len(runs.near_ties) / max(1, len(runs.per_prompt)),
            "num_spec_prompts": len(runs.per_prompt),
        }
    )
    return result


def spec_decoding(
    target,
    draft,
    prompts: list[dict],
    cfg: EvaluateConfig,
    *,
    eos_id,
    pad_id: int,
    seed: int,
    greedy_references: list[list[int]],
    target_only_seconds: float,
    desc: str = "speculative",
    vocab: int | None = None,
) -> dict:
    """Real speculative decoding in batches of cfg.batch_size, per task: greedy (timed, with the
    lossless check against `greedy_references`) and at cfg.temperature."""
    runs = spec_runs(
        target,
        draft,
        prompts,
        cfg,
        eos_id=eos_id,
        pad_id=pad_id,
        seed=seed,
        greedy_references=greedy_references,
        desc=desc,
        vocab=vocab,
    )
    return summarize_spec(runs, cfg, target_only_seconds)
