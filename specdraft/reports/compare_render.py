"""Render a comparison (specdraft/pipeline/stages/comparison.py's results) as Markdown tables and a
self-contained HTML page with plots, in the style of the run report (render.py). A renderer only:
it returns text, and the comparison stage writes it."""

from __future__ import annotations

from matplotlib.figure import Figure

from specdraft.reports.page import document, esc, figure, md, table

LABELS = {
    "alpha": "alpha (T=1)",
    "alpha_greedy": "alpha_greedy",
    "greedy_drafting": "greedy drafting",
    "tau": "tau (T=1)",
    "tau_greedy": "tau (greedy)",
}
SHARED_LABELS = {"baseline": "draft init (untrained)", "reference": "reference (shared)"}


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    return "=n/a" if value is None else "<0.001" if value < 0.001 else f"={value:.3f}"


def cell_text(cell: dict, digits: int) -> str:
    """`mean ± std (diff [95 % interval], p over seeds, Holm-adjusted p; p over prompts)`. The
    difference is starred when the Holm-adjusted seed-level p < 0.05 (in a file made before the
    seed-level test, when the prompt-level p is)."""
    text = _num(cell.get("mean"), digits)
    if cell.get("std") is not None:
        text += f" ± {cell['std']:.{digits}f}"
    if "diff" not in cell:
        return text
    decisive = cell["p_holm"] if "p_holm" in cell else cell.get("p")
    star = "*" if decisive is not None and decisive < 0.05 else ""
    parts = [f"{cell['diff']:+.{digits}f}{star}"]
    if cell.get("ci95"):
        low, high = cell["ci95"]
        parts[0] += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    if "p_holm" in cell:
        parts.append(f"seeds p{_p(cell.get('p_seed'))}, Holm p{_p(cell['p_holm'])}")
    parts.append(f"prompts p{_p(cell.get('p'))}" if "p_holm" in cell else f"p{_p(cell.get('p'))}")
    return text + " (" + ", ".join(parts) + ")"


def _digits(metric: str) -> int:
    return 2 if metric.startswith("tau") else 3


def _tests_line(results: dict) -> str:
    prompts = (
        f"{results['num_prompts']['alpha']} alpha prompts / {results['num_prompts']['spec']} "
        "speculative-decoding prompts"
    )
    if not _has_seed_tests(results):
        return f"p from a paired permutation test over {prompts}; * marks p < 0.05."
    return (
        "Beside each difference: its 95 % interval and p from a paired t-test over the "
        f"{len(results['seeds'])} training seeds, that p Holm-adjusted over every test in this "
        f"file, and p from a paired permutation test over {prompts} with seeds averaged (the "
        "seed's variance does not enter it; n/a where it cannot reach 0.05); * marks a "
        "Holm-adjusted p < 0.05."
    )


def _has_seed_tests(results: dict) -> bool:
    return any(
        "p_holm" in cell
        for by_task in results["results"].values()
        for cells in by_task.values()
        for cell in cells.values()
    )


def results_markdown(results: dict) -> str:
    lines = [
        f"# {results['title']}: {len(results['recipes'])} recipes × {len(results['seeds'])} seeds",
        "",
        f"gamma = {results['gamma']}; seeds {results['seeds']}; differences are to "
        f"`{results['baseline']}`. " + _tests_line(results),
        "",
        "| recipe | what it is |",
        "|---|---|",
        *(f"| {name} | {md(r['help'])} |" for name, r in results["recipes"].items()),
    ]
    for task in results["tasks"]:
        lines += ["", f"## {md(task)}", "", "| recipe | " + " | ".join(LABELS.values()) + " |"]
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


def render_comparison(results: dict) -> str:
    """The comparison's HTML page (its index.html)."""
    recipe_rows = [
        f"<tr><td>{esc(name)}</td><td>{esc(r['help'])}</td>"
        f"<td><code>{esc(', '.join(f'{k}={v}' for k, v in r['set'].items()))}</code></td></tr>"
        for name, r in results["recipes"].items()
    ]
    parts = [
        "<h2>Recipes</h2>",
        table("<tr><th>recipe</th><th>what it is</th><th>settings</th></tr>", recipe_rows),
    ]
    head = "<tr><th>recipe</th>" + "".join(f"<th>{esc(v)}</th>" for v in LABELS.values()) + "</tr>"
    for task in results["tasks"]:
        rows = []
        for recipe, by_task in results["results"].items():
            cells = "".join(
                f"<td>{esc(cell_text(by_task[task][m], _digits(m)))}</td>" for m in LABELS
            )
            rows.append(f"<tr><td>{esc(recipe)}</td>{cells}</tr>")
        for name, by_task in results["shared"].items():
            cells = "".join(f"<td>{_num(by_task[task][m], _digits(m))}</td>" for m in LABELS)
            rows.append(f"<tr><td><em>{esc(SHARED_LABELS[name])}</em></td>{cells}</tr>")
        parts += [f"<h2>Task: {esc(task)}</h2>", table(head, rows)]
    plots = [
        figure(
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
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in results["definitions"].items())
        + "</dl>"
    )
    title = f"specdraft comparison: {results['title']}"
    meta = (
        f'<p class="meta">seeds {esc(results["seeds"])} · γ = {esc(results["gamma"])} · '
        f"differences to <b>{esc(results['baseline'])}</b></p>\n"
        f'<p class="meta">{esc(_tests_line(results))}</p>'
    )
    return document(title, title, f"{meta}\n" + "\n".join(parts))
