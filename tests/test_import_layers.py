"""The packages' import graph: no import cycle between modules (inside a package too), and no package imports
one above it.

Layers, bottom to top: common <- model <- {data_pipeline, outliers, checkpoint} <- parallel <- launcher
(the parallel model asks checkpoint/ for DeepSpeed's file names and the shard merge); the family specs under
model/ may also import data_pipeline (a spec holds its family's data). Every import counts,
also the ones inside functions (a lazy import is still a dependency). Run as a script
(`python tests/test_import_layers.py`) to print the package graph and every import against the layers.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "model", "data_pipeline", "parallel", "outliers", "checkpoint", "launcher")
LAYER = {"common": 0, "model": 1, "data_pipeline": 2, "outliers": 2, "checkpoint": 2, "parallel": 3, "launcher": 4}
CHECKED = ("checkpoint", "data_pipeline", "model", "outliers", "parallel")
# A family's spec holds its data (model/family.py): the family packages and the text families' shared spec sit
# above data_pipeline, which they reach into for their examples. model's core never imports it.
FAMILY_SPECS = ("model.opt", "model.bert", "model.vit", "model.stanhop", "model.text_spec")


def family_data_import(importer: str, target: str) -> bool:
    return target.split(".")[0] == "data_pipeline" and any(
        importer == spec or importer.startswith(spec + ".") for spec in FAMILY_SPECS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (anywhere in the file), resolved to the longest known module name."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package upwards
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for end in range(len(parts), 0, -1):  # `from a.b import c`: c may be a module or a name in a.b
                candidate = ".".join(parts[:end])
                if candidate in modules and candidate != name:
                    found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def against_layers(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a package imports one on its own layer or above (another package)."""
    bad = []
    for importer, targets in sorted(graph.items()):
        mine = importer.split(".")[0]
        for target in sorted(targets):
            theirs = target.split(".")[0]
            if theirs != mine and LAYER[theirs] >= LAYER[mine]:
                bad.append((importer, target))
    return bad


def across_packages(components: list[list[str]]) -> list[list[str]]:
    return [c for c in components if len({name.split(".")[0] for name in c}) > 1]


def test_no_import_cycle_across_packages() -> None:
    assert across_packages(cycles(import_graph())) == []


def test_no_import_cycle_between_modules() -> None:
    # Inside a package too: a lazy import that closes a cycle still ties the modules together (neither can be
    # understood, tested or moved without the other). Registries look built-in entries up by module name
    # (importlib) instead: model/family.py's BUILTIN_FAMILIES, data_pipeline/source_registry.py's sources.
    assert cycles(import_graph()) == []


def test_packages_import_only_packages_below_them() -> None:
    graph = import_graph()
    assert [(a, b) for a, b in against_layers(graph)
            if a.split(".")[0] in CHECKED and not family_data_import(a, b)] == []
    # The checkpoint package sits on the model (and common) only: consolidation and the weights format are
    # reused by the parallel engine and the launcher, never the other way round.
    assert {t.split(".")[0] for name, targets in graph.items() if name.startswith("checkpoint")
            for t in targets} <= {"checkpoint", "common", "model"}


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    graph = {"checkpoint.b": {"parallel.a"}, "parallel.a": {"launcher.c"}, "launcher.c": {"checkpoint.b"},
             "model.x": {"model.y"}, "model.y": {"model.x"}}
    assert cycles(graph) == [["checkpoint.b", "launcher.c", "parallel.a"], ["model.x", "model.y"]]
    assert across_packages(cycles(graph)) == [["checkpoint.b", "launcher.c", "parallel.a"]]
    assert against_layers(graph) == [("checkpoint.b", "parallel.a"), ("parallel.a", "launcher.c")]


if __name__ == "__main__":
    graph = import_graph()
    edges: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for importer, targets in graph.items():
        for target in targets:
            if target.split(".")[0] != importer.split(".")[0]:
                edges[importer.split(".")[0]][target.split(".")[0]] += 1
    print("package -> packages it imports (module pairs):")
    for package in PACKAGES:
        print(f"  {package:14s}", ", ".join(f"{t} ({n})" for t, n in sorted(edges[package].items())) or "-")
    print("module cycles across packages:", across_packages(cycles(graph)) or "none")
    inside = [c for c in cycles(graph) if c not in across_packages(cycles(graph))]
    print("module cycles inside a package:", inside or "none")
    print("imports on the same layer or upwards:")
    for importer, target in against_layers(graph):
        print(f"  {importer} -> {target}")
