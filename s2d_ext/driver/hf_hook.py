"""``custom_generate`` hook: ``model.generate(..., custom_generate=s2d_ext.generate, draft=draft)``.

transformers (5.17 - 5.24) calls a callable ``custom_generate`` after it has prepared the generation
config, the attention mask and ``max_length``, as
``custom_generate(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=...,
**extra, **model_kwargs)``; ``extra`` holds the keyword arguments of ``generate()`` whose names appear in
this function's signature and not in ``GenerationMixin._sample``'s (here: ``draft``, ``num_draft_tokens``,
``draft_length``, ``thresholds``, ``seed``, ``stop_token_ids``).

What carries over from ``generate()``: ``max_new_tokens`` / ``max_length``, ``do_sample``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``bad_words_ids``,
``min_new_tokens`` / ``min_length``, ``eos_token_id``, ``pad_token_id``, the attention mask,
``return_dict_in_generate`` (sequences only), the caller's own ``logits_processor`` entries (each run
at every verified position with its own prefix, :class:`~s2d_ext.engine.processors.HFLogitsProcessor`),
and ``stopping_criteria`` entries of the types ``MaxLengthCriteria`` / ``EosTokenCriteria`` (any other
criterion raises a ValueError: it cannot be run exactly, and ignoring it would change the output).
Settings that are not supported (beam search, ``no_repeat_ngram_size``, ``typical_p`` when sampling,
``inputs_embeds``, ...) raise a ValueError. A ``streamer`` works as with ``generate()``: transformers sends it
the prompt and does not hand it to a callable ``custom_generate``, so the hook takes it from ``generate()``'s
frame (see :func:`_streamer_of_generate`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext.driver.generation_config import (
    check_supported,
    is_sampling,
    processing_settings,
    sampling_settings,
)


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    draft: Any = None,
    num_draft_tokens: int = 5,
    draft_length: str = "heuristic",
    thresholds: Sequence[float] | None = None,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    stop_token_ids: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> Any:
    """Speculative decoding as a ``generate()`` decoding method (see the module docstring).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The target (``generate()``'s ``self``).
    input_ids : torch.Tensor
        [B, L] int64 prompts prepared by ``generate()``.
    draft : SortedDraft, DraftModel or transformers.PreTrainedModel
        Required, passed as ``generate(..., draft=...)``.

    Returns
    -------
    torch.Tensor or GenerateDecoderOnlyOutput
        [B, L + new] sequences, like ``generate()``.
    """
    from s2d_ext.driver.batch import BatchRequest, generate_batch
    from s2d_ext.engine.models import TargetConfig, as_draft
    from s2d_ext.engine.processors import HFLogitsProcessor

    if draft is None:
        raise ValueError(
            "custom_generate=s2d_ext.generate needs a draft: model.generate(..., draft=my_draft)"
        )
    if synced_gpus:
        raise ValueError("synced_gpus is not supported by s2d_ext.generate")
    if model_kwargs.get("inputs_embeds") is not None:
        # NOTE: generate() hands both over when given both; the draft and the engine read token ids only,
        # and generating from input_ids alone would silently follow another prompt.
        raise ValueError("inputs_embeds is not supported by s2d_ext.generate; pass input_ids instead")
    config = generation_config
    check_supported(config, "generation_config")
    past = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        raise ValueError(
            "s2d_ext.generate cannot continue from a filled cache; pass the whole prompt instead"
        )
    sampling = is_sampling(config)
    settings = sampling_settings(config, "generation_config")
    eos = _ids(getattr(config, "_eos_token_tensor", None), config.eos_token_id)
    processing = processing_settings(config, eos, input_ids.shape[1])
    min_new_tokens = processing["min_new_tokens"]
    max_length, stop_eos = _stopping(stopping_criteria, config, eos, min_new_tokens)
    sampling_params = {  # NOTE: more SamplingParams fields for every row
        "min_p": settings["min_p"],
        **processing,
        # NOTE: generate() built processors for the settings above (and warpers for the sampling ones);
        # those run natively. What is left came from the caller: run each at every verified position.
        "logits_processors": [
            HFLogitsProcessor(p) for p in (logits_processor or []) if not _from_config(p, config, sampling)
        ],
    }
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        # NOTE: generate() has resolved the mask already (inferred from pad_token_id when the caller gave
        # none) and drops it only when it is all ones; None must not be inferred again from the pad id.
        attention_mask = torch.ones_like(input_ids)
    draft = as_draft(draft)
    target = TargetConfig(model, num_draft_tokens, draft_length, thresholds).checked("target", draft)
    rows = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
    request = BatchRequest(
        input_ids,
        attention_mask,
        ["target"] * rows,
        max_new_tokens=max(max_length - input_ids.shape[1], 0),
        temperature=settings["temperature"],
        top_k=settings["top_k"],
        top_p=settings["top_p"],
        seed=seed,
        # NOTE: [] (not None) when nothing stops on EOS: None would fall back to the generation_config.
        eos_token_id=stop_eos,
        pad_token_id=_first(getattr(config, "_pad_token_tensor", None), config.pad_token_id),
        stop_token_ids=stop_token_ids,
        streamer=streamer if streamer is not None else _streamer_of_generate(),
        streamer_has_prompt=streamer is None,
        sampling=sampling_params,
        # NOTE: generate() merged the call's arguments into its config, which was translated above;
        # the model's own generation_config must not override them.
        from_generation_config=False,
    )
    out = generate_batch(draft, {"target": target}, request)
    if getattr(config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out.sequences)
    return out.sequences


def _stopping(
    stopping_criteria: Any, config: Any, eos: list[int] | None, min_new_tokens: int
) -> tuple[int, list[int]]:
    """``(max_length, EOS ids a row stops on)`` from the stopping criteria ``generate()`` hands over.

    ``generate()`` passes its own ``MaxLengthCriteria`` / ``EosTokenCriteria`` (from the config) merged
    with the caller's ``stopping_criteria``: a caller's criterion of one of these types takes the place
    of generate()'s, any other is added. Those two types are honoured as ``generate()`` runs them (the
    smallest max_length, the union of the EOS ids); every other criterion raises a ValueError.

    Raises
    ------
    ValueError
        For a criterion of any other type (it would be ignored: the driver emits several tokens a step
        and has no per-token hook), and for EOS criteria other than the EOS ids together with
        ``min_new_tokens`` (generate() then holds back its EOS ids but stops on the criterion's).
    """
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    lengths: list[int] = []
    stops: set[int] = set()
    has_eos_criterion = False
    for criterion in stopping_criteria or []:
        # NOTE: exact types: a subclass may override __call__ with another rule.
        if type(criterion) is MaxLengthCriteria:
            lengths.append(int(criterion.max_length))
        elif type(criterion) is EosTokenCriteria:
            has_eos_criterion = True
            stops.update(int(t) for t in torch.as_tensor(criterion.eos_token_id).flatten().tolist())
        else:
            raise ValueError(
                f"stopping_criteria: {type(criterion).__name__} is not supported by s2d_ext.generate (it "
                "verifies several tokens a step and implements only max-length and EOS stops: "
                "MaxLengthCriteria, EosTokenCriteria); to stop on token ids pass stop_token_ids=[...] "
                "or eos_token_id=..., else use generate() without custom_generate"
            )
    max_length = min(lengths) if lengths else int(config.max_length)
    eos = list(eos or [])
    if not has_eos_criterion or stops == set(eos):
        return max_length, eos
    if min_new_tokens > 0:
        raise ValueError(
            f"stopping_criteria: an EosTokenCriteria for {sorted(stops)} takes the place of generate()'s "
            f"EOS stop for {eos}; with min_new_tokens={min_new_tokens} generate() would hold back {eos} "
            f"but stop on {sorted(stops)}, which s2d_ext.generate does not implement; pass "
            f"eos_token_id={sorted(stops)} instead of the criterion"
        )
    return max_length, sorted(stops)


def _from_config(processor: Any, config: Any, sampling: bool) -> bool:
    """Whether generate() built ``processor`` from a generation_config field that runs natively here.

    NOTE: generate() refuses a caller's processor of a type it also builds from the config, so an
    instance of such a type, with its field set, came from the config.
    """
    from transformers import generation as g

    fields = {
        "TemperatureLogitsWarper": sampling and config.temperature not in (None, 1.0),
        "TopKLogitsWarper": sampling and bool(config.top_k),
        "TopPLogitsWarper": sampling and config.top_p is not None and config.top_p < 1.0,
        "MinPLogitsWarper": sampling and config.min_p is not None,
        "RepetitionPenaltyLogitsProcessor": getattr(config, "repetition_penalty", None) not in (None, 1.0),
        "NoBadWordsLogitsProcessor": getattr(config, "bad_words_ids", None) is not None,
        "MinNewTokensLengthLogitsProcessor": bool(getattr(config, "min_new_tokens", None)),
        "MinLengthLogitsProcessor": bool(getattr(config, "min_length", None)),
    }
    return any(
        isinstance(processor, getattr(g, name)) for name, on in fields.items() if on and hasattr(g, name)
    )


def _streamer_of_generate() -> Any:
    """The ``streamer`` of the ``generate()`` call that is running this hook, or None.

    NOTE: transformers (5.17 - 5.24) sends a streamer the prompt and then hands a callable
    ``custom_generate`` only the keyword arguments ``GenerationMixin._sample`` does not take, so the
    streamer never gets the new tokens nor ``end()`` and a ``TextIteratorStreamer`` consumer waits forever.
    ``generate()`` still holds it as its local ``streamer``: look a few frames up (decorators wrap the
    hook's call), and find nothing (None) rather than guess when the layout differs.
    """
    frame = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back
        if frame is None:
            return None
        if (
            frame.f_code.co_name == "generate"
            and frame.f_globals.get("__name__") == "transformers.generation.utils"
        ):
            return frame.f_locals.get("streamer")
    return None


def _ids(tensor: torch.Tensor | None, fallback: Any) -> list[int] | None:
    if tensor is not None:
        return [int(t) for t in tensor.flatten().tolist()]
    if fallback is None:
        return None
    return [int(fallback)] if isinstance(fallback, int) else [int(t) for t in fallback]


def _first(tensor: torch.Tensor | None, fallback: Any) -> int | None:
    ids = _ids(tensor, fallback)
    return ids[0] if ids else None
