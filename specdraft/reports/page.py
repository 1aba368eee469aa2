"""The pieces of a self-contained specdraft HTML page, shared by the run report (render.py), the
comparison (compare_render.py) and the history section of `specdraft report`: one stylesheet,
escaping for HTML and Markdown, scrollable tables and inline PNG figures.

Figures use `matplotlib.figure.Figure` with an Agg canvas directly, so drawing one never imports
pyplot or touches the caller's backend.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
 padding:1rem;max-width:1100px;line-height:1.45;color:#1b1b1b;background:#fff}
h1{font-size:1.5rem;word-break:break-word}h2{font-size:1.2rem;margin-top:2rem;
 border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555;font-size:.9rem;word-break:break-all}
.table-wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.9rem;white-space:nowrap}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
.up{color:#1a7f37;font-weight:600}.down{color:#cf222e;font-weight:600}.flat{color:#666}
.plots{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr))}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
.na{color:#777;font-style:italic}
.check{display:inline-block;padding:.35rem .8rem;border-radius:.3rem;font-weight:600;color:#fff}
.pass{background:#1a7f37}.fail{background:#cf222e}.unknown{background:#777}
.tokens{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,
 monospace;font-size:.85rem;line-height:1.9;border:1px solid #eee;padding:.5rem}
.kept{background:#c6f0c2}.dropped{color:#888;background:#f2f2f2}
dt{font-weight:600}dd{margin:0 0 .6rem 1rem}
@media (max-width:600px){body{padding:.6rem}h1{font-size:1.25rem}table{font-size:.8rem}}
"""


def document(title: str, heading: str, body: str) -> str:
    """A whole page: `title` in the tab, `heading` as its <h1>, then `body` (HTML); the CSS inline,
    nothing fetched."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(heading)}</h1>\n{body}\n</body>\n</html>\n"
    )


def table(head: str, rows: list[str]) -> str:
    """A table that scrolls sideways inside its box on a narrow screen; `head` and `rows` are
    <tr> elements."""
    body = "\n".join(rows)
    return f'<div class="table-wrap"><table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody></table></div>'


def figure(fig: Figure, caption: str) -> str:
    """Encode `fig` as an inline PNG <figure> and free it."""
    try:
        FigureCanvasAgg(fig)  # Agg for this figure only; pyplot's global backend is untouched
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def esc(value: Any) -> str:
    """`value` as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape(str(value), quote=True)


def md(value: Any) -> str:
    """`value` as Markdown text: Markdown renderers pass raw HTML through, so <, > and & are
    escaped like in the HTML report, and | and newlines would break a table row."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")
