"""`specdraft report`: the acceptance report of one or more finished runs, with their history.

For each RUN_DIR (the --out of `specdraft run`, holding metrics.json) in the order given, the run's
metrics are appended to the history store when --history is given. The history is then all rows in
the store (or, without --history, the given runs alone), and the report goes to --out (default
`runs/report/`, beside the run directories and ignored by git):

- `index.html`: the newest given run's report (specdraft/reports/render.py, from its metrics.json
  and serving.json) plus a history section: per (job, target, task) trend lines of the final
  draft's alpha and tau as inline PNGs, regressions marked, and the skipped history rows;
- `summary.md`: the run summary plus the regressions and problems, in a few lines;
- `summary.json`: `runs` (per run and task, baseline → final alpha and tau), `regressions`,
  `problems`.

A run's timestamp is its metrics.json's modification time (when the run finished). Appending the
same run twice records it twice: give each run directory to `--history` once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.figure import Figure

from specdraft.errors import InputError
from specdraft.pipeline.engine.artifacts import atomic_write_text
from specdraft.reports.history import (
    HISTORY_FILE,
    OVERALL,
    append_run,
    find_regressions,
    load_history,
    metrics_to_rows,
    run_series,
)
from specdraft.reports.page import esc, figure, md
from specdraft.reports.render import render_report, served_summary

DEFAULT_OUT = Path("runs") / "report"


def read_run(run_dir: Path) -> tuple[dict, str, dict | None]:
    """A run directory's metrics.json dict (with `served`, served_summary's numbers, when it has a
    serving.json), its finish time (ISO 8601, UTC) and its serving.json (None without one)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise InputError(f"{run_dir} has no metrics.json; give the --out of a finished run")
    try:
        metrics = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path} is not valid JSON ({err}); re-run the job") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{path} is not a metrics object; re-run the job")
    finished = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    serving = read_serving(Path(run_dir))
    if serving is not None:
        metrics["served"] = served_summary(serving)
    return metrics, finished.isoformat(timespec="seconds"), serving


def read_serving(run_dir: Path) -> dict | None:
    """`specdraft serve-check`'s serving.json, if the run has one (a damaged file is reported and
    left out)."""
    path = run_dir / "serving.json"
    if not path.is_file():
        return None
    try:
        serving = json.loads(path.read_text())
        served_summary(serving)  # holds the numbers the report and the history take from it
        return serving
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(
            f"specdraft: {path} is damaged ({err}); its served numbers are left out",
            file=sys.stderr,
        )
        return None


def check_history_dir(history_dir: Path) -> None:
    """--history names a directory that holds (or will hold) HISTORY_FILE, an SQLite database:
    InputError before anything is read or appended otherwise."""
    database = history_dir / HISTORY_FILE
    if history_dir.exists() and not history_dir.is_dir():
        raise InputError(
            f"--history {history_dir}: a file; give the directory that holds {HISTORY_FILE}"
        )
    if database.exists() and not database.is_file():
        raise InputError(f"--history {history_dir}: {database} is not a file")
    if database.is_file():
        try:
            with open(database, "rb") as f:
                header = f.read(16)
        except OSError as err:
            raise InputError(f"{database} cannot be read ({err.strerror})") from None
        if header and header != b"SQLite format 3\x00":
            raise InputError(
                f"{database} is not an SQLite database (not a specdraft history); move it away "
                "or give another --history"
            )


def check_regression_rule(threshold: float, window: int) -> None:
    """--threshold must be finite and >= 0 (NaN or inf would flag no drop: the gate would be off)
    and --window >= 1: InputError before anything is read or appended otherwise."""
    if not (math.isfinite(threshold) and threshold >= 0):
        raise InputError(
            f"--threshold {threshold}: must be finite and >= 0 (the drop that counts as a "
            "regression: absolute for alpha, relative for tau; e.g. 0.02)"
        )
    if window < 1:
        raise InputError(f"--window {window}: must be >= 1 (the runs the newest is held to)")


def build_report(
    run_dirs: list[Path],
    *,
    history_dir: Path | None,
    out_dir: Path,
    threshold: float,
    window: int,
    code_version: str = "",
) -> dict:
    """Append the runs to the history, write the report files to `out_dir`; return summary.json."""
    check_regression_rule(threshold, window)
    if not run_dirs and history_dir is None:
        raise InputError("nothing to report: give RUN_DIR(s), --history DIR, or both")
    if history_dir is not None:
        check_history_dir(history_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: a file; give a directory for the report")
    runs = [(Path(d), *read_run(Path(d))) for d in run_dirs]  # read all before appending any
    rows: list[dict] = []
    problems: list[str] = []
    for _, metrics, finished, _ in runs:
        if history_dir is not None:
            try:
                append_run(history_dir, metrics, timestamp=finished, code_version=code_version)
            except sqlite3.Error as err:  # a damaged database behind a valid header
                raise InputError(
                    f"{history_dir / HISTORY_FILE} is not a usable specdraft history ({err})"
                ) from None
        else:
            rows += metrics_to_rows(metrics, timestamp=finished, code_version=code_version)
    if history_dir is not None:
        rows, problems = load_history(history_dir)
    for i, row in enumerate(rows):
        row.setdefault("id", i)
    regressions = find_regressions(rows, threshold=threshold, window=window)
    summary = {
        "history": str(history_dir) if history_dir is not None else None,
        "threshold": threshold,
        "window": window,
        "runs": [_run_summary(d, m, t) for d, m, t, _ in runs],
        "regressions": regressions,
        "problems": problems,
    }
    newest, serving = (runs[-1][1], runs[-1][3]) if runs else ({}, None)
    report = render_report({"metrics": newest}, serving)
    section = _history_section(rows, regressions, problems, threshold, window)
    page = report.html.replace("</body>", f"{section}\n</body>", 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(
        out_dir / "summary.md", f"{report.markdown}\n{_history_markdown(summary, len(rows))}"
    )
    atomic_write_text(out_dir / "index.html", page)
    return summary


def _run_summary(run_dir: Path, metrics: dict, finished: str) -> dict:
    tasks: dict[str, dict] = {}
    for role in ("baseline", "final"):
        entry = metrics.get(role) or {}
        for task, m in {OVERALL: entry, **(entry.get("tasks") or {})}.items():
            for metric in ("alpha", "tau"):
                tasks.setdefault(task, {})[f"{metric}_{role}"] = m.get(metric)
    return {
        "run_dir": str(run_dir),
        "job": metrics.get("job"),
        "job_hash": metrics.get("job_hash"),
        "target": metrics.get("target"),
        "finished": finished,
        "tasks": tasks,
    }


# --- history section ---------------------------------------------------------------------------


def _history_section(
    rows: list[dict], regressions: list[dict], problems: list[str], threshold: float, window: int
) -> str:
    runs = len({r["run_id"] for r in rows})
    parts = [
        f"<p>{runs} run(s) in the history. A regression is the newest run's final-draft alpha "
        f"falling more than {threshold:g} (absolute), or tau more than {threshold:.0%} (relative), "
        f"below both the previous run and the median of the {window} runs before it.</p>"
    ]
    if regressions:
        items = "".join(
            f"<tr><td>{esc(r['job'])}</td><td>{esc(r['target'])}</td><td>{esc(r['task'])}</td>"
            f"<td>{esc(r['metric'])}</td><td>{r['previous']:.3f}</td><td>{r['median']:.3f}</td>"
            f'<td class="down">{r["current"]:.3f}</td><td class="down">{_drop_text(r)}</td></tr>'
            for r in regressions
        )
        parts.append(
            '<h3 class="down">Regressions</h3><div class="table-wrap"><table><thead><tr>'
            "<th>job</th><th>target</th><th>task</th><th>metric</th><th>previous</th>"
            f"<th>median</th><th>current</th><th>drop</th></tr></thead><tbody>{items}</tbody>"
            "</table></div>"
        )
    else:
        parts.append('<p class="up">No regressions.</p>')
    flagged = {(r["job"], r["target"], r["task"], r["metric"]) for r in regressions}
    figures = [
        _trend_figure(key, points, flagged)
        for key, points in sorted(run_series(rows).items(), key=lambda kv: kv[0])
    ]
    parts.append(f'<div class="plots">{"".join(figures)}</div>' if figures else "")
    if problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        parts.append(f"<h3>Skipped history rows ({len(problems)})</h3><ul>{items}</ul>")
    body = "\n".join(p for p in parts if p)
    return f'<section id="history">\n<h2>History</h2>\n{body}\n</section>'


def _trend_figure(key: tuple[str, str, str], points: list[dict], flagged: set) -> str:
    """alpha and tau of one (job, target, task) series over runs; a red cross on a regression."""
    job, target, task = key
    fig = Figure(figsize=(6.4, 2.8))
    x = list(range(len(points)))
    labels = [str(p["timestamp"])[:10] for p in points]
    if len(set(labels)) < len(labels):  # several runs a day: show the time too
        labels = [str(p["timestamp"])[:16].replace("T", " ") for p in points]
    for i, metric in enumerate(("alpha", "tau")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(x, [p[metric] for p in points], marker="o", color="#e66101", label="final")
        shown = [metric]
        if metric == "alpha" and any(p.get("served") is not None for p in points):
            # the served rule's acceptance (the headline) on the same axis, where recorded
            served = [math.nan if p.get("served") is None else p["served"] for p in points]
            ax.plot(x, served, marker="s", color="#5e3c99", label="served")
            ax.legend(fontsize=7)
            shown.append("served")
        bad = [m for m in shown if (job, target, task, m) in flagged]
        for m in bad:
            ax.plot([x[-1]], [points[-1][m]], "x", color="#cf222e", markersize=14, mew=3)
        if bad:
            ax.set_title(f"{' and '.join(shown)}: REGRESSION", color="#cf222e")
        else:
            ax.set_title(" and ".join(shown))
        step = max(1, len(x) // 6)
        ax.set_xticks(x[::step], labels[::step], rotation=30, fontsize=7)
        ax.grid(alpha=0.3)
    caption = f"{job} · {task} · target {target}"
    return figure(fig, caption)


def _history_markdown(summary: dict, num_rows: int) -> str:
    lines = ["## History", ""]
    regressions = summary["regressions"]
    if not regressions:
        lines.append("No regressions.")
    for r in regressions:
        lines.append(
            f"- REGRESSION {md(r['job'])} / {md(r['task'])}: {r['metric']} {r['previous']:.3f} "
            f"(median {r['median']:.3f}) → {r['current']:.3f}, drop {_drop_text(r)}"
        )
    if summary["problems"]:
        lines += ["", f"{len(summary['problems'])} history row(s) skipped; see summary.json."]
    return "\n".join(lines) + "\n"


def _drop_text(regression: dict) -> str:
    drop = regression["drop"]
    return f"{drop:.1%}" if regression["relative"] else f"{drop:.3f}"


def main(args) -> int:
    """The `specdraft report` command: 3 when --fail-on-regression and a regression is found."""
    out = Path(args.out) if args.out else DEFAULT_OUT
    summary = build_report(
        [Path(d) for d in args.run_dirs],
        history_dir=Path(args.history) if args.history else None,
        out_dir=out,
        threshold=args.threshold,
        window=args.window,
        code_version=args.code_version,
    )
    regressions, problems = summary["regressions"], summary["problems"]
    for r in regressions:
        print(f"REGRESSION {r['job']} / {r['task']}: {r['metric']} {r['current']:.3f}")
    if problems:
        print(
            f"specdraft: warning: {len(problems)} history row(s) skipped as corrupt "
            f"(listed in {out / 'summary.json'})",
            file=sys.stderr,
        )
    print(f"report: {out / 'index.html'} ({len(regressions)} regression(s))")
    return 3 if regressions and args.fail_on_regression else 0
