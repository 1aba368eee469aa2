"""Stage `report`: the self-contained HTML report and Markdown summary of a run.

Reads: `target`, `draft_init`, `reference`, `distil`, `evaluate`
Writes: `report/` (index.html, summary.md)

The page is drawn by specdraft/reports/render.py from what `page_input` gathers. `specdraft
serve-check` draws it again with the same two functions and the engine's numbers (serving.json),
so a served run's page is this stage's page plus its "Served" section.
"""

from __future__ import annotations

import json
from pathlib import Path

from specdraft.pipeline.config import ReportConfig
from specdraft.pipeline.engine.artifacts import StageContext, atomic_write_text
from specdraft.reports.render import render_report


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def page_input(cfg: ReportConfig, inputs: dict[str, Path]) -> dict:
    """What the run's page is drawn from (render_report's `run`): the evaluate stage's metrics,
    titled; the training stages' loss histories and distil's held-out alpha; distil's token
    selection."""
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
    return run_info


def write_report(run: dict, out_dir: Path, serving: dict | None = None) -> Path:
    """Draw the page of `run` (with `serving`, serve-check's serving.json, when given) into
    `out_dir`: index.html and summary.md, each written whole or not at all. Returns index.html."""
    page = render_report(run, serving)  # a malformed input raises before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "summary.md", page.markdown)
    atomic_write_text(out_dir / "index.html", page.html)
    return out_dir / "index.html"


def run(cfg: ReportConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    write_report(page_input(cfg, inputs), ctx.out / "report")
    return {"report": "report/index.html"}
