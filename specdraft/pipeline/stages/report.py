"""Stage `report`: the self-contained HTML report and Markdown summary of a run.

Reads: `target`, `draft_init`, `reference`, `distil`, `evaluate`
Writes: `report/` (index.html, summary.md)
"""

from __future__ import annotations

import json
from pathlib import Path

from specdraft.pipeline.config import ReportConfig
from specdraft.pipeline.engine.artifacts import StageContext
from specdraft.reports.render import render_report


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run(cfg: ReportConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    training = {}
    for stage in ("target", "draft_init", "reference", "distil"):
        history = _json(inputs[stage] / "history.json") if stage in inputs else None
        if history:
            training[stage] = history
    alpha_history = _json(inputs["distil"] / "alpha_history.json")
    if alpha_history:
        training["distil_alpha"] = alpha_history
    run_info = {
        "metrics": _json(inputs["evaluate"] / "metrics.json"),
        "training": training,
        "selection": _json(inputs["distil"] / "selection.json"),
    }
    if cfg.title and run_info["metrics"]:
        run_info["metrics"]["job"] = cfg.title
    render_report(run_info, ctx.out / "report")
    return {"report": "report/index.html"}
