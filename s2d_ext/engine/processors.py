"""Lossless logits processors: applied to the target's logits at every position being verified.

Speculative decoding stays exact under a processor as long as the target distribution at each verified
position is the processed one *for that position's own prefix*: position ``j`` of a step follows the
request's context plus the step's first ``j`` drafts, whether or not they will be accepted. So the engine
calls each processor once per request and step with every verified position at once::

    processor(token_ids, num_prompt, prefix_lengths, logits) -> logits

    token_ids      [n] int64 (logits' device): prompt + generated tokens + this step's drafts
    num_prompt     int: how many of them are the prompt
    prefix_lengths list of P ints: position j continues token_ids[:prefix_lengths[j]]
    logits         [P, V] float32: the target's logits at the P positions (a copy the processor may edit)

It returns [P, V] logits. The draft keeps proposing from its own distribution q; verification accepts
against the processed target distribution, so the output is distributed exactly as ``generate()`` with
the same processors (greedy: token for token).

A processor that raises fails its request only (``finish_reason == "error"``); the engine and the other
requests carry on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from s2d_ext.engine.penalties import FrequencyPresencePenalty, LogitBias


@runtime_checkable
class LogitsProcessor(Protocol):
    def __call__(
        self,
        token_ids: torch.Tensor,  # [n] int64
        num_prompt: int,
        prefix_lengths: Sequence[int],  # [P]
        logits: torch.Tensor,  # [P, V] float32
    ) -> torch.Tensor: ...


class RepetitionPenalty:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: every token already in the prefix (prompt
    included) has its logit divided by ``penalty`` when positive, multiplied when negative."""

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty = float(penalty)

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        positions, vocab = logits.shape
        base = prefix_lengths[0]
        seen = torch.zeros((positions, vocab), dtype=torch.bool, device=logits.device)
        seen[:, token_ids[:base]] = True
        # NOTE: position j also saw drafts 0..j-1: a lower-triangular scatter of the step's drafts.
        drafts = token_ids[base : prefix_lengths[-1]]  # [P-1]
        if drafts.numel():
            earlier = (
                torch.arange(drafts.numel(), device=logits.device)[None, :]
                < torch.arange(positions, device=logits.device)[:, None]
            )  # [P, P-1]
            seen.scatter_reduce_(1, drafts[None, :].expand(positions, -1), earlier, reduce="amax")
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalised, logits)

    def __repr__(self) -> str:
        return f"RepetitionPenalty({self.penalty})"


class BadWords:
    """transformers' ``NoBadWordsLogitsProcessor``: a sequence's last token is banned where the prefix
    ends with the rest of it (a one-token sequence is always banned)."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]]) -> None:
        self.words = [tuple(int(t) for t in w) for w in bad_words_ids]
        self.always = sorted({w[0] for w in self.words if len(w) == 1})

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        logits = logits.clone()
        if self.always:
            logits[:, self.always] = float("-inf")
        ends = torch.as_tensor(list(prefix_lengths), device=logits.device)  # [P]
        for word in self.words:
            m = len(word) - 1
            if m == 0:
                continue
            start = ends - m  # [P]: where the word's head would start
            ok = start >= 0
            index = start.clamp(min=0)[:, None] + torch.arange(m, device=logits.device)[None, :]
            head = token_ids[index.clamp(max=token_ids.numel() - 1)]  # [P, m]
            match = ok & (head == torch.tensor(word[:-1], device=logits.device)).all(-1)
            logits[:, word[-1]] = torch.where(match, float("-inf"), logits[:, word[-1]])
        return logits

    def __repr__(self) -> str:
        return f"BadWords({self.words})"


class AllowedTokens:
    """Only ``token_ids`` may be generated."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = sorted({int(t) for t in token_ids})
        self._mask: torch.Tensor | None = None

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        if self._mask is None or self._mask.shape[0] != logits.shape[1] or self._mask.device != logits.device:
            mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[self.token_ids] = False
            self._mask = mask
        return logits.masked_fill(self._mask, float("-inf"))

    def __repr__(self) -> str:
        return f"AllowedTokens({len(self.token_ids)} ids)"


class TokenMask:
    """A per-position hook for grammar engines: ``allowed(generated) -> mask``.

    ``allowed`` gets the tokens generated so far at that position (a list of ints: the request's
    generated tokens plus the step's drafts before it) and returns a [V] bool tensor (True = allowed), a
    list of allowed ids, or None (everything allowed). It is called on the host, once per verified
    position, so a request with a token mask pays one device-to-host copy of its drafts per step.
    NOTE: positions after a rejected draft are never kept, so a stateful grammar must derive its state
    from ``generated`` (or cache it by prefix), not advance it on every call.
    """

    def __init__(self, allowed: Callable[[list[int]], Any]) -> None:
        if not callable(allowed):
            raise TypeError("TokenMask needs a callable allowed(generated_ids) -> mask")
        self.allowed = allowed

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        ids = token_ids.tolist()
        rows = []
        for end in prefix_lengths:
            mask = self.allowed(ids[num_prompt:end])
            if mask is None:
                rows.append(torch.ones(logits.shape[1], dtype=torch.bool))
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
                allowed[torch.as_tensor(list(mask), dtype=torch.int64)] = True
                mask = allowed
            if tuple(mask.shape) != (logits.shape[1],):
                raise ValueError(
                    f"TokenMask: the mask must have shape [V={logits.shape[1]}], got {tuple(mask.shape)}"
                )
            rows.append(mask.cpu())
        keep = torch.stack(rows).to(logits.device)
        return logits.masked_fill(~keep, float("-inf"))


class MinNewTokens:
    """Masks ``stop_ids`` while fewer than ``min_new_tokens`` tokens were generated (transformers'
    ``MinNewTokensLengthLogitsProcessor``, applied to EOS and the request's stop ids)."""

    def __init__(self, min_new_tokens: int, stop_ids: Sequence[int]) -> None:
        self.min_new_tokens = int(min_new_tokens)
        self.stop_ids = sorted(set(stop_ids))

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        if not self.stop_ids:
            return logits
        early = torch.as_tensor([end - num_prompt < self.min_new_tokens for end in prefix_lengths])
        if not bool(early.any()):  # NOTE: host data: no device read
            return logits
        logits = logits.clone()
        rows = early.nonzero().squeeze(1).to(logits.device)
        ids = torch.as_tensor(self.stop_ids, device=logits.device)
        logits[rows[:, None], ids[None, :]] = float("-inf")
        return logits


class HFLogitsProcessor:
    """Any transformers ``LogitsProcessor`` (``processor(input_ids [1, L], scores [1, V]) -> scores``),
    called once per verified position with that position's prefix (prompt included, as ``generate()``
    passes it). Processors that keep state across calls are not supported."""

    def __init__(self, processor: Any) -> None:
        if not callable(processor):
            raise TypeError(f"{processor!r} is not a transformers logits processor")
        self.processor = processor

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        rows = [
            self.processor(token_ids[None, :end], logits[j : j + 1].clone())
            for j, end in enumerate(prefix_lengths)
        ]
        return torch.cat(rows, dim=0)

    def __repr__(self) -> str:
        return f"HFLogitsProcessor({type(self.processor).__name__})"


def processors_for(params: Any) -> list[Any]:
    """The processors a (resolved) :class:`~s2d_ext.engine.params.SamplingParams` asks for, in order."""
    chain: list[Any] = []
    # NOTE: logit_bias before the penalties, as vLLM's sampler applies them.
    if params.logit_bias:
        chain.append(LogitBias(params.logit_bias))
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        chain.append(FrequencyPresencePenalty(params.presence_penalty, params.frequency_penalty))
    if params.bad_words_ids:
        chain.append(BadWords(params.bad_words_ids))
    if params.min_new_tokens:
        chain.append(MinNewTokens(params.min_new_tokens, sorted(params.stop_ids)))
    if params.allowed_token_ids is not None:
        chain.append(AllowedTokens(params.allowed_token_ids))
    chain.extend(params.logits_processors)
    return chain
