"""The package's shape (docs/architecture.md): no import cycle between sortedllm modules, imports of sortedllm
modules at module level (at most 10 inside functions), and no function over 80 lines or 8 parameters (an
autograd forward/backward excepted). Read from the source with `ast`, so the check needs no import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sortedllm"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def targets(node: ast.AST, name: str, is_package: bool, known: dict) -> list[str]:
    """The sortedllm modules an import statement loads (a `from pkg import sub` names the submodule only)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    found = subs if len(subs) == len(node.names) else [target] + subs
    return [t for t in found if t in known]


def scan() -> tuple[dict[str, set], list[str], list[str]]:
    """(import graph at module level, imports inside functions, functions too long or with too many parameters)."""
    known = modules()
    graph, inner, long = {m: set() for m in known}, [], []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(x) for f in functions for x in ast.walk(f) if x is not f}
        for f in functions:
            a = f.args
            params = len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            params -= bool(a.args and a.args[0].arg in ("self", "cls"))
            lines = f.end_lineno - f.lineno + 1
            if (lines > 80 or params > 8) and f.name not in ("forward", "backward"):
                long.append(f"{path.name}:{f.lineno} {f.name} ({lines} lines, {params} parameters)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = targets(node, name, path.name == "__init__.py", known)
                if found and id(node) in nested:
                    inner.append(f"{path.name}:{node.lineno} {found[0]}")
                elif found:
                    graph[name].update(t for t in found if t != name)
    return graph, inner, long


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def scanned():
    return scan()


def test_no_import_cycle(scanned):
    graph = scanned[0]
    assert {"sortedllm.models", "sortedllm.inference.kv"} <= graph["sortedllm.inference.runtime"]
    assert sum(map(len, graph.values())) > 100  # the walk sees the package's imports
    assert cycles(graph) == []


def test_sortedllm_modules_import_at_module_level(scanned):
    assert len(scanned[1]) <= 10, scanned[1]


def test_functions_fit_a_screen_and_eight_parameters(scanned):
    assert scanned[2] == []


def test_the_check_sees_a_cycle_and_an_inner_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .exits import SortedModel\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert targets(node, "sortedllm.cli", False, modules()) == ["sortedllm.exits"]
