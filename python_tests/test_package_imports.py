"""Package code never reaches into the source checkout, so a wheel works where a clone is absent.

Regression test: `s2d bench` put the checkout's bench/ on sys.path and failed from a non-editable install.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "s2d_ext"
CHECKOUT_ONLY = ("bench", "tools", "python_tests")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_package_module_imports_checkout_folders():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in CHECKOUT_ONLY]
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in bad]
    assert not offenders, offenders


def test_no_package_module_edits_sys_path():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("insert", "append")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "path"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "sys"
            ):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders
