"""The tiers and their checks, and shared fixtures: one Ray cluster per pytest run, a tiny job,
and its run (done once)."""

from __future__ import annotations

import os

import pytest
import torch

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
    "target.arch.num_heads=1",  # head_dim 32: vLLM's CPU attention serves it (serve-check)
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
    # AdaSPEC's selection and LoRA adapters (not the defaults): the paths a whole job exercises
    # least otherwise; the defaults (all tokens, full fine-tuning) run in the real pair's test
    "distil.selection=top",
    "distil.lora.enabled=true",
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


# A small job for a pair of real (tiny) models on a JSONL file with `question`, `answer` and
# `category` fields: tests/test_real_pair.py and tests/test_cross_tokenizer.py.
SMALL_PAIR = [
    "name=byo",
    "data.prompt_field=question",
    "data.response_field=answer",
    "data.task_field=category",
    "data.max_length=64",
    "data.eval_ratio=0.25",
    "generate.num_prompts=8",
    "generate.max_new_tokens=8",
    "reference.train.steps=2",
    "reference.train.batch_size=4",
    "distil.train.steps=2",
    "distil.train.batch_size=4",
    "distil.lora.enabled=true",  # not the default: test_real_pair checks the adapter's export
    "distil.lora.r=4",
    "evaluate.max_new_tokens=6",
    "evaluate.prompts_per_task=2",
    "evaluate.spec_prompts_per_task=1",
    "generate.resources.cpus=1",
    "reference.resources.cpus=1",
    "distil.resources.cpus=1",
    "evaluate.resources.cpus=1",
]


# The tiers: `pytest -q` runs the unit tier; `pytest -q -m integration` runs whole jobs, Ray, a
# browser and a served model (CI runs both). Each test file marks its tier itself (a module's
# `pytestmark`, a test's own marks); collection fails where a mark contradicts what a test uses.
RAY_FIXTURES = {"ray_cluster", "tiny_run"}
TORCH_THREADS = torch.get_num_threads()  # before any test sets it


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything: every test is checked
def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        needed = set()
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            needed |= {"integration", "ray"}
        if marks & {"ray", "slow"}:
            needed.add("integration")
        if needed - marks:
            missing = " and ".join(f"@pytest.mark.{m}" for m in sorted(needed - marks))
            wrong.append(f"  {item.nodeid}: add {missing}")
    if wrong:
        raise pytest.UsageError(
            "tests in the wrong tier (a Ray fixture, `ray` or `slow` means the integration tier):\n"
            + "\n".join(wrong)
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Unit tests compute on tiny models, where a second intra-op thread only adds barrier waits
    (10x slower on a busy 2-core machine): one thread for them, set before their fixtures are. The
    integration tier keeps torch's own choice."""
    torch.set_num_threads(TORCH_THREADS if item.get_closest_marker("integration") else 1)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The names of the tests/dag_stages.py stages run so far, in order (DAG_TEST_LOG)."""
    from specdraft.pipeline.engine import dag

    log = tmp_path / "calls.txt"
    monkeypatch.setenv("DAG_TEST_LOG", str(log))
    monkeypatch.setattr(dag, "POLL_SECONDS", 0.05)  # stages locked by another run: look often
    return lambda: log.read_text().split() if log.exists() else []


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    # Two logical GPUs: data-parallel stages schedule on them (nothing here runs CUDA).
    # Workers import the tests' own stage modules (tests/dag_stages.py) from PYTHONPATH.
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    # Mirrors of remote stores (tests/test_store.py) stay out of the home directory.
    mirror = str(tmp_path_factory.mktemp("ray-mirror"))
    context = ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=True,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "SPECDRAFT_CACHE": mirror}},
    )
    ray.dashboard_address = f"http://{context.dashboard_url}"  # for `specdraft submit`
    ray.specdraft_mirror = mirror  # the workers' "machine", unlike a test's own mirror
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_cluster):
    """The tiny job run once through Ray: (job, out dir, stage results)."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import run_job

    root = tmp_path_factory.mktemp("tiny")
    job = load_job(None, [*TINY, f"store={root / 'store'}"])
    out = root / "out"
    results = run_job(job, out, use_ray=True)
    return job, out, results


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 (moto's server on loopback), shared by the tests of one pytest run."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint, tmp_path, monkeypatch):
    """`s3://<a new bucket>/store` on the local S3, with fsspec configured to reach it (the way a
    user sets FSSPEC_S3_ENDPOINT_URL) and this machine's mirror in the test's directory."""
    import uuid

    import fsspec.config
    import s3fs

    options = {
        "endpoint_url": s3_endpoint,
        "key": "test",
        "secret": "test",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "mirror"))
    bucket = f"specdraft-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/store"
