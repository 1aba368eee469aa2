"""Stage `comparison`: recipes × seeds reduced to mean ± std per task, with each recipe's difference
to the baseline recipe and its significance, paired over prompts.

Inputs: `shared` (the evaluation of the draft init and the reference) and `<recipe>.s<seed>` (the
evaluation of that run's final draft). Every evaluation saw the same prompts and target
continuations (specdraft/pipeline/commands/compare_recipes.py gives them one seed), so prompt i is the same trial for every
recipe. Two tests per recipe and metric against the baseline recipe:
- over training seeds (the unit of replication: a claim about the recipe is a claim about the
  next training run): a paired t-test of the per-seed differences, its 95 % interval and effect
  size, and Holm's adjustment across every such test of the file (specdraft/pipeline/statistics.py);
- over prompts: per prompt, each recipe's value averaged over its seeds, the signs of the
  per-prompt differences flipped at random (a paired permutation test; exact when there are few
  prompts), reported only where it can reject at 0.05.
Means and std are of the per-seed metrics as `evaluate` reports them; per-seed and per-prompt
values are written beside them so every p-value can be re-derived from `results.json`.

Reads: `shared` and every `<recipe>.s<seed>` evaluation
Writes: `results.json`, `results.md`, `report/`
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.engine.artifacts import StageContext, atomic_write_text
from specdraft.pipeline.statistics import can_reject, holm, seed_test
from specdraft.reports.compare_render import render_comparison, results_markdown

# metric -> (per-prompt table of evaluate's per_prompt.json, field there)
METRICS = {
    "alpha": ("alpha", "alpha"),
    "alpha_greedy": ("alpha", "alpha_greedy"),
    "greedy_drafting": ("alpha", "greedy_drafting"),
    "tau": ("spec", "tau"),
    "tau_greedy": ("spec", "tau_greedy"),
}
RULE_METRICS = {"greedy_drafting"}  # read from metrics.json's acceptance_by_rule
EXACT_UP_TO = 14  # prompts: below this every sign pattern is enumerated
PERMUTATIONS = 20_000

DEFINITIONS = {
    "alpha": "expected acceptance sum_v min(p_v, q_v) at T = 1 over target continuations",
    "alpha_greedy": "top-1 agreement of draft and target at the same positions",
    "greedy_drafting": "acceptance of the draft's argmax, p_T(argmax q) at the evaluation "
    "temperature, at alpha's positions: what an engine drafting greedily (vLLM's default) accepts",
    "tau": "tokens per target call (bonus included) in real speculative decoding at T = 1",
    "tau_greedy": "tokens per target call in greedy speculative decoding",
    "mean ± std": "over seeds (sample std), of each seed's metric as `evaluate` reports it",
    "diff": "mean of the recipe minus mean of the baseline recipe",
    "p": "two-sided paired permutation test over prompts: per prompt, each recipe's value averaged "
    "over seeds; the signs of the differences flipped at random (exact below "
    f"{EXACT_UP_TO} prompts, else {PERMUTATIONS} draws); null where the test cannot reach "
    "p < 0.05 (fewer than 5 prompts). It treats prompts as the trials: the training seed's "
    "variance does not enter it",
    "per_seed": "the recipe's metric on each seed, in the order of `seeds`",
    "per_prompt": "per seed (s<seed>), the recipe's value on each prompt, in evaluation order",
    "p_seed": "two-sided paired t-test over training seeds of the per-seed differences to the "
    "baseline recipe (the seed is the unit of replication); null below two seeds",
    "ci95": "95 % confidence interval of the mean per-seed difference (Student's t, seeds - 1 df)",
    "effect_size": "d_z: mean per-seed difference / its standard deviation",
    "p_holm": "p_seed adjusted by Holm's step-down method over every test in this file",
}


def paired_permutation_p(diffs: list[float], *, seed: int = 0) -> float | None:
    """Two-sided p-value of mean(diffs) = 0 against random sign flips of the paired differences."""
    diffs = [d for d in diffs if d is not None and not math.isnan(d)]
    if not diffs:
        return None
    observed = abs(sum(diffs)) - 1e-12  # float noise must not turn a tie into a miss
    if len(diffs) < EXACT_UP_TO:
        patterns = itertools.product((1, -1), repeat=len(diffs))
        hits = total = 0
        for signs in patterns:
            total += 1
            hits += abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed
        return hits / total
    rng = random.Random(seed)
    hits = sum(
        abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed
        for _ in range(PERMUTATIONS)
    )
    return (hits + 1) / (PERMUTATIONS + 1)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _metric(metrics: dict, task: str, name: str):
    entry = metrics if task == "all" else metrics.get("tasks", {}).get(task, {})
    if name in entry or name not in RULE_METRICS:
        return entry.get(name)
    return entry.get("acceptance_by_rule", {}).get(name, {}).get("acceptance")


def _read(path: Path, name: str):
    file = path / name
    if not file.exists():
        raise InputError(f"{file} is missing: the evaluation was made by an older specdraft")
    return json.loads(file.read_text())


def _check_same_prompts(per_prompt: dict[str, dict]) -> None:
    """Pairing needs identical prompt lists; say which run differs if not."""
    first_name, first = next(iter(per_prompt.items()))
    for name, rows in per_prompt.items():
        for table in ("alpha", "spec"):
            if [r["prompt"] for r in rows[table]] != [r["prompt"] for r in first[table]]:
                raise InputError(
                    f"evaluations {first_name} and {name} saw different {table} prompts: "
                    "a paired comparison needs the same evaluation seed and data"
                )


def add_seed_tests(results: dict, baseline: str) -> None:
    """Per recipe, task and metric beside the baseline recipe: the seed-level test of the per-seed
    differences (`p_seed`, `ci95`, `effect_size`), then `p_holm` over every test of the file.
    Reads only the per-seed `values` of `results` (recipe -> task -> metric -> cell), so a results
    file written before these keys existed can be brought up to date from its own numbers."""
    tested = []
    for recipe, tasks in results.items():
        if recipe == baseline:
            continue
        for task, cells in tasks.items():
            for metric, cell in cells.items():
                base = results[baseline][task][metric]["values"]
                diffs = [
                    a - b
                    for a, b in zip(cell["values"], base, strict=True)
                    if a is not None and b is not None
                ]
                if len(diffs) != len(cell["values"]):
                    continue  # a metric some seed lacks (no spec prompts in a task) is not tested
                test = seed_test(diffs)
                cell.update(
                    p_seed=test["p_seed"], ci95=test["ci95"], effect_size=test["effect_size"]
                )
                tested.append(cell)
    for cell, adjusted in zip(tested, holm([c["p_seed"] for c in tested]), strict=True):
        cell["p_holm"] = adjusted


def compare_runs(config: dict, inputs: dict[str, Path]) -> dict:
    """The results: per recipe, per task (and `all`), per metric mean/std/values/diff/p."""
    recipes, seeds, baseline = list(config["recipes"]), config["seeds"], config["baseline"]
    metrics = {
        (r, s): _read(inputs[f"{r}.s{s}"], "metrics.json")["final"] for r in recipes for s in seeds
    }
    per_prompt = {
        (r, s): _read(inputs[f"{r}.s{s}"], "per_prompt.json")["final"]
        for r in recipes
        for s in seeds
    }
    _check_same_prompts({f"{r}.s{s}": v for (r, s), v in per_prompt.items()})
    first = per_prompt[(recipes[0], seeds[0])]
    tasks = ["all", *sorted({row["task"] for row in first["alpha"]})]

    def prompt_means(recipe: str, metric: str, task: str) -> list[float | None]:
        """Per prompt of `task`, the recipe's value averaged over seeds."""
        table, field = METRICS[metric]
        rows = [i for i, row in enumerate(first[table]) if task == "all" or row["task"] == task]
        return [_mean([per_prompt[(recipe, s)][table][i].get(field) for s in seeds]) for i in rows]

    def prompt_values(recipe: str, seed: int, metric: str, task: str) -> list[float | None]:
        """Per prompt of `task`, the value of one recipe's run on one seed."""
        table, field = METRICS[metric]
        rows = per_prompt[(recipe, seed)][table]
        return [row.get(field) for row in rows if task == "all" or row["task"] == task]

    results: dict = {}
    for recipe in recipes:
        results[recipe] = {}
        for task in tasks:
            cells = {}
            for metric in METRICS:
                values = [_metric(metrics[(recipe, s)], task, metric) for s in seeds]
                base_values = [_metric(metrics[(baseline, s)], task, metric) for s in seeds]
                mean, base_mean = _mean(values), _mean(base_values)
                cell = {
                    "mean": mean,
                    "std": _std(values),
                    "values": values,
                    "per_seed": values,
                    "per_prompt": {f"s{s}": prompt_values(recipe, s, metric, task) for s in seeds},
                }
                if recipe != baseline and mean is not None and base_mean is not None:
                    mine, theirs = (prompt_means(r, metric, task) for r in (recipe, baseline))
                    diffs = [
                        a - b
                        for a, b in zip(mine, theirs, strict=True)
                        if a is not None and b is not None
                    ]
                    cell["diff"] = mean - base_mean
                    # over prompts (seeds averaged): printed only where such a test can reject
                    cell["p"] = paired_permutation_p(diffs) if can_reject(len(diffs)) else None
                    cell["pairs"] = len(diffs)
                cells[metric] = cell
            results[recipe][task] = cells
    add_seed_tests(results, baseline)
    shared = _read(inputs["shared"], "metrics.json")
    untrained = {
        name: {task: {m: _metric(shared[name], task, m) for m in METRICS} for task in tasks}
        for name in ("baseline", "reference")
        if name in shared
    }
    any_eval = metrics[(recipes[0], seeds[0])]
    return {
        "title": config["title"],
        "baseline": baseline,
        "seeds": seeds,
        "recipes": config["recipes"],
        "tasks": tasks,
        "metrics": list(METRICS),
        "results": results,
        "shared": untrained,
        "gamma": shared.get("gamma"),
        "temperature": shared.get("temperature"),
        "num_prompts": {"alpha": len(first["alpha"]), "spec": len(first["spec"])},
        "num_positions": any_eval.get("num_positions"),
        "definitions": DEFINITIONS,
    }


def run(config: dict, inputs: dict[str, Path], ctx: StageContext) -> dict:
    out = ctx.out
    results = compare_runs(config, inputs)
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (out / "results.md").write_text(results_markdown(results))
    (out / "report").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report" / "index.html", render_comparison(results))
    best = max(results["results"], key=lambda r: results["results"][r]["all"]["alpha"]["mean"])
    return {"best_alpha": best, "recipes": len(results["recipes"]), "seeds": len(results["seeds"])}
