"""Acceptance history across runs: a SQLite store and the regression rule of the nightly report.

The store is one file, `<history_dir>/history.sqlite`, with one row per (run, draft role, task);
task `all` is the draft's overall row. It runs in WAL mode with a busy timeout, so two processes
appending at the same time both succeed (each run is written in one transaction).

`load_history` never drops a row silently: a row whose alpha or tau is not a finite number, whose
other numbers are not finite, whose `per_position` is not a JSON list of numbers or whose timestamp
is not ISO 8601 is skipped and named in `problems`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import statistics
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from specdraft.errors import InputError

HISTORY_FILE = "history.sqlite"
ROLES = ("baseline", "reference", "final")
OVERALL = "all"  # the task name of a draft's overall row
METRICS = ("served", "alpha", "alpha_greedy", "spec_alpha", "tau")
REQUIRED = ("alpha", "tau")  # every row has them; the regression rule follows them and `served`
# the served rule's acceptance (metrics.json's served.acceptance): the headline, absent from rows
# written before the serving rule was recorded
OPTIONAL = ("served",)
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another one's transaction

COLUMNS = (
    "run_id",
    "job",
    "job_hash",
    "target",
    "draft",
    "draft_role",
    "task",
    "gamma",
    "temperature",
    *METRICS,
    "per_position",
    "timestamp",
    "code_version",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS acceptance (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    job TEXT, job_hash TEXT, target TEXT, draft TEXT, draft_role TEXT, task TEXT,
    gamma INTEGER, temperature REAL,
    served REAL, alpha REAL, alpha_greedy REAL, spec_alpha REAL, tau REAL,
    per_position TEXT,
    timestamp TEXT,
    code_version TEXT
)
"""


def _connect(history_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(history_dir) / HISTORY_FILE, timeout=BUSY_TIMEOUT_S)
    _set_wal(conn)
    conn.execute(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(acceptance)")}
    for column in OPTIONAL:  # a history made before the column existed gains it, empty
        if column not in have:
            conn.execute(f"ALTER TABLE acceptance ADD COLUMN {column} REAL")
    conn.execute("CREATE INDEX IF NOT EXISTS acceptance_run ON acceptance (run_id)")
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    """WAL mode, waiting as the busy timeout waits: a journal-mode change that meets another
    connection's lock (two processes opening a new history at once) can fail with "database is
    locked" without SQLite's busy handler waiting (a lock it could only wait for by deadlocking),
    so the change is retried here until the timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.05)


def _metric(entry: dict, name: str):
    """Metric `name` of one draft's (or task's) metrics.json entry."""
    if name == "served":
        served = entry.get("served")
        return served.get("acceptance") if isinstance(served, dict) else None
    return entry.get(name)


def _number(value: Any) -> float | None:
    """A finite float, or None (SQLite stores NaN as NULL anyway; load_history reports it)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def run_identity(metrics: dict, timestamp: str, code_version: str = "") -> str:
    """A run's id: the hash of its metrics, finish time and code version, so that reporting the
    same run again (a retried cron job) is recognised."""
    blob = json.dumps([metrics, timestamp, code_version], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def metrics_to_rows(
    metrics: dict, *, timestamp: str, code_version: str = "", run_id: str | None = None
) -> list[dict]:
    """The history rows of one run's metrics.json dict: per draft role, `all` then each task."""
    missing = [r for r in ROLES if not isinstance(metrics.get(r), dict)]
    if missing:
        raise InputError(
            f"metrics lack the draft role(s) {', '.join(missing)}; "
            "give the metrics.json of a finished `specdraft run`"
        )
    served = metrics.get("served")
    plain = {k: v for k, v in metrics.items() if k != "served"}
    run_id = run_id or run_identity(plain, timestamp, code_version)
    rows = []
    for role in ROLES:
        by_task = {OVERALL: metrics[role], **(metrics[role].get("tasks") or {})}
        for task, entry in by_task.items():
            row = {
                "run_id": run_id,
                "job": str(metrics.get("job", "")),
                "job_hash": str(metrics.get("job_hash", "")),
                "target": str(metrics.get("target", "")),
                # each role records its own model; the top-level `draft` is the exported final one
                "draft": str(
                    metrics[role].get("model")
                    or (metrics.get("draft", "") if role == "final" else "")
                ),
                "draft_role": role,
                "task": str(task),
                "gamma": metrics.get("gamma"),
                "temperature": _number(metrics.get("temperature")),
                **{m: _number(_metric(entry, m)) for m in METRICS},
                "per_position": json.dumps(entry.get("per_position")),
                "timestamp": timestamp,
                "code_version": code_version,
            }
            rows.append(row)
    if isinstance(served, dict):  # `specdraft serve-check`'s numbers: the engine's, at T = 0
        rows.append(
            {
                **{k: rows[0][k] for k in ("run_id", "job", "job_hash", "target", "timestamp")},
                "draft": str(metrics.get("draft", "")),
                "draft_role": "served",
                "task": OVERALL,
                "gamma": served.get("gamma"),
                "temperature": 0.0,
                "served": _number(served.get("accept_rate")),
                "alpha": _number(served.get("accept_rate")),
                "alpha_greedy": _number(served.get("accept_rate")),
                "spec_alpha": _number(served.get("accept_rate")),
                "tau": _number(served.get("tokens_per_step")),
                "per_position": json.dumps(served.get("per_position")),
                "code_version": code_version,
            }
        )
    return rows


def append_run(
    history_dir: Path | str, metrics: dict, *, timestamp: str | None = None, code_version: str = ""
) -> int:
    """Append one run's metrics (a metrics.json dict) to the history; return the rows written
    (0 when the history has this run already: same metrics, timestamp and code version).

    `timestamp` is ISO 8601 (default: now, UTC). All rows of the run go in one transaction.
    """
    history_dir = Path(history_dir)
    history_dir.mkdir(parents=True, exist_ok=True)
    timestamp = timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = metrics_to_rows(metrics, timestamp=timestamp, code_version=code_version)
    sql = f"INSERT INTO acceptance ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    with closing(_connect(history_dir)) as conn, conn:
        conn.execute("BEGIN IMMEDIATE")  # the check and the insert in one write transaction
        seen = "SELECT 1 FROM acceptance WHERE run_id = ? LIMIT 1"
        if conn.execute(seen, (rows[0]["run_id"],)).fetchone():
            return 0
        conn.executemany(sql, [tuple(r[c] for c in COLUMNS) for r in rows])
    return len(rows)


def _row_problem(row: dict) -> str | None:
    """Why `row` cannot be used, or None."""
    for key in REQUIRED:
        if _number(row[key]) is None:
            return f"{key} is {row[key]!r}, not a finite number"
    for key in (*METRICS, "temperature"):
        if row[key] is not None and _number(row[key]) is None:
            return f"{key} is {row[key]!r}, not a finite number"
    try:
        per_position = json.loads(row["per_position"]) if row["per_position"] is not None else None
    except (TypeError, ValueError):
        return f"per_position is not JSON: {str(row['per_position'])[:60]!r}"
    if per_position is not None and not (
        isinstance(per_position, list) and all(_number(p) is not None for p in per_position)
    ):
        return f"per_position is not a list of finite numbers: {str(row['per_position'])[:60]!r}"
    row["per_position"] = per_position
    try:
        datetime.fromisoformat(str(row["timestamp"]))
    except ValueError:
        return f"timestamp {row['timestamp']!r} is not ISO 8601"
    return None


def load_history(history_dir: Path | str) -> tuple[list[dict], list[str]]:
    """All usable rows (oldest first, `per_position` parsed) and a message per skipped row."""
    path = Path(history_dir) / HISTORY_FILE
    if not path.is_file():
        return [], []
    try:
        with closing(_connect(Path(history_dir))) as conn:
            conn.row_factory = sqlite3.Row
            raw = [dict(r) for r in conn.execute("SELECT * FROM acceptance ORDER BY id")]
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path} is not a readable specdraft history ({err})") from None
    rows, problems = [], []
    for row in raw:
        problem = _row_problem(row)
        if problem is None:
            rows.append(row)
        else:
            problems.append(
                f"history row {row['id']} (job {row['job']!r}, {row['draft_role']}, task "
                f"{row['task']!r}, {row['timestamp']}) skipped: {problem}"
            )
    return rows, problems


def _drop(metric: str, before: float, after: float) -> float:
    """How far `after` fell below `before`: absolute for alpha, a fraction of `before` for tau."""
    if metric == "tau":
        return (before - after) / before if before > 0 else 0.0
    return before - after


def run_series(rows: list[dict], role: str = "final") -> dict[tuple[str, str, str], list[dict]]:
    """{(job, target, task): rows of `role`, one per run, oldest first}."""
    series: dict[tuple[str, str, str], list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["timestamp"], r.get("id") or 0)):
        if row["draft_role"] == role:
            series.setdefault((row["job"], row["target"], row["task"]), []).append(row)
    return series


def find_regressions(
    rows: list[dict], *, threshold: float = 0.02, window: int = 5, role: str = "final"
) -> list[dict]:
    """Regressions of the newest run of each (job, target, task) series of the `final` draft.

    The newest served acceptance, alpha or tau regresses when it drops by more than `threshold`
    below both the previous run's value and the median of the `window` runs before it (served:
    over the runs that recorded it). For acceptances the drop is absolute (0.02 = two points of
    acceptance); for tau it is relative (0.02 = 2 % fewer tokens per target pass), since tau's
    scale grows with gamma. `drop` is the smaller of the two drops.
    """
    if not (math.isfinite(threshold) and threshold >= 0) or window < 1:  # NaN would flag nothing
        raise InputError(
            f"threshold must be finite and >= 0 and window >= 1, got {threshold} and {window}"
        )
    found = []
    for (job, target, task), points in run_series(rows, role).items():
        if len(points) < 2:
            continue
        newest, before = points[-1], points[-1 - window : -1]
        for metric in (*OPTIONAL, *REQUIRED):
            earlier = [p for p in before if p.get(metric) is not None]
            if newest.get(metric) is None or not earlier:
                continue  # a series from before the metric was recorded
            current, previous = newest[metric], earlier[-1][metric]
            median = statistics.median(p[metric] for p in earlier)
            drop = min(_drop(metric, previous, current), _drop(metric, median, current))
            if drop > threshold:
                found.append(
                    {
                        "job": job,
                        "target": target,
                        "task": task,
                        "metric": metric,
                        "previous": previous,
                        "median": median,
                        "current": current,
                        "drop": drop,
                        "relative": metric == "tau",
                        "run_id": newest["run_id"],
                        "timestamp": newest["timestamp"],
                    }
                )
    return found
