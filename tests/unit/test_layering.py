"""Layering: model/ < adapters/ < service/ (the package root's errors/fileio below all), nothing imports
upward, not even lazily inside a function, and no imports form a cycle."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "uniadapter_serve"
LAYERS = {"model": 1, "adapters": 2, "service": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def sources() -> dict[str, Path]:
    found = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):  # model/, adapters/, service/ are symlinks
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                found[module_name(Path(folder) / f)] = Path(folder) / f
    return found


def imports(path: Path, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every `uniadapter_serve` import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                if not top_level_only:
                    visit(child, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno) for a in child.names if a.name.startswith("uniadapter_serve"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("uniadapter_serve"):
                found.append((child.module, child.lineno))
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if not (nested and top_level_only):
                visit(child, top and not nested)

    visit(tree, True)
    return found


def test_the_package_has_the_three_layers():
    names = sources()
    assert {layer(m) for m in names} == {0, 1, 2, 3}


@pytest.mark.parametrize("module", sorted(sources()))
def test_no_upward_import(module):
    path = sources()[module]
    upward = [f"line {line}: {target}" for target, line in imports(path, top_level_only=False)
              if layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports from a higher layer: {upward}"


def test_no_import_cycles():
    """Not even through imports made only for type checking or inside functions."""
    modules = sources()
    graph = {m: sorted({t for t, _ in imports(p, top_level_only=False) if t in modules and t != m})
             for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")


MAX_SERVICE_CHAIN = 7
"""modules in the longest import chain inside service/ (cli > app > a router > ... ): a route stands on few floors"""


def resolved_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules a file imports, at any depth (in functions, under TYPE_CHECKING). `from pkg import
    name` names the module `pkg.name` when there is one, else `pkg` itself (its `__init__`); a package's
    `__init__` is never counted for merely being the parent of an imported module."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uniadapter_serve"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found.update(subs)
            if len(subs) < len(node.names) and node.module in modules:
                found.add(node.module)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest simple path of an acyclic import graph (the cycle test keeps it acyclic)."""
    best: dict[str, list[str]] = {}

    def from_(m: str, seen: tuple[str, ...]) -> list[str]:
        if m in seen:
            pytest.fail(f"import cycle: {' -> '.join([*seen[seen.index(m):], m])}")
        if m not in best:
            tails = [from_(n, (*seen, m)) for n in sorted(graph[m])]
            best[m] = [m, *max(tails, key=len, default=[])]
        return best[m]

    return max((from_(m, ()) for m in sorted(graph)), key=len, default=[])


def test_longest_chain_helper():
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": set(), "d": {"c"}, "e": {"c"}}
    assert longest_chain(graph) == ["a", "b", "d", "c"]


def test_service_import_chain_is_short():
    """The longest chain of imports among service/'s modules (counting imports inside functions and for type
    checking) stays at MAX_SERVICE_CHAIN modules or fewer."""
    prefix = "uniadapter_serve.service"
    modules = sources()
    service = {m: p for m, p in modules.items() if m == prefix or m.startswith(prefix + ".")}
    graph = {m: {t for t in resolved_imports(p, modules) if t in service and t != m} for m, p in service.items()}
    chain = longest_chain(graph)
    short = " > ".join(m.removeprefix(prefix + ".") for m in chain)
    assert len(chain) <= MAX_SERVICE_CHAIN, f"{len(chain)} modules: {short}"
