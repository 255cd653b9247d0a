"""The drafts and the driver never import a ``*_reference`` module: the references are the ops' specs and
oracles (plain PyTorch, slow), reached only through an op's ``backend="reference"``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "s2d_ext"


def hot_path_modules() -> list[Path]:
    """The drafts, the target runner, the engine, the drivers over it and the server."""
    found = [PACKAGE / "target.py"]
    for folder in ("draft", "engine", "driver", "server"):
        found += sorted((PACKAGE / folder).rglob("*.py"))
    return [path for path in found if path.is_file()]


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (anywhere: also inside functions),
    including ``from package import module`` targets."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_the_scan_sees_the_hot_path():
    names = {p.relative_to(PACKAGE).as_posix() for p in hot_path_modules()}
    assert {"draft/sorted_draft.py", "draft/hf_draft.py", "engine/engine.py", "driver/speculator.py"} <= names
    # NOTE: the scan would catch one: the ops wrappers do import their references.
    assert any(m.endswith("_reference") for m in imported_modules(PACKAGE / "ops" / "verify.py"))


@pytest.mark.parametrize("path", hot_path_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_reference_import(path):
    modules = imported_modules(path)
    offending = [m for m in modules if any(part.endswith("_reference") for part in m.split("."))]
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}"


def kernel_modules() -> list[Path]:
    """The ops wrappers (not the references themselves) and the Triton kernels."""
    found = [p for p in sorted((PACKAGE / "ops").glob("*.py")) if not p.stem.endswith("_reference")]
    return found + sorted((PACKAGE / "triton").glob("*.py"))


def module_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", kernel_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_wrappers_reach_their_reference_only_through_backend_reference(path):
    # NOTE: a wrapper imports its reference inside the backend="reference" branch only; what every backend
    # runs (the top-k / top-p threshold, sanitising) lives in s2d_ext/ops/logit_filters.py.
    offending = [m for m in module_level_imports(path) if m.split(".")[-1].endswith("_reference")]
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending} at module level"


@pytest.mark.parametrize("path", hot_path_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_decoding_path_never_imports_training_or_the_checkout(path):
    # NOTE: arrows point down: training (s2d_ext.train) and the checkout's bench/ and tools/ sit above the
    # decoding path, so a server that only decodes never loads them.
    modules = imported_modules(path)
    offending = [m for m in modules if m.startswith(("s2d_ext.train", "bench", "tools"))]
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}"
