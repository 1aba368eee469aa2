"""Draw a finished run's report: a self-contained HTML page and a short Markdown summary.

A renderer only: it is handed the run's JSON (the evaluate stage's metrics, training histories,
`specdraft serve-check`'s serving.json) as dicts and returns text; the pipeline writes the files
(the report stage, `specdraft serve-check`, `specdraft report`). The page inlines every plot as a
base64 PNG and carries its own CSS (page.py), so it can be mailed, attached to a ticket or opened
offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from specdraft.reports.page import document, esc, figure, md, table

DRAFTS = ("baseline", "reference", "final")
DRAFT_COLOURS = {"baseline": "#8c8c8c", "reference": "#1f77b4", "final": "#e66101"}
TRAINING_STAGES = ("target", "draft_init", "reference", "distil")
NOT_AVAILABLE = '<p class="na">not available</p>'
MAX_EXAMPLES = 20  # enough to eyeball selection; more only bloats the page


@dataclass(frozen=True)
class ReportPage:
    """A run's report: the texts of its `index.html` and its `summary.md`."""

    html: str
    markdown: str


def render_report(run: dict, serving: dict | None = None) -> ReportPage:
    """The report page of `run` and its Markdown summary.

    `run` may hold `metrics` (metrics.json), `training`, `selection`, `examples` and `stages`; any
    that is missing renders as "not available". `serving` is `specdraft serve-check`'s
    serving.json: given, the page has a "Served" section (served_summary's numbers). A malformed
    input raises ValueError (KeyError or TypeError for a malformed `serving`).
    """
    metrics = run.get("metrics") or {}
    job = str(metrics.get("job") or "unknown job")
    sections = [
        ("summary", "Summary", _summary_section(metrics)),
        ("definitions", "Definitions", _definitions_section(metrics.get("definitions"))),
        ("lossless", "Lossless check (greedy)", _lossless_section(metrics)),
        *(
            [("served", "Served (vLLM)", _served_section(served_summary(serving)))]
            if serving is not None
            else []
        ),
        ("acceptance", "Acceptance", _acceptance_section(metrics)),
        ("training", "Training", _training_section(run.get("training"))),
        ("selection", "Token selection (ΔL)", _selection_section(run.get("selection"))),
        ("examples", "Examples", _examples_section(run.get("examples"))),
        ("stages", "Stages", _stages_section(run.get("stages"))),
    ]
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{title}</h2>\n{content}\n</section>'
        for sid, title, content in sections
    )
    html = document(
        f"specdraft report: {job}", f"specdraft run report: {job}", f"{_run_meta(metrics)}\n{body}"
    )
    return ReportPage(html=html, markdown=render_summary_markdown(metrics))


def served_summary(serving: dict) -> dict:
    """The engine's T = 0 numbers (and its sampled run's, if any) from `specdraft serve-check`'s
    serving.json: what the page's Served section shows and the history records as the `served`
    draft. KeyError or TypeError when `serving` lacks them."""
    engine = serving["temperature_0"]["engine"]
    return {
        "engine": f"{serving['engine']} {serving['engine_version']}",
        "gamma": serving["gamma"],
        "prompts": serving["prompts"],
        "accept_rate": engine["accept_rate"],
        "tokens_per_step": engine["tokens_per_step"],
        "per_position": engine["per_pos_of_drafts"],
        "speedup": engine["speedup"],
        "sampled": _sampled_summary(serving.get("temperature")),
    }


def _sampled_summary(sampled: dict | None) -> dict | None:
    """serve-check's run at the run's temperature: the engine's rate as shipped, with a known
    defect fixed, and what its acceptance rule expects on the contexts it visited (the replay of
    the run the check judged: the fixed one when there is one). None for a T = 0 check or a file
    from before the replay."""
    if not sampled or "runs" not in sampled:
        return None
    runs = sampled["runs"]
    checked = next((r for r in runs if r["engine_fix"]), runs[0])
    replay = checked.get("replay") or {}
    return {
        "temperature": sampled["temperature"],
        "as_shipped": sampled["engine_accept_rate"],
        "fixed": sampled.get("engine_fixed_accept_rate"),
        "expected": replay.get("accept_rate_expected"),
        "z": replay.get("z"),
        "follows_rule": checked.get("follows_rule"),
        "defects": [d["upstream"] for d in sampled.get("engine_defects", [])],
    }


def served_headline(metrics: dict) -> str | None:
    """The headline sentence: the served rule's acceptance and acceptance length, baseline →
    final (None for metrics made before the serving rule was recorded)."""
    base, final = metrics.get("baseline") or {}, metrics.get("final") or {}
    b, f = base.get("served"), final.get("served")
    if not isinstance(f, dict):
        return None
    b = b if isinstance(b, dict) else {}
    a0, a1 = b.get("acceptance"), f.get("acceptance")
    l0, l1 = b.get("acceptance_length"), f.get("acceptance_length")
    return (
        f"Served as the job serves it ({f.get('drafting')} drafting, T = "
        f"{_fmt(f.get('temperature'), 2)}, γ = {metrics.get('gamma', 'n/a')}): acceptance "
        f"{_fmt(a0, 3)} → {_fmt(a1, 3)} ({_delta(a0, a1, 3)}), acceptance length "
        f"{_fmt(l0, 2)} → {_fmt(l1, 2)} ({_delta(l0, l1, 2)}), baseline → final"
    )


def render_summary_markdown(metrics: dict) -> str:
    """A short Markdown summary (the served headline, per-task α and τ, baseline → final, and the
    lossless check)."""
    job = metrics.get("job") or "unknown job"
    lines = [f"# specdraft run: {md(job)}", ""]
    facts = [f"{k} {md(metrics[k])}" for k in ("job_hash", "gamma", "temperature") if k in metrics]
    if facts:
        lines += [", ".join(facts), ""]
    headline = served_headline(metrics)
    if headline:
        lines += [f"**{md(headline)}**", ""]
    rows = _task_rows(metrics)
    if rows:
        lines += [
            "| task | α baseline → final | Δα | τ baseline → final | Δτ |",
            "|---|---|---|---|---|",
        ]
        for task, by_draft in rows:
            base, final = by_draft.get("baseline", {}), by_draft.get("final", {})
            a0, a1, t0, t1 = (
                base.get("alpha"),
                final.get("alpha"),
                base.get("tau"),
                final.get("tau"),
            )
            lines.append(
                f"| {md(task)} | {_fmt(a0, 3)} → {_fmt(a1, 3)} | {_delta(a0, a1, 3)} "
                f"| {_fmt(t0, 2)} → {_fmt(t1, 2)} | {_delta(t0, t1, 2)} |"
            )
    else:
        lines.append("Acceptance metrics: not available")
    verdict = {True: "passed", False: "FAILED", None: "not available"}[_lossless(metrics)]
    lines += ["", f"Lossless greedy check: {verdict}", ""]
    return "\n".join(lines)


# --- sections --------------------------------------------------------------------------------


def _served_section(served: dict) -> str:
    """`specdraft serve-check`'s numbers: what the engine measured for the exported draft."""
    per_pos = served.get("per_position") or []
    positions = ", ".join(_fmt(p, 3) for p in per_pos)
    return (
        f"<p>The exported draft served by {esc(served.get('engine', 'the engine'))} with the "
        f"target, γ = {esc(served.get('gamma'))}, on {esc(served.get('prompts'))} of the run's "
        "prompts, greedy (T = 0; serving.json has specdraft's numbers beside it).</p>\n"
        "<table><tr><th>accepted / drafted</th><th>tokens per target step</th>"
        "<th>per position</th><th>speedup</th></tr>"
        f"<tr><td>{_fmt(served.get('accept_rate'), 3)}</td>"
        f"<td>{_fmt(served.get('tokens_per_step'), 2)}</td><td>{positions}</td>"
        f"<td>{_fmt(served.get('speedup'), 2)}</td></tr></table>"
        + _sampled_served(served.get("sampled"))
    )


def _sampled_served(sampled: dict | None) -> str:
    """One paragraph on the engine's sampled run: its rate, and whether it follows its rule."""
    if not sampled:
        return ""
    temperature = _fmt(sampled["temperature"], 2)
    rule = (
        f"its acceptance rule expects {_fmt(sampled['expected'], 3)} on the contexts it visited "
        f"(z = {_fmt(sampled['z'], 1)}: "
        + ("it follows the rule" if sampled["follows_rule"] else "it does NOT follow the rule")
        + ")"
    )
    if sampled["fixed"] is None:
        return f"<p>At T = {temperature} the engine accepts {_fmt(sampled['as_shipped'], 3)}; {rule}.</p>"
    links = ", ".join(f'<a href="{esc(u)}">{esc(u)}</a>' for u in sampled["defects"])
    return (
        f"<p>At T = {temperature} the engine as shipped accepts {_fmt(sampled['as_shipped'], 3)}: "
        f"its CPU sampler divides by uninitialised temperatures ({links}). With that fixed it "
        f"accepts {_fmt(sampled['fixed'], 3)}; {rule}.</p>"
    )


def _run_meta(metrics: dict) -> str:
    keys = ("job_hash", "target", "draft", "gamma", "temperature")
    items = [f"<b>{k}</b>: {esc(metrics[k])}" for k in keys if k in metrics]
    return f'<p class="meta">{" · ".join(items)}</p>' if items else ""


def _summary_section(metrics: dict) -> str:
    rows = _task_rows(metrics)
    if not rows:
        return NOT_AVAILABLE
    head = (
        "<tr><th>task</th><th>α baseline</th><th>α final</th><th>Δα</th><th>τ baseline</th>"
        "<th>τ final</th><th>Δτ</th><th>α reference</th><th>τ reference</th></tr>"
    )
    body = []
    for task, by_draft in rows:
        base, final = by_draft.get("baseline", {}), by_draft.get("final", {})
        ref = by_draft.get("reference", {})
        a0, a1, t0, t1 = base.get("alpha"), final.get("alpha"), base.get("tau"), final.get("tau")
        body.append(
            f"<tr><td>{esc(task)}</td><td>{_fmt(a0, 3)}</td><td>{_fmt(a1, 3)}</td>"
            f"{_delta_cell(a0, a1, 3)}<td>{_fmt(t0, 2)}</td><td>{_fmt(t1, 2)}</td>"
            f"{_delta_cell(t0, t1, 2)}<td>{_fmt(ref.get('alpha'), 3)}</td>"
            f"<td>{_fmt(ref.get('tau'), 2)}</td></tr>"
        )
    headline = served_headline(metrics)
    summary = (f"<p><b>{esc(headline)}</b></p>\n" if headline else "") + table(head, body)
    # Every overall number per draft, for readers who want the greedy and counting columns too.
    present = [d for d in DRAFTS if isinstance(metrics.get(d), dict)]
    rule_rows = []
    for rule in ("probabilistic", "greedy_drafting", "agreement_t0"):
        for key, digits in (("acceptance", 3), ("acceptance_length", 2)):
            cells = "".join(
                "<td>"
                + _fmt(
                    ((metrics[d].get("acceptance_by_rule") or {}).get(rule) or {}).get(key), digits
                )
                + "</td>"
                for d in present
            )
            if any(isinstance(metrics[d].get("acceptance_by_rule"), dict) for d in present):
                rule_rows.append(f"<tr><td>{rule} {key.replace('_', ' ')}</td>{cells}</tr>")
    keys = ("alpha", "alpha_greedy", "spec_alpha", "spec_alpha_greedy", "tau", "tau_greedy")
    keys += ("num_positions", "num_prompts")
    detail_head = "<tr><th>overall</th>" + "".join(f"<th>{d}</th>" for d in present) + "</tr>"
    detail = []
    for key in keys:
        digits = 0 if key.startswith("num_") else (2 if key.startswith("tau") else 3)
        cells = "".join(f"<td>{_fmt(metrics[d].get(key), digits)}</td>" for d in present)
        detail.append(f"<tr><td>{key}</td>{cells}</tr>")
    detail += rule_rows
    off = {d: (metrics[d].get("off_distribution") or {}).get("free_text") for d in present}
    if any(isinstance(v, dict) for v in off.values()):
        for label, pick, digits in (
            (
                "free text: served acceptance",
                lambda v: (v.get("served") or {}).get("acceptance"),
                3,
            ),
            ("free text: alpha", lambda v: v.get("alpha"), 3),
        ):
            cells = "".join(
                f"<td>{_fmt(pick(off[d]) if isinstance(off[d], dict) else None, digits)}</td>"
                for d in present
            )
            detail.append(f"<tr><td>{label}</td>{cells}</tr>")
    return summary + "\n<h3>All overall metrics</h3>\n" + table(detail_head, detail)


def _definitions_section(definitions: Any) -> str:
    notes = (
        "<p>τ (tau) counts the bonus token: it is the mean number of tokens emitted per target "
        "forward pass, accepted drafts plus the one token the target always adds. "
        "spec_alpha = accepted / drafted tokens.</p>"
    )
    if not isinstance(definitions, dict) or not definitions:
        return notes + "<p>Definitions from metrics.json:</p>" + NOT_AVAILABLE
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in definitions.items())
    return f"{notes}\n<dl>{items}</dl>"


def _lossless_section(metrics: dict) -> str:
    verdict = _lossless(metrics)
    badge = {
        True: '<span class="check pass">passed: greedy output is identical with speculation</span>',
        False: '<span class="check fail">FAILED: greedy output differs with speculation</span>',
        None: '<span class="check unknown">not available</span>',
    }[verdict]
    per_draft = [
        f"{d}: {'passed' if metrics[d]['lossless_greedy'] else 'FAILED'}"
        for d in DRAFTS
        if isinstance(metrics.get(d), dict) and isinstance(metrics[d].get("lossless_greedy"), bool)
    ]
    detail = f"<p>{esc(', '.join(per_draft))}</p>" if per_draft else ""
    return f"<p>{badge}</p>{detail}"


def _acceptance_section(metrics: dict) -> str:
    rows = _task_rows(metrics)
    if not rows:
        return NOT_AVAILABLE
    figures = [figure(_plot_alpha_per_task(rows), "α per task for each draft")]
    curves = {
        d: metrics[d]
        for d in DRAFTS
        if isinstance(metrics.get(d), dict) and metrics[d].get("per_position")
    }
    if curves:
        caption = "Acceptance at each draft position (solid: sampled, dashed: greedy)"
        figures.append(figure(_plot_per_position(curves), caption))
    else:
        figures.append("<p>Per-position acceptance:</p>" + NOT_AVAILABLE)
    return '<div class="plots">' + "".join(figures) + "</div>"


def _training_section(training: Any) -> str:
    if not isinstance(training, dict):
        return NOT_AVAILABLE
    stages = [s for s in TRAINING_STAGES if training.get(s)]
    # Stages this renderer does not know yet still get a loss plot if they look like one.
    stages += [
        s
        for s, v in training.items()
        if s not in TRAINING_STAGES and s != "distil_alpha" and isinstance(v, list)
    ]
    figures = []
    for stage in stages:
        points = training[stage]
        if not points:
            continue
        _require_keys(points, ("step", "loss"), f"training.{stage}")
        figures.append(figure(_plot_loss(stage, points), f"{stage}: training loss"))
    if training.get("distil_alpha"):
        _require_keys(training["distil_alpha"], ("step", "alpha"), "training.distil_alpha")
        caption = "distil: α on the held-out split over training steps"
        figures.append(figure(_plot_alpha_over_steps(training["distil_alpha"]), caption))
    if not figures:
        return NOT_AVAILABLE
    return '<div class="plots">' + "".join(figures) + "</div>"


def _selection_section(selection: Any) -> str:
    if not isinstance(selection, dict) or not selection.get("delta_histogram"):
        return NOT_AVAILABLE
    hist = selection["delta_histogram"]
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    if not counts or len(edges) != len(counts) + 1:
        raise ValueError(
            "selection.delta_histogram needs n counts and n + 1 edges; got "
            f"{len(counts)} counts and {len(edges)} edges. Fix the selection stage's output."
        )
    threshold, k = selection.get("threshold"), selection.get("k")
    caption = f"ΔL per token; threshold {_fmt(threshold, 4)}, kept fraction k = {_fmt(k, 3)}"
    return figure(_plot_histogram(edges, counts, threshold), caption)


def _examples_section(examples: Any) -> str:
    if not examples:
        return NOT_AVAILABLE
    legend = '<p><span class="kept">kept</span> / <span class="dropped">dropped</span> tokens; '
    legend += "hover a token for its ΔL.</p>"
    parts = [legend]
    for i, ex in enumerate(examples[:MAX_EXAMPLES]):
        tokens = list(ex.get("tokens") or [])
        kept, delta = ex.get("kept"), ex.get("delta")
        for name, values in (("kept", kept), ("delta", delta)):
            if values is not None and len(values) != len(tokens):
                raise ValueError(
                    f"examples[{i}].{name} has {len(values)} entries for {len(tokens)} tokens; "
                    "they must align one to one."
                )
        spans = []
        for j, token in enumerate(tokens):
            cls = "" if kept is None else (' class="kept"' if kept[j] else ' class="dropped"')
            tip = "" if delta is None else f' title="ΔL = {_fmt(delta[j], 4)}"'
            spans.append(f"<span{cls}{tip}>{esc(token)}</span>")
        parts.append(f"<h3>{esc(ex.get('task', 'example'))}</h3>")
        parts.append(f'<div class="tokens">{"".join(spans)}</div>')
    if len(examples) > MAX_EXAMPLES:
        parts.append(f"<p>Showing {MAX_EXAMPLES} of {len(examples)} examples.</p>")
    return "\n".join(parts)


def _stages_section(stages: Any) -> str:
    if not stages:
        return NOT_AVAILABLE
    head = "<tr><th>stage</th><th>cache key</th><th>seconds</th><th>reused</th></tr>"
    body, total = [], 0.0
    for stage in stages:
        key = str(stage.get("key", ""))
        seconds = stage.get("seconds")
        total += seconds if _is_number(seconds) else 0.0
        reused = {True: "yes", False: "no"}.get(stage.get("reused"), "n/a")
        body.append(
            f'<tr><td>{esc(stage.get("name", "?"))}</td><td title="{esc(key)}">'
            f"<code>{esc(key[:12])}</code></td><td>{_fmt(seconds, 1)}</td><td>{reused}</td></tr>"
        )
    body.append(f"<tr><th>total</th><th></th><th>{_fmt(total, 1)}</th><th></th></tr>")
    return table(head, body)


# --- plots -----------------------------------------------------------------------------------


def _plot_alpha_per_task(rows: list[tuple[str, dict]]) -> Figure:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    present = [d for d in DRAFTS if any(d in by_draft for _, by_draft in rows)]
    width = 0.8 / max(len(present), 1)
    for i, draft in enumerate(present):
        xs = [t + (i - (len(present) - 1) / 2) * width for t in range(len(rows))]
        ys = [_num(by_draft.get(draft, {}).get("alpha")) for _, by_draft in rows]
        ax.bar(xs, ys, width, label=draft, color=DRAFT_COLOURS[draft])
    ax.set_xticks(range(len(rows)), [task for task, _ in rows], rotation=20, ha="right")
    ax.set_ylabel("α (acceptance rate)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", ncols=len(present), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_per_position(curves: dict[str, dict]) -> Figure:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    for draft, m in curves.items():
        ys = [_num(v) for v in m["per_position"]]
        ax.plot(range(1, len(ys) + 1), ys, "o-", color=DRAFT_COLOURS[draft], label=draft)
        if m.get("per_position_greedy"):
            ys = [_num(v) for v in m["per_position_greedy"]]
            ax.plot(range(1, len(ys) + 1), ys, "s--", color=DRAFT_COLOURS[draft], alpha=0.7)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _plot_loss(stage: str, points: list[dict]) -> Figure:
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    ax.plot([p["step"] for p in points], [_num(p["loss"]) for p in points], color="#1f77b4")
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="#1f77b4")
    ax.grid(alpha=0.3)
    kept = [p for p in points if _is_number(p.get("kept_fraction"))]
    if kept:
        twin = ax.twinx()
        twin.plot([p["step"] for p in kept], [p["kept_fraction"] for p in kept], color="#e66101")
        twin.set_ylabel("kept fraction", color="#e66101")
        twin.set_ylim(0, 1)
    return fig


def _plot_alpha_over_steps(points: list[dict]) -> Figure:
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    ax.plot([p["step"] for p in points], [_num(p["alpha"]) for p in points], "o-", color="#e66101")
    ax.set_title("distil: held-out α")
    ax.set_xlabel("step")
    ax.set_ylabel("α")
    ax.grid(alpha=0.3)
    return fig


def _plot_histogram(edges: list[float], counts: list[int], threshold: Any) -> Figure:
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color="#9ecae1", edgecolor="#3182bd")
    if _is_number(threshold):
        ax.axvline(threshold, color="#cf222e", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("ΔL per token")
    ax.set_ylabel("tokens")
    return fig


# --- helpers ---------------------------------------------------------------------------------


def _task_rows(metrics: dict) -> list[tuple[str, dict]]:
    """[(task, {draft: metrics})], "overall" first, then tasks in first-seen order."""
    drafts = {d: metrics[d] for d in DRAFTS if isinstance(metrics.get(d), dict)}
    if not drafts:
        return []
    rows = [("overall", drafts)]
    tasks: list[str] = []
    for m in drafts.values():
        tasks += [t for t in (m.get("tasks") or {}) if t not in tasks]
    for task in tasks:
        rows.append(
            (
                task,
                {d: m["tasks"][task] for d, m in drafts.items() if task in (m.get("tasks") or {})},
            )
        )
    return rows


def _lossless(metrics: dict) -> bool | None:
    if isinstance(metrics.get("lossless_greedy"), bool):
        return metrics["lossless_greedy"]
    flags = [
        metrics[d]["lossless_greedy"]
        for d in DRAFTS
        if isinstance(metrics.get(d), dict) and isinstance(metrics[d].get("lossless_greedy"), bool)
    ]
    return all(flags) if flags else None


def _require_keys(points: list[dict], keys: tuple[str, ...], where: str) -> None:
    for i, point in enumerate(points):
        missing = [k for k in keys if k not in point]
        if missing:
            raise ValueError(f"{where}[{i}] lacks {missing}; each point needs {list(keys)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def _delta(before: Any, after: Any, digits: int) -> str:
    if not (_is_number(before) and _is_number(after)):
        return "n/a"
    return f"{after - before:+.{digits}f}"


def _delta_cell(before: Any, after: Any, digits: int) -> str:
    text = _delta(before, after, digits)
    if text == "n/a":
        return '<td class="flat">n/a</td>'
    change = round(after - before, digits)
    cls = "up" if change > 0 else ("down" if change < 0 else "flat")
    return f'<td class="{cls}">{text}</td>'
