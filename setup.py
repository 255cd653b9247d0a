"""Builds the native op libraries with CMake against the torch installed in this environment.

Install (README, Install)::

    python -m pip install torch==2.13.0 cmake ninja setuptools wheel
    python -m pip install --no-build-isolation .        # or -e . for development

NOTE: ``--no-build-isolation`` is the route, as for vLLM and flash-attn: the kernels link against torch's C++
ABI, so they must be built against the very torch that runs them. pip's default isolated build would install
some other torch into a throw-away environment; there torch is not importable, and this file stops at once
with the command above (it never downloads a torch of its own).

Environment:
  TORCH_CUDA_ARCH_LIST  CUDA architectures, torch syntax ("8.0;9.0a"); default "8.0;9.0a".
  S2D_WITH_CUDA=0|1     force the CUDA kernels off/on (default: on when torch has CUDA and a CUDA
                        toolkit exists).
  S2D_BUILD_DIR         CMake build folder (default: build/<python>-<torch>-<cpu|cuXX>-<hash>, one per
                        environment, so two environments never share a CMake cache).
  MAX_JOBS              parallel compile jobs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import native_build  # noqa: E402  (tools/native_build.py: stdlib only)

OPS = native_build.OPS


def _fail(error: Exception) -> None:
    # NOTE: one line, no traceback from deep inside setuptools: SystemExit with a string prints just that.
    raise SystemExit(f"error: {error}")


def _torch_or_fail():
    try:
        torch = native_build.import_torch()
        native_build.check_torch_range(torch)
    except native_build.BuildError as error:
        _fail(error)
    return torch


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        import os

        torch = _torch_or_fail()
        try:
            with_cuda, why_not = native_build.want_cuda(torch)
            if not with_cuda:
                print(f"s2d_ext: CUDA kernels off ({why_not}); building the CPU kernels", file=sys.stderr)
            key = native_build.environment_key(torch, with_cuda)
            build_dir = Path(os.environ.get("S2D_BUILD_DIR") or ROOT / "build" / key).resolve()
            native_build.configure(build_dir, with_cuda=with_cuda)
            native_build.build(build_dir, [ext.target for ext in self.extensions])
        except native_build.BuildError as error:
            _fail(error)
        package_dir = None
        for ext in self.extensions:
            built = build_dir / f"{ext.target}.so"
            destination = Path(self.get_ext_fullpath(ext.name))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, destination)
            package_dir = destination.parent
        self._build_info = native_build.build_info(torch, with_cuda)
        if package_dir is not None:
            native_build.write_build_info(package_dir, self._build_info)

    def copy_extensions_to_source(self) -> None:
        # NOTE: editable installs copy the libraries into the source package; their record goes with them.
        super().copy_extensions_to_source()
        if getattr(self, "_build_info", None) is not None:
            native_build.write_build_info(ROOT / "s2d_ext", self._build_info)


# NOTE: checked when pip asks what the build needs (the first thing it runs), so an isolated build stops in
# seconds with the working command, before any compiler runs. ``setup.py --version`` and similar queries
# do not need torch.
if any(
    arg.startswith(("egg_info", "bdist", "build", "develop", "editable", "dist_info", "install"))
    for arg in sys.argv[1:]
):
    _torch_or_fail()

setup(
    packages=find_packages(include=["s2d_ext", "s2d_ext.*"]),
    package_data={"s2d_ext": [native_build.BUILD_INFO], "s2d_ext.bench": ["data/*.jsonl"]},
    ext_modules=[
        CMakeExtension(f"s2d_ext._{op}_C", f"_{op}_C")
        for op in OPS
        if any((ROOT / "csrc" / op).glob("*_cpu.cpp"))
    ],
    cmdclass={"build_ext": CMakeBuild},
)
