"""Tests for the run report: its renderer (specdraft/reports/render.py) and the writer of its files
(the report stage's write_report)."""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specdraft.pipeline.stages.report import write_report
from specdraft.reports.render import render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ("arithmetic", "instruction", "code", "summary")
# alpha per task for baseline / reference / final; "code" regresses on purpose.
ALPHA = {
    "arithmetic": (0.50, 0.70, 0.66),
    "instruction": (0.55, 0.68, 0.63),
    "code": (0.60, 0.62, 0.57),
    "summary": (0.43, 0.61, 0.58),
}
TAU = {
    "arithmetic": (2.00, 2.90, 2.75),
    "instruction": (2.20, 2.80, 2.60),
    "code": (2.40, 2.50, 2.30),
    "summary": (1.80, 2.70, 2.55),
}
EVIL_TOKEN = "<b>&"


def _draft_metrics(alpha: float, tau: float, with_tasks: bool, column: int) -> dict:
    m = {
        "alpha": alpha,
        "alpha_greedy": alpha + 0.05,
        "spec_alpha": alpha - 0.04,
        "tau": tau,
        "spec_alpha_greedy": alpha + 0.03,
        "tau_greedy": tau + 0.3,
        "per_position": [0.8, 0.6, 0.45, 0.3],
        "per_position_greedy": [0.85, 0.65, 0.5, 0.35],
        "lossless_greedy": True,
        "num_positions": 1234,
        "num_prompts": 32,
    }
    if with_tasks:
        m["tasks"] = {
            t: _draft_metrics(ALPHA[t][column], TAU[t][column], False, column) for t in TASKS
        }
    return m


def full_run() -> dict:
    overall = {"baseline": (0.52, 2.10), "reference": (0.66, 2.80), "final": (0.61, 2.60)}
    metrics = {
        "job": "demo-job",
        "job_hash": "ab12cd34ef56ab12cd34",
        "target": "/runs/demo/target",
        "draft": "/runs/demo/out/draft",
        "gamma": 4,
        "temperature": 1.0,
        "lossless_greedy": True,
        "definitions": {
            "alpha": "mean per-position acceptance probability",
            "alpha_greedy": "alpha with greedy verification",
            "spec_alpha": "accepted / drafted",
            "tau": "tokens per target forward, bonus token included",
        },
    }
    for column, draft in enumerate(("baseline", "reference", "final")):
        metrics[draft] = _draft_metrics(*overall[draft], True, column)
    steps = range(10, 110, 10)
    training = {
        stage: [{"step": s, "loss": 3.0 / (1 + s / 50)} for s in steps]
        for stage in ("target", "draft_init", "reference")
    }
    training["distil"] = [{"step": s, "loss": 1.5 - s / 200, "kept_fraction": 0.4} for s in steps]
    training["distil_alpha"] = [{"step": s, "alpha": 0.5 + s / 1000} for s in steps]
    return {
        "metrics": metrics,
        "training": training,
        "selection": {
            "delta_histogram": {
                "edges": [-0.2, -0.1, 0.0, 0.1, 0.2, 0.3],
                "counts": [5, 20, 40, 25, 10],
            },
            "threshold": 0.12,
            "k": 0.4,
        },
        "examples": [
            {
                "task": "arithmetic",
                "tokens": ["Tom", " has", " 3", EVIL_TOKEN, " apples"],
                "kept": [True, False, True, True, False],
                "delta": [0.1, -0.05, 0.3, 0.2, 0.0],
            }
        ],
        "stages": [
            {"name": "data", "key": "3f2a9b8c7d6e5f4a", "seconds": 1.2, "reused": False},
            {"name": "distil", "key": "9e8d7c6b5a4f3e2d", "seconds": 340.5, "reused": True},
        ],
    }


# alpha bar chart, per-position lines, 4 loss curves, held-out alpha, ΔL histogram
EXPECTED_PLOTS = 8


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("report")
    index = write_report(full_run(), out)
    return index, index.read_text(encoding="utf-8"), (out / "summary.md").read_text("utf-8")


def test_writes_index_and_summary_only(rendered):
    index, _, _ = rendered
    assert index.name == "index.html"
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.html", "summary.md"]


def test_the_renderer_returns_the_files_texts_and_writes_nothing(rendered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = render_report(full_run())
    _, html, md = rendered
    assert (page.html, page.markdown) == (html, md)
    assert list(tmp_path.iterdir()) == []


def test_html_is_self_contained_and_responsive(rendered):
    _, page, _ = rendered
    assert 'src="http' not in page
    assert "<link" not in page
    assert "<script" not in page
    assert "url(" not in page and "@import" not in page
    assert '<meta name="viewport" content="width=device-width' in page
    assert "overflow-x:auto" in page
    assert page.count('<div class="table-wrap">') >= 3  # summary, all metrics, stages


def test_every_plot_is_an_inline_valid_png(rendered):
    _, page, _ = rendered
    pngs = _pngs(page)
    assert len(pngs) == EXPECTED_PLOTS
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 100 and height > 100
    for section, count in (("acceptance", 2), ("training", 5), ("selection", 1)):
        assert len(_pngs(_section(page, section))) == count


def test_summary_table_numbers_and_coloured_changes(rendered):
    _, page, _ = rendered
    summary = _section(page, "summary")
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"<tr><td>(\w+)</td>.*?</tr>", summary.split("<h3>")[0])
    }
    assert set(rows) == {"overall", *TASKS}
    assert re.search(
        r"0\.520</td><td>0\.610</td><td class=\"up\">\+0\.090</td><td>2\.10</td><td>2\.60</td>"
        r"<td class=\"up\">\+0\.50</td><td>0\.660</td><td>2\.80</td>",
        rows["overall"],
    )
    assert '<td class="down">-0.030</td>' in rows["code"]  # 0.60 -> 0.57
    assert '<td class="down">-0.10</td>' in rows["code"]  # 2.40 -> 2.30
    assert '<td class="up">+0.160</td>' in rows["arithmetic"]  # 0.50 -> 0.66
    assert "<title>specdraft report: demo-job</title>" in page
    assert "ab12cd34ef56ab12cd34" in page


def test_definitions_state_bonus_token_and_spec_alpha(rendered):
    _, page, _ = rendered
    definitions = _section(page, "definitions")
    assert "bonus token" in definitions
    assert "spec_alpha = accepted / drafted" in definitions
    assert "<dt>alpha_greedy</dt><dd>alpha with greedy verification</dd>" in definitions


def test_tokens_are_html_escaped(rendered):
    _, page, _ = rendered
    examples = _section(page, "examples")
    assert "&lt;b&gt;&amp;" in examples
    assert EVIL_TOKEN not in page
    assert '<span class="dropped" title="ΔL = -0.0500"> has</span>' in examples
    assert '<span class="kept" title="ΔL = 0.2000">&lt;b&gt;&amp;</span>' in examples


def test_lossless_and_stage_table(rendered):
    _, page, _ = rendered
    assert '<span class="check pass">' in _section(page, "lossless")
    stages = _section(page, "stages")
    assert "<code>9e8d7c6b5a4f</code>" in stages and "340.5" in stages
    assert "<th>341.7</th>" in stages  # total seconds


def test_summary_md_has_per_task_rows(rendered):
    _, _, md = rendered
    assert md.startswith("# specdraft run: demo-job")
    assert "| overall | 0.520 → 0.610 | +0.090 | 2.10 → 2.60 | +0.50 |" in md
    assert "| code | 0.600 → 0.570 | -0.030 | 2.40 → 2.30 | -0.10 |" in md
    for task in TASKS:
        assert re.search(rf"^\| {task} \| [0-9.]+ → [0-9.]+ \| [+-][0-9.]+ \|", md, re.M)
    assert "Lossless greedy check: passed" in md


@pytest.mark.parametrize(
    "run", [{}, {"metrics": {"job": "empty"}}, {"metrics": {}, "training": {}, "examples": []}]
)
def test_missing_sections_render_not_available(tmp_path, run):
    page = write_report(run, tmp_path).read_text("utf-8")
    for section in (
        "summary",
        "lossless",
        "acceptance",
        "training",
        "selection",
        "examples",
        "stages",
    ):
        assert "not available" in _section(page, section), section
    assert "not available" in _section(page, "definitions")
    assert _pngs(page) == []
    md = (tmp_path / "summary.md").read_text("utf-8")
    assert "Acceptance metrics: not available" in md
    assert "Lossless greedy check: not available" in md


def test_partial_run_renders_what_is_present(tmp_path):
    run = full_run()
    del run["metrics"]["final"], run["metrics"]["lossless_greedy"], run["selection"]
    del run["training"]["distil_alpha"], run["training"]["target"]
    run["metrics"]["reference"]["lossless_greedy"] = False
    page = write_report(run, tmp_path).read_text("utf-8")
    overall = re.search(r"<tr><td>overall</td>.*?</tr>", page).group(0)
    assert '<td>0.520</td><td>n/a</td><td class="flat">n/a</td>' in overall
    assert "not available" in _section(page, "selection")
    assert len(_pngs(_section(page, "training"))) == 3
    # Without a top-level verdict the per-draft flags decide, and one failure fails the check.
    assert '<span class="check fail">' in _section(page, "lossless")
    md = (tmp_path / "summary.md").read_text("utf-8")
    assert "| overall | 0.520 → n/a | n/a | 2.10 → n/a | n/a |" in md
    assert "Lossless greedy check: FAILED" in md


def test_rerender_overwrites(tmp_path):
    write_report({"metrics": {"job": "first"}}, tmp_path)
    page = write_report({"metrics": {"job": "second"}}, tmp_path).read_text("utf-8")
    assert "specdraft run report: second" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "summary.md"]


def test_malformed_histogram_raises_clear_error(tmp_path):
    run = {"selection": copy.deepcopy(full_run()["selection"])}
    run["selection"]["delta_histogram"]["edges"] = [0.0, 1.0]
    with pytest.raises(ValueError, match="n \\+ 1 edges"):
        write_report(run, tmp_path)
    assert not (tmp_path / "index.html").exists()


def test_rendering_leaves_pyplot_and_backend_alone(tmp_path):
    # A fresh interpreter, so other tests' imports cannot hide a stray pyplot import.
    code = textwrap.dedent(
        f"""
        import json, sys
        import matplotlib
        matplotlib.use("svg")
        from specdraft.pipeline.stages.report import write_report
        write_report(json.loads(sys.argv[1]), {str(tmp_path)!r})
        assert "matplotlib.pyplot" not in sys.modules, "render imported pyplot"
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(full_run())], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert len(_pngs((tmp_path / "index.html").read_text("utf-8"))) == EXPECTED_PLOTS


def test_summary_md_escapes_raw_html_from_task_names(tmp_path):
    run = full_run()
    evil = '<img src=x onerror="alert(1)">|x'
    for draft in ("baseline", "reference", "final"):
        tasks = run["metrics"][draft]["tasks"]
        tasks[evil] = tasks.pop("code")
    run["metrics"]["job"] = "<script>job</script>"
    write_report(run, tmp_path)
    md = (tmp_path / "summary.md").read_text("utf-8")
    assert "<img" not in md and "<script>" not in md
    assert '| &lt;img src=x onerror="alert(1)"&gt;\\|x | 0.600 → 0.570 |' in md
    assert md.startswith("# specdraft run: &lt;script&gt;job&lt;/script&gt;")


def test_the_report_stage_is_titled_with_the_job_name():
    """The report of `specdraft run` names its job (it read "unknown job": the evaluate stage's
    metrics carry no job name, and report.title defaults to empty)."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import build_stages

    stages = {s.name: s for s in build_stages(load_job(None, ["name=my-job"]))}
    assert stages["report"].config.title == "my-job"
    titled = {s.name: s for s in build_stages(load_job(None, ["report.title=Mine"]))}
    assert titled["report"].config.title == "Mine"


def test_the_served_rule_is_the_headline(tmp_path):
    """A run's summary opens with the acceptance of the rule it serves with, baseline -> final."""
    from specdraft.reports.render import render_report

    def draft(acceptance, length):
        served = {"drafting": "greedy", "temperature": 1.0, "acceptance": acceptance}
        by_rule = {"greedy_drafting": {"acceptance": acceptance, "acceptance_length": length}}
        return {
            "alpha": 0.5,
            "tau": 2.0,
            "served": {**served, "acceptance_length": length},
            "acceptance_by_rule": by_rule,
        }

    metrics = {"job": "j", "gamma": 4, "baseline": draft(0.1, 1.2), "final": draft(0.35, 2.05)}
    page = render_report({"metrics": metrics})
    headline = (
        "Served as the job serves it (greedy drafting, T = 1.00, γ = 4): acceptance 0.100 → "
        "0.350 (+0.250), acceptance length 1.20 → 2.05 (+0.85), baseline → final"
    )
    assert f"**{headline}**" in page.markdown and headline in page.html
    assert "<tr><td>greedy_drafting acceptance length</td><td>1.20</td>" in page.html
    old = render_report({"metrics": {"job": "j", "final": {"alpha": 0.5}}})
    assert "Served as" not in old.markdown  # metrics made before the rule was recorded
