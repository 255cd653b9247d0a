"""A real pretrained model end to end: SmolLM2-135M-Instruct (GGUF) as a target, its truncations and a SoFT
draft that references its embedding and head, lossless against generate on Spec-Bench chat prompts."""

from __future__ import annotations

import json

import torch

import s2d_ext
from s2d_ext import checkpoints
from s2d_ext.bench.spec_bench import encode_prompt, left_pad, load_questions
from s2d_ext.cli import main
from s2d_ext.draft.draft_vocab import load_draft_vocab
from s2d_ext.train import self_data, soft


def _chat_prompts(tokenizer, n):
    from s2d_ext.bench.arguments import DEFAULT_DATA

    questions = load_questions(DEFAULT_DATA, 1)[:n]
    return [encode_prompt(tokenizer, q["turns"][0], 96) for q in questions]


def test_loads_as_transformers_loads_it(smollm2):
    tokenizer, target, ref = smollm2
    assert ref.is_gguf and ref.gguf_file == checkpoints.SMOLLM2_FILE and ref.describe() == "smollm2"
    assert checkpoints.resolve_target(ref.path) == checkpoints.resolve_target(ref.folder, ref.gguf_file)
    config = target.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    assert target.get_input_embeddings().weight.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    header = tokenizer.decode(self_data.user_header(tokenizer))
    assert header.startswith("<|im_start|>system\n") and header.endswith("<|im_start|>user\n")


def test_truncated_drafts_are_lossless_on_chat_prompts(smollm2):
    tokenizer, target, _ = smollm2
    draft = s2d_ext.SortedDraft.truncate(
        target, 4, exits=(2, 4), thresholds=(0.3, 0.0), share_embeddings=True
    )
    prompts = _chat_prompts(tokenizer, 3)
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)  # a left-padded batch of 3, and each prompt alone
    with torch.inference_mode():
        ref = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=10, pad_token_id=pad)
    assert torch.equal(out.sequences, ref)
    for row in prompts[:2]:
        one = torch.tensor([row])
        with torch.inference_mode():
            ref = target.generate(one, max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert torch.equal(s2d_ext.speculate(target, draft, one, max_new_tokens=10).sequences, ref)


def test_soft_on_self_data_then_generate_one_command_each(tmp_path, smollm2, no_reload, capsys):
    """The issue's commands at toy size: the target writes its data, SoFT trains a 2-layer draft that
    references the target's embedding and head, and generate uses it losslessly."""
    tokenizer, target, _ = smollm2
    embed = target.get_input_embeddings().weight.clone()
    out = tmp_path / "draft"
    argv = ["soft", "--base", "smollm2", "--layers", "2", "--exits", "1,2", "--self-data", "toy"]
    argv += ["--self-data-dir", str(tmp_path / "data"), "--self-data-prompts", "4"]
    argv += ["--self-data-answer-tokens", "8", "--heldout", "1", "--out", str(out), "--steps", "2"]
    argv += ["--batch-size", "2", "--warmup", "1", "--autocast", "bfloat16", "--no-progress"]
    argv += ["--draft-vocab", "512"]
    assert main(argv) == 0
    assert torch.equal(target.get_input_embeddings().weight, embed)  # the target is left as it was
    data = self_data.load_self_data(tmp_path / "data" / "toy")
    assert data.num_sequences >= 2 and data.manifest["complete"]
    evaluation = self_data.evaluation_prompts()
    assert not {self_data.normalize_prompt(t) for t in data.training_prompts()} & evaluation

    config = json.loads((out / "config.json").read_text())
    assert config["s2d_exits"] == [1, 2] and config["s2d_shared"]["target"] == "smollm2"
    assert (out / "model.safetensors").stat().st_size < 2 * 3.6e6 * 4 * 1.05  # 2 layers, no embedding
    record = soft.read_training_record(out)
    assert record["step"] == 2 and len(record["evals"][-1]["agreement"]) == 2
    # the draft vocabulary: the 512 most frequent answer tokens of the rows it trained on
    vocab = load_draft_vocab(out)
    assert vocab.numel() == 512 and record["draft_vocab_size"] == 512
    answers = data.answer_tokens(range(data.num_sequences - 1))  # --heldout 1: the last row is held out
    counts = torch.bincount(answers, minlength=target.config.vocab_size)
    outside = torch.ones_like(counts, dtype=torch.bool)
    outside[vocab] = False
    assert counts[vocab].min() >= counts[outside].max()
    assert checkpoints.load_draft(out, target).draft_vocab.tolist() == vocab.tolist()

    capsys.readouterr()
    status = main(
        [
            "generate",
            "--target",
            "smollm2",
            "--draft",
            str(out),
            "--prompt",
            "def fib(n):",
            "--max-new-tokens",
            "8",
        ]
    )
    assert status == 0
    assert "1/1" in capsys.readouterr().out  # greedy S2D output == target.generate's
