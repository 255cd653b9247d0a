"""A user mistake on the command line is one ``error:`` line, never a traceback from torch or transformers.

Regression tests: ``--device cuda`` on a CPU-only torch raised ``AssertionError: Torch not compiled with CUDA
enabled``, and a bad ``--tokenizer`` path raised transformers' ``Repo id must use alphanumeric chars``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2d_ext.cli import main, program_name


def _generate(target, draft, *extra):
    return ["generate", "--target", str(target), "--draft", str(draft), "--prompt", "x", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only build of torch")
def test_device_cuda_on_a_cpu_torch(tiny_checkpoint, capsys):
    assert main(_generate(tiny_checkpoint, tiny_checkpoint, "--device", "cuda")) == 1
    line = _one_error_line(capsys)
    assert "--device cuda" in line and "CPU build" in line


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_device_that_is_not_a_torch_device(tiny_checkpoint, capsys, device):
    assert main(_generate(tiny_checkpoint, tiny_checkpoint, "--device", device)) == 1
    assert f"--device {device}" in _one_error_line(capsys)


def test_missing_paths_name_their_flag(tmp_path, tiny_checkpoint, capsys):
    missing = tmp_path / "nope"
    assert main(_generate(tiny_checkpoint, missing)) == 1
    assert "--draft" in _one_error_line(capsys)
    assert main(_generate(missing, tiny_checkpoint)) == 1
    assert "--target" in _one_error_line(capsys)
    assert main(_generate(tiny_checkpoint, tiny_checkpoint, "--tokenizer", "not/a:repo id")) == 1
    assert "--tokenizer" in _one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_generate(tiny_checkpoint, tiny_checkpoint, "--tokenizer", str(empty))) == 1
    assert "holds no tokenizer" in _one_error_line(capsys)


def test_target_without_a_tokenizer_asks_for_one(tmp_path, tiny_checkpoint, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", bare / "config.json")
    assert main(_generate(bare, tiny_checkpoint)) == 1
    line = _one_error_line(capsys)
    assert "tokenizer" in line and "--tokenizer" in line


def test_soft_and_bench_check_their_paths(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    argv = ["soft", "--base", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "--distill-target", str(tmp_path / "gone")]) == 1
    assert "--distill-target" in _one_error_line(capsys)
    assert main(["bench", "--targets", str(tmp_path / "gone"), "--draft", str(tiny_checkpoint)]) == 1
    assert "--targets" in _one_error_line(capsys)
    assert main(["bench", "--data", str(tmp_path / "q.jsonl")]) == 1
    assert "--data" in _one_error_line(capsys)


def test_program_name():
    assert program_name("/venv/bin/s2d") == "s2d"
    assert program_name("/src/s2d_ext/__main__.py") == "python -m s2d_ext"


def test_console_command_help_shows_its_own_name():
    script = Path(sys.executable).parent / "s2d"
    if not script.exists():
        pytest.skip("the s2d console command is not installed in this environment")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("usage: s2d ")
    module = subprocess.run(
        [sys.executable, "-m", "s2d_ext", "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    assert module.stdout.startswith("usage: python -m s2d_ext ")
