"""The layout of mkt_torchrec/evaluation/: no import cycle (function-level imports included), no module reaching
into another's private (underscore) names, every module under 900 lines, and the report templates shipped."""

from __future__ import annotations

import ast
import fnmatch
import os
import tomllib
from typing import Dict, List, Set, Tuple

from tests.conftest import REPO

PACKAGE = "mkt_torchrec.evaluation"
ROOT = os.path.join(REPO, *PACKAGE.split("."))
MAX_LINES = 900


def _modules() -> Dict[str, str]:
    """``{dotted module name: path}`` of every Python file under evaluation/ (subpackages included)."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([PACKAGE, *rel])] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].endswith("__init__.py")
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name / Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _scan(module: str) -> Tuple[Set[str], List[str]]:
    """(evaluation modules ``module`` imports anywhere in its body, its cross-file private uses)."""
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read(), MODULES[module])
    deps: Set[str] = set()
    private: List[str] = []
    aliases: Dict[str, str] = {}  # local name -> evaluation module it is bound to
    for node in ast.walk(tree):  # every import, at module level or inside a function
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in MODULES:  # from mkt_torchrec.evaluation import bootstrap
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                elif source in MODULES:
                    deps.add(source)
                    if _is_private(a.name) and source != module:
                        private.append(f"{module}:{node.lineno}: from {source} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = aliases.get(_dotted(node.value), _dotted(node.value))
            if owner in MODULES and owner != module:
                private.append(f"{module}:{node.lineno}: {owner}.{node.attr}")
    deps.discard(module)
    return deps, private


def _graph() -> Dict[str, Set[str]]:
    return {m: _scan(m)[0] for m in MODULES}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` (as a path that returns to its start), or []."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_checker_sees_cycles_and_function_level_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
    assert len(MODULES) > 5 and f"{PACKAGE}.metrics" in MODULES


def test_evaluation_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert not cycle, "import cycle in evaluation/ (function-level imports count): " + " -> ".join(cycle)


def test_no_module_uses_another_modules_private_names():
    found = [p for m in sorted(MODULES) for p in _scan(m)[1]]
    assert not found, "private names used across evaluation modules (make them public):\n" + "\n".join(found)


def test_every_evaluation_module_is_under_the_line_limit():
    too_long = {}
    for path in MODULES.values():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            too_long[os.path.relpath(path, REPO)] = n
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_report_templates_are_package_data():
    """The wheel carries the templates only if pyproject.toml lists them as package data."""
    templates = os.path.join(ROOT, "templates")
    names = sorted(os.listdir(templates)) if os.path.isdir(templates) else []
    assert names, "evaluation/templates/ holds the report templates"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-data", {}).get(PACKAGE, [])
    for name in names:
        assert any(fnmatch.fnmatch(f"templates/{name}", p) for p in patterns), (name, patterns)
