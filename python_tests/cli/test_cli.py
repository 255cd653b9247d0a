"""CLI: subcommand registry, argument parsing, clear refusals, and a tiny end-to-end soft + generate run."""

import importlib
import json

import pytest

from python_tests.train.conftest import TEXT
from s2d_ext.cli import SUBCOMMANDS, build_parser, main


def test_registry_modules_expose_add_parser_and_run():
    assert {"demo", "generate", "soft", "family"} <= set(SUBCOMMANDS)
    for module_path in SUBCOMMANDS.values():
        module = importlib.import_module(module_path)
        assert callable(module.add_parser) and callable(module.run)


def test_parses_documented_commands():
    parser = build_parser()
    args = parser.parse_args(
        [
            "soft",
            "--base",
            "B",
            "--layers",
            "12",
            "--exits",
            "6,9,12",
            "--data",
            "d.txt",
            "--out",
            "o",
            "--grad-accum",
            "4",
            "--distill-target",
            "T",
            "--distill-weight",
            "0.5",
        ]
    )
    assert args.exits == (6, 9, 12) and args.layers == 12 and args.grad_accum == 4
    assert args.distill_target == ["T"] and args.distill_weight == [0.5]
    args = parser.parse_args(["family", "build", "--size", "bench"])
    assert args.family_command == "build" and args.size == "bench"
    args = parser.parse_args(
        ["generate", "--target", "T", "--draft", "D", "--exits", "6,9,12", "--prompt", "x"]
    )
    assert args.exits == (6, 9, 12) and args.prompt == ["x"]
    args = parser.parse_args(["demo"])
    assert args.family == "qwen" and args.temperature == 0.0  # the Qwen2.5-Coder pair (issue 20)
    assert build_parser().parse_args(["demo", "--size", "tiny"]).family == "tiny"  # the old spelling


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["soft", "--data", "d", "--out", "o"],  # no --base
        ["soft", "--base", "b", "--data", "d", "--out", "o", "--exits", "6,x"],
        ["soft", "--base", "b", "--data", "d", "--out", "o", "--layers", "0"],
        ["soft", "--base", "b", "--data", "d", "--out", "o", "--lr", "-1"],
        ["family", "build", "--size", "huge"],
        ["family"],
        ["generate", "--target", "t"],  # no --draft
        ["generate", "--target", "t", "--draft", "d", "--temperature", "-0.5"],
        ["demo", "--draft-length", "sometimes"],
    ],
)
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def _soft_argv(base, data, out, *extra):
    return [
        "soft",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def test_soft_refuses_bad_input(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    assert main(_soft_argv(tiny_checkpoint, tmp_path / "missing.txt", tmp_path / "o")) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(_soft_argv(tiny_checkpoint, tmp_path / "empty.txt", tmp_path / "o")) == 1
    assert "empty" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    assert main(_soft_argv(tiny_checkpoint, data, tmp_path / "busy")) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"
    assert main(_soft_argv(tmp_path / "nobase", data, tmp_path / "o")) == 1
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # exits do not fit the 3-layer base
        main(_soft_argv(tiny_checkpoint, data, tmp_path / "o", "--layers", "2", "--exits", "1,3"))
    assert info.value.code == 2 and "last exit" in capsys.readouterr().err
    assert main(_soft_argv(tiny_checkpoint, data, tmp_path / "o", "--layers", "5")) == 1
    assert "does not fit" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    assert main(_soft_argv(no_tok, data, tmp_path / "o")) == 1
    assert "tokenizer" in capsys.readouterr().err


def test_soft_then_generate_end_to_end(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": chunk}) for chunk in TEXT.split("\n\n\n") if chunk) + "\n")
    out = tmp_path / "draft"
    assert (
        main(
            _soft_argv(
                tiny_checkpoint,
                data,
                out,
                "--layers",
                "2",
                "--exits",
                "1,2",
                "--distill-target",
                str(tiny_checkpoint),
                "--draft-vocab",
                "40",
            )
        )
        == 0
    )
    from s2d_ext.draft.draft_vocab import load_draft_vocab

    assert load_draft_vocab(out).numel() == 40  # generate below drafts with it: still lossless
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["s2d_exits"] == [1, 2]
    assert (out / "tokenizer.json").is_file() and (out / "soft_state.pt").is_file()
    # a second run refuses the existing checkpoint, --resume continues it
    assert main(_soft_argv(tiny_checkpoint, data, out, "--layers", "2", "--exits", "1,2")) == 1
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            _soft_argv(
                tiny_checkpoint, data, out, "--layers", "2", "--exits", "1,2", "--resume", "--steps", "3"
            )
        )
        == 0
    )
    assert json.loads((out / "soft_config.json").read_text())["step"] == 3
    capsys.readouterr()
    status = main(
        [
            "generate",
            "--target",
            str(tiny_checkpoint),
            "--draft",
            str(out),
            "--prompt",
            "def add(",
            "--prompt",
            "class Point:",
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "greedy match" in printed and "2/2" in printed  # lossless: S2D == target.generate


def test_generate_refuses_bad_input(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--target", str(tiny_checkpoint), "--draft", str(tiny_checkpoint)])  # no prompt
    assert (
        main(
            ["generate", "--target", str(tmp_path / "nope"), "--draft", str(tiny_checkpoint), "--prompt", "x"]
        )
        == 1
    )
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(
            [
                "generate",
                "--target",
                str(tiny_checkpoint),
                "--draft",
                str(tiny_checkpoint),
                "--exits",
                "1,2",
                "--prompt",
                "x",
            ]
        )
    assert info.value.code == 2 and "last exit" in capsys.readouterr().err


def test_family_check_reports_a_missing_cache(tmp_path, capsys):
    assert main(["family", "check", "--size", "tiny", "--cache-dir", str(tmp_path)]) == 1
    assert "NOT complete" in capsys.readouterr().out
