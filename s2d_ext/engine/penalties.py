"""OpenAI's ``presence_penalty`` / ``frequency_penalty`` and ``logit_bias`` as lossless processors.

Both follow OpenAI's and vLLM's definitions. Penalties count the *generated* tokens only (vLLM's
``output_tokens``; the prompt is ``repetition_penalty``'s business)::

    logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)

and ``logit_bias`` adds a fixed number to the logits of the ids it names. Like every processor they run at
each verified position with that position's own prefix (:mod:`s2d_ext.engine.processors`): position ``j``
counts the generated tokens plus the step's drafts before it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class FrequencyPresencePenalty:
    """``logits -= frequency * count + presence * (count > 0)`` over the generated tokens (not the prompt).

    Parameters
    ----------
    presence, frequency : float
        OpenAI's ranges are [-2, 2] (checked by :class:`~s2d_ext.engine.params.SamplingParams`); negative
        values favour repeats.
    """

    def __init__(self, presence: float = 0.0, frequency: float = 0.0) -> None:
        self.presence, self.frequency = float(presence), float(frequency)

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        positions, vocab = logits.shape
        base = prefix_lengths[0]
        counts = torch.bincount(token_ids[num_prompt:base], minlength=vocab)[:vocab].to(logits.dtype)  # [V]
        counts = counts.expand(positions, vocab).clone()  # [P, V]
        drafts = token_ids[base : prefix_lengths[-1]]  # [P-1]
        if drafts.numel():
            # NOTE: position j also generated drafts 0..j-1: add a lower-triangular one-hot of them.
            earlier = (
                torch.arange(drafts.numel(), device=logits.device)[None, :]
                < torch.arange(positions, device=logits.device)[:, None]
            ).to(logits.dtype)  # [P, P-1]
            counts.scatter_add_(1, drafts[None, :].expand(positions, -1), earlier)
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)

    def __repr__(self) -> str:
        return f"FrequencyPresencePenalty(presence={self.presence}, frequency={self.frequency})"


class LogitBias:
    """``logits[:, id] += bias`` for each ``id -> bias`` of ``biases`` (OpenAI's ``logit_bias``)."""

    def __init__(self, biases: Mapping[int, float]) -> None:
        self.ids = torch.tensor(list(biases), dtype=torch.int64)  # [n]
        self.values = torch.tensor(list(biases.values()), dtype=torch.float32)  # [n]

    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        ids, values = self.ids.to(logits.device), self.values.to(logits.device, logits.dtype)
        return logits.index_add(1, ids, values[None, :].expand(logits.shape[0], -1))

    def __repr__(self) -> str:
        return f"LogitBias({len(self.ids)} ids)"
