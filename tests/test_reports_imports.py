"""specdraft/reports/ is a leaf the pipeline calls: its renderers are handed dicts and return text,
so none of its modules imports the pipeline, the drafts or the kernels (read from the sources, so
an import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import specdraft.reports

FORBIDDEN = ("specdraft.pipeline", "specdraft.drafts", "specdraft.kernels")
REPORTS = Path(specdraft.reports.__file__).parent


def imported(source: str, package: str) -> set[str]:
    """Every module (and `from` name, which may be a module) the source imports, anywhere in it;
    relative imports resolved against `package`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def forbidden(names: set[str]) -> set[str]:
    return {n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}


def test_reports_import_nothing_of_the_pipeline_drafts_or_kernels():
    modules = sorted(REPORTS.rglob("*.py"))
    assert {"render.py", "compare_render.py", "page.py", "history.py"} <= {m.name for m in modules}
    offenders = {
        str(m.relative_to(REPORTS)): sorted(found)
        for m in modules
        if (found := forbidden(imported(m.read_text(encoding="utf-8"), "specdraft.reports")))
    }
    assert offenders == {}


def test_the_check_sees_every_form_of_import():
    source = (
        "import specdraft.pipeline.config\n"
        "from specdraft.drafts.models import load_causal_lm\n"
        "from specdraft import kernels\n"
        "from ..pipeline import dag\n"
        "import specdraft.errors, matplotlib\n"
        "def late():\n"
        "    from specdraft.pipeline.engine.artifacts import atomic_write_text\n"
    )
    assert forbidden(imported(source, "specdraft.reports")) == {
        "specdraft.pipeline.config",
        "specdraft.drafts.models",
        "specdraft.drafts.models.load_causal_lm",
        "specdraft.kernels",
        "specdraft.pipeline",
        "specdraft.pipeline.dag",
        "specdraft.pipeline.engine.artifacts",
        "specdraft.pipeline.engine.artifacts.atomic_write_text",
    }
