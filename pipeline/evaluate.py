"""Stage `evaluate`: acceptance of the baseline (draft init), reference and final drafts.

- `alpha`: β = Σ_v min(p_v, q_v) = 1 − TVD(p, q) at the evaluation temperature, averaged over the
  response positions of target-generated continuations of eval prompts (DistillSpec's definition).
- `alpha_greedy`: top-1 agreement of draft and target at the same positions.
- `spec_alpha` / `tau`: accepted / drafted tokens and tokens per target call (bonus included) from
  real speculative decoding with `gamma` drafted tokens at the evaluation temperature.
- `*_greedy`: the same at temperature 0, where the output must equal target-only greedy decoding
  token for token (`lossless_greedy`); a mismatch fails the stage.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdraft.drafts.models import device_for
from specdraft.kernels import fused_kd_loss
from specdraft.pipeline.artifacts import (
    load_model_artifact,
    load_tokenizer_artifact,
    model_location,
)
from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.data import chat_template_of, load_splits
from specdraft.pipeline.generate import sample_responses
from specdraft.pipeline.speculative import SpecStats, autoregressive_generate, speculative_generate
from specdraft.pipeline.training import Collator, hidden_and_head, prompt_token_ids

DRAFTS = {"baseline": "draft_init", "reference": "reference", "final": "distil"}

DEFINITIONS = {
    "alpha": "mean over response positions of target-generated continuations of sum_v min(p_v, q_v) "
    "(= 1 - TVD) at `temperature`",
    "alpha_greedy": "top-1 agreement of draft and target at the same positions",
    "spec_alpha": "accepted / drafted tokens in real speculative decoding at `temperature` "
    "(greedy verification at 0, rejection sampling above)",
    "tau": "tokens emitted per target forward pass, bonus token included (block efficiency)",
    "per_position": "acceptance rate of drafted position i = 1..gamma, given it was reached",
    "lossless_greedy": "greedy speculative output equals target-only greedy output token for token",
}


class LosslessError(RuntimeError):
    pass


@torch.no_grad()
def position_acceptance(
    target, draft, batch: dict, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """β (N,) and top-1 agreement (N,) at every response position of a padded batch."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = labels[:, 1:] != -100
    t_hidden, t_head = hidden_and_head(target, ids, attn)
    d_hidden, d_head = hidden_and_head(draft, ids, attn)
    t_hidden, d_hidden = t_hidden[:, :-1][counted], d_hidden[:, :-1][counted]  # (N, H)
    agree = (d_hidden @ d_head.T).argmax(-1) == (t_hidden @ t_head.T).argmax(-1)  # (N,)
    if temperature == 0:
        return agree.float(), agree.float()
    tvd = fused_kd_loss(
        d_hidden,
        d_head,
        t_hidden,
        t_head,
        divergence="tvd",
        temperature=temperature,
        reduction="none",
    )
    return 1.0 - tvd, agree.float()


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _finite(value):
    """NaN (e.g. a drafted position never reached) as None, so metrics.json stays strict JSON."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def analytic_acceptance(
    target, draft, sequences: list[dict], pad_id: int, temperature: float
) -> dict:
    """alpha and alpha_greedy overall and per task over the given tokenised sequences."""
    collate = Collator(pad_id)
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"beta": [], "agree": []})
    for start in range(0, len(sequences), 16):
        chunk = sequences[start : start + 16]
        batch = collate(chunk)
        beta, agree = position_acceptance(target, draft, batch, temperature)
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        offset = 0
        for row, n in zip(chunk, counts, strict=True):
            per_task[row["task"]]["beta"].extend(beta[offset : offset + n].tolist())
            per_task[row["task"]]["agree"].extend(agree[offset : offset + n].tolist())
            offset += n
    every_beta = [b for t in per_task.values() for b in t["beta"]]
    every_agree = [a for t in per_task.values() for a in t["agree"]]
    return {
        "alpha": _mean(every_beta),
        "alpha_greedy": _mean(every_agree),
        "num_positions": len(every_beta),
        "tasks": {
            task: {
                "alpha": _mean(v["beta"]),
                "alpha_greedy": _mean(v["agree"]),
                "num_positions": len(v["beta"]),
            }
            for task, v in sorted(per_task.items())
        },
    }


def spec_decoding(
    target,
    draft,
    prompts: list[dict],
    cfg: EvaluateConfig,
    eos_id: int,
    seed: int,
    greedy_references: list[list[int]],
) -> dict:
    """Real speculative decoding per task, greedy (with the lossless check) and at cfg.temperature."""
    by_task: dict[tuple[str, str], SpecStats] = {}
    mismatches = []
    generator = torch.Generator().manual_seed(seed)
    for row, reference in zip(prompts, greedy_references, strict=True):
        ids = torch.tensor([row["prompt_ids"]])
        out, stats = speculative_generate(
            target,
            draft,
            ids,
            gamma=cfg.gamma,
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0,
            eos_token_id=eos_id,
        )
        if out.tolist() != reference:
            mismatches.append(row["prompt"][:60])
        runs = {"greedy": stats}
        if cfg.temperature > 0:
            _, runs["sampled"] = speculative_generate(
                target,
                draft,
                ids,
                gamma=cfg.gamma,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                eos_token_id=eos_id,
                generator=generator,
            )
        for mode, st in runs.items():
            key = (row["task"], mode)
            if key not in by_task:
                by_task[key] = SpecStats(gamma=cfg.gamma)
            by_task[key].merge(st)
    if mismatches:
        raise LosslessError(
            f"greedy speculative decoding differed from target-only greedy decoding on {len(mismatches)} "
            f"prompt(s), e.g. {mismatches[0]!r}: the decoder is not lossless"
        )
    sampled_mode = "sampled" if cfg.temperature > 0 else "greedy"
    result: dict = {"tasks": {}}
    for mode, suffix in ((sampled_mode, ""), ("greedy", "_greedy")):
        total = SpecStats(gamma=cfg.gamma)
        for (task, m), st in sorted(by_task.items()):
            if m != mode:
                continue
            total.merge(st)
            entry = result["tasks"].setdefault(task, {})
            entry.update(
                {
                    f"spec_alpha{suffix}": _finite(st.spec_alpha),
                    f"tau{suffix}": _finite(st.tau),
                    f"per_position{suffix}": _finite(st.per_position),
                }
            )
        result.update(
            {
                f"spec_alpha{suffix}": _finite(total.spec_alpha),
                f"tau{suffix}": _finite(total.tau),
                f"per_position{suffix}": _finite(total.per_position),
            }
        )
        if mode == "greedy":
            result["draft_seconds"], result["target_seconds"] = (
                total.draft_seconds,
                total.target_seconds,
            )
    result["lossless_greedy"] = True
    result["num_spec_prompts"] = len(prompts)
    return result


def pick_eval_prompts(eval_split, per_task: int) -> list[dict]:
    chosen, counts = [], defaultdict(int)
    for row in eval_split:
        if counts[row["task"]] < per_task:
            counts[row["task"]] += 1
            chosen.append(row)
    return chosen


def run(cfg: EvaluateConfig, inputs: dict[str, Path], out: Path, *, seed: int) -> dict:
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"])
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    target = load_model_artifact(inputs["target"], device)
    chat = chat_template_of(inputs["data"])
    eval_rows = pick_eval_prompts(load_splits(inputs["data"])["eval"], cfg.prompts_per_task)
    for row in eval_rows:
        row["prompt_ids"] = prompt_token_ids(tokenizer, row["prompt"], chat)

    # Target-generated continuations at the evaluation temperature: the positions alpha averages over.
    continuations = sample_responses(
        target,
        tokenizer,
        [r["prompt_ids"] for r in eval_rows],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=32,
        seed=seed,
        desc="target continuations",
    )
    sequences = [
        {
            "input_ids": r["prompt_ids"] + c,
            "response_mask": [0] * len(r["prompt_ids"]) + [1] * len(c),
            "task": r["task"],
        }
        for r, c in zip(eval_rows, continuations, strict=True)
        if c
    ]
    spec_rows = pick_eval_prompts(eval_rows, cfg.spec_prompts_per_task)
    greedy_refs = [
        autoregressive_generate(
            target,
            torch.tensor([r["prompt_ids"]]),
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0,
            eos_token_id=eos_id,
        ).tolist()
        for r in tqdm(spec_rows, desc="target-only greedy", mininterval=2.0)
    ]
    metrics: dict = {
        "gamma": cfg.gamma,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "target": model_location(inputs["target"]),
        "definitions": DEFINITIONS,
    }
    for name, stage in DRAFTS.items():
        draft = load_model_artifact(inputs[stage], device)
        result = analytic_acceptance(target, draft, sequences, pad_id, cfg.temperature)
        spec = spec_decoding(target, draft, spec_rows, cfg, eos_id, seed, greedy_refs)
        for task, entry in spec.pop("tasks").items():
            result["tasks"].setdefault(task, {}).update(entry)
        result.update(spec)
        result["model"] = model_location(inputs[stage])
        metrics[name] = result
        print(
            f"evaluate {name:<9} alpha={result['alpha']:.3f} alpha_greedy={result['alpha_greedy']:.3f} "
            f"spec_alpha={result['spec_alpha']:.3f} tau={result['tau']:.2f}"
        )
        del draft
    metrics["lossless_greedy"] = all(metrics[n]["lossless_greedy"] for n in DRAFTS)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    return {n: {"alpha": metrics[n]["alpha"], "tau": metrics[n]["tau"]} for n in DRAFTS}
