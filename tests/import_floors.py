"""The project's floors (docs/architecture.md), held against its imports.

`python -m tests.import_floors` reads every module of the library and the Prefect layer
with `ast` (imports inside functions too), and prints each import that points up a floor and
each circle of modules importing each other; it exits 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folders of the Prefect layer, installed as polar_cube.<name> (pyproject's package-dir)
LAYER_FOLDERS = ("tasks", "flows", "deployments", "cli")
# module (or package) name -> floor, the most specific prefix wins; docs/architecture.md
FLOORS = {
    "polar_cube": 1,
    "polar_cube.sources": 2,
    "polar_cube.resample": 3,
    "polar_cube.rasterize": 3,
    "polar_cube.dataset": 4,
    "polar_cube.zarr_store": 4,
    "polar_cube.cube": 5,
    "polar_cube.preflight": 5,
    "polar_cube.servers": 6,
    **{f"polar_cube.{folder}": 7 for folder in LAYER_FOLDERS},
}


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} of the library and the Prefect layer."""
    modules = {}
    roots = [(REPO / "polar_cube", "polar_cube")]
    roots += [(REPO / folder, f"polar_cube.{folder}") for folder in LAYER_FOLDERS]
    for folder, package in roots:
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def floor(module: str) -> int:
    prefixes = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    return FLOORS[max(prefixes, key=len)]


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                names.append(node.module)
            for name in names:
                target = _known(name, modules)
                if target and target != module:
                    graph[module].add(target)
    return graph


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` is or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a floor to a higher one."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other in a loop (Tarjan's strongly connected
    components of more than one module), ignoring a package's `__init__` that only hands on
    its own modules' names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target.startswith(node + "."):
                continue  # a package importing its own modules
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    graph = imports(project_modules())
    up, loops = upward(graph), circles(graph)
    for a, b in up:
        print(f"up a floor: {a} (floor {floor(a)}) imports {b} (floor {floor(b)})")
    for group in loops:
        print(f"circle: {' <-> '.join(group)}")
    edges = sum(len(targets) for targets in graph.values())
    print(f"{len(graph)} modules, {edges} imports: {len(up)} up a floor, {len(loops)} circles")
    return 1 if up or loops else 0


if __name__ == "__main__":
    sys.exit(main())
