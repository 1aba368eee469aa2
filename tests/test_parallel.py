"""Data-parallel generation: shards of whole batches on logical GPUs, merged output unchanged."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from specdraft.pipeline.config import Resources
from specdraft.pipeline.dag import Stage, execute
from specdraft.pipeline.generate import load_sequences
from specdraft.pipeline.job import build_stages
from specdraft.pipeline.parallel import shard_bounds


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


def test_two_gpu_workers_generate_exactly_what_one_worker_does(tiny_run, ray_cluster):
    """The session cluster has 2 logical GPUs: each shard task gets one of them."""
    job, _, _ = tiny_run
    assert ray_cluster.cluster_resources().get("GPU") == 2
    upstream = [s for s in build_stages(job) if s.name in ("data", "target", "draft_init")]
    made = {}
    for workers, gpus in ((1, 0), (2, 1)):
        cfg = dataclasses.replace(
            job.generate,
            batch_size=2,
            resources=Resources(cpus=1, gpus=gpus, workers=workers),
        )
        stage = Stage(
            "generate",
            "specdraft.pipeline.generate",
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


def test_distil_with_two_workers_trains_ddp_through_ray_train(tiny_run, ray_cluster):
    job, _, results = tiny_run
    stages = {s.name: s for s in build_stages(job)}
    upstream = [stages[n] for n in ("data", "target", "draft_init", "generate", "reference")]
    cfg = dataclasses.replace(job.distil, rounds=1, resources=Resources(cpus=1, gpus=0, workers=2))
    stage = dataclasses.replace(stages["distil"], config=cfg, resources=cfg.resources)
    made = execute([*upstream, stage], job.store, use_ray=True, say=lambda _: None)["distil"]
    info = made.manifest["info"]
    assert info["workers"] == 2 and info["replicas_in_sync"]
    assert "weights_checksum" not in info
    from specdraft.pipeline.artifacts import load_model_artifact

    trained = load_model_artifact(made.path, "cpu")
    start = load_model_artifact(results["draft_init"].path, "cpu")
    moved = [
        name
        for (name, a), (_, b) in zip(
            trained.named_parameters(), start.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert moved  # training happened
    assert not list(Path(made.path).glob("ddp_info.json"))


def test_evaluation_spread_over_two_gpu_workers_gives_the_same_metrics(tiny_run, ray_cluster):
    job, _, _ = tiny_run
    stages = {s.name: s for s in build_stages(job)}
    upstream = [stages[n] for n in ("data", "target", "draft_init", "generate", "reference")]
    upstream += [s for n, s in stages.items() if n.startswith(("distil", "generate_r"))]
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
