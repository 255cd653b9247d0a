"""Tiny random target/draft pairs for the driver tests (fp32, CPU, built from configs, no downloads).

Acceptance must be non-trivial, so the draft is the target's first layers and the target's later layers
are damped (their output projections scaled down): the draft then predicts the target's tokens often,
but not always.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from s2d_ext.draft.sorted_draft import truncated_hf_model

VOCAB = 96


def make_target(
    arch: str = "llama",
    vocab: int = VOCAB,
    layers: int = 4,
    hidden: int = 64,
    damp_from: int = 2,
    damp: float = 0.15,
    seed: int = 0,
    context: int = 256,
) -> torch.nn.Module:
    """A random causal LM whose layers >= ``damp_from`` only nudge the residual stream."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers[damp_from:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    return model


def make_draft_model(target: torch.nn.Module, layers: int = 2) -> torch.nn.Module:
    """A plain HF causal LM made of the target's first ``layers`` layers (copies)."""
    return truncated_hf_model(target, layers).eval()


def left_padded(
    lengths: list[int], vocab: int = VOCAB, pad: int = 0, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded: (input_ids [B, L], attention_mask [B, L])."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(lengths), width), dtype=torch.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def greedy_reference(target, ids, mask, max_new_tokens, **kwargs) -> torch.Tensor:
    """target.generate(do_sample=False) with pad 0 and no EOS unless given."""
    kwargs.setdefault("pad_token_id", 0)
    return target.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
