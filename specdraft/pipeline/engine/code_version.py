"""A stage's code version: a hash of the code it runs, and of nothing else.

Starting from the stage module's `run`, every specdraft function, class and module-level value it
references is followed, transitively, by reading the sources (nothing is imported): names a
function uses, attributes of specdraft modules (`parallel.map_shards`), imports inside functions,
and the chains of `from specdraft.x import y` re-exports. Each reached definition is hashed as its
syntax tree with docstrings removed, so comments, docstrings, blank lines and formatting do not
count, and code the stage never reaches does not either.

`specdraft.pipeline.config` is not followed: a stage's config values are in its key already, and
what that module holds besides them (help strings, validation) does not change what a stage
computes. Libraries outside specdraft are not hashed (their versions are the environment's).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

NOT_FOLLOWED = ("specdraft.pipeline.config",)


@functools.cache
def _find_module(name: str):
    """The spec of module `name`, or None when it names an attribute of a module. Imports no
    module itself (only its parent packages)."""
    parent = name.rpartition(".")[0]
    if parent:
        parent_spec = _find_module(parent)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def module_source(name: str) -> str | None:
    """The source of specdraft module `name`, or None when `name` is not a module."""
    spec = _find_module(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text()


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.rsplit(".", node.level)[0]
    return f"{package}.{node.module}" if node.module else package


@dataclass
class _Module:
    """What a module's top level defines: name -> definition node, or an import of a specdraft
    name (module, attribute or None for a module itself)."""

    name: str
    defs: dict[str, list[ast.AST]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _top_level(statements: list[ast.stmt]):
    """Top-level statements, looking into module-level if/try blocks (optional imports)."""
    for stmt in statements:
        if isinstance(stmt, ast.If | ast.Try):
            yield from _top_level(stmt.body + stmt.orelse + getattr(stmt, "finalbody", []))
            for handler in getattr(stmt, "handlers", []):
                yield from _top_level(handler.body)
        else:
            yield stmt


def _imports_of(module: str, node: ast.stmt) -> dict[str, tuple[str, str | None]]:
    found = {}
    if isinstance(node, ast.ImportFrom):
        source = _resolve_from(module, node)
        if source.startswith("specdraft"):
            for alias in node.names:
                found[alias.asname or alias.name] = (source, alias.name)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("specdraft"):
                # `import specdraft.a.b` binds `specdraft`; `import specdraft.a.b as m` binds m
                bound = alias.asname or alias.name.partition(".")[0]
                found[bound] = (alias.asname and alias.name or bound, None)
    return found


@functools.cache
def _parse(name: str) -> _Module | None:
    source = module_source(name)
    if source is None:
        return None
    mod = _Module(name)
    for stmt in _top_level(ast.parse(source).body):
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            mod.defs.setdefault(stmt.name, []).append(stmt)
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        mod.defs.setdefault(node.id, []).append(stmt)
        else:
            mod.imports.update(_imports_of(name, stmt))
    return mod


def _references(node: ast.AST, module: str) -> tuple[set[str], dict[str, tuple[str, str | None]]]:
    """Global names a definition uses, and the specdraft names it imports inside its body."""
    names, imported = set(), {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            chain = []
            base = sub
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                names.add(".".join([base.id, *reversed(chain)]))
        elif isinstance(sub, ast.ImportFrom | ast.Import) and sub is not node:
            imported.update(_imports_of(module, sub))
    return names, imported


class _Walker:
    def __init__(self):
        self.parts: dict[str, str] = {}  # "module:name" -> normalised source of what it defines
        self.seen: set[tuple[str, str | None]] = set()

    def symbol(self, module: str, name: str | None) -> None:
        """Follow `name` of `module` (None: the module itself, nothing to hash until used)."""
        if module.startswith(NOT_FOLLOWED) or (module, name) in self.seen:
            return
        self.seen.add((module, name))
        if name is None:
            return
        mod = _parse(module)
        if mod is None:  # `module` is itself an attribute of its parent
            parent, _, attr = module.rpartition(".")
            self.symbol(parent, attr)
            return
        if _parse(f"{module}.{name}") is not None:  # a submodule
            self.seen.discard((module, name))
            self.symbol(f"{module}.{name}", None)
            return
        if name in mod.imports:
            self.symbol(*mod.imports[name])
            return
        for node in mod.defs.get(name, []):
            self.parts[f"{module}:{name}:{id(node)}"] = ast.dump(
                _strip_docstrings(_copy(node)), include_attributes=False
            )
            names, imported = _references(node, module)
            for source, attr in imported.values():
                self.symbol(source, attr)
            for dotted in names:
                self.dotted(mod, {**mod.imports, **imported}, dotted)

    def dotted(self, mod: _Module, imports: dict, dotted: str) -> None:
        """A name as used in `mod` (with `imports` in scope): `f`, or `m.f` where `m` is a
        specdraft module."""
        head, *rest = dotted.split(".")
        if head in imports:
            source, attr = imports[head]
            target = source if attr is None else f"{source}.{attr}"
            if rest and _parse(target) is not None:  # `module.attr`: follow the attribute
                for i in range(len(rest)):
                    prefix = ".".join([target, *rest[:i]])
                    if _parse(prefix) is not None and _parse(f"{prefix}.{rest[i]}") is None:
                        self.symbol(prefix, rest[i])
                        break
            else:
                self.symbol(source, attr)
        elif head in mod.defs:
            self.symbol(mod.name, head)


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node)).body[0]


@functools.cache
def code_version(module: str, entry: str = "run") -> str:
    """Hash of the code that `module.entry` runs (see the module docstring for the rule)."""
    walker = _Walker()
    walker.symbol(module, entry)
    digest = hashlib.sha256()
    for key in sorted(walker.parts, key=lambda k: (k.rsplit(":", 1)[0], walker.parts[k])):
        digest.update(key.rsplit(":", 1)[0].encode())
        digest.update(walker.parts[key].encode())
    return digest.hexdigest()[:12]


def reached(module: str, entry: str = "run") -> list[str]:
    """The `module:name` definitions a stage's code version covers (for tests and `--explain`)."""
    walker = _Walker()
    walker.symbol(module, entry)
    return sorted({k.rsplit(":", 1)[0] for k in walker.parts})
