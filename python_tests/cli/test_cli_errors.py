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


@pytest.mark.parametrize(
    "flags",
    [
        ["--threads", "-2"],
        ["--threads", "0"],
        ["--limit", "0"],
        ["--dtype", "foo"],
        ["--methods", "bogus"],
        ["--rounds", "0"],
        ["--exits", "a,b"],
        ["--max-new-tokens", "0"],
        ["--temperatures", "-1"],
    ],
)
def test_bench_flags_are_checked_before_anything_runs(tiny_checkpoint, capsys, flags):
    # Regression: these raised tracebacks after the models loaded, or ran (exit 0) with a silent default.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--targets", str(tiny_checkpoint), "--draft", str(tiny_checkpoint), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and flags[0] in err


def test_bench_device_and_methods_of_the_run_are_checked(tiny_checkpoint, capsys):
    assert (
        main(["bench", "--targets", str(tiny_checkpoint), "--draft", str(tiny_checkpoint), "--device", "foo"])
        == 1
    )
    assert "--device foo" in _one_error_line(capsys)
    # sd-exit9 is a method name, but the 3-layer draft has no exit 9: the run would silently skip it
    argv = [
        "bench",
        "--targets",
        str(tiny_checkpoint),
        "--draft",
        str(tiny_checkpoint),
        "--methods",
        "sd-exit9",
    ]
    assert main([*argv, "--limit", "1", "--batch-sizes", "1"]) == 1
    err = capsys.readouterr().err  # NOTE: after transformers' weight-loading progress bar
    assert "Traceback" not in err and "error: --methods sd-exit9: not a method of this run" in err


def test_a_checkpoint_without_weights_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    # Regression: transformers' OSError ("no file named model.safetensors") escaped as a traceback.
    hollow = tmp_path / "hollow"
    shutil.copytree(tiny_checkpoint, hollow)
    for weights in hollow.glob("*.safetensors"):
        weights.unlink()
    assert main(_generate(hollow, tiny_checkpoint)) == 1
    assert "model.safetensors" in _one_error_line(capsys)


def test_serve_checks_its_port_and_paths(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    serve = ["serve", "--target", str(tiny_checkpoint), "--draft", str(tiny_checkpoint)]
    with pytest.raises(SystemExit) as exit_info:
        main([*serve, "--port", "99999"])  # regression: an OverflowError after the models loaded
    assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err
    assert main([*serve, "--tokenizer", "/nope"]) == 1  # regression: "Repo id must use alphanumeric chars"
    assert "--tokenizer" in _one_error_line(capsys)
    assert main(["serve", "--target", str(tmp_path / "gone"), "--draft", str(tiny_checkpoint)]) == 1
    assert "--target" in _one_error_line(capsys)
