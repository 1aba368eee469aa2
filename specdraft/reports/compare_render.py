"""Render a comparison (specdraft/pipeline/stages/comparison.py's results) as Markdown tables and a self-contained
HTML page with plots, in the style of the run report (specdraft/reports/render.py)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from specdraft.pipeline.engine.artifacts import atomic_write_text
from specdraft.reports.render import CSS, _esc, _figure, _md, _table

LABELS = {
    "alpha": "alpha (T=1)",
    "alpha_greedy": "alpha_greedy",
    "tau": "tau (T=1)",
    "tau_greedy": "tau (greedy)",
}
SHARED_LABELS = {"baseline": "draft init (untrained)", "reference": "reference (shared)"}


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell_text(cell: dict, digits: int) -> str:
    """`mean ± std (diff, p)`; the difference is starred when p < 0.05."""
    text = _num(cell.get("mean"), digits)
    if cell.get("std") is not None:
        text += f" ± {cell['std']:.{digits}f}"
    if "diff" in cell:
        p = cell.get("p")
        star = "*" if p is not None and p < 0.05 else ""
        shown = "p<0.001" if p is not None and p < 0.001 else f"p={_num(p, 3)}"
        text += f" ({cell['diff']:+.{digits}f}{star}, {shown})"
    return text


def _digits(metric: str) -> int:
    return 2 if metric.startswith("tau") else 3


def results_markdown(results: dict) -> str:
    lines = [
        f"# {results['title']}: {len(results['recipes'])} recipes × {len(results['seeds'])} seeds",
        "",
        f"gamma = {results['gamma']}; seeds {results['seeds']}; differences are to "
        f"`{results['baseline']}`, p from a paired permutation test over "
        f"{results['num_prompts']['alpha']} alpha prompts / {results['num_prompts']['spec']} "
        "speculative-decoding prompts; * marks p < 0.05.",
        "",
        "| recipe | what it is |",
        "|---|---|",
        *(f"| {name} | {_md(r['help'])} |" for name, r in results["recipes"].items()),
    ]
    for task in results["tasks"]:
        lines += ["", f"## {_md(task)}", "", "| recipe | " + " | ".join(LABELS.values()) + " |"]
        lines.append("|---" * (len(LABELS) + 1) + "|")
        for recipe, by_task in results["results"].items():
            cells = [cell_text(by_task[task][m], _digits(m)) for m in LABELS]
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        for name, by_task in results["shared"].items():
            cells = [_num(by_task[task][m], _digits(m)) for m in LABELS]
            lines.append(f"| _{SHARED_LABELS[name]}_ | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_metric(results: dict, metric: str) -> Figure:
    """Grouped bars per task, one per recipe, with the seed std as error bars."""
    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.add_subplot()
    recipes, tasks = list(results["results"]), results["tasks"]
    means = []
    width = 0.8 / len(recipes)
    for i, recipe in enumerate(recipes):
        xs = [t + (i - (len(recipes) - 1) / 2) * width for t in range(len(tasks))]
        cells = [results["results"][recipe][task][metric] for task in tasks]
        ys = [c["mean"] if c["mean"] is not None else float("nan") for c in cells]
        errs = [c["std"] or 0.0 for c in cells]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=recipe)
        means += [y for y in ys if y == y]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(LABELS[metric])
    if means:  # zoom in on the bars' range: the differences are what the plot is for
        low, high = min(means), max(means)
        pad = 0.1 * (high - low) + 1e-3
        ax.set_ylim(max(0.0, low - 3 * pad), high + pad)
    ax.legend(fontsize="x-small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    return fig


def render_comparison(results: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_rows = [
        f"<tr><td>{_esc(name)}</td><td>{_esc(r['help'])}</td>"
        f"<td><code>{_esc(', '.join(f'{k}={v}' for k, v in r['set'].items()))}</code></td></tr>"
        for name, r in results["recipes"].items()
    ]
    parts = [
        "<h2>Recipes</h2>",
        _table("<tr><th>recipe</th><th>what it is</th><th>settings</th></tr>", recipe_rows),
    ]
    head = "<tr><th>recipe</th>" + "".join(f"<th>{_esc(v)}</th>" for v in LABELS.values()) + "</tr>"
    for task in results["tasks"]:
        rows = []
        for recipe, by_task in results["results"].items():
            cells = "".join(
                f"<td>{_esc(cell_text(by_task[task][m], _digits(m)))}</td>" for m in LABELS
            )
            rows.append(f"<tr><td>{_esc(recipe)}</td>{cells}</tr>")
        for name, by_task in results["shared"].items():
            cells = "".join(f"<td>{_num(by_task[task][m], _digits(m))}</td>" for m in LABELS)
            rows.append(f"<tr><td><em>{_esc(SHARED_LABELS[name])}</em></td>{cells}</tr>")
        parts += [f"<h2>Task: {_esc(task)}</h2>", _table(head, rows)]
    plots = [
        _figure(
            _plot_metric(results, m),
            f"{LABELS[m]} per task, mean ± std over seeds (the axis spans the bars, not from 0)",
        )
        for m in LABELS
    ]
    parts += [
        "<h2>Plots</h2>",
        f'<div class="plots">{"".join(plots)}</div>',
        "<h2>Definitions</h2>",
    ]
    parts.append(
        "<dl>"
        + "".join(
            f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in results["definitions"].items()
        )
        + "</dl>"
    )
    title = f"specdraft comparison: {results['title']}"
    meta = (
        f'<p class="meta">seeds {_esc(results["seeds"])} · γ = {_esc(results["gamma"])} · '
        f"differences to <b>{_esc(results['baseline'])}</b> · * p &lt; 0.05</p>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{meta}\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return index
