"""What a ``transformers.GenerationConfig`` asks of a decode, in ``SamplingParams`` terms.

``generate()`` takes every setting its caller leaves unset from the model's ``generation_config``: a model
may ship ``do_sample=True, temperature=0.6`` or ``repetition_penalty=1.1``, and its ``generate()`` output
then follows them. ``custom_generate`` receives the merged config from ``generate()``; ``speculate()`` and
``Speculator.generate()`` read the target's own. Both translate it here, so the two agree with
``generate()`` and with each other. Settings the engine does not implement raise a ValueError naming the
field: ignoring one would give output that differs from ``generate()``'s.
"""

from __future__ import annotations

from typing import Any

#: generation_config fields (and their neutral values) whose other values change the output in ways the
#: engine does not implement.
UNSUPPORTED = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "force_words_ids": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "stop_strings": None,
    "max_time": None,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}
#: Of those, the ones generate() applies only when sampling (warpers): a greedy call ignores them.
SAMPLING_ONLY = frozenset({"typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"})


def is_sampling(config: Any) -> bool:
    return bool(getattr(config, "do_sample", False))


def check_supported(config: Any, where: str) -> None:
    """Raise a ValueError naming ``<where>.<field>`` for a setting the engine does not implement."""
    sampling = is_sampling(config)
    for name, default in UNSUPPORTED.items():
        if name in SAMPLING_ONLY and not sampling:
            continue
        value = getattr(config, name, default)
        if value is not None and value != default and not (value == 0 and default is None):
            raise ValueError(f"{where}.{name}={value!r} is not supported by s2d_ext")


def sampling_settings(config: Any, where: str) -> dict[str, Any]:
    """``temperature``, ``top_k``, ``top_p``, ``min_p`` as ``generate()`` samples with ``config``
    (temperature 0 = greedy, when ``do_sample`` is off; the filters then do nothing)."""
    if not is_sampling(config):
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    temperature = float(config.temperature if config.temperature is not None else 1.0)
    if temperature == 0.0:
        raise ValueError(f"{where}.temperature=0 with do_sample=True; use do_sample=False for greedy")
    return {
        "temperature": temperature,
        "top_k": int(config.top_k or 0),
        "top_p": float(config.top_p if config.top_p is not None else 1.0),
        "min_p": float(config.min_p or 0.0),
    }


def processing_settings(config: Any, eos: list[int] | None, prompt_width: int) -> dict[str, Any]:
    """``repetition_penalty``, ``bad_words_ids`` and ``min_new_tokens`` as ``generate()`` applies them.

    ``prompt_width``: the (padded) prompt length L, which ``min_length`` counts as MinLengthLogitsProcessor
    does.
    """
    return {
        "repetition_penalty": float(getattr(config, "repetition_penalty", None) or 1.0),
        # NOTE: as generate()'s NoBadWordsLogitsProcessor, a one-token bad word that is an EOS id is dropped.
        "bad_words_ids": [
            list(w)
            for w in (getattr(config, "bad_words_ids", None) or [])
            if not (len(w) == 1 and w[0] in (eos or []))
        ],
        "min_new_tokens": max(
            int(getattr(config, "min_new_tokens", None) or 0),
            int(getattr(config, "min_length", None) or 0) - prompt_width,
        ),
    }
