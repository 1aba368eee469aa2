"""`specdraft compare`: the comparison file, its DAG, the paired test and a tiny end-to-end run."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from specdraft.pipeline.commands.compare_recipes import build_comparison_stages, load_comparison
from specdraft.pipeline.config import ConfigError
from specdraft.pipeline.stages.comparison import paired_permutation_p

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, compare: dict, **job) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "cmp", **job, "compare": compare}, sort_keys=False))
    return path


def test_paired_permutation_p_exact_and_sampled():
    # five positive differences: only all-plus and all-minus are as extreme -> 2 / 32
    assert paired_permutation_p([0.1, 0.2, 0.1, 0.3, 0.2]) == pytest.approx(2 / 32)
    assert paired_permutation_p([0.0] * 6) == 1.0
    assert paired_permutation_p([0.1, -0.1, 0.1, -0.1]) == 1.0
    assert paired_permutation_p([]) is None
    shifted = [0.05 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]  # sampled branch, clear effect
    assert paired_permutation_p(shifted) < 1e-3
    noise = [0.01 * ((i * 7) % 5 - 2) for i in range(40)]  # mean 0
    assert paired_permutation_p(noise) > 0.5


def test_the_shipped_comparison_loads_with_six_recipes_over_three_seeds():
    comp = load_comparison(REPO / "specdraft" / "jobs" / "compare.yaml")
    assert len(comp.recipes) == 6 and len(comp.seeds) >= 3
    assert comp.baseline == "fkl_all"
    by_name = {r.name: r.job for r in comp.recipes}
    assert by_name["ce"].distil.divergence == "ce"
    assert by_name["adaspec"].distil.selection == "top" and by_name["adaspec"].distil.k == 0.4
    assert by_name["fkl_onpolicy"].generate.draft_fraction == 1.0
    assert comp.base.generate.dataset_fraction == 1.0  # the shared sequences are the dataset's


def test_bad_comparisons_list_every_problem(tmp_path):
    path = write(
        tmp_path,
        {
            "seeds": [0, 0],
            "baseline": "nope",
            "recipes": {
                "a": {"set": {"target.train.steps": 3}},
                "b": {"set": {"distil.k": 7}},
                "Bad Name": {"set": {}},
            },
        },
    )
    with pytest.raises(ConfigError) as err:
        load_comparison(path)
    text = str(err.value)
    assert "compare.seeds" in text
    assert "compare.baseline" in text
    assert "compare.recipes.a" in text and "shared by every recipe" in text
    assert "compare.recipes.b: distil.k" in text
    assert "Bad Name" in text
    with pytest.raises(ConfigError, match="at least two recipes"):
        load_comparison(write(tmp_path, {"recipes": {"a": {}}}))
    with pytest.raises(ConfigError, match="no `compare:` section"):
        path.write_text("name: x\n")
        load_comparison(path)


def test_shared_stages_appear_once_and_evaluations_share_one_seed(tmp_path):
    path = write(
        tmp_path,
        {
            "seeds": [3, 4],
            "recipes": {
                "offline": {"set": {"distil.selection": "all"}},
                "online": {"set": {"generate.dataset_fraction": 0.0, "distil.rounds": 2}},
                "online_top": {"set": {"generate.dataset_fraction": 0.0, "distil.k": 0.2}},
            },
        },
        seed=7,
        generate={"dataset_fraction": 1.0, "draft_fraction": 0.0},
    )
    stages = {s.name: s for s in build_comparison_stages(load_comparison(path))}
    for name in ("data", "target", "draft_init", "generate", "reference", "comparison"):
        assert stages[name].seed == 7
    assert "generate.offline.s3" not in stages  # same generation as the shared one
    assert stages["distil.offline.s3"].deps[-2:] == ("generate", "target_outputs")
    assert stages["generate.online.s4"].seed == 4
    assert "generate=generate.online.s4" in stages["distil.online.s4"].deps
    assert stages["distil_r2.online.s4"].seed == 5  # round 2 of seed 4
    assert stages["evaluate.online.s4"].deps[-1] == "distil=distil_r2.online.s4"
    assert "generate.online_top.s4" not in stages  # the same generation as `online`'s
    assert "generate=generate.online.s4" in stages["distil.online_top.s4"].deps
    # recipes on the same sequences read the same stored target outputs
    outputs = {d for d in stages["distil.online.s4"].deps if d.startswith("target_outputs")}
    assert outputs == {d for d in stages["distil.online_top.s4"].deps if d.startswith("target_")}
    assert {s.seed for n, s in stages.items() if n.startswith("evaluate")} == {7}
    assert "offline.s3=evaluate.offline.s3" in stages["comparison"].deps


def test_recipes_with_other_store_settings_get_one_store_each_for_all_seeds(tmp_path):
    path = write(
        tmp_path,
        {
            "seeds": [0, 1],
            "recipes": {
                "top16": {"set": {}},
                "top4": {"set": {"distil.stored_k": 4}},
                "exact": {"set": {"target_outputs.format": "hidden"}},
                "exact_fkl": {
                    "set": {"target_outputs.format": "hidden", "distil.divergence": "fkl"}
                },
                "exact_online": {
                    "set": {"target_outputs.format": "hidden", "generate.dataset_fraction": 0.0}
                },
                "top8_online": {"set": {"target_outputs.k": 8, "generate.dataset_fraction": 0.0}},
            },
        },
        generate={"dataset_fraction": 1.0, "draft_fraction": 0.0},
        target_outputs={"format": "topk", "k": 16},
    )
    stages = {s.name: s for s in build_comparison_stages(load_comparison(path))}
    stores = sorted(n for n in stages if n.startswith("target_outputs"))
    # the shared top-16 store, the exact recipes' hidden states on the shared sequences (made
    # once: exact_fkl reuses exact's), and the online recipes' own per seed (none on the shared
    # sequences for them)
    assert stores == [
        "target_outputs",
        "target_outputs.exact",
        "target_outputs.exact_online.s0",
        "target_outputs.exact_online.s1",
        "target_outputs.top8_online.s0",
        "target_outputs.top8_online.s1",
    ]
    assert stages["target_outputs.top8_online.s1"].config.k == 8
    assert stages["target_outputs"].config.format == "topk"
    assert stages["target_outputs.exact"].config.format == "hidden"
    assert stages["target_outputs.exact"].seed == stages["target_outputs"].seed

    def store(run):
        return [d for d in stages[f"distil.{run}"].deps if d.startswith("target_outputs")]

    for seed in (0, 1):
        assert store(f"top16.s{seed}") == store(f"top4.s{seed}") == ["target_outputs"]
        assert store(f"exact.s{seed}") == ["target_outputs=target_outputs.exact"]
        assert store(f"exact_fkl.s{seed}") == ["target_outputs=target_outputs.exact"]
        assert store(f"exact_online.s{seed}") == [
            f"target_outputs=target_outputs.exact_online.s{seed}"
        ]
        # exact_online's sequences, read through a top-8 store of its own
        assert store(f"top8_online.s{seed}") == [
            f"target_outputs=target_outputs.top8_online.s{seed}"
        ]
        own = stages[f"target_outputs.top8_online.s{seed}"]
        assert f"generate=generate.exact_online.s{seed}" in own.deps and own.seed == seed
    assert stages["distil.top4.s0"].config.stored_k == 4
    with pytest.raises(ConfigError, match="compare.recipes.wide: distil.stored_k=32 above"):
        load_comparison(
            write(
                tmp_path,
                {"recipes": {"top16": {}, "wide": {"set": {"distil.stored_k": 32}}}},
                target_outputs={"format": "topk", "k": 16},
            )
        )


@pytest.mark.integration  # a whole (tiny) job
def test_a_tiny_comparison_end_to_end(tmp_path):
    """Two copies of one recipe train identically (paired difference 0, p = 1); the table holds
    every task, seed and metric; shared stages are made once."""
    from specdraft.cli import main

    path = write(
        tmp_path,
        {
            "seeds": [0, 1],
            "baseline": "fkl",
            "recipes": {
                "fkl": {"help": "forward KL", "set": {"distil.selection": "all"}},
                "fkl_again": {"help": "the same recipe", "set": {"distil.selection": "all"}},
                "adaspec": {"help": "top 40 %", "set": {"distil.selection": "top"}},
            },
        },
        generate={"dataset_fraction": 1.0, "draft_fraction": 0.0},
    )
    tiny = [o for o in TINY if not o.startswith(("name=", "generate.", "distil.rounds"))]
    out = tmp_path / "out"
    argv = ["compare", str(path), *tiny, f"store={tmp_path / 'store'}", "--out", str(out)]
    assert main([*argv, "--no-ray"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"][0] == "all" and len(results["tasks"]) == 5
    assert list(results["results"]) == ["fkl", "fkl_again", "adaspec"]
    for recipe, by_task in results["results"].items():
        for task in results["tasks"]:
            for metric in ("alpha", "alpha_greedy", "greedy_drafting", "tau", "tau_greedy"):
                cell = by_task[task][metric]
                assert len(cell["per_seed"]) == 2 and len(cell["per_prompt"]) == 2
                assert ("diff" in cell) == (recipe != "fkl")
                assert ("p_seed" in cell) == ("p_holm" in cell) == (recipe != "fkl")
                if "p" in cell:  # printed only where a sign-flip test over its prompts can reject
                    assert (cell["p"] is None) == (cell["pairs"] < 5), cell
    same = results["results"]["fkl_again"]["all"]["alpha"]
    assert same["diff"] == pytest.approx(0, abs=1e-9) and same["p"] == 1.0
    assert set(results["shared"]) == {"baseline", "reference"}
    assert "| fkl_again |" in (out / "results.md").read_text()
    assert "<img" in (out / "report" / "index.html").read_text()
    store = tmp_path / "store"
    assert len(list(store.glob("target-*"))) == 1 and len(list(store.glob("reference-*"))) == 1
    assert len(list(store.glob("distil.*"))) == 6
    # a second run reuses every stage
    assert main([*argv, "--no-ray"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert all(stage["reused"] for stage in run["stages"])
    assert run["command"] == "specdraft " + " ".join(argv + ["--no-ray"])
    assert run["stages_run"] == 0 and run["machine"]["logical_cores"]


def test_validate_and_run_point_at_the_comparison(capsys):
    from specdraft.cli import main

    assert main(["validate", str(REPO / "specdraft" / "jobs" / "compare.yaml")]) == 0
    assert "6 recipes x 3 seeds" in capsys.readouterr().out
    assert main(["run", str(REPO / "specdraft" / "jobs" / "compare.yaml")]) == 2
    assert "specdraft compare" in capsys.readouterr().err


def _fake_evaluation(folder, alphas: list[float], shift: float):
    """An evaluation dir as `evaluate` writes it: per-prompt alpha (two tasks) and spec rows."""
    folder.mkdir(parents=True)
    rows = [
        {
            "prompt": i,
            "task": "a" if i % 2 else "b",
            "alpha": x + shift,
            "alpha_greedy": x,
            "greedy_drafting": x / 2 + shift,
        }
        for i, x in enumerate(alphas)
    ]
    spec = [
        {"prompt": i, "task": r["task"], "tau": 2.0 + shift, "tau_greedy": 2.0}
        for i, r in enumerate(rows)
    ]
    mean = sum(r["alpha"] for r in rows) / len(rows)
    values = {"alpha_greedy": 0.5, "tau": 2.0 + shift, "tau_greedy": 2.0}
    tasks = {
        t: {"alpha": sum(r["alpha"] for r in rows if r["task"] == t) / 3, **values} for t in "ab"
    }
    by_rule = {"greedy_drafting": {"acceptance": mean / 2}}
    final = {"alpha": mean, **values, "acceptance_by_rule": by_rule, "tasks": tasks}
    (folder / "metrics.json").write_text(json.dumps({"final": final}))
    (folder / "per_prompt.json").write_text(json.dumps({"final": {"alpha": rows, "spec": spec}}))


def test_results_carry_seed_level_tests_holm_and_per_prompt_values(tmp_path):
    from specdraft.pipeline.stages.comparison import compare_runs
    from specdraft.pipeline.statistics import holm, seed_test

    alphas = [0.2, 0.4, 0.3, 0.5, 0.6, 0.1]
    shifts = {"base": [0.0, 0.01, -0.01], "up": [0.03, 0.05, 0.02], "down": [-0.04, -0.02, -0.05]}
    inputs = {"shared": tmp_path / "shared"}
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metrics.json").write_text(json.dumps({"gamma": 4}))
    for recipe, per_seed in shifts.items():
        for seed, shift in zip((0, 1, 2), per_seed, strict=True):
            inputs[f"{recipe}.s{seed}"] = tmp_path / f"{recipe}.s{seed}"
            _fake_evaluation(inputs[f"{recipe}.s{seed}"], alphas, shift)
    config = {
        "title": "t",
        "recipes": {r: {"help": r} for r in shifts},
        "seeds": [0, 1, 2],
        "baseline": "base",
    }
    results = compare_runs(config, inputs)["results"]

    up, down = results["up"]["all"]["alpha"], results["down"]["all"]["alpha"]
    diffs_up = [u - b for u, b in zip(shifts["up"], shifts["base"], strict=True)]
    assert up["per_seed"] == pytest.approx([sum(alphas) / 6 + s for s in shifts["up"]])
    assert up["p_seed"] == pytest.approx(seed_test(diffs_up)["p_seed"])
    assert up["ci95"][0] > 0 and down["ci95"][1] < 0  # the sign of each effect is caught
    assert up["per_prompt"]["s1"] == pytest.approx([x + 0.05 for x in alphas])
    assert results["up"]["a"]["alpha"]["per_prompt"]["s0"] == pytest.approx([0.43, 0.53, 0.13])
    # Holm over every seed-level test of the file, the adjusted never below the raw
    cells = [results[r][t][m] for r in ("up", "down") for t in results[r] for m in results[r][t]]
    tested = [c for c in cells if "p_holm" in c]
    assert [c["p_holm"] for c in tested] == holm([c["p_seed"] for c in tested])
    assert all(c["p_holm"] >= c["p_seed"] for c in tested if c["p_seed"] is not None)
    # three prompts per task: a prompt-level sign-flip test cannot reject there, so no p
    assert results["up"]["a"]["alpha"]["p"] is None
    assert results["up"]["all"]["alpha"]["p"] is not None  # six prompts can
    assert "p_seed" not in results["base"]["all"]["alpha"]
    # greedy drafting's acceptance, read from acceptance_by_rule and the per-prompt rows
    greedy = results["up"]["all"]["greedy_drafting"]
    assert greedy["per_seed"] == pytest.approx([sum(alphas) / 12 + s / 2 for s in shifts["up"]])
    assert greedy["per_prompt"]["s0"] == pytest.approx([x / 2 + 0.03 for x in alphas])


def test_a_cell_is_starred_by_its_holm_adjusted_seed_test_not_by_prompts():
    from specdraft.reports.compare_render import cell_text

    cell = {"mean": 0.283, "std": 0.003, "diff": 0.011, "p": 0.0001, "ci95": [0.005, 0.017]}
    weak = cell_text({**cell, "p_seed": 0.017, "p_holm": 0.6}, 3)
    assert weak == (
        "0.283 ± 0.003 (+0.011 [+0.005, +0.017], seeds p=0.017, Holm p=0.600, prompts p<0.001)"
    )
    assert "*" in cell_text({**cell, "p_seed": 0.001, "p_holm": 0.04}, 3)
    assert "prompts p=n/a" in cell_text({**cell, "p": None, "p_seed": 0.5, "p_holm": 1.0}, 3)
    # a file made before the seed-level test: starred by its prompt-level p, as it was
    assert (
        cell_text({"mean": 0.3, "std": None, "diff": -0.02, "p": 0.01}, 3)
        == "0.300 (-0.020*, p=0.010)"
    )
