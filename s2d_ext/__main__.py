"""``python -m s2d_ext``: see :mod:`s2d_ext.cli` (subcommands demo, generate, soft, family, ...)."""

import sys

from s2d_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
