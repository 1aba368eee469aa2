"""The documentation says what the code and the committed results say.

- docs/configuration.md's settings tables are what `python docs/settings_table.py` makes from
  `config.describe()` (the help strings are the only copy);
- every file the README, RESULTS.md and docs/ point at exists in the repository;
- the README's demo table holds the numbers of results/demo/metrics.json.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from specdraft.pipeline.config import describe

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _settings_script():
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "docs" / "settings_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_tables_match_the_config():
    script = _settings_script()
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == script.render(committed), (
        "docs/configuration.md's settings tables differ from config.describe(): "
        f"run `{script.REFRESH}` and commit the result"
    )


def test_configuration_tables_have_one_row_per_setting():
    tables = _settings_script().settings_tables()
    keys = re.findall(r"^\| `([^`]+)` \|", tables, flags=re.M)
    assert keys == [key for key, _, _ in describe()]


def test_settings_table_escapes_what_markdown_would_eat():
    script = _settings_script()
    assert script._cell("|x| for <name>") == "\\|x\\| for &lt;name>"
    assert script._yaml_default("None") == "`null`"
    assert script._yaml_default("False") == "`false`"
    assert script._yaml_default("''") == "empty"
    assert script._yaml_default("['a', 'b']") == "`[a, b]`"


# Repository paths a page names: results/…, benchmarks/…, docs/…, tests/…, specdraft/…, metrics/….
PATH = re.compile(
    r"(?<![\w/.-])((?:results|benchmarks|docs|tests|specdraft|metrics)/[\w./-]*[\w/])"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _named_paths(page: Path) -> set[Path]:
    text = page.read_text(encoding="utf-8")
    found = {ROOT / m for m in PATH.findall(text)}
    found |= {(page.parent / m).resolve() for m in LINK.findall(text) if "://" not in m}
    return {p for p in found if "<" not in str(p) and "…" not in str(p)}


def test_every_path_a_page_names_exists():
    missing = [
        f"{page.relative_to(ROOT)} names {path.relative_to(ROOT)}"
        for page in PAGES
        for path in sorted(_named_paths(page))
        if not path.exists()
    ]
    assert not missing, "\n".join(missing)


def test_readme_demo_table_is_the_committed_metrics():
    metrics = json.loads((ROOT / "results" / "demo" / "metrics.json").read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for draft in ("baseline", "reference", "final"):
        m = metrics[draft]
        cells = f"| {m['alpha']:.3f} | {m['alpha_greedy']:.3f} | {m['spec_alpha']:.3f} | {m['tau']:.2f} |"
        rows = [line for line in readme.splitlines() if line.startswith(f"| {draft}")]
        assert rows and rows[0].endswith(cells), (
            f"README's {draft} row should end with {cells} (results/demo/metrics.json)"
        )


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Repository layout", 1)[1].split("\n## ", 1)[0]
    words = set(re.findall(r"[\w]+", layout))
    unlisted = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "specdraft").rglob("*.py"))
        if path.stem not in ("__init__", "__main__")
        and path.parent.name != "stages"
        and path.stem not in words
    ]
    assert not unlisted, f"README's repository layout does not name: {unlisted}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_anchor_a_page_links_exists():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text("utf-8")):
            linked = (page.parent / target).resolve() if target else page
            headings = re.findall(r"^#+ (.+)$", linked.read_text("utf-8"), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{page.relative_to(ROOT)} links {target}#{anchor}")
    assert not broken, "\n".join(broken)
