"""Incremental build of one op library into the package, for development.

    python tools/dev_build.py verify        # builds s2d_ext/_verify_C*.so
    python tools/dev_build.py --cuda-check  # compiles every .cu for sm_80 and sm_90a (no GPU needed)
    python tools/dev_build.py --sanitize    # CPU kernels with ASan + UBSan in their own folder (CI)

Each op builds in its own folder (build/dev-<op>), so several ops can be rebuilt at once.
``pip install --no-build-isolation -e .`` remains the way to install everything.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import native_build  # noqa: E402

ROOT = native_build.ROOT


def build_op(op: str) -> Path:
    torch = native_build.import_torch()
    with_cuda, _ = native_build.want_cuda(torch)
    build_dir = ROOT / "build" / f"dev-{op}-{native_build.environment_key(torch, with_cuda)}"
    native_build.configure(build_dir, with_cuda=with_cuda, quiet=True)
    native_build.build(build_dir, [f"_{op}_C"])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    destination = ROOT / "s2d_ext" / f"_{op}_C{suffix}"
    shutil.copyfile(build_dir / f"_{op}_C.so", destination)
    native_build.write_build_info(destination.parent, native_build.build_info(torch, with_cuda))
    return destination


def cuda_compile_check(archs: str) -> None:
    """Compile every csrc/*/*.cu with nvcc for ``archs`` (CMake syntax, e.g. "80;90a")."""
    nvcc, why = native_build.cuda_toolkit()
    if nvcc is None:
        raise native_build.BuildError(f"--cuda-check: {why}")
    build_dir = ROOT / "build" / "cuda-check"
    native_build.configure(
        build_dir,
        with_cuda=False,
        options={"S2D_CUDA_COMPILE_CHECK": "ON", "S2D_CUDA_ARCHS": archs, "CMAKE_CUDA_COMPILER": str(nvcc)},
    )
    native_build.build(build_dir)


def sanitizer_build() -> Path:
    """The CPU kernels with -fsanitize=address,undefined in build/sanitize-*; returns the library folder."""
    torch = native_build.import_torch()
    build_dir = ROOT / "build" / f"sanitize-{native_build.environment_key(torch, False)}"
    native_build.configure(build_dir, with_cuda=False, options={"S2D_SANITIZE": "ON"}, quiet=True)
    native_build.build(build_dir, [f"_{op}_C" for op in native_build.OPS])
    libs = build_dir / "lib"
    libs.mkdir(exist_ok=True)
    for library in build_dir.glob("_*_C.so"):
        shutil.copyfile(library, libs / library.name)
    native_build.write_build_info(libs, native_build.build_info(torch, False))
    return libs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ops", nargs="*", help=f"ops to build ({', '.join(native_build.OPS)})")
    parser.add_argument("--cuda-check", action="store_true", help="compile every .cu file with nvcc")
    parser.add_argument("--archs", default="80;90a")
    parser.add_argument(
        "--sanitize", action="store_true", help="build the CPU kernels with ASan + UBSan; prints their folder"
    )
    args = parser.parse_args()
    try:
        if args.cuda_check:
            cuda_compile_check(args.archs)
        if args.sanitize:
            print(sanitizer_build())
        for op in args.ops:
            print(f"built {build_op(op)}")
    except native_build.BuildError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
