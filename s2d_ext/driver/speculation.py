"""``speculate()``: lossless speculative decoding of a Hugging Face target with a (sorted) draft.

A thin loop over :class:`s2d_ext.engine.Engine` (see its module for the step): every row of the batch is
one request with its own seed, so a row's output depends only on its prompt, seed and settings, never on
the rest of the batch. ``seed=None`` draws the seeds from torch's default generator; an int seeds every
row with that int (identical prompts then give identical outputs); a list / tensor gives one seed per row.

KV cache: see :mod:`s2d_ext.target` (holes + explicit position ids, compaction with ``kv_compact``);
between steps a target cache holds at most ``(1 + 0.25) * longest_row + 64`` columns. Finished rows draft
nothing and are dropped from a target's batch once a quarter of its rows are done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext.driver.batch import BatchRequest, SpeculateOutput, SpeculateStats, generate_batch
from s2d_ext.engine.models import TargetConfig, as_draft

__all__ = ["SpeculateOutput", "SpeculateStats", "speculate"]


def speculate(
    target: torch.nn.Module,
    draft: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    num_draft_tokens: int = 5,
    draft_length: str = "heuristic",
    thresholds: Sequence[float] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    streamer: Any = None,
    profile: bool = False,
    **sampling: Any,
) -> SpeculateOutput:
    """Generate with ``target``, drafting with ``draft``; the output is distributed exactly as ``target``'s.

    Parameters
    ----------
    target : transformers.PreTrainedModel
        Any causal LM, also one spread over devices (``device_map="auto"``).
    draft : SortedDraft, DraftModel or transformers.PreTrainedModel
        A plain HF causal LM is wrapped as a one-exit draft (``SortedDraft`` for Llama / Mistral / Qwen2,
        else :class:`~s2d_ext.draft.hf_draft.HFDraft`). Must share the target's vocabulary.
    input_ids : torch.Tensor
        [B, L] int64 left-padded prompts, on CPU or the target's input device.
    attention_mask : torch.Tensor, optional
        [B, L] (1 = token), on ``input_ids``' device. None: all ones, or ``input_ids != pad_token_id``
        when the prompts contain the pad token (as ``generate()`` does).
    max_new_tokens : int, optional
        At most this many new tokens per row, >= 1 (``generate()`` rejects 0 too). None:
        ``target.generation_config.max_new_tokens`` when it is set, else 128.
    num_draft_tokens : int
        Draft tokens per step (the start value of "heuristic", the cap of "confidence").
    draft_length : str
        "fixed", "heuristic" (+2 after a fully accepted step, -1 otherwise) or "confidence" (stop a row's
        drafting at a token whose confidence is below the policy's stop threshold).
    thresholds : sequence of float, optional
        Exit thresholds of a sorted draft (one per exit); None = the draft's own.
    temperature, top_k, top_p : float, int, float, optional
        Sampling as in ``generate()`` (temperature 0 = greedy; the filters apply only when sampling).
        ``temperature=None`` does what ``generate()`` does without sampling arguments: greedy, unless
        ``target.generation_config.do_sample`` is set, then its temperature, top-k, top-p and min-p. An
        explicit temperature samples with exactly the filters passed (None = off).
    seed : int, sequence of int or [B] tensor, optional
        Philox seed(s), see the module docstring.
    eos_token_id, stop_token_ids : int or sequence of int, optional
        A row stops after emitting any of them (kept in the output, like ``generate()`` keeps EOS).
        ``eos_token_id=None`` takes ``target.generation_config.eos_token_id``, as ``generate()`` does.
    pad_token_id : int, optional
        Fills rows that stopped early; default: ``target.generation_config.pad_token_id``, else the first
        EOS id, else 0 (``generate()``'s choice).
    streamer : transformers streamer, optional
        Gets ``put(prompt [B, L])`` first, then the new tokens column by column (all of a batch-1 step
        at once), then ``end()``.
    profile : bool
        Measure the draft / target / verify / other time split into ``stats`` (synchronises the devices
        several times a step; off by default, when only ``stats.time_total`` is measured).
    **sampling
        More :class:`~s2d_ext.engine.SamplingParams` fields for every row: ``min_p``,
        ``min_new_tokens``, ``repetition_penalty``, ``bad_words_ids``, ``allowed_token_ids``,
        ``logits_processors``. ``repetition_penalty``, ``bad_words_ids`` and ``min_new_tokens`` /
        ``min_length`` default to the target's generation_config, as in ``generate()``; a generation_config
        setting that s2d_ext does not implement (``no_repeat_ngram_size``, beams, ...) raises a ValueError.

    Returns
    -------
    SpeculateOutput
        ``sequences`` [B, L + max new] and ``stats``.
    """
    draft = as_draft(draft)
    config = TargetConfig(target, num_draft_tokens, draft_length, thresholds).checked("target", draft)
    rows = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
    request = BatchRequest(
        input_ids,
        attention_mask,
        ["target"] * rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_token_ids=stop_token_ids,
        streamer=streamer,
        profile=profile,
        sampling=sampling,
    )
    return generate_batch(draft, {"target": config}, request)
