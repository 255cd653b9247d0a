"""The native build's driver, shared by ``setup.py``, ``tools/dev_build.py`` and CI's sanitizer build.

``CMakeLists.txt`` owns sources, flags and CUDA architectures; this file only finds the tools, keys the build
folder by environment and runs CMake. Every failure a user can meet (no compiler, an old cmake, no CUDA
toolkit, a torch outside the supported range) is a :class:`BuildError` with one line that says what to do.

Tool lookup (no venv activation needed): the Python environment's own ``cmake`` / ``ninja`` first (the PyPI
packages of those names put their binaries next to ``sys.executable``), then the ones on PATH when new enough.

This file imports nothing but the standard library at module level, so ``setup.py`` can read it before torch
is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# The op libraries, one _<op>_C per op (s2d_ext/_native.py keeps the same tuple: it cannot import tools/).
OPS = ("verify", "exit_head", "kv_compact", "invariant_linear")
ROOT = Path(__file__).resolve().parent.parent
MIN_CMAKE = (3, 26)
#: torch releases the native code is built and tested against: [low, high).
TORCH_RANGE = ((2, 11), (2, 14))
BUILD_INFO = "_build_info.json"
PIP_COMMAND = "python -m pip install --no-build-isolation ."
DEFAULT_CUDA_HOMES = (Path("/usr/local/cuda"),)


class BuildError(RuntimeError):
    """A build problem the user can fix; ``str()`` is the one line to show."""


# --------------------------------------------------------------------------------------------- tools
def _env_bin_dirs() -> list[Path]:
    """Folders of the running Python environment that hold console scripts (venv/bin), in order."""
    dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for module, attribute in (("cmake", "CMAKE_BIN_DIR"), ("ninja", "BIN_DIR")):
        try:
            found = getattr(__import__(module), attribute, None)
        except Exception:  # noqa: BLE001  (a broken package must not stop the search)
            found = None
        if found:
            dirs.append(Path(found))
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _version_of(binary: str) -> tuple[int, ...] | None:
    try:
        text = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _candidates(name: str) -> list[str]:
    found = [str(d / name) for d in _env_bin_dirs() if (d / name).is_file() and os.access(d / name, os.X_OK)]
    on_path = shutil.which(name)
    if on_path and on_path not in found:
        found.append(on_path)
    return found


def find_cmake() -> str:
    """The environment's cmake, else PATH's if >= 3.26; else a BuildError naming what to install."""
    seen = []
    for binary in _candidates("cmake"):
        version = _version_of(binary)
        if version is not None and version[:2] >= MIN_CMAKE:
            return binary
        seen.append(f"{'.'.join(map(str, version or ())) or '?'} at {binary}")
    have = f" (found {', '.join(seen)})" if seen else ""
    raise BuildError(
        f"s2d_ext needs cmake >= {'.'.join(map(str, MIN_CMAKE))}{have}: "
        f"run `{sys.executable} -m pip install cmake ninja`, then build again"
    )


def find_generator() -> tuple[str, str | None]:
    """(CMake generator, make program): Ninja from the environment or PATH, else Unix Makefiles."""
    ninja = _candidates("ninja")
    if ninja:
        return "Ninja", ninja[0]
    make = shutil.which("make")
    if make:
        return "Unix Makefiles", make
    raise BuildError(f"s2d_ext needs ninja or make: run `{sys.executable} -m pip install ninja`")


def check_compiler() -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise BuildError(
            "s2d_ext needs a C++17 compiler and none was found (set CXX, or install g++: "
            "`apt-get install g++` on Debian/Ubuntu)"
        )


# --------------------------------------------------------------------------------------------- torch
def import_torch():
    try:
        import torch
    except ImportError:
        raise BuildError(
            "s2d_ext builds its kernels against the torch you run, and none is importable here. "
            f"Install torch first, then build without pip's isolated environment: `{PIP_COMMAND}` "
            "(see README, Install)"
        ) from None
    return torch


def torch_version(torch) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_torch_range(torch) -> None:
    low, high = TORCH_RANGE
    if os.environ.get("S2D_ALLOW_ANY_TORCH") == "1":
        return
    if not low <= torch_version(torch) < high:
        raise BuildError(
            f"s2d_ext supports torch >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; this environment has "
            f"torch {torch.__version__} (install e.g. torch==2.13.0, or set S2D_ALLOW_ANY_TORCH=1 to try "
            "anyway)"
        )


def cuda_toolkit() -> tuple[Path | None, str]:
    """(nvcc path or None, why not). A toolkit is nvcc with its cuda_runtime.h beside it.

    Looked for in $CUDA_HOME, $CUDA_PATH, PATH and /usr/local/cuda, in that order; the first complete one
    wins.
    NOTE: an nvcc on PATH may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc``) with no headers
    next to it, so an incomplete candidate does not end the search.
    """
    homes = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates = [home / "bin" / "nvcc" for home in homes]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates += [home / "bin" / "nvcc" for home in DEFAULT_CUDA_HOMES]
    seen = []
    for nvcc in candidates:
        if not nvcc.exists():
            continue
        nvcc = nvcc.resolve()
        home = nvcc.parent.parent
        headers = [home / "include" / "cuda_runtime.h", *home.glob("targets/*/include/cuda_runtime.h")]
        if any(h.exists() for h in headers):
            return nvcc, ""
        seen.append(str(nvcc))
    if seen:
        return None, f"no cuda_runtime.h next to {', '.join(seen)} (set CUDA_HOME to a complete CUDA toolkit)"
    return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"


def want_cuda(torch) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and if not, why (S2D_WITH_CUDA=0|1 forces it)."""
    forced = os.environ.get("S2D_WITH_CUDA")
    if forced == "0":
        return False, "S2D_WITH_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            raise BuildError(f"S2D_WITH_CUDA=1 but torch {torch.__version__} is a CPU build")
        return False, f"torch {torch.__version__} is a CPU build"
    nvcc, why = cuda_toolkit()
    if nvcc is None:
        if forced == "1":
            raise BuildError(f"S2D_WITH_CUDA=1 but {why}")
        return False, why
    return True, ""


def cmake_cuda_archs() -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", torch syntax) in CMake syntax ("80;90a")."""
    torch_style = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    archs = []
    for arch in torch_style.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if arch:
            archs.append(arch.replace(".", ""))
    return ";".join(archs)


def environment_key(torch, with_cuda: bool) -> str:
    """Python, torch version, CUDA on/off and torch's location: two environments never share a folder."""
    where = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    kind = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return f"{python}-torch{torch.__version__.replace('+', '_')}-{kind}-{where}"


def build_info(torch, with_cuda: bool) -> dict:
    """What the libraries were built against; ``s2d_ext._native`` compares it with the running torch."""
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }


def write_build_info(folder: Path, info: dict) -> None:
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")


# --------------------------------------------------------------------------------------------- cmake
def configure(
    build_dir: Path,
    *,
    with_cuda: bool,
    options: dict[str, str] | None = None,
    quiet: bool = False,
) -> str:
    """Configure ``build_dir``; returns the cmake binary used."""
    check_compiler()
    cmake = find_cmake()
    generator, make_program = find_generator()
    build_dir.mkdir(parents=True, exist_ok=True)
    command = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build_dir),
        "-G",
        generator,
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DS2D_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        f"-DS2D_CUDA_ARCHS={cmake_cuda_archs()}",
    ]
    if make_program:
        command.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
    if with_cuda:
        nvcc, _ = cuda_toolkit()
        command.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    for key, value in (options or {}).items():
        command.append(f"-D{key}={value}")
    _run(command, quiet=quiet, what="CMake configure")
    return cmake


def build(build_dir: Path, targets: list[str] | None = None, *, quiet: bool = False) -> None:
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    command = [find_cmake(), "--build", str(build_dir), "-j", jobs]
    if targets:
        command += ["--target", *targets]
    _run(command, quiet=quiet, what="CMake build")


def _run(command: list[str], *, quiet: bool, what: str) -> None:
    result = subprocess.run(command, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        if quiet:
            sys.stderr.write((result.stdout or "") + (result.stderr or ""))
        raise BuildError(
            f"{what} failed (exit {result.returncode}); its output is above: {' '.join(command)}"
        )
