"""The package's layering: no import cycle between its sub-packages, and storage/ a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import lminfluence

ROOT = Path(lminfluence.__file__).parent


def unit(path: Path) -> str:
    """A module's unit: its sub-package (curvature, scoring, …) or, at the top level, the module itself."""
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.parts[0]


def resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The lminfluence modules an import statement names, as dotted paths below the package."""
    package = list(path.relative_to(ROOT).parent.parts)
    if node.level:
        base = package[: len(package) - (node.level - 1)]
    elif node.module and node.module.startswith("lminfluence"):
        base = []
        node = ast.ImportFrom(module=node.module.removeprefix("lminfluence").lstrip("."), names=node.names, level=0)
    else:
        return []
    stem = base + (node.module.split(".") if node.module else [])
    return [".".join(stem + [a.name]) if not node.module else ".".join(stem) for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """unit → the other units it imports (module-level or inside functions alike)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        me = unit(path)
        graph.setdefault(me, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for target in resolve(path, node):
                    first = target.split(".")[0] if target else ""
                    if first and first != me and first != "__init__" and ((ROOT / first).is_dir() or (ROOT / f"{first}.py").is_file()):
                        graph[me].add(first)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_sub_packages():
    """Every import, also those inside functions, goes one way: a cycle would mean two layers know each other."""
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph) or [])}"


def test_storage_is_a_leaf():
    """storage/ (the layout and atomic writes) imports nothing else of lminfluence."""
    assert import_graph()["storage"] == set()
