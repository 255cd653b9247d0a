"""Tiny random HF models and slow plainly written references for the draft tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from s2d_ext.draft.sorted_draft import truncated_hf_model

VOCAB = 96
EXITS = (2, 4, 6)
# NOTE: a large init range makes the tiny models' top probabilities spread over (0.1, 0.5), so
# thresholds around 0.16 send tokens to every exit.
MIXED_THRESHOLDS = (0.16, 0.16, 0.0)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    initializer_range=0.2,
    pad_token_id=0,
)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random fp32 causal LM.

    ``kind``: llama, llama_hd (head_dim != d / heads), llama3_rope, qwen2, mistral.
    """
    torch.manual_seed(seed)
    kwargs = dict(_COMMON, **overrides)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif kind == "llama_hd":
        model = LlamaForCausalLM(LlamaConfig(head_dim=32, **kwargs))
    elif kind == "llama3_rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **kwargs))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        # NOTE: Qwen2 q/k/v biases start at zero; make them matter.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=128, **kwargs))
    else:
        raise ValueError(kind)
    return model.eval()


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, L] and mask [B, L] for token lists of different lengths."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def last_logits(model: torch.nn.Module, context: list[int]) -> torch.Tensor:
    """[V] float32 logits after ``context`` (full recompute, no cache)."""
    return model(torch.tensor([context])).logits[0, -1].float()


class ReferenceCascade:
    """The slow sorted draft: per token, full recompute of every exit's truncated model, no caches.

    With ``vocab_ids`` (a reduced draft vocabulary) an exit's confidence is the top probability within the
    subset (softmax over the subset's logits) and its token the argmax within it; ``final_full`` keeps the
    whole vocabulary at the last exit. A threshold of 1 turns an early exit off.
    """

    def __init__(
        self,
        hf_model: torch.nn.Module,
        exits: tuple[int, ...],
        thresholds: tuple[float, ...],
        vocab_ids: torch.Tensor | None = None,
        final_full: bool = False,
    ):
        self.models = [truncated_hf_model(hf_model, e) for e in exits]
        self.exits = exits
        self.thresholds = thresholds
        self.vocab_ids = vocab_ids
        self.final_full = final_full

    def step(self, context: list[int]) -> tuple[int, int, float]:
        """(token, exit layer, confidence) of the next greedy draft token."""
        for i, (model, tau) in enumerate(zip(self.models, self.thresholds, strict=True)):
            last = i == len(self.models) - 1
            logits = last_logits(model, context)
            ids = None if self.vocab_ids is None or (last and self.final_full) else self.vocab_ids
            if ids is not None:
                logits = logits[ids]
            confidence = float(torch.softmax(logits, -1).max())
            if last or (tau < 1.0 and confidence >= tau):
                token = int(logits.argmax())
                return (token if ids is None else int(ids[token])), self.exits[i], confidence
        raise AssertionError("unreachable")

    def draft(self, context: list[int], k: int) -> tuple[list[int], list[int], list[float]]:
        tokens, exits, confs = [], [], []
        context = list(context)
        for _ in range(k):
            token, exit_layer, conf = self.step(context)
            tokens.append(token)
            exits.append(exit_layer)
            confs.append(conf)
            context.append(token)
        return tokens, exits, confs
