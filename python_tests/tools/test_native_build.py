"""tools/native_build.py: the build finds its tools without activation and says in one line what is missing.

Regression tests for the fresh-machine failures: `make demo` ran the system's cmake 3.25 (the venv's cmake 4.x
was not on PATH); two venvs shared one CMake cache (the second built against the first one's torch).
"""

from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import native_build  # noqa: E402


def _fake_tool(folder: Path, name: str, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho '{name} version {version}'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return tool


def test_the_environments_cmake_wins_over_an_old_one_on_path(tmp_path, monkeypatch):
    env_bin = tmp_path / "venv" / "bin"
    mine = _fake_tool(env_bin, "cmake", "4.1.0")
    _fake_tool(tmp_path / "system", "cmake", "3.25.1")
    monkeypatch.setenv("PATH", str(tmp_path / "system"))
    monkeypatch.setattr(native_build, "_env_bin_dirs", lambda: [env_bin])
    assert native_build.find_cmake() == str(mine)


def test_a_new_enough_cmake_on_path_is_used_when_the_environment_has_none(tmp_path, monkeypatch):
    on_path = _fake_tool(tmp_path / "system", "cmake", "3.28.3")
    monkeypatch.setenv("PATH", str(tmp_path / "system"))
    monkeypatch.setattr(native_build, "_env_bin_dirs", lambda: [tmp_path / "empty"])
    assert native_build.find_cmake() == str(on_path)


def test_only_an_old_cmake_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    _fake_tool(tmp_path / "system", "cmake", "3.25.1")
    monkeypatch.setenv("PATH", str(tmp_path / "system"))
    monkeypatch.setattr(native_build, "_env_bin_dirs", lambda: [])
    with pytest.raises(native_build.BuildError) as info:
        native_build.find_cmake()
    message = str(info.value)
    assert "\n" not in message and "3.25.1" in message and "pip install cmake ninja" in message


def test_generator_falls_back_to_make_and_then_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "_env_bin_dirs", lambda: [])
    _fake_tool(tmp_path / "with_make", "make", "4.3")
    monkeypatch.setenv("PATH", str(tmp_path / "with_make"))
    assert native_build.find_generator()[0] == "Unix Makefiles"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(native_build.BuildError, match="pip install ninja"):
        native_build.find_generator()


def test_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(native_build.BuildError, match="C\\+\\+17 compiler"):
        native_build.check_compiler()


def _torch(version: str, cuda: str | None, where: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        __version__=version, __file__=f"{where}/torch/__init__.py", version=types.SimpleNamespace(cuda=cuda)
    )


def test_build_folders_differ_by_environment():
    keys = {
        native_build.environment_key(_torch("2.13.0+cpu", None, "/a"), False),
        native_build.environment_key(_torch("2.13.0+cpu", None, "/b"), False),  # same torch, another venv
        native_build.environment_key(_torch("2.12.0+cpu", None, "/a"), False),
        native_build.environment_key(_torch("2.13.0", "13.0", "/a"), True),
        native_build.environment_key(_torch("2.13.0", "13.0", "/a"), False),  # CUDA torch, CPU kernels
    }
    assert len(keys) == 5
    assert all(os.sep not in key and "+" not in key for key in keys)


@pytest.mark.parametrize("version", ["2.10.1", "2.14.1", "3.0.0"])
def test_torch_outside_the_supported_range_is_one_line(version, monkeypatch):
    monkeypatch.delenv("S2D_ALLOW_ANY_TORCH", raising=False)
    with pytest.raises(native_build.BuildError) as info:
        native_build.check_torch_range(_torch(version, None, "/a"))
    assert "\n" not in str(info.value) and version in str(info.value)


def test_supported_torch_passes():
    for version in ("2.11.0", "2.12.1+cpu", "2.13.0"):
        native_build.check_torch_range(_torch(version, None, "/a"))


def test_cuda_torch_without_a_toolkit_builds_cpu_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv("S2D_WITH_CUDA", raising=False)
    monkeypatch.setattr(native_build, "cuda_toolkit", lambda: (None, "no nvcc found (set CUDA_HOME)"))
    with_cuda, why = native_build.want_cuda(_torch("2.13.0", "13.0", "/a"))
    assert not with_cuda and "nvcc" in why
    monkeypatch.setenv("S2D_WITH_CUDA", "1")
    with pytest.raises(native_build.BuildError, match="S2D_WITH_CUDA=1"):
        native_build.want_cuda(_torch("2.13.0", "13.0", "/a"))
    monkeypatch.setenv("S2D_WITH_CUDA", "0")
    assert native_build.want_cuda(_torch("2.13.0", "13.0", "/a")) == (False, "S2D_WITH_CUDA=0")


def test_a_toolkit_is_nvcc_with_its_headers(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    _fake_tool(home / "bin", "nvcc", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(native_build, "DEFAULT_CUDA_HOMES", ())
    nvcc, why = native_build.cuda_toolkit()
    assert nvcc is None and "cuda_runtime.h" in why
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    assert native_build.cuda_toolkit()[0] == (home / "bin" / "nvcc").resolve()


def test_an_nvcc_wrapper_without_headers_does_not_hide_the_toolkit(tmp_path, monkeypatch):
    # NOTE: this machine's /usr/local/bin/nvcc is `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, with no headers.
    _fake_tool(tmp_path / "bin", "nvcc", "13.0")
    real = tmp_path / "cuda-13.0"
    _fake_tool(real / "bin", "nvcc", "13.0")
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(native_build, "DEFAULT_CUDA_HOMES", (real,))
    assert native_build.cuda_toolkit()[0] == (real / "bin" / "nvcc").resolve()


def test_the_build_and_the_loader_name_the_same_ops():
    """Every op the package loads is one the build (setup.py, the dev and sanitizer builds) compiles.

    Regression: the sanitizer build listed three ops after invariant_linear was added, and CI failed.
    """
    import re

    from s2d_ext import _native

    assert _native.OPS == native_build.OPS
    cmake = (Path(native_build.ROOT) / "CMakeLists.txt").read_text()
    listed = re.search(r"set\(S2D_OPS ([^)]*)\)", cmake).group(1).split()
    assert tuple(listed) == native_build.OPS
