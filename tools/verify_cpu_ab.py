"""Compare the CPU verify kernel of a git revision with the working tree's, in one process.

    python tools/verify_cpu_ab.py                   # base = HEAD
    python tools/verify_cpu_ab.py --base HEAD~3 --trials 5000 --rounds 21 --threads 2

Builds tools/verify_cpu_ab.cpp (g++, OpenMP) with the base revision's
csrc/include/s2d/verify_cpu.h and the working tree's, then (1) fuzzes both on random
configurations and fails if any emitted token differs, (2) times both, alternating, on the
issue's comparison case. On a shared machine whose speed drifts, alternating rounds in one
process is the only A/B worth trusting; bench/verify.py stays the source of published figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "csrc/include/s2d/verify_cpu.h"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD", help="git revision of the base kernel")
    parser.add_argument("--trials", type=int, default=2000, help="fuzz configurations (0: skip)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base" / "s2d"
        base_dir.mkdir(parents=True)
        header = subprocess.run(
            ["git", "show", f"{args.base}:{HEADER}"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (base_dir / "verify_cpu.h").write_bytes(header)
        binary = Path(tmp) / "verify_cpu_ab"
        subprocess.run(
            ["g++", "-O3", "-std=c++17", "-fopenmp", "-mf16c", "-Wno-psabi",
             f"-I{tmp}", f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "tools" / "verify_cpu_ab.cpp"),
             "-o", str(binary)],
            check=True,
        )  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        return subprocess.run([str(binary), str(args.trials), str(args.rounds)], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
