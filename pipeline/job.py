"""A job as a DAG of stages, and a run: execute the DAG and lay out the run directory."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import yaml

from specdraft.pipeline.config import JobConfig, Resources
from specdraft.pipeline.dag import (
    Stage,
    StageResult,
    atomic_write_text,
    commit_dir,
    default_store,
    execute,
)

# name: (job section, input stages)
STAGES = {
    "data": ("data", ()),
    "target": ("target", ("data",)),
    "draft_init": ("draft", ("data",)),
    "generate": ("generate", ("data", "target", "draft_init")),
    "reference": ("reference", ("data", "target", "draft_init", "generate")),
    "distil": ("distil", ("data", "target", "draft_init", "reference", "generate")),
    "evaluate": ("evaluate", ("data", "target", "draft_init", "reference", "distil")),
    "export": ("export", ("target", "draft_init", "distil", "evaluate")),
    "report": ("report", ("target", "draft_init", "reference", "distil", "evaluate")),
}


def build_stages(job: JobConfig) -> list[Stage]:
    stages = []
    for name, (section, deps) in STAGES.items():
        cfg = getattr(job, section)
        resources = getattr(cfg, "resources", Resources(cpus=1))
        if name in ("target", "draft_init") and cfg.model != "builtin":
            resources = Resources(cpus=1)  # a given model is only recorded, not trained
        stages.append(Stage(name, f"specdraft.pipeline.{name}", cfg, deps, resources, job.seed))
    return stages


def store_for(job: JobConfig) -> Path:
    return Path(job.store).expanduser() if job.store else default_store()


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy directory `src` over `dst` atomically (temporary copy, then rename)."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    commit_dir(tmp, dst)


def run_job(
    job: JobConfig, out: Path, *, force: set[str] = frozenset(), use_ray: bool | None = None
) -> dict[str, StageResult]:
    """Execute the job's DAG (cached stages are reused) and lay out `out`."""
    use_ray = job.ray.enabled if use_ray is None else use_ray
    results = execute(
        build_stages(job),
        store_for(job),
        force=set(force),
        use_ray=use_ray,
        ray_address=job.ray.address,
    )
    out.mkdir(parents=True, exist_ok=True)
    _copy_dir(results["export"].path / "draft", out / "draft")
    if (results["export"].path / "adapter").exists():
        _copy_dir(results["export"].path / "adapter", out / "adapter")
    _copy_dir(results["report"].path / "report", out / "report")
    metrics = json.loads((results["evaluate"].path / "metrics.json").read_text())
    metrics = {
        "job": job.name,
        "job_hash": results["report"].key,
        **metrics,
        "draft": str((out / "draft").resolve()),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out / "job.yaml", yaml.safe_dump(dataclasses.asdict(job), sort_keys=False))
    stages = [
        {
            "name": r.name,
            "key": r.key,
            "path": str(r.path),
            "reused": r.reused,
            "seconds": round(r.seconds, 2),
        }
        for r in results.values()
    ]
    atomic_write_text(out / "run.json", json.dumps({"job": job.name, "stages": stages}, indent=2))
    return results
