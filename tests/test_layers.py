"""The layer rule of docs/architecture.md, checked on the source: every import of an upcycle module (at the top of a
file or inside a function) goes to the importer's own unit or to a layer below it, and no modules import each other
in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "upcycle"

# top first; a unit is a module or a package (its prefix); each layer may import only its own unit and lower layers
LAYERS: list[tuple[str, ...]] = [
    ("upcycle.__main__",),
    ("upcycle.cli",),
    ("upcycle.train",),
    ("upcycle.convert", "upcycle.eval", "upcycle.inspect_model", "upcycle.hub"),
    ("upcycle.card",),
    ("upcycle.methods",),
    ("upcycle.arch", "upcycle.data", "upcycle.checkpoint"),
    ("upcycle",),  # the ground floor: errors, paths, files, tables, assets, lazy, interrupts, auto_registration
    ("upcycle.modeling",),  # the runtime inside every checkpoint: imports nothing else of upcycle
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def unit(module: str) -> str:
    """The longest unit of LAYERS that ``module`` belongs to."""
    units = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    return max(units, key=len)


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def imports(module: str) -> set[str]:
    """The upcycle modules ``module`` imports anywhere in its file (a name from a package that is a submodule
    counts as that submodule)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def test_the_layers_cover_every_module():
    assert "upcycle.train.loop" in GRAPH and GRAPH["upcycle.train.loop"]  # the walk finds modules and imports
    for module in MODULES:
        assert layer(module) is not None


def wrong_way(module: str, targets: set[str]) -> list[str]:
    """The imports of ``module`` that go to another unit of its own layer or to a layer above it."""
    return [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for target in sorted(targets)
        if unit(target) != unit(module) and layer(target) <= layer(module)
    ]


def test_the_rule_itself():
    assert wrong_way("upcycle.methods.moh", {"upcycle.card.render"})  # up
    assert wrong_way("upcycle.data.text", {"upcycle.arch.decoder"})  # sideways, to another unit
    assert not wrong_way("upcycle.methods.moh", {"upcycle.methods.base", "upcycle.files", "upcycle.arch"})


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    wrong = wrong_way(module, GRAPH[module])
    assert not wrong, "\n".join(wrong)


def test_the_runtime_imports_nothing_else_of_upcycle():
    runtime = [m for m in MODULES if unit(m) == "upcycle.modeling"]
    assert runtime
    for module in runtime:
        assert all(target.startswith("upcycle.modeling") for target in GRAPH[module]), module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_in_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert cycles(GRAPH) == []


def test_every_function_of_the_methods_and_the_trainer_reads_on_one_screen():
    """No function in ``methods/`` or ``train/`` is 80 lines or longer (a method's ``convert`` calls its parts)."""
    import ast

    long = []
    for folder in ("methods", "train"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines >= 80:
                        long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
