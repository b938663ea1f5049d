"""Issue 15's architecture figures for a lorafleet tree: import cycles, imports inside functions, largest modules.

An AST walk over ``platform/lorafleet`` and ``services`` (nothing is imported or run). A "package" is the first
level under ``lorafleet`` (``lorafleet.qa``, ``lorafleet.store``, ...) and ``services`` as a whole. It prints:

- the package pairs that import each other, and the strongly connected groups of packages (cycles of any
  length; both should be zero, since ``lint-imports`` enforces the layers);
- how many imports stand inside a function (only allowed to defer a heavy optional dependency), how many of
  those import project modules, and the third-party or stdlib top-level names the others import;
- the ten largest modules, in lines;
- the library modules that import ``services`` (only entry points may).

``docs/refactor-figures.md`` records these figures before and after the issue. Usage, from the repository root:

    python tests/benchmarks/refactor_figures.py .
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOTS = ("lorafleet", "services")
"""Top-level import names that belong to the project."""

ImportNode = ast.Import | ast.ImportFrom


def find_modules(root: Path) -> dict[str, Path]:
    """Map each dotted module name of ``lorafleet`` (under ``platform/``) and ``services`` to its file."""
    modules: dict[str, Path] = {}
    for base, top in ((root / "platform", "lorafleet"), (root, "services")):
        for path in sorted((base / top).rglob("*.py")):
            name = ".".join(path.relative_to(base).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def package_of(module: str) -> str:
    """The package a module counts under: ``services`` as a whole, else the first level under ``lorafleet``."""
    parts = module.split(".")
    if parts[0] == "services":
        return "services"
    return ".".join(parts[:2])


def is_project(target: str) -> bool:
    """Whether an imported name belongs to the project (``lorafleet`` or ``services``)."""
    return target.split(".")[0] in PROJECT_ROOTS


def import_targets(module: str, node: ImportNode, modules: dict[str, Path]) -> list[str]:
    """The dotted names one import statement in ``module`` brings in.

    ``from x import y`` names the module ``x.y`` when that is a module of the tree, else ``x`` itself;
    relative imports are resolved against ``module`` (a package's ``__init__`` is its own base).
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = module.split(".")
        if modules[module].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        targets.append(full if full in modules else base)
    return targets


def imports_of(tree: ast.AST) -> Iterator[ImportNode]:
    """Every import statement in a tree, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def imports_inside_functions(tree: ast.AST) -> list[ImportNode]:
    """The import statements that stand inside a function (each once, however deeply functions nest)."""
    found: dict[int, ImportNode] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in imports_of(function):
                found.setdefault(id(node), node)
    return list(found.values())


def strongly_connected_groups(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of more than one node that all reach each other, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    nodes = set(edges) | {target for targets in edges.values() for target in targets}
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return groups


def report(root: Path) -> None:
    """Print the figures for the tree at ``root``."""
    modules = find_modules(root)
    trees = {module: ast.parse(path.read_text()) for module, path in modules.items()}

    package_edges: dict[str, set[str]] = defaultdict(set)
    importing_services: set[str] = set()
    inner_total = 0
    inner_project = 0
    inner_external: dict[str, int] = defaultdict(int)
    for module, tree in trees.items():
        for node in imports_of(tree):
            for target in import_targets(module, node, modules):
                if target.startswith("services") and not module.startswith("services"):
                    importing_services.add(module)
                if not is_project(target):
                    continue
                source_package, target_package = package_of(module), package_of(target)
                if source_package != target_package and target_package != "lorafleet":
                    package_edges[source_package].add(target_package)
        for node in imports_inside_functions(tree):
            inner_total += 1
            targets = import_targets(module, node, modules)
            if any(is_project(target) for target in targets):
                inner_project += 1
            else:
                inner_external[targets[0].split(".")[0]] += 1

    mutual = sorted(
        {
            tuple(sorted((a, b)))
            for a in package_edges
            for b in package_edges[a]
            if a in package_edges.get(b, ())
        }
    )
    print("package pairs importing each other (2-cycles):", len(mutual))
    for pair in mutual:
        print("  ", " <-> ".join(pair))
    groups = strongly_connected_groups(package_edges)
    print("strongly connected groups of packages:", len(groups))
    for group in groups:
        print("  ", ", ".join(group))
    print("imports inside functions (platform/ + services/):", inner_total)
    print("largest modules:")
    sizes = sorted(
        ((len(path.read_bytes().splitlines()), module) for module, path in modules.items()), reverse=True
    )
    for lines, module in sizes[:10]:
        print(f"   {lines:5d} {module}")
    print("  of which import lorafleet/services modules:", inner_project)
    print("  third-party/stdlib:", dict(sorted(inner_external.items(), key=lambda item: (-item[1], item[0]))))
    print("library modules importing services:", sorted(importing_services))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the repository root (holds platform/lorafleet and services)")
    report(parser.parse_args().root)


if __name__ == "__main__":
    main()
