"""`specdraft submit` sends a job to a real (local) Ray cluster through the Jobs API and follows
it to success; bad jobs are refused before anything is sent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from ray.job_submission import JobSubmissionClient

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # a real (local) Ray cluster

REPO = Path(__file__).resolve().parents[1]


def specdraft(*args):
    return subprocess.run(
        [sys.executable, "-m", "specdraft", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_submit_runs_the_job_on_the_cluster(ray_cluster, tmp_path):
    out = tmp_path / "out"
    result = specdraft(
        "submit",
        *TINY,
        "name=submitted",
        f"store={tmp_path / 'store'}",
        "--out",
        str(out),
        "--address",
        ray_cluster.dashboard_address,
        "--follow",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_") and "SUCCEEDED" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["job"] == "submitted" and metrics["lossless_greedy"] is True
    status = specdraft("status", job_id, "--address", ray_cluster.dashboard_address)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = specdraft("logs", job_id, "--address", ray_cluster.dashboard_address)
    assert "finished" in logs.stdout and "lossless greedy check: passed" in logs.stdout


def test_bad_job_is_refused_before_submission(ray_cluster, tmp_path):
    result = specdraft("submit", "distil.k=3", "--address", ray_cluster.dashboard_address)
    assert result.returncode == 2 and "distil.k: 3.0 is out of range" in result.stderr
    outside = tmp_path / "job.yaml"
    outside.write_text("name: outside\n")
    result = specdraft("submit", str(outside), "--address", ray_cluster.dashboard_address)
    assert result.returncode == 2 and "outside the working directory" in result.stderr
    too_big = [
        "distil.resources.gpus=3",  # the cluster has 2
        "generate.resources.workers=2",
        "generate.resources.placement=STRICT_SPREAD",  # on 1 node
    ]
    result = specdraft("submit", *too_big, "--address", ray_cluster.dashboard_address)
    assert result.returncode == 2, result.stderr
    assert "stage distil asks for 3 GPU but the cluster has 2" in result.stderr
    assert "STRICT_SPREAD needs 2 nodes" in result.stderr
    jobs = JobSubmissionClient(ray_cluster.dashboard_address).list_jobs()
    assert not [j for j in jobs if j.entrypoint and "distil.resources.gpus=3" in j.entrypoint]
