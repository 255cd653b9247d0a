"""Command-line interface of s2d_ext: ``python -m s2d_ext <subcommand> ...``.

Every subcommand lives in its own module exposing ``add_parser(subparsers) -> argparse.ArgumentParser`` and
``run(args) -> int``; :data:`SUBCOMMANDS` registers them (module imported lazily by name, so adding a
subcommand is one line here). Modules import torch / transformers inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

#: subcommand name -> module path. Add one line per subcommand.
SUBCOMMANDS: dict[str, str] = {
    "demo": "s2d_ext.cli.demo",
    "generate": "s2d_ext.cli.generate",
    "soft": "s2d_ext.cli.soft",
    "family": "s2d_ext.cli.family",
    "bench": "s2d_ext.cli.bench",
    "serve": "s2d_ext.cli.serve",
}


class UsageError(ValueError):
    """Bad command-line input detected after parsing (reported like an argparse error, exit status 2)."""


def program_name(argv0: str | None = None) -> str:
    """``s2d`` for the console command, ``python -m s2d_ext`` for the module (not argparse's __main__.py)."""
    name = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "s2d")).name
    return "python -m s2d_ext" if name in ("__main__.py", "-m", "") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Sorted speculative decoding (S2D): demo, generation, SoFT training, local model family.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_path in SUBCOMMANDS.values():
        module = importlib.import_module(module_path)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns the exit status.

    Bad arguments exit with status 2 (argparse); a ValueError/TypeError/OSError raised while
    running is printed as ``error: ...`` with status 1 (a :class:`UsageError` gets the usage line, status 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        args._parser.error(str(exc))  # raises SystemExit(2)
    except (ValueError, TypeError, OSError) as exc:
        # NOTE: OSError covers what transformers raises for a folder without weights or a broken config
        # (and FileNotFoundError / NotADirectoryError for paths): one line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
