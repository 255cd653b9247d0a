"""The package's top level: lazy imports (``s2d --help`` loads neither torch nor transformers), public
names that stay the functions whatever submodules get imported, and imports that only point down."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import s2d_ext

PACKAGE = Path(s2d_ext.__file__).parent


def test_import_and_cli_parser_load_no_torch():
    code = (
        "import sys, s2d_ext, s2d_ext.cli; s2d_ext.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_functions_stay_functions_after_submodule_imports():
    import importlib

    for name in (
        "s2d_ext.driver.speculation",
        "s2d_ext.driver.hf_hook",
        "s2d_ext.cli.generate",
        "s2d_ext.engine",
    ):
        importlib.import_module(name)
    from s2d_ext.driver.hf_hook import generate
    from s2d_ext.driver.speculation import speculate

    assert s2d_ext.speculate is speculate and callable(s2d_ext.speculate)
    assert s2d_ext.generate is generate and callable(s2d_ext.generate)
    assert not (PACKAGE / "speculate.py").exists() and not (PACKAGE / "generate.py").exists()
    assert {"Engine", "SamplingParams", "Speculator", "SortedDraft", "ops"} <= set(dir(s2d_ext))


# A layer may import the layers below it only (ops -> draft / target -> engine -> driver / server / cli).
LAYERS = {"ops": 0, "triton": 0, "draft": 1, "target": 1, "engine": 2, "driver": 3, "server": 4, "cli": 5}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "s2d_ext" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def test_arrows_point_down():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        own = LAYERS.get(rel.parts[0].removesuffix(".py"))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                layer = _layer(name)
                if layer is not None and layer > own:
                    wrong.append(f"{rel}: imports {name}")
    assert not wrong, wrong
