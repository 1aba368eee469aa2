"""Data parallelism: generation and evaluation sharded over logical GPUs with the output unchanged;
training stages with DDP through Ray Train."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from specdraft.drafts.models import load_tokenizer, toy_llama
from specdraft.errors import InputError
from specdraft.pipeline.config import ReferenceConfig, Resources
from specdraft.pipeline.engine.artifacts import StageContext, load_model_artifact
from specdraft.pipeline.engine.dag import Stage, execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.parallel import map_shards, shard_bounds
from specdraft.pipeline.sequences import load_sequences, max_length_of, tokenizer_dir


@pytest.mark.parametrize(
    "n,workers,batch,expected",
    [
        (10, 2, 2, [(0, 6), (6, 10)]),
        (10, 3, 4, [(0, 4), (4, 8), (8, 10)]),
        (3, 4, 2, [(0, 2), (2, 3)]),  # fewer batches than workers
        (0, 2, 2, []),
        (7, 1, 3, [(0, 7)]),
    ],
)
def test_shards_are_contiguous_runs_of_whole_batches(n, workers, batch, expected):
    bounds = shard_bounds(n, workers, batch)
    assert bounds == expected
    assert all(start % batch == 0 for start, _ in bounds)


@pytest.mark.integration
@pytest.mark.ray
def test_a_placement_strategy_reserves_the_workers_together(ray_cluster, monkeypatch):
    from dag_parallel_stages import placed

    shards = [(0,), (1,)]
    here = StageContext(Path("."), 0)  # a local store: workers fetch nothing
    loose = map_shards(placed, shards, Resources(cpus=0.5, gpus=1, workers=2), here)
    assert all(group is None for group, _ in loose)
    packed = map_shards(
        placed, shards, Resources(cpus=0.5, gpus=1, workers=2, placement="STRICT_PACK"), here
    )
    groups = {group for group, _ in packed}
    assert len(groups) == 1 and None not in groups  # one placement group holds both
    assert sorted(g for _, gpus in packed for g in gpus) == [0, 1]
    assert not [
        g for g in ray_cluster.util.placement_group_table().values() if g["state"] != "REMOVED"
    ]
    monkeypatch.setenv("SPECDRAFT_PLACEMENT_TIMEOUT", "2")
    with pytest.raises(
        InputError, match="could not reserve 2 x {'CPU': 0.5, 'GPU': 1} with strategy STRICT_SPREAD"
    ):
        map_shards(
            placed,
            shards,
            Resources(cpus=0.5, gpus=1, workers=2, placement="STRICT_SPREAD"),
            here,
        )  # one node


@pytest.mark.integration
@pytest.mark.ray
def test_a_shard_computes_with_the_cpus_it_holds(ray_cluster):
    """Ray reuses worker processes across tasks and torch keeps the thread count a worker started
    with: shard tasks of 2 CPUs after 1-CPU ones (and back) each compute with their own CPUs."""
    from dag_parallel_stages import threads

    here = StageContext(Path("."), 0)
    seen = [
        map_shards(threads, [(0,), (1,)], Resources(cpus=cpus, workers=2), here)
        for cpus in (1, 2, 1, 0.5)
    ]
    assert seen == [[1, 1], [2, 2], [1, 1], [1, 1]]


@pytest.mark.integration
@pytest.mark.ray
def test_independent_stages_with_fractional_gpus_run_side_by_side(ray_cluster, tmp_path):
    """Four stages asking for half a GPU each run at once on the 2 logical GPUs: each waits
    until all four have started, which could not happen one or two at a time."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    share = Resources(cpus=0.25, gpus=0.5)
    stages = [
        Stage(
            name,
            "dag_stages",
            {
                "name": name,
                "add": 1,
                "barrier": str(barrier),
                "together": 4,
                "log": str(tmp_path / "calls.txt"),
            },
            resources=share,
        )
        for name in ("w", "x", "y", "z")
    ]
    results = execute(stages, tmp_path / "store", use_ray=True, say=lambda _: None)
    assert sorted(p.name for p in barrier.iterdir()) == ["w", "x", "y", "z"]
    assert not any(r.reused for r in results.values())


@pytest.mark.integration
@pytest.mark.ray
def test_two_gpu_workers_generate_exactly_what_one_worker_does(tiny_run, ray_cluster):
    """The session cluster has 2 logical GPUs: each shard task gets one of them (both reserved
    together in a placement group)."""
    job, _, _ = tiny_run
    assert ray_cluster.cluster_resources().get("GPU") == 2
    upstream = [s for s in build_stages(job) if s.name in ("data", "target", "draft_init")]
    made = {}
    for workers, gpus, placement in ((1, 0, ""), (2, 1, "STRICT_PACK")):
        cfg = dataclasses.replace(
            job.generate,
            batch_size=2,
            resources=Resources(cpus=1, gpus=gpus, workers=workers, placement=placement),
        )
        stage = Stage(
            "generate",
            "specdraft.pipeline.stages.generate",
            cfg,
            ("data", "target", "draft_init"),
            cfg.resources,
            job.seed,
        )
        results = execute([*upstream, stage], job.store, use_ray=True, say=lambda _: None)
        assert all(results[s.name].reused for s in upstream)
        made[workers] = results["generate"]
    one, two = (load_sequences(made[w].path).to_list() for w in (1, 2))
    assert one == two and any(r["source"] == "draft" for r in one)
    info = made[2].manifest["info"]
    for shards in info["worker_gpu_ids"]:  # per sampled part: one GPU per shard task
        assert len(shards) == 2
        assert all(len(ids) == 1 and ids[0] in (0, 1) for ids in shards)
    assert made[1].manifest["info"]["worker_gpu_ids"] == [[[]], [[]]]


def _made_by_two_workers(job, name: str, upstream: tuple[str, ...], **changes):
    """Stage `name` trained by 2 DDP workers (its config changed by `changes`), upstream reused."""
    stages = {s.name: s for s in build_stages(job)}
    cfg = dataclasses.replace(
        stages[name].config, resources=Resources(cpus=1, gpus=0, workers=2), **changes
    )
    stage = dataclasses.replace(stages[name], config=cfg, resources=cfg.resources)
    todo = [*(stages[n] for n in upstream), stage]
    made = execute(todo, job.store, use_ray=True, say=lambda _: None)[name]
    info = made.manifest["info"]
    assert info["workers"] == 2 and info["replicas_in_sync"]
    assert "weights_checksum" not in info
    assert not list(Path(made.path).glob("ddp_info.json"))
    return made


def _moved(trained, start) -> list[str]:
    """Names of the parameters that differ between two models of one architecture."""
    return [
        name
        for (name, a), (_, b) in zip(
            trained.named_parameters(), start.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]


@pytest.mark.integration
@pytest.mark.ray
def test_distil_with_two_workers_trains_ddp_through_ray_train(tiny_run, ray_cluster):
    job, _, results = tiny_run
    upstream = ("data", "target", "draft_init", "generate", "target_outputs", "reference")
    made = _made_by_two_workers(job, "distil", upstream, rounds=1)
    trained = load_model_artifact(made.path, "cpu")
    assert _moved(trained, load_model_artifact(results["draft_init"].path, "cpu"))


@pytest.mark.integration
@pytest.mark.ray
def test_reference_with_two_workers_trains_ddp_through_ray_train(tiny_run, ray_cluster):
    job, _, results = tiny_run
    assert "workers" not in results["reference"].manifest["info"]  # one worker: no DDP record
    assert "weights_checksum" not in results["reference"].manifest["info"]
    upstream = ("data", "target", "draft_init", "generate", "target_outputs")
    made = _made_by_two_workers(job, "reference", upstream)
    trained = load_model_artifact(made.path, "cpu")
    start = load_model_artifact(results["draft_init"].path, "cpu")
    assert len(_moved(trained, start)) == len(list(start.parameters()))  # full fine-tuning


@pytest.mark.integration
@pytest.mark.ray
def test_toy_draft_with_two_workers_pretrains_ddp_through_ray_train(tiny_run, ray_cluster):
    """The toy draft's cross-entropy pre-training (plain HF Trainer) on 2 DDP workers."""
    job, _, results = tiny_run
    train = dataclasses.replace(job.draft.train, log_every=1)
    made = _made_by_two_workers(job, "draft_init", ("data",), train=train)
    losses = [row["loss"] for row in json.loads((made.path / "history.json").read_text())]
    assert len(losses) == job.draft.train.steps and losses[-1] < losses[0]
    data = results["data"].path
    start = toy_llama(
        job.draft.arch,
        load_tokenizer(tokenizer_dir(data)),
        max_positions=max_length_of(data),
        seed=job.seed + 1,  # the draft's seed: every rank starts from these weights
    )
    assert _moved(load_model_artifact(made.path, "cpu"), start)


def test_two_workers_outside_ray_ask_for_ray(monkeypatch, tmp_path):
    from specdraft.pipeline.engine import parallel
    from specdraft.pipeline.stages import reference

    monkeypatch.setattr(parallel, "in_ray_cluster", lambda: False)
    cfg = dataclasses.replace(ReferenceConfig(), resources=Resources(workers=2))
    with pytest.raises(InputError, match=r"reference.resources.workers > 1 .*drop --no-ray"):
        reference.run(cfg, {}, StageContext(tmp_path, 0))


@pytest.mark.integration
@pytest.mark.ray
def test_evaluation_spread_over_two_gpu_workers_gives_the_same_metrics(tiny_run, ray_cluster):
    job, _, _ = tiny_run
    stages = {s.name: s for s in build_stages(job)}
    upstream = [s for n, s in stages.items() if n not in ("evaluate", "export", "report")]
    made = {}
    for workers, gpus in ((1, 0), (2, 1)):
        cfg = dataclasses.replace(
            job.evaluate, resources=Resources(cpus=1, gpus=gpus, workers=workers)
        )
        stage = dataclasses.replace(stages["evaluate"], config=cfg, resources=cfg.resources)
        made[workers] = execute([*upstream, stage], job.store, use_ray=True, say=lambda _: None)[
            "evaluate"
        ]
    metrics = {w: json.loads((made[w].path / "metrics.json").read_text()) for w in made}
    assert metrics[1]["workers"] == 1 and metrics[2]["workers"] == 2
    timing = ("seconds", "speedup", "cost_ratio", "workers")

    def without_timing(value):
        if isinstance(value, dict):
            return {
                k: without_timing(v) for k, v in value.items() if not any(t in k for t in timing)
            }
        return value

    assert without_timing(metrics[1]) == without_timing(metrics[2])
    per_prompt = [(made[w].path / "per_prompt.json").read_text() for w in made]
    assert per_prompt[0] == per_prompt[1]
