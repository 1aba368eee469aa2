"""`specdraft compare`: several distillation recipes × seeds on one shared pipeline, side by side.

A comparison file is a job YAML plus a `compare:` section:

    compare:
      seeds: [0, 1, 2]
      baseline: fkl_all          # the recipe every other one is compared with
      recipes:
        fkl_all:
          help: forward KL on every response token
          set: {distil.selection: all}

Every recipe is the job with its `set` overrides applied (then the command line's, which win), and
may change only `generate.*`, `distil.*` and `target_outputs.*`: data, target, draft init, the
dataset-response sequences and the reference are computed once and shared by every recipe through
the stage cache. A recipe on the shared sequences whose stored target outputs differ from the
shared ones (another target_outputs.format or k, a top-k at another distil.temperature) gets
`target_outputs.<recipe>`, made once for all its seeds (the first recipe with those settings names
it, later ones reuse it); so does a recipe on another recipe's sequences, as
`target_outputs.<recipe>.s<seed>`. Each recipe
× seed gets its own `generate.<recipe>.s<seed>` (when its generation differs from the shared one;
the first recipe with those settings names it, later ones reuse it),
`distil.<recipe>.s<seed>` and `evaluate.<recipe>.s<seed>`; every evaluation uses the job's seed, so
all drafts are judged on the same prompts and target continuations (paired comparisons).
The `comparison` stage (specdraft/pipeline/stages/comparison.py) reduces them to the table and report.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from specdraft.pipeline.config import ConfigError, JobConfig, Resources, job_from_dict
from specdraft.pipeline.engine.dag import Stage
from specdraft.pipeline.engine.job import (
    build_stages,
    check_models,
    check_store,
    draft_input,
    evaluate_deps,
    execute_logged,
    read_places,
    recipe_stages,
    resolve_local_paths,
    section_stage,
    target_outputs_name,
    target_outputs_stage,
)
from specdraft.pipeline.engine.rundir import check_apart, check_destination, write_run_dir
from specdraft.pipeline.preflight import check_inputs

SHARED = ("data", "target", "draft_init", "generate", "target_outputs", "vocab_trim", "reference")
RECIPE_SECTIONS = ("generate", "distil", "target_outputs")  # what a recipe may change
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclasses.dataclass
class Recipe:
    name: str
    help: str
    settings: dict  # dotted key -> value, as written in the file
    job: JobConfig


@dataclasses.dataclass
class Comparison:
    base: JobConfig
    recipes: list[Recipe]
    seeds: list[int]
    baseline: str


def _override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_comparison(path: str | Path, overrides: list[str] | None = None) -> Comparison:
    """Read a comparison file; every problem of every recipe is reported at once (ConfigError)."""
    from specdraft.pipeline.config import read_job_yaml

    data = read_job_yaml(path)
    section = data.pop("compare", None)
    overrides = list(overrides or [])
    if not isinstance(section, dict):
        raise ConfigError([f"{path}: no `compare:` section (seeds, baseline, recipes)"])
    problems: list[str] = []
    unknown = set(section) - {"seeds", "baseline", "recipes"}
    if unknown:
        problems.append(
            f"compare: unknown keys {sorted(unknown)} (known: seeds, baseline, recipes)"
        )
    seeds = section.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        problems.append(f"compare.seeds: expected distinct non-negative integers, got {seeds!r}")
    raw = section.get("recipes")
    if not isinstance(raw, dict) or len(raw) < 2:
        raise ConfigError(problems + ["compare.recipes: name at least two recipes"])
    baseline = section.get("baseline", next(iter(raw)))
    if baseline not in raw:
        problems.append(f"compare.baseline: {baseline!r} is not one of the recipes {list(raw)}")
    try:
        base = job_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    recipes = []
    for name, spec in raw.items():
        where = f"compare.recipes.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            problems.append(f"{where}: a recipe name is lower-case letters, digits, _ and -")
            continue
        spec = spec or {}
        settings = spec.get("set", {}) if isinstance(spec, dict) else None
        if not isinstance(settings, dict) or set(spec) - {"help", "set"}:
            problems.append(f"{where}: expected `help:` and a `set:` mapping of section.key: value")
            continue
        outside = [k for k in settings if str(k).split(".")[0] not in RECIPE_SECTIONS]
        if outside:
            problems.append(
                f"{where}: {outside} are shared by every recipe; a recipe may set only "
                f"{', '.join(s + '.*' for s in RECIPE_SECTIONS)}"
            )
            continue
        try:
            job = job_from_dict(data, [_override(k, v) for k, v in settings.items()] + overrides)
        except ConfigError as err:
            problems.extend(f"{where}: {p}" for p in err.problems)
            continue
        recipes.append(Recipe(name, str(spec.get("help", "")), settings, job))
    if problems:
        raise ConfigError(problems)
    return Comparison(base, recipes, list(seeds), baseline)


def run_name(recipe: str, seed: int) -> str:
    return f"{recipe}.s{seed}"


def build_comparison_stages(comp: Comparison) -> list[Stage]:
    """Shared stages once; per recipe × seed its generation (if its own), distillation and
    evaluation (job.recipe_stages); the comparison stage over all of them."""
    base = comp.base
    stages = [s for s in build_stages(base) if s.name in SHARED]
    # the shared evaluation judges the drafts every recipe starts from or is compared with
    stages.append(
        section_stage(
            base,
            "evaluate",
            base.seed,
            deps=tuple(
                draft_input(base) if d == "draft_init" else d
                for d in evaluate_deps(("draft_init", "reference"))
            ),
        )
    )
    finals = {"shared": "evaluate"}
    generations = {
        (json.dumps(dataclasses.asdict(base.generate), sort_keys=True), None): "generate"
    }
    # (generation stage, what its store depends on) -> the target_outputs stage that holds it
    stores = {}
    if base.distil.stored_target_outputs:
        stores["generate", _store_settings(base, (base.reference.train, base.distil.train))] = (
            "target_outputs"
        )
    for recipe in comp.recipes:
        for seed in comp.seeds:
            suffix = "." + run_name(recipe.name, seed)
            settings = json.dumps(dataclasses.asdict(recipe.job.generate), sort_keys=True)
            generate = generations.get((settings, None)) or generations.get((settings, seed))
            stored = None
            if generate is not None and recipe.job.distil.stored_target_outputs:
                # another stage's sequences: the store made on them with these settings, or
                # this recipe's own (on the shared sequences once for all seeds)
                shared = generate == "generate"
                readers = _store_readers(recipe.job, base, shared)
                key = (generate, _store_settings(recipe.job, readers))
                if key not in stores:
                    store = target_outputs_stage(
                        recipe.job,
                        base.seed if shared else seed,
                        generate,
                        readers,
                        suffix="." + recipe.name if shared else suffix,
                    )
                    stages.append(store)
                    stores[key] = store.name
                stored = stores[key]
            chain, made, evaluate = recipe_stages(
                recipe.job,
                seed,
                suffix=suffix,
                generate=generate,
                eval_seed=base.seed,
                stored=stored,
            )
            if generate is None and recipe.job.distil.stored_target_outputs:
                readers = _store_readers(recipe.job, base, False)
                stores[made, _store_settings(recipe.job, readers)] = target_outputs_name(made)
            # the first recipe with this generation makes it, for all
            generations.setdefault((settings, seed), made)
            stages += chain
            finals[run_name(recipe.name, seed)] = evaluate
    config = {
        "title": base.report.title or base.name,
        "baseline": comp.baseline,
        "seeds": comp.seeds,
        "recipes": {r.name: {"help": r.help, "set": r.settings} for r in comp.recipes},
    }
    deps = tuple(f"{alias}={stage}" for alias, stage in finals.items())
    stages.append(
        Stage(
            "comparison",
            "specdraft.pipeline.stages.comparison",
            config,
            deps,
            Resources(cpus=1),
            base.seed,
        )
    )
    return stages


def _store_readers(job: JobConfig, base: JobConfig, shared: bool) -> tuple:
    """The training sections whose precision a store follows (target_outputs_stage): on the
    shared sequences the shared reference's and `job`'s distil; on a recipe's own, its distil."""
    return (base.reference.train, job.distil.train) if shared else (job.distil.train,)


def _store_settings(job: JobConfig, readers: tuple) -> str:
    """What `job`'s stored target outputs depend on besides their sequences, as a dict key."""
    store = target_outputs_stage(job, 0, "generate", readers)
    return json.dumps(dataclasses.asdict(store.config), sort_keys=True)


def resolve_comparison_paths(comp: Comparison) -> None:
    """Local model and data paths of the base job and every recipe made absolute (before the
    stages are keyed)."""
    for recipe in comp.recipes:
        resolve_local_paths(recipe.job)
    resolve_local_paths(comp.base)


def run_comparison(
    comp: Comparison,
    out: Path,
    *,
    force: set[str] = frozenset(),
    use_ray: bool | None = None,
    command: str = "",
    overwrite: bool = False,
):
    """Execute the comparison DAG (cached stages are reused) and publish the run directory `out`
    whole (rundir.write_run_dir, kind `comparison`); `out` and the store are checked first."""
    started = time.time()
    out = Path(out).expanduser().absolute()
    check_destination(out, overwrite=overwrite)
    base = comp.base
    resolve_comparison_paths(comp)
    check_apart(out, read_places(base))  # before the store is made: it may be inside `out`
    check_store(base, create=True)
    check_models(base)
    # the prompts are the base job's; the recipe generating the most tokens needs the most room
    check_inputs(
        max([base, *(r.job for r in comp.recipes)], key=lambda j: j.generate.max_new_tokens)
    )
    results = execute_logged(build_comparison_stages(comp), base, force=force, use_ray=use_ray)
    made = results["comparison"].path
    job = dataclasses.asdict(base) | {
        "compare": {
            "seeds": comp.seeds,
            "baseline": comp.baseline,
            "recipes": {r.name: {"help": r.help, "set": r.settings} for r in comp.recipes},
        }
    }
    write_run_dir(
        out,
        kind="comparison",
        job=job,
        results=results,
        copies={name: made / name for name in ("report", "results.json", "results.md")},
        texts={},
        command=command,
        started=started,
        overwrite=overwrite,
    )
    return results
