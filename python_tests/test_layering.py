"""Arrows point down: every module of s2d_ext imports only its own layer's group and the layers below it, and
no import cycle joins s2d_ext modules. Imports inside functions count as much as those at the top.

The layers, lowest first (a layer with several groups: the groups do not import each other)::

    base        _native, _machine, _transfer, _argtypes, _data, packaged_models   (no s2d_ext imports)
    kernels     ops, triton
    target      target, _cache_compat, row_invariant, compute
    draft       draft
    engine      engine
    apis        driver | server | checkpoints
    train       train
    bench       bench | demo
    cli         cli, __main__
    integrations  integrations (vLLM, Ray Serve: other servers' plug-ins)

NOTE: the issue's order is ops/triton < target < draft < engine < driver/server < bench/train < cli; within
bench/train the bench measures the models training makes (the local family), never the other way round.

An edge is what a module makes Python load: ``import a.b`` and ``from a.b import c`` load ``a.b`` (or
``a.b.c`` when that is a module); the top package's lazy names (``from s2d_ext import speculate``,
``s2d_ext.Engine``) load the module they name. A module's own ancestor packages load before it anyway, so
they are no edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import s2d_ext

PACKAGE = Path(s2d_ext.__file__).resolve().parent

LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("_native", "_machine", "_transfer", "_argtypes", "_data", "packaged_models")},
    {"kernels": ("ops", "triton")},
    {"target": ("target", "_cache_compat", "row_invariant", "compute")},
    {"draft": ("draft",)},
    {"engine": ("engine",)},
    {"driver": ("driver",), "server": ("server",), "checkpoints": ("checkpoints",)},
    {"train": ("train",)},
    {"bench": ("bench",), "demo": ("demo",)},
    {"cli": ("cli", "__main__")},
    {"integrations": ("integrations",)},  # NOTE: other servers' plug-ins build on the CLI's loaders
]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def place(module: str) -> tuple[int, str] | None:
    """(layer, group) of a module; None for the top package (its names load lazily)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for layer, groups in enumerate(LAYERS):
        for group, members in groups.items():
            if parts[1] in members:
                return layer, group
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def _loaded(name: str) -> str | None:
    """The module an import of ``name`` loads: ``name`` itself, or its nearest enclosing module."""
    if name.split(".")[0] != "s2d_ext":
        return None
    if name.count(".") == 1 and name.split(".")[1] in s2d_ext._LAZY:
        return s2d_ext._LAZY[name.split(".")[1]][0]
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> set[str]:
    """The s2d_ext modules ``module`` loads, anywhere in its code (see the module docstring)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            lazy = node.value.id == "s2d_ext" and node.attr in s2d_ext._LAZY
            names = [f"s2d_ext.{node.attr}"] if lazy else []
        found.update(loaded for name in names if (loaded := _loaded(name)) is not None)
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return found - ancestors - {module}


GRAPH = {module: imports(module) for module in MODULES}


def test_the_scan_sees_imports_inside_functions_and_lazy_names():
    # NOTE: the scan would catch them: these are in-function imports and lazy package names.
    assert "s2d_ext.ops.verify_reference" in GRAPH["s2d_ext.ops.verify"]
    assert "s2d_ext.driver.speculation" in GRAPH["s2d_ext.demo"]
    assert "s2d_ext.engine.host_reads" in GRAPH["s2d_ext.engine.request"]
    assert "s2d_ext.engine" not in GRAPH["s2d_ext.engine.request"]  # its own package: no edge


def test_every_module_has_a_layer():
    for module in MODULES:
        place(module)


def test_arrows_point_down_or_stay_in_their_group():
    wrong = []
    for module, targets in GRAPH.items():
        own = place(module)
        if own is None:
            continue
        for target in sorted(targets):
            other = place(target)
            if other is None:
                continue
            if other[0] > own[0]:
                wrong.append(f"{module} ({own[1]}) imports {target} ({other[1]}), a layer above")
            elif other[0] == own[0] and other[1] != own[1]:
                wrong.append(f"{module} ({own[1]}) imports {target} ({other[1]}), sideways")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> None:  # NOTE: Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(GRAPH[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, cycles
