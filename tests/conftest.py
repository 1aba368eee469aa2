"""Shared fixtures: one Ray cluster per pytest run, a tiny job, and its run (done once)."""

from __future__ import annotations

import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A toy job small enough for CI: every stage runs for real, on a few examples.
TINY = [
    "name=tiny",
    "data.train_per_task=40",
    "data.eval_per_task=3",
    "data.vocab_size=320",
    "data.max_length=112",
    "target.arch.hidden_size=32",
    "target.arch.num_layers=1",
    "target.arch.num_heads=2",
    "target.arch.intermediate_size=64",
    "target.train.steps=10",
    "target.train.batch_size=8",
    "draft.arch.hidden_size=16",
    "draft.arch.num_heads=2",
    "draft.arch.intermediate_size=32",
    "draft.train.steps=6",
    "draft.train.batch_size=8",
    "generate.num_prompts=12",
    "generate.max_new_tokens=12",
    "generate.draft_fraction=0.5",
    "generate.dataset_fraction=0.25",
    "distil.rounds=2",
    "distil.eval_every=2",
    "reference.train.steps=3",
    "reference.train.batch_size=4",
    "distil.train.steps=3",
    "distil.train.batch_size=4",
    "distil.lora.r=4",
    "evaluate.max_new_tokens=10",
    "evaluate.prompts_per_task=2",
    "evaluate.spec_prompts_per_task=1",
    "target.resources.cpus=1",
    "draft.resources.cpus=1",
    "generate.resources.cpus=1",
    "reference.resources.cpus=1",
    "distil.resources.cpus=1",
    "evaluate.resources.cpus=1",
]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Two logical GPUs: data-parallel stages schedule on them (nothing here runs CUDA).
    # Workers import the tests' own stage modules (tests/dag_stages.py) from PYTHONPATH.
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    context = ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=True,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    ray.dashboard_address = f"http://{context.dashboard_url}"  # for `specdraft submit`
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_cluster):
    """The tiny job run once through Ray: (job, out dir, stage results)."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.job import run_job

    root = tmp_path_factory.mktemp("tiny")
    job = load_job(None, [*TINY, f"store={root / 'store'}"])
    out = root / "out"
    results = run_job(job, out, use_ray=True)
    return job, out, results
