"""The package's shape: imports only go down (no module imports one that imports it back, not even inside
a function), product code does not import the test stand-ins, and a module over ~400 lines says at its top
why it is one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xray_train"
LONG = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every xray_train module ``name`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != name}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as the path of modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_imports_only_go_down():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "xray_train.loss" in graph["xray_train.trainer"]  # the graph sees real imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


#: Product modules that may use the stand-ins: the demo and ``xray-train make-tiny-model`` exist to run them.
USES_STAND_INS = {"xray_train.demo", "xray_train.cli"}


def test_product_code_does_not_import_the_stand_ins():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("xray_train.testing") or name in USES_STAND_INS:
            continue
        stand_ins = {m for m in _imports(name, path, modules) if m.startswith("xray_train.testing")}
        assert not stand_ins, f"{name} imports {sorted(stand_ins)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_a_long_module_says_why_at_its_top(name):
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    if len(text.splitlines()) <= LONG:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert f"{LONG} lines" in docstring, f"{path.name}: {len(text.splitlines())} lines and no reason at its top"
