"""Shared set-up of the engine benchmarks: the models (bench family, or random ones) and the prompts."""

from __future__ import annotations

import argparse
import os
import random

import torch

from s2d_ext._machine import cpu_name


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="bench", help="local model family (bench, tiny)")
    parser.add_argument("--random", action="store_true", help="random Llama models instead (quick checks)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def load_models(args):
    """(tokenizer or None, target name, target, draft): the family's largest target and its draft."""
    torch.set_num_threads(args.threads)
    if args.random:
        from transformers import LlamaConfig, LlamaForCausalLM

        from s2d_ext import SortedDraft

        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip
        target = LlamaForCausalLM(config).eval()
        return (
            None,
            "random-llama",
            target,
            SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0)),
        )
    from s2d_ext.train.family import load_family

    tokenizer, targets, draft = load_family(args.family, build=False, progress=False)
    name = list(targets)[-1]
    return tokenizer, name, targets[name], draft


def prompts(tokenizer, n: int, vocab: int, seed: int = 0, max_tokens: int = 96) -> list[list[int]]:
    """``n`` Spec-Bench first turns (cycled), or random ids without a tokenizer."""
    rng = random.Random(seed)
    if tokenizer is None:
        return [[rng.randrange(1, vocab) for _ in range(rng.randrange(8, 48))] for _ in range(n)]
    from s2d_ext.bench.arguments import DEFAULT_DATA
    from s2d_ext.bench.spec_bench import encode_prompt, load_questions

    rows = load_questions(DEFAULT_DATA, None)
    rng.shuffle(rows)
    return [encode_prompt(tokenizer, rows[i % len(rows)]["turns"][0], max_tokens) for i in range(n)]


def machine(threads: int) -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {threads} thread(s)"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"
