"""A character tokenizer with an EOS for grammar tests, and an independent grammar mask for generate()."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

EOS = 95  # the tiny models' last id (ASCII 127, DEL) serves as the end of sequence


class CharEosTokenizer:
    """Printable ASCII, one token per character (id = ord - 32), and id 95 as EOS."""

    chat_template = None
    eos_token_id = EOS
    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [min(max(ord(c) - 32, 0), 94) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if int(i) == EOS and skip_special_tokens else chr(32 + int(i)) for i in ids)


def replay_mask(grammars, grammar_text: str, generated: list[int], vocab: int) -> torch.Tensor:
    """[V] bool: a fresh llguidance matcher fed ``generated`` one token at a time (no caching, no rollback:
    the plain way to say what the grammar allows)."""
    import llguidance

    matcher = llguidance.LLMatcher(grammars._tokenizer(), grammar_text, log_level=0)
    for t in generated:
        assert matcher.consume_token(t), (generated, matcher.get_error())
    bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    return ((bits[:, None] >> torch.arange(32, dtype=torch.int32)[None, :]) & 1).flatten()[:vocab].bool()


class ReplayGrammar(LogitsProcessor):
    """transformers processor: the grammar's mask after the tokens generated so far (replayed each call)."""

    def __init__(self, grammars, grammar_text: str, prompt_len: int) -> None:
        self.grammars, self.grammar_text, self.prompt_len = grammars, grammar_text, prompt_len

    def __call__(self, input_ids, scores):
        rows = [
            replay_mask(self.grammars, self.grammar_text, ids[self.prompt_len :].tolist(), scores.shape[1])
            for ids in input_ids
        ]
        return scores.masked_fill(~torch.stack(rows), float("-inf"))
