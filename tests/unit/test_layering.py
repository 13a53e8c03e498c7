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
