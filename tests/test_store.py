"""Artifact stores at a URL (S3 here, on a local moto server): publish, fetch, reuse, share, run."""

import json
import shutil
import time
from pathlib import Path

import pytest

from specdraft.errors import InputError
from specdraft.pipeline.engine.dag import Stage, StageError, execute
from specdraft.pipeline.engine.store import Store

MODULE = "dag_stages"


def chain(log=None, **c_extra):
    extra = {"log": str(log)} if log else {}
    return [
        Stage("a", MODULE, {"name": "a", "add": 1, **extra}),
        Stage("b", MODULE, {"name": "b", "add": 2, **extra}, deps=("a",)),
        Stage("c", MODULE, {"name": "c", "add": 3, **extra, **c_extra}, deps=("a", "b")),
    ]


def quiet(_):
    pass


def published(store: Store) -> list[str]:
    """Artifacts with a manifest in the store (what every machine sees as made)."""
    store.fs.invalidate_cache()
    return sorted(p.split("/")[-2] for p in store.fs.glob(f"{store.url}/*/manifest.json"))


def test_stages_publish_to_the_store_and_another_machine_reuses_them(
    s3_store, tmp_path, calls, monkeypatch
):
    store = Store(s3_store)
    first = execute(chain(), store, use_ray=False, say=quiet)
    assert calls() == ["a", "b", "c"]
    assert published(store) == sorted(r.path.name for r in first.values())
    assert json.loads((first["c"].path / "value.json").read_text()) == 1 + (1 + 2) + 3
    assert first["c"].path.is_relative_to(tmp_path / "mirror")
    assert first["c"].manifest["inputs"]["a"] == f"{s3_store}/{first['a'].path.name}"

    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "other-machine"))  # an empty mirror
    again = execute(chain(), Store(s3_store), use_ray=False, say=quiet)
    assert calls() == ["a", "b", "c"]  # nothing ran again
    assert all(r.reused for r in again.values())
    assert again["c"].path.is_relative_to(tmp_path / "other-machine")
    assert json.loads((again["c"].path / "value.json").read_text()) == 7  # fetched


def test_a_failed_stage_publishes_nothing(s3_store, calls):
    store = Store(s3_store)
    with pytest.raises(StageError, match="planned failure"):
        execute(chain(fail=True), store, use_ray=False, say=quiet)
    assert [name.split("-")[0] for name in published(store)] == ["a", "b"]
    store.fs.invalidate_cache()
    assert not [p for p in store.fs.find(store.url) if "/c-" in p]  # no partial upload
    assert not store.fs.glob(f"{store.url}/.lock-*")  # the failed run let go of its locks


def test_a_forced_rerun_replaces_the_artifact_and_stale_mirrors_fetch_it_again(
    s3_store, tmp_path, calls, monkeypatch
):
    execute(chain(), Store(s3_store), use_ray=False, say=quiet)
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "other-machine"))
    before = execute(chain(), Store(s3_store), use_ray=False, say=quiet)["c"]
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "mirror"))
    time.sleep(1.1)  # manifests record the finish time to the second
    forced = execute(chain(), Store(s3_store), force={"c"}, use_ray=False, say=quiet)["c"]
    assert calls() == ["a", "b", "c", "c"]
    assert forced.manifest["finished"] != before.manifest["finished"]
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "other-machine"))
    fetched = Store(s3_store).fetch(forced.path.name)
    assert json.loads((fetched / "manifest.json").read_text()) == forced.manifest


@pytest.mark.integration
@pytest.mark.ray
def test_ray_tasks_read_and_write_a_remote_store(ray_cluster, s3_store, tmp_path):
    log = tmp_path / "calls.txt"
    results = execute(chain(log), Store(s3_store), use_ray=True, say=quiet)
    assert log.read_text().split() == ["a", "b", "c"]
    assert len(published(Store(s3_store))) == 3
    assert json.loads((results["c"].path / "value.json").read_text()) == 7  # fetched here


@pytest.mark.integration
@pytest.mark.ray
def test_workers_on_another_machine_fetch_the_stage_inputs(ray_cluster, s3_store, tmp_path, calls):
    """The stages run here (mirror tmp_path/mirror); their shard tasks and DDP workers run in the
    Ray cluster, whose workers mirror the store elsewhere, like another node's."""
    stages = [
        Stage("a", MODULE, {"name": "a", "add": 1}),
        Stage("shards", "dag_parallel_stages", {"kind": "shards"}, deps=("a",)),
        Stage("ddp", "dag_parallel_stages", {"kind": "ddp", "add": 2}, deps=("a",)),
    ]
    results = execute(stages, Store(s3_store), use_ray=False, say=quiet)
    assert ray_cluster.specdraft_mirror != str(tmp_path / "mirror")
    assert json.loads((results["shards"].path / "value.json").read_text()) == 2
    elsewhere = Store(s3_store).local.name  # the store's mirror directory in any mirror root
    elsewhere = f"{ray_cluster.specdraft_mirror}/{elsewhere}/{results['a'].path.name}"
    assert results["shards"].manifest["info"]["read"] == [f"{elsewhere}/value.json"] * 2
    ddp = results["ddp"]
    assert json.loads((ddp.path / "value.json").read_text()) == 3  # rank 0's, via the store
    info = ddp.manifest["info"]
    assert info["workers"] == 2 and info["replicas_in_sync"]
    assert info["read"] == [elsewhere]
    store = Store(s3_store)
    store.fs.invalidate_cache()
    assert not store.fs.glob(f"{store.url}/.staging-*")  # the hand-over is cleaned up


def test_paths_under_one_mirror_move_to_another():
    from specdraft.pipeline.engine.parallel import relocated

    args = ("/m/a-1/model", Path("/m/a-1"), {"k": ["/m", "/mx/b", 3]}, "/other/m/c")
    assert relocated(args, "/m", "/n") == (
        "/n/a-1/model",
        Path("/n/a-1"),
        {"k": ["/n", "/mx/b", 3]},
        "/other/m/c",
    )


def test_a_store_url_fsspec_cannot_open_is_one_clear_error(capsys):
    from specdraft.cli import main

    with pytest.raises(InputError, match="no protocol 'nosuch'"):
        Store("nosuch://bucket/store")
    assert main(["validate", "store=nosuch://bucket/store"]) == 2
    assert "fsspec knows no protocol 'nosuch'" in capsys.readouterr().err


def test_local_paths_and_file_urls_are_the_same_local_store(tmp_path):
    assert Store(f"file://{tmp_path}").local == Store(tmp_path).local == tmp_path
    assert not Store(f"file://{tmp_path}").remote


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.slow
def test_the_tiny_job_runs_on_a_remote_store(ray_cluster, s3_store, tmp_path, monkeypatch):
    from conftest import TINY

    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import run_job

    job = load_job(None, [*TINY, f"store={s3_store}"])
    results = run_job(job, tmp_path / "out", use_ray=True)
    assert published(Store(s3_store)) == sorted(r.path.name for r in results.values())
    assert (tmp_path / "out" / "draft" / "config.json").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["job_hash"]
    assert (Store(s3_store).local / "logs" / "tiny.log").exists()

    from specdraft.cli import main

    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "another-machine"))
    to = tmp_path / "bf16"
    assert main(["export", str(tmp_path / "out"), "--to", str(to), "--dtype", "bfloat16"]) == 0
    assert json.loads((to / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_artifact_is_found_where_its_manifest_recorded_it(s3_store, tmp_path, calls):
    from specdraft.pipeline.engine.store import artifact_at

    made = execute(chain(), tmp_path / "local", use_ray=False, say=quiet)["a"]
    assert artifact_at(str(made.path)) == made.path
    assert artifact_at(str(tmp_path / "local" / "a-gone")) is None
    remote = execute(chain(), Store(s3_store), use_ray=False, say=quiet)["a"]
    shutil.rmtree(Store(s3_store).local)  # this machine has no copy: it is fetched
    assert artifact_at(f"{s3_store}/{remote.path.name}") == remote.path
    assert json.loads((remote.path / "value.json").read_text()) == 1
    assert artifact_at(f"{s3_store}/a-gone") is None
