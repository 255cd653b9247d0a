"""A tiny target and its sorted draft saved as checkpoint folders, for tests that start servers in other
processes (tensor-parallel ranks, Ray Serve replicas), and a free loopback port."""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def save_tiny_pair(root: Path, tokenizer, *, shared: bool = True) -> tuple[Path, Path]:
    """(target folder, draft folder) under ``root``: a 4-layer Llama (4 heads, 2 key/value heads, so that
    tensor parallelism over 2 ranks divides them) with ``tokenizer``, and its 2-layer draft, exits (1, 2).

    ``shared``: the draft references the target's embedding and head (as ``s2d cut`` saves a draft) instead
    of holding its own copies; loaded, it borrows them from the target, sharded under tensor parallelism."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from s2d_ext import checkpoints
    from s2d_ext.draft.sorted_draft import SortedDraft

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    target = LlamaForCausalLM(config).eval()
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    if shared:
        draft.config.s2d_exits, draft.config.s2d_thresholds = list(draft.exits), list(draft.thresholds)
        ref = checkpoints.resolve_target(root / "target")
        checkpoints.save_draft(draft.hf_model, root / "draft", target_ref=ref)
    else:
        draft.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
