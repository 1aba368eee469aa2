"""The comparison's DAG is wired by the same job -> stages code as `specdraft run`, and that wiring
keeps every stage name and cache key a comparison had before it was shared.

`data/compare_wiring.json` was written from the hand-wired `build_comparison_stages` (before the
wiring moved to engine/job.py) by `describe` below: per stage its module, where its config comes
from (a job section of the base or of a recipe), inputs, seed, resources and whether it carries an
input fingerprint. Config values are not in it, so changing a default elsewhere does not break it;
the keys are compared by rebuilding the recorded stages from today's configs. One deliberate
change since: a generation with draft_fraction=0 no longer lists `draft_init` (it never read it).
"""

import dataclasses
import json
from pathlib import Path

import pytest

from specdraft.pipeline.commands.compare_recipes import build_comparison_stages, load_comparison
from specdraft.pipeline.config import Resources
from specdraft.pipeline.engine.dag import Stage, plan
from specdraft.pipeline.engine.job import input_fingerprints

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).parent / "data" / "compare_wiring.json"
# jobs/compare.yaml as shipped (one round), and with on-policy rounds sampled by the draft; both
# with the target run live at every step (the wiring recorded before the target's outputs were
# stored; the stored wiring is tested in test_target_outputs.py)
LIVE = ["distil.stored_target_outputs=false"]
VARIANTS = {"shipped": LIVE, "rounds": ["distil.rounds=2", "distil.later_rounds=draft", *LIVE]}


def config_sources(comp, recipe: str = "") -> dict[str, object]:
    """Every config a stage may use, by where it comes from: the stage's own recipe first (so a
    recipe equal to the base by today's defaults still names itself), then the base."""
    jobs = [(r.name, r.job) for r in comp.recipes if r.name == recipe] + [("base", comp.base)]
    jobs += [(r.name, r.job) for r in comp.recipes if r.name != recipe]
    sources: dict[str, object] = {}
    for who, job in jobs:
        for f in dataclasses.fields(job):
            sources[f"{who}.{f.name}"] = getattr(job, f.name)
        later = dataclasses.replace(job.generate, draft_fraction=1.0, dataset_fraction=0.0)
        sources[f"{who}.generate(later rounds)"] = later
    return sources


def recipe_of(stage_name: str) -> str:
    """`distil_r2.fkl_all.s1` -> `fkl_all`; shared stages have none."""
    parts = stage_name.split(".")
    return parts[1] if len(parts) == 3 else ""


def describe(comp, stages: list[Stage]) -> dict:
    def source(stage: Stage) -> object:
        if not dataclasses.is_dataclass(stage.config):
            return {"value": stage.config}  # the comparison stage's own dict
        sources = config_sources(comp, recipe_of(stage.name))
        return next(
            k for k, v in sources.items() if type(v) is type(stage.config) and v == stage.config
        )

    return {
        s.name: {
            "module": s.module,
            "config": source(s),
            "deps": list(s.deps),
            "seed": s.seed,
            "resources": dataclasses.asdict(s.resources),
            "fingerprint": bool(s.fingerprint),
        }
        for s in stages
    }


def rebuild(comp, described: dict) -> list[Stage]:
    sources = config_sources(comp)  # every name, whichever comes first
    fingerprints = input_fingerprints(comp.base)
    stages = []
    for name, d in described.items():
        config = d["config"]["value"] if isinstance(d["config"], dict) else sources[d["config"]]
        resources = Resources(**d["resources"])
        fingerprint = fingerprints.get(name, "") if d["fingerprint"] else ""
        stages.append(
            Stage(name, d["module"], config, tuple(d["deps"]), resources, d["seed"], fingerprint)
        )
    return stages


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_comparison_keeps_its_stage_names_wiring_and_keys(variant, tmp_path):
    comp = load_comparison(REPO / "specdraft" / "jobs" / "compare.yaml", VARIANTS[variant])
    expected = json.loads(SNAPSHOT.read_text())[variant]
    stages = build_comparison_stages(comp)
    assert describe(comp, stages) == expected
    keys = {s.name: key for s, key, _ in plan(stages, tmp_path)}
    recorded = {s.name: key for s, key, _ in plan(rebuild(comp, expected), tmp_path)}
    assert keys == recorded
