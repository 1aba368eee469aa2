"""The stage DAG: content-addressed cache, reuse, --force, atomic commits, resource checks."""

import json
import types

import pytest

from specdraft.pipeline.config import Resources
from specdraft.pipeline.engine.artifacts import MANIFEST
from specdraft.pipeline.engine.dag import Stage, StageError, check_cluster_resources, execute

MODULE = "dag_stages"


def chain(add_b=2, fail_c=False):
    return [
        Stage("a", MODULE, {"name": "a", "add": 1}),
        Stage("b", MODULE, {"name": "b", "add": add_b}, deps=("a",)),
        Stage("c", MODULE, {"name": "c", "add": 10, "fail": fail_c}, deps=("b",)),
        Stage("d", MODULE, {"name": "d", "add": 100}, deps=("a",)),
    ]


def run(stages, store, **kw):
    return execute(stages, store, use_ray=False, say=lambda _: None, **kw)


def test_runs_in_order_and_passes_inputs(tmp_path, calls):
    results = run(chain(), tmp_path / "store")
    assert calls()[0] == "a" and calls().index("b") < calls().index("c")
    assert json.loads((results["c"].path / "value.json").read_text()) == 13
    assert results["c"].manifest["info"] == {"value": 13}
    assert results["c"].manifest["inputs"] == {"b": str(results["b"].path)}


def test_second_run_reuses_everything(tmp_path, calls):
    first = run(chain(), tmp_path / "store")
    second = run(chain(), tmp_path / "store")
    assert len(calls()) == 4
    assert all(r.reused for r in second.values())
    assert {n: r.path for n, r in first.items()} == {n: r.path for n, r in second.items()}


def test_config_change_reruns_the_stage_and_its_dependents_only(tmp_path, calls):
    first = run(chain(), tmp_path / "store")
    second = run(chain(add_b=3), tmp_path / "store")
    assert calls()[4:] == ["b", "c"]
    assert second["a"].reused and second["d"].reused
    assert second["b"].key != first["b"].key and second["c"].key != first["c"].key
    assert json.loads((second["c"].path / "value.json").read_text()) == 14


def test_force_reruns_stage_and_dependents(tmp_path, calls):
    run(chain(), tmp_path / "store")
    again = run(chain(), tmp_path / "store", force={"b"})
    assert sorted(calls()[4:]) == ["b", "c"]
    assert not again["b"].reused and again["a"].reused
    with pytest.raises(StageError, match="unknown stages: zz"):
        run(chain(), tmp_path / "store", force={"zz"})


def test_failed_stage_leaves_no_artifact_and_keeps_finished_ones(tmp_path, calls):
    store = tmp_path / "store"
    with pytest.raises(StageError, match="stage c failed: RuntimeError: planned failure"):
        run(chain(fail_c=True), store)
    dirs = sorted(p.name.split("-")[0] for p in store.iterdir())
    assert "c" not in dirs and not any(p.name.startswith(".tmp") for p in store.iterdir())
    assert all((p / MANIFEST).exists() for p in store.iterdir())
    run(chain(), store)
    assert calls().count("a") == 1  # the finished stages were kept and reused


def test_missing_gpus_fail_at_once_with_what_is_missing():
    stages = [Stage("distil", MODULE, {}, resources=Resources(cpus=1, gpus=2))]
    with pytest.raises(StageError, match="stage distil asks for 2 GPU but the cluster has 0"):
        check_cluster_resources(stages, {"CPU": 2.0})
    check_cluster_resources(stages, {"CPU": 2.0, "GPU": 2.0})


def test_workers_that_start_together_are_counted_together():
    """DDP (a config with `train`) and placement groups need every worker at once; plain shard
    tasks only need room for one at a time. STRICT_* strategies are checked node by node."""
    trains = types.SimpleNamespace(train=None)
    two_nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    cluster = {"CPU": 4.0, "GPU": 2.0}

    def check(config, placement="", workers=3, gpus=1):
        res = Resources(cpus=1, gpus=gpus, workers=workers, placement=placement)
        check_cluster_resources([Stage("s", MODULE, config, resources=res)], cluster, two_nodes)

    check({})  # shards: one at a time fits
    with pytest.raises(StageError, match="asks for 3 workers x 1 GPU but the cluster has 2"):
        check(trains)
    with pytest.raises(StageError, match="asks for 3 workers x 1 GPU"):
        check({}, "PACK")
    check({}, "STRICT_SPREAD", workers=2)
    with pytest.raises(StageError, match="STRICT_PACK needs one node with 2 x"):
        check({}, "STRICT_PACK", workers=2)
    check({}, "STRICT_PACK", workers=2, gpus=0.5)  # fractions: two workers share one GPU
    with pytest.raises(StageError, match="STRICT_SPREAD needs 3 nodes"):
        check({}, "STRICT_SPREAD", gpus=0)


def test_checkpoints_survive_a_failed_attempt_and_go_with_success(tmp_path, calls):
    stages = [Stage("a", MODULE, {"name": "a", "add": 1, "checkpointed": True})]
    store = tmp_path / "store"
    with pytest.raises(StageError, match="first attempt dies"):
        run(stages, store)
    (ckpt,) = [p for p in store.iterdir() if p.name.startswith(".ckpt-a-")]
    assert (ckpt / "attempts").read_text() == "1"
    results = run(stages, store)
    assert json.loads((results["a"].path / "value.json").read_text()) == 2  # saw the checkpoint
    assert not ckpt.exists()


def test_a_stage_s_seconds_are_its_own_run_time_not_its_wait_in_the_queue(tmp_path):
    """Under Ray a comparison submits every ready stage at once; a stage's `seconds` (run.json,
    the log) is its manifest's run time, and the wait before it is `queued`."""
    import time

    from specdraft.pipeline.engine import dag
    from specdraft.pipeline.engine.rundir import stage_records

    said = []
    stage = dag.Stage(name="distil.x.s0", module="m", config={}, deps=())
    started = time.time() - 700  # submitted 700 s ago, ran 100 s
    result = dag._finish(stage, "k", tmp_path, started, {"seconds": 100.0}, said.append)
    assert result.seconds == 100.0 and 599 <= result.queued <= 601
    assert "finished in 100.0s after 600s queued" in said[0]
    record = stage_records({"distil.x.s0": result})[0]
    assert record["seconds"] == 100.0 and 599 <= record["queued_seconds"] <= 601


@pytest.mark.integration
@pytest.mark.ray
def test_a_ray_stage_computes_with_the_cpus_it_holds(ray_cluster, tmp_path):
    """Ray reuses a worker process for task after task and torch keeps the thread count it
    started with (the first task's CPUs): a 2-CPU stage after a 1-CPU one in the same worker ran
    on one core. Each stage now sets torch's threads to its CPUs."""
    from specdraft.pipeline.config import Resources
    from specdraft.pipeline.engine import dag

    stages = [
        dag.Stage("one", "dag_thread_stage", {"n": 1}, resources=Resources(cpus=1)),
        dag.Stage("two", "dag_thread_stage", {"n": 2}, deps=("one",), resources=Resources(cpus=2)),
        dag.Stage(
            "three", "dag_thread_stage", {"n": 3}, deps=("two",), resources=Resources(cpus=1)
        ),
    ]
    results = dag.execute(stages, tmp_path / "store", use_ray=True, say=lambda _: None)
    threads = {name: r.manifest["info"]["threads"] for name, r in results.items()}
    assert threads == {"one": 1, "two": 2, "three": 1}
