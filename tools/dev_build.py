"""Incremental build of one op library into the package, for development.

    python tools/dev_build.py verify        # builds s2d_ext/_verify_C*.so
    python tools/dev_build.py --cuda-check  # compiles every .cu for sm_80 and sm_90a (no GPU needed)

Each op builds in its own folder (build/dev-<op>), so several ops can be rebuilt at once.
``pip install --no-build-isolation -e .`` remains the way to install everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_op(op: str) -> Path:
    import torch

    build_dir = ROOT / "build" / f"dev-{op}"
    subprocess.check_call(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DS2D_WITH_CUDA={'ON' if torch.version.cuda and shutil.which('nvcc') else 'OFF'}",
        ],
        stdout=subprocess.DEVNULL,
    )
    subprocess.check_call(
        [
            "cmake",
            "--build",
            str(build_dir),
            "--target",
            f"_{op}_C",
            "-j",
            os.environ.get("MAX_JOBS", str(os.cpu_count())),
        ]
    )
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    destination = ROOT / "s2d_ext" / f"_{op}_C{suffix}"
    shutil.copyfile(build_dir / f"_{op}_C.so", destination)
    return destination


def cuda_compile_check(archs: str) -> None:
    """Compile every csrc/*/*.cu with nvcc for ``archs`` (CMake syntax, e.g. "80;90a")."""
    import torch

    build_dir = ROOT / "build" / "cuda-check"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    subprocess.check_call(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            "-DS2D_CUDA_COMPILE_CHECK=ON",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DS2D_CUDA_ARCHS={archs}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
        ]
    )
    subprocess.check_call(
        ["cmake", "--build", str(build_dir), "-j", os.environ.get("MAX_JOBS", str(os.cpu_count()))]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ops", nargs="*", help="ops to build (verify, exit_head, kv_compact)")
    parser.add_argument("--cuda-check", action="store_true", help="compile every .cu file with nvcc")
    parser.add_argument("--archs", default="80;90a")
    args = parser.parse_args()
    if args.cuda_check:
        cuda_compile_check(args.archs)
    for op in args.ops:
        print(f"built {build_op(op)}")


if __name__ == "__main__":
    main()
