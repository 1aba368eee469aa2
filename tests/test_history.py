"""The acceptance history store, the regression rule and `specdraft report` on fake runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from specdraft.reports.history import (
    HISTORY_FILE,
    append_run,
    find_regressions,
    load_history,
)

TASKS = ("arith", "copy")


def fake_metrics(alpha: float = 0.6, tau: float = 2.2, *, arith_alpha: float | None = None) -> dict:
    """A metrics.json dict shaped like the evaluate stage's, with the job fields of a run."""

    def entry(a: float, t: float) -> dict:
        return {
            "alpha": a,
            "alpha_greedy": a + 0.05,
            "spec_alpha": a - 0.2,
            "tau": t,
            "per_position": [a, a - 0.1, a - 0.2, a - 0.3],
        }

    metrics = {"job": "nightly", "job_hash": "abc123", "target": "/store/target", "gamma": 4}
    metrics.update(temperature=1.0, draft="/runs/n/draft", lossless_greedy=True)
    for role, shift in (("baseline", -0.2), ("reference", 0.05), ("final", 0.0)):
        tasks = {task: entry(alpha + shift, tau + shift) for task in TASKS}
        if arith_alpha is not None and role == "final":
            tasks["arith"]["alpha"] = arith_alpha
        metrics[role] = {**entry(alpha + shift, tau + shift), "tasks": tasks, "model": f"/m/{role}"}
    return metrics


def nights(history: Path, alphas: list[float], **kwargs) -> None:
    for day, alpha in enumerate(alphas, start=1):
        stamp = f"2026-11-{day:02d}T02:00:00+00:00"
        append_run(history, fake_metrics(alpha, **kwargs), timestamp=stamp, code_version="0.1.0")


def test_append_writes_one_row_per_role_and_task(tmp_path):
    assert append_run(tmp_path, fake_metrics(), code_version="v1") == 3 * (1 + len(TASKS))
    rows, problems = load_history(tmp_path)
    assert problems == []
    final_all = [r for r in rows if r["draft_role"] == "final" and r["task"] == "all"]
    assert len(final_all) == 1
    row = final_all[0]
    assert (row["job"], row["gamma"], row["alpha"], row["code_version"]) == (
        "nightly",
        4,
        0.6,
        "v1",
    )
    assert row["per_position"] == pytest.approx([0.6, 0.5, 0.4, 0.3])
    assert row["draft"] == "/m/final"


def test_planted_alpha_drop_is_flagged(tmp_path):
    nights(tmp_path, [0.60, 0.61, 0.60, 0.61, 0.60, 0.55])
    regressions = find_regressions(load_history(tmp_path)[0])
    flagged = {(r["task"], r["metric"]) for r in regressions}
    # tau is unchanged (2.2 every night), so only alpha regresses, on every task
    assert flagged == {("all", "alpha"), ("arith", "alpha"), ("copy", "alpha")}
    r = next(r for r in regressions if r["task"] == "all")
    assert r["previous"] == 0.60 and r["current"] == 0.55 and r["median"] == pytest.approx(0.60)
    assert r["drop"] == pytest.approx(0.05)


def test_single_task_drop_names_that_task(tmp_path):
    nights(tmp_path, [0.6] * 4)
    append_run(tmp_path, fake_metrics(0.6, arith_alpha=0.5), timestamp="2026-11-09T02:00:00")
    regressions = find_regressions(load_history(tmp_path)[0])
    assert [(r["task"], r["metric"]) for r in regressions] == [("arith", "alpha")]


def test_history_without_drop_has_no_regression(tmp_path):
    # small noise, and a drop that the rolling median does not confirm (the previous night spiked)
    nights(tmp_path, [0.60, 0.61, 0.59, 0.60, 0.65, 0.61])
    assert find_regressions(load_history(tmp_path)[0]) == []


def test_tau_threshold_is_relative(tmp_path):
    # 2.2 → 2.1 is a 4.5 % drop: over a 2 % relative threshold, under a 5 % one
    for day, tau in enumerate([2.2, 2.2, 2.2, 2.1], start=1):
        append_run(tmp_path, fake_metrics(0.6, tau), timestamp=f"2026-11-0{day}T00:00:00")
    rows = load_history(tmp_path)[0]
    assert {r["metric"] for r in find_regressions(rows, threshold=0.02)} == {"tau"}
    assert find_regressions(rows, threshold=0.05) == []


def test_the_same_run_reported_twice_is_recorded_once(tmp_path):
    stamp = "2026-11-01T02:00:00+00:00"
    assert append_run(tmp_path, fake_metrics(0.6), timestamp=stamp, code_version="v1") > 0
    assert append_run(tmp_path, fake_metrics(0.6), timestamp=stamp, code_version="v1") == 0
    assert append_run(tmp_path, fake_metrics(0.6), timestamp="2026-11-02T02:00:00+00:00") > 0
    rows, _ = load_history(tmp_path)
    assert len({r["run_id"] for r in rows}) == 2  # a later run with equal metrics is a new run


def _append_many(history: str, worker: int) -> None:
    for i in range(20):
        append_run(history, fake_metrics(0.5 + i / 100), code_version=f"worker{worker}")


def test_concurrent_appends_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows, problems = load_history(tmp_path)
    assert problems == []
    assert len(rows) == 2 * 20 * 3 * (1 + len(TASKS))
    assert len({r["run_id"] for r in rows}) == 40


def test_corrupt_rows_are_reported_and_skipped(tmp_path):
    nights(tmp_path, [0.6, 0.6])
    with sqlite3.connect(tmp_path / HISTORY_FILE) as conn:
        conn.execute(
            "INSERT INTO acceptance (run_id, job, target, draft_role, task, alpha, tau, "
            "per_position, timestamp) VALUES ('x', 'nightly', 't', 'final', 'all', ?, 2.0, "
            "'[0.5]', '2026-11-03T00:00:00')",
            (float("nan"),),
        )
        conn.execute(
            "INSERT INTO acceptance (run_id, job, target, draft_role, task, alpha, tau, "
            "per_position, timestamp) VALUES ('y', 'nightly', 't', 'final', 'all', 0.5, 2.0, "
            "'[0.5,', '2026-11-03T00:00:00')"
        )
    rows, problems = load_history(tmp_path)
    assert len(rows) == 2 * 3 * (1 + len(TASKS))
    assert {r["run_id"] for r in rows}.isdisjoint({"x", "y"})
    assert len(problems) == 2
    assert "alpha" in problems[0] and "per_position" in problems[1]


# --- the CLI ---------------------------------------------------------------------------------


def write_run(path: Path, metrics: dict, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    os.utime(path / "metrics.json", (mtime, mtime))
    return path


def specdraft(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specdraft", "report", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fake_runs(tmp_path) -> list[Path]:
    alphas = [0.60, 0.61, 0.60, 0.61, 0.50]  # the last night drops
    day = 86400
    return [
        write_run(tmp_path / f"nightly-{i}", fake_metrics(a), 1_790_000_000 + i * day)
        for i, a in enumerate(alphas)
    ]


def test_report_cli_flags_the_planted_drop(tmp_path, fake_runs):
    history, out = tmp_path / "history", tmp_path / "site"
    first = specdraft(*fake_runs[:-1], "--history", history, "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "summary.json").read_text())["regressions"] == []
    last = specdraft(
        fake_runs[-1], "--history", history, "--out", out, "--fail-on-regression", cwd=tmp_path
    )
    assert last.returncode == 3, last.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["task"], r["metric"]) for r in summary["regressions"]} == {
        ("all", "alpha"),
        ("arith", "alpha"),
        ("copy", "alpha"),
    }
    assert summary["problems"] == []
    assert summary["runs"][0]["tasks"]["arith"] == {
        "alpha_baseline": pytest.approx(0.3),
        "tau_baseline": pytest.approx(2.0),
        "alpha_final": 0.5,
        "tau_final": 2.2,
    }
    page = (out / "index.html").read_text()
    run_part, history_part = page.split('<section id="history">')
    assert "data:image/png;base64," in run_part  # render_report's plots of the newest run
    assert history_part.count("data:image/png;base64,") == 1 + len(TASKS)  # a trend per task
    assert "Regressions" in history_part and "Regressions" not in run_part
    assert "<script" not in page and 'src="http' not in page and "href=" not in page
    markdown = (out / "summary.md").read_text()
    assert "REGRESSION nightly / all: alpha 0.610" in markdown
    assert len(load_history(history)[0]) == 5 * 3 * (1 + len(TASKS))


def test_report_cli_without_history_compares_given_runs(tmp_path, fake_runs):
    out = tmp_path / "site"
    steady = specdraft(*fake_runs[:-1], "--out", out, "--fail-on-regression", cwd=tmp_path)
    assert steady.returncode == 0, steady.stderr
    dropped = specdraft(*fake_runs, "--out", out, "--fail-on-regression", cwd=tmp_path)
    assert dropped.returncode == 3
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 5
    # the default --out is runs/report under the current directory
    assert specdraft(fake_runs[0], cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs" / "report" / "index.html").is_file()


def test_report_cli_warns_about_corrupt_history(tmp_path, fake_runs):
    history = tmp_path / "history"
    nights(history, [0.6, 0.6])
    with sqlite3.connect(history / HISTORY_FILE) as conn:
        conn.execute("UPDATE acceptance SET alpha = NULL WHERE id = 1")
    result = specdraft(fake_runs[0], "--history", history, "--out", tmp_path / "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 history row(s) skipped" in result.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert len(summary["problems"]) == 1 and "row 1 " in summary["problems"][0]


def test_report_cli_rejects_a_dir_without_metrics(tmp_path, fake_runs):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    history = tmp_path / "history"
    result = specdraft(fake_runs[0], empty, "--history", history, cwd=tmp_path)
    assert result.returncode == 2
    assert "has no metrics.json; give the --out of a finished run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (history / HISTORY_FILE).exists()  # nothing appended when one input is bad


@pytest.mark.parametrize("case", ["file", "not-sqlite", "database-is-a-dir", "out-is-a-file"])
def test_report_cli_bad_history_or_out_is_one_message(tmp_path, fake_runs, case):
    history, out = tmp_path / "history", tmp_path / "o"
    if case == "file":
        history.write_text("x")
    elif case == "not-sqlite":
        history.mkdir()
        (history / HISTORY_FILE).write_text("these are my notes, not a database\n" * 5)
    elif case == "database-is-a-dir":
        (history / HISTORY_FILE).mkdir(parents=True)
    else:
        out.write_text("x")
    result = specdraft(fake_runs[0], "--history", history, "--out", out, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    if case == "not-sqlite":
        assert "not an SQLite database" in result.stderr
        assert (history / HISTORY_FILE).read_text().startswith("these are my notes")


def _report(capsys, *args) -> tuple[int, str]:
    from specdraft.cli import main

    code = main(["report", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["nan", "inf", "-0.1"])
def test_report_cli_refuses_a_threshold_that_turns_the_gate_off(tmp_path, capsys, threshold):
    """NaN and inf flag no drop (the CI gate silently off: alpha 0.945 -> 0.1 passed with exit 0),
    a negative threshold flags steady runs: one message, exit 2, nothing appended or written."""
    high = write_run(tmp_path / "high", fake_metrics(0.945), 1_790_000_000)
    low = write_run(tmp_path / "low", fake_metrics(0.1), 1_790_086_400)
    history, out = tmp_path / "history", tmp_path / "site"
    flags = ["--history", history, "--out", out, "--threshold", threshold, "--fail-on-regression"]
    code, err = _report(capsys, high, low, *flags)
    assert code == 2, err
    assert f"--threshold {float(threshold)}: must be finite and >= 0" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not history.exists() and not out.exists()


def test_report_cli_flags_the_same_drop_with_a_finite_threshold(tmp_path, capsys):
    high = write_run(tmp_path / "high", fake_metrics(0.945), 1_790_000_000)
    low = write_run(tmp_path / "low", fake_metrics(0.1), 1_790_086_400)
    out = tmp_path / "site"
    code, err = _report(
        capsys, high, low, "--out", out, "--threshold", 0.05, "--fail-on-regression"
    )
    assert code == 3, err
    regressions = json.loads((out / "summary.json").read_text())["regressions"]
    overall = [r for r in regressions if (r["task"], r["metric"]) == ("all", "alpha")]
    assert len(overall) == 1
    assert (overall[0]["previous"], overall[0]["current"]) == (0.945, 0.1)


def test_a_served_acceptance_drop_is_flagged_and_old_histories_gain_the_column(tmp_path):
    # a history written before the served column existed: rows without it
    conn = sqlite3.connect(tmp_path / HISTORY_FILE)
    conn.execute(
        "CREATE TABLE acceptance (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
        "job TEXT, job_hash TEXT, target TEXT, draft TEXT, draft_role TEXT, task TEXT, "
        "gamma INTEGER, temperature REAL, alpha REAL, alpha_greedy REAL, spec_alpha REAL, "
        "tau REAL, per_position TEXT, timestamp TEXT, code_version TEXT)"
    )
    conn.execute(
        "INSERT INTO acceptance (run_id, job, target, draft_role, task, alpha, tau, timestamp) "
        "VALUES ('old', 'nightly', '/store/target', 'final', 'all', 0.6, 2.2, "
        "'2026-10-01T02:00:00+00:00')"
    )
    conn.commit()
    conn.close()
    for day, served in enumerate([0.30, 0.31, 0.30, 0.24], start=1):
        metrics = fake_metrics()  # alpha and tau the same every night
        metrics["final"]["served"] = {
            "drafting": "greedy",
            "temperature": 1.0,
            "acceptance": served,
        }
        append_run(tmp_path, metrics, timestamp=f"2026-11-{day:02d}T02:00:00+00:00")
    rows, problems = load_history(tmp_path)
    assert problems == [] and rows[0]["served"] is None  # the old row: kept, without the metric
    regressions = find_regressions(rows)
    assert [(r["task"], r["metric"]) for r in regressions] == [("all", "served")]
    assert regressions[0]["previous"] == 0.30 and regressions[0]["current"] == 0.24
    assert regressions[0]["drop"] == pytest.approx(0.06)
