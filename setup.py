"""Drives CMake (CMakeLists.txt owns sources, flags and CUDA architectures).

Build against the installed torch: ``pip install --no-build-isolation -e .``
Environment:
  TORCH_CUDA_ARCH_LIST  CUDA architectures, torch syntax ("8.0;9.0a"); default "8.0;9.0a".
  S2D_WITH_CUDA=0|1     force the CUDA kernels off/on (default: on when torch has CUDA and nvcc exists).
  MAX_JOBS              parallel compile jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
OPS = ("verify", "exit_head", "kv_compact")


def _cmake_cuda_archs() -> str:
    torch_style = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    archs = []
    for arch in torch_style.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if arch:
            archs.append(arch.replace(".", ""))
    return ";".join(archs)


def _want_cuda() -> bool:
    forced = os.environ.get("S2D_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc")
    return torch.version.cuda is not None and Path(nvcc).exists()


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        import torch

        # NOTE: a fixed folder (not pip's temporary one) keeps rebuilds incremental.
        build_dir = Path(os.environ.get("S2D_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DS2D_WITH_CUDA={'ON' if _want_cuda() else 'OFF'}",
            f"-DS2D_CUDA_ARCHS={_cmake_cuda_archs()}",
        ]
        cuda_home = os.environ.get("CUDA_HOME")
        if cuda_home:
            configure.append(f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc")
        subprocess.check_call(configure)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        targets = [ext.target for ext in self.extensions]
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *targets])
        for ext in self.extensions:
            built = build_dir / f"{ext.target}.so"
            destination = Path(self.get_ext_fullpath(ext.name))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, destination)


setup(
    packages=find_packages(include=["s2d_ext", "s2d_ext.*"]),
    ext_modules=[
        CMakeExtension(f"s2d_ext._{op}_C", f"_{op}_C")
        for op in OPS
        if any((ROOT / "csrc" / op).glob("*_cpu.cpp"))
    ],
    cmdclass={"build_ext": CMakeBuild},
)
