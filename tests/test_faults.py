"""Faults survived: a Ray worker SIGKILLed mid-stage, a driver SIGKILLed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdraft.pipeline.engine.artifacts import MANIFEST
from specdraft.pipeline.engine.dag import Stage, execute

pytestmark = pytest.mark.integration

MODULE = "dag_stages"
TESTS = Path(__file__).resolve().parent


def read_calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.ray
def test_a_worker_killed_mid_stage_is_retried_and_the_run_completes(tmp_path, ray_cluster):
    log, marker = tmp_path / "calls.txt", tmp_path / "killed"
    stages = [
        Stage("a", MODULE, {"name": "a", "add": 1, "log": str(log), "kill_once": str(marker)}),
        Stage("b", MODULE, {"name": "b", "add": 2, "log": str(log)}, deps=("a",)),
    ]
    store = tmp_path / "store"
    results = execute(stages, store, use_ray=True, say=lambda _: None)
    killed_pid = int(marker.read_text())
    assert killed_pid != os.getpid()  # a Ray worker died, not this process
    assert read_calls(log) == ["a", "a", "b"]  # the killed attempt, its retry, then b
    assert json.loads((results["b"].path / "value.json").read_text()) == 3
    assert not (results["a"].path / "partial.txt").exists()  # the killed attempt left nothing
    assert sorted(p.name.split("-")[0] for p in store.iterdir() if not p.name.startswith(".")) == [
        "a",
        "b",
    ]


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from specdraft.pipeline.engine.dag import Stage, execute
stages = [
    Stage("a", "dag_stages", {{"name": "a", "add": 1, "log": {log!r}}}),
    Stage("b", "dag_stages", {{"name": "b", "add": 2, "log": {log!r}, "hold": {hold!r}}}, deps=("a",)),
]
execute(stages, {store!r}, use_ray=False, say=print)
"""


def test_a_driver_killed_mid_run_resumes_without_redoing_finished_stages(tmp_path):
    log, store, hold = tmp_path / "calls.txt", tmp_path / "store", tmp_path / "hold"
    hold.touch()
    script = DRIVER.format(tests=str(TESTS), log=str(log), store=str(store), hold=str(hold))
    # An hour's lease: the second driver can only finish by seeing that the lock's holder is
    # gone (a dead pid on this host) and taking the lock over; waiting the lease out would hang
    # until the hang guard (timeout) fails the test.
    env = {**os.environ, "SPECDRAFT_LOCK_LEASE": "3600"}
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while read_calls(log) != ["a", "b"] and time.time() < deadline:
        time.sleep(0.1)  # `a` committed, `b` under way
    assert read_calls(log) == ["a", "b"]
    (a_dir,) = [p for p in store.glob("a-*") if (p / MANIFEST).exists()]
    a_manifest = (a_dir / MANIFEST).read_text()
    assert list(store.glob(".lock-b-*"))  # the killed driver leaves its lock behind
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    hold.unlink()

    subprocess.run(
        [sys.executable, "-c", script], check=True, stdout=subprocess.DEVNULL, env=env, timeout=600
    )
    assert read_calls(log) == ["a", "b", "b"]  # `a` reused, `b` made again
    assert (a_dir / MANIFEST).read_text() == a_manifest  # the committed artifact is untouched
    (b_dir,) = [p for p in store.glob("b-*") if (p / MANIFEST).exists()]
    assert json.loads((b_dir / "value.json").read_text()) == 3
