"""A wheel install (not editable) finds the shipped jobs: `specdraft run` plans the demo job and
`specdraft compare` the default comparison, from a directory that is not a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _run(*cmd, cwd: Path, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A virtual environment with specdraft installed from its wheel (dependencies from this
    environment's site-packages, so nothing is downloaded)."""
    root = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(root / "dist"),
        str(REPO),
        cwd=root,
    )
    wheel = next((root / "dist").glob("specdraft-*.whl"))
    _run(sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv"), cwd=root)
    python = root / "venv" / "bin" / "python"
    _run(str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel), cwd=root)
    return python


def test_the_wheel_carries_the_jobs_and_runs_the_demo_job(wheel_env, tmp_path):
    where = _run(
        str(wheel_env), "-c", "import specdraft, sys; print(specdraft.__file__)", cwd=tmp_path
    )
    assert str(REPO) not in where.stdout  # the wheel's copy, not the checkout
    store = f"store={tmp_path / 'store'}"
    plan = _run(str(wheel_env), "-m", "specdraft", "run", store, "--plan", cwd=tmp_path)
    assert "job 'demo' from " in plan.stdout and "site-packages/specdraft/jobs/demo.yaml" in (
        plan.stdout
    )
    assert "report" in plan.stdout and "to run" in plan.stdout
    comp = _run(str(wheel_env), "-m", "specdraft", "compare", store, "--plan", cwd=tmp_path)
    assert "site-packages/specdraft/jobs/compare.yaml" in comp.stdout
    assert "distil.fkl_all.s0" in comp.stdout and "comparison" in comp.stdout
    # the demo file's own settings arrive (lost when the dataclass defaults ran instead)
    shown = _run(
        str(wheel_env),
        "-c",
        "from specdraft.cli import _job_path; from specdraft.pipeline.config import load_job;"
        "print(load_job(_job_path(None)).distil.lora.modules_to_save)",
        cwd=tmp_path,
    )
    assert "embed_tokens" in shown.stdout and "lm_head" in shown.stdout
