"""``SamplingParams``: every per-request generation setting, validated here and nowhere else.

``speculate()``, ``Speculator.generate()``, ``custom_generate``, the CLI and the server all build one
``SamplingParams`` per request and hand it to :class:`~s2d_ext.engine.Engine`. Checks that need no model
run when the object is made (``__post_init__``); the two that need one (token ids against the vocabulary,
the default EOS from the target's ``generation_config``) run in :meth:`SamplingParams.resolve`, which the
engine calls in ``add_request``.

Target processing order (transformers' order; :mod:`s2d_ext.engine.filters`): logits processors
(:mod:`s2d_ext.engine.processors`, including ``logit_bias``, ``repetition_penalty``,
``presence_penalty`` / ``frequency_penalty``, ``bad_words_ids``, ``allowed_token_ids`` and
``min_new_tokens``), then ``temperature``, ``top_k``, ``top_p``, ``min_p``.
``temperature == 0`` is greedy (the filters are then ignored, as ``generate(do_sample=False)`` ignores them),
and so is a temperature below :data:`GREEDY_BELOW` (vLLM's rule).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: Temperatures below this are greedy. NOTE: vLLM's ``_SAMPLING_EPS``; logits divided by a temperature
#: near float32's smallest normal overflow to inf and the softmax turns to nan, while anything this small
#: already puts all the mass on the argmax (ties apart).
GREEDY_BELOW = 1e-5


class RequestError(ValueError):
    """A request the engine refuses (bad parameters, unknown / duplicate id, prompt too long, ...)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is generated.

    Parameters
    ----------
    max_new_tokens : int
        At most this many new tokens, >= 1 (``generate()`` rejects 0 too).
    min_new_tokens : int
        EOS and stop ids are masked until this many tokens were generated (0 = off).
    temperature, top_k, top_p, min_p : float, int, float, float
        Sampling as in ``generate()``; 0 temperature is greedy, and so is one below ``GREEDY_BELOW``
        (1e-5, as in vLLM). ``min_p`` in [0, 1] (0 = off).
    seed : int, optional
        Philox seed of this request; None draws one from torch's default generator when it is added.
    eos_token_id : int or sequence of int, optional
        The request stops after emitting one (kept in the output). None: the target's
        ``generation_config.eos_token_id``; ``[]``: no EOS.
    stop_token_ids : sequence of int
        More ids that stop the request like EOS.
    logprobs : int, optional
        None: no log-probabilities. n in [0, vocabulary size]: the processed target log-probability of
        every emitted token and the n most probable tokens at its position
        (:attr:`RequestOutput.top_logprobs`).
    repetition_penalty : float
        > 0, 1 = off; transformers' ``RepetitionPenaltyLogitsProcessor`` (prompt tokens count).
    bad_words_ids : sequence of sequence of int
        Token sequences that must not be generated (``NoBadWordsLogitsProcessor``).
    allowed_token_ids : sequence of int, optional
        Only these tokens may be generated.
    presence_penalty, frequency_penalty : float
        In [-2, 2], 0 = off; OpenAI's penalties over the *generated* tokens (vLLM's rule; the prompt does not
        count): ``logits -= frequency_penalty * count + presence_penalty * (count > 0)``.
    logit_bias : mapping of int to float, optional
        Token id -> a number in [-100, 100] added to its logit (OpenAI's ``logit_bias``).
    logits_processors : sequence
        More :class:`~s2d_ext.engine.processors.LogitsProcessor` objects, applied in order after the
        built-in ones.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    eos_token_id: int | Sequence[int] | None = None
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    bad_words_ids: Sequence[Sequence[int]] = ()
    allowed_token_ids: Sequence[int] | None = None
    logits_processors: Sequence[Any] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        # NOTE: generate() (and so custom_generate) rejects max_new_tokens=0; the engine does the same.
        _set(self, "max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, low=1))
        _set(self, "min_new_tokens", check_int("min_new_tokens", self.min_new_tokens, low=0))
        temperature = _check_float("temperature", self.temperature, low=0.0)
        _set(self, "temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        _set(self, "top_k", check_int("top_k", self.top_k, low=0))
        top_p = self.top_p
        # NOTE: the kernels take top_p as float32, where a positive double below ~7e-46 is 0 (a value the
        # draft refuses mid-step, failing every request of the step): such values are refused here.
        if (
            isinstance(top_p, bool)
            or not isinstance(top_p, (int, float))
            or not 0.0 < top_p <= 1.0
            or _float32(top_p) == 0.0
        ):
            raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
        _set(self, "top_p", float(top_p))
        min_p = _check_float("min_p", self.min_p, low=0.0)
        if min_p > 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        _set(self, "min_p", min_p)
        if self.seed is not None:
            seed = self.seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not _INT64_MIN <= seed <= _INT64_MAX:
                raise TypeError(f"seed must be an int in the int64 range or None, got {seed!r}")
        if self.logprobs is not None:
            _set(self, "logprobs", check_int("logprobs", self.logprobs, low=0))
        penalty = _check_float("repetition_penalty", self.repetition_penalty, low=0.0)
        if _float32(penalty) == 0.0 or _float32(penalty) == math.inf:  # NOTE: float32 logits divide by it
            raise ValueError(f"repetition_penalty must be > 0 and finite in float32 (1 = off), got {penalty}")
        _set(self, "repetition_penalty", penalty)
        _set(self, "stop_token_ids", tuple(_token_list("stop_token_ids", self.stop_token_ids)))
        if self.eos_token_id is not None:
            _set(self, "eos_token_id", tuple(_token_list("eos_token_id", self.eos_token_id)))
        words = self.bad_words_ids
        if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
            raise TypeError(f"bad_words_ids must be a list of token-id lists, got {type(words).__name__}")
        words = tuple(tuple(_token_list("bad_words_ids", w)) for w in words)
        if any(not w for w in words):
            raise ValueError("bad_words_ids: every entry must hold at least one token id")
        _set(self, "bad_words_ids", words)
        if self.allowed_token_ids is not None:
            allowed = tuple(_token_list("allowed_token_ids", self.allowed_token_ids))
            if not allowed:
                raise ValueError("allowed_token_ids must name at least one token (None = all)")
            _set(self, "allowed_token_ids", allowed)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name), low=-2.0)
            if value > 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            _set(self, name, value)
        if self.logit_bias is not None:
            _set(self, "logit_bias", _bias_map(self.logit_bias) or None)
        procs = self.logits_processors
        if procs is None:
            procs = ()
        if callable(procs) or not isinstance(procs, Sequence):
            raise TypeError("logits_processors must be a list of processors")
        for p in procs:
            if not callable(p):
                raise TypeError(f"logits_processors: {p!r} is not callable")
        _set(self, "logits_processors", tuple(procs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, vocab_size: int, generation_config: Any = None) -> SamplingParams:
        """Check every token id and ``logprobs`` against ``vocab_size``; take an unset EOS from
        ``generation_config``."""
        params = self
        if params.eos_token_id is None:
            params = params.replace(eos_token_id=tuple(generation_default_ids(generation_config)))
        fields = {
            "eos_token_id": params.eos_token_id,
            "stop_token_ids": params.stop_token_ids,
            "allowed_token_ids": params.allowed_token_ids or (),
        }
        for name, ids in fields.items():
            _check_range(name, ids, vocab_size)
        for word in params.bad_words_ids:
            _check_range("bad_words_ids", word, vocab_size)
        _check_range("logit_bias", sorted(params.logit_bias or {}), vocab_size)
        if params.logprobs is not None and params.logprobs > vocab_size:
            raise RequestError(
                f"logprobs must be at most the vocabulary size {vocab_size}, got {params.logprobs}"
            )
        return params

    @property
    def stop_ids(self) -> frozenset[int]:
        """EOS + stop ids (resolved params only)."""
        return frozenset((self.eos_token_id or ()) + tuple(self.stop_token_ids))


def generation_default_ids(generation_config: Any, field: str = "eos_token_id") -> list[int]:
    """``generation_config.<field>`` as a list of ids (empty when unset)."""
    value = getattr(generation_config, field, None)
    if value is None:
        return []
    if hasattr(value, "flatten"):
        value = value.flatten().tolist()
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def seeds_for(seed: Any, batch: int) -> list[int]:
    """Per-row Philox seeds from ``seed``: None (drawn from torch's default generator), an int (every
    row), or a sequence / [B] tensor of ints."""
    import torch

    from s2d_ext.engine.host_reads import host_list

    if seed is None:
        return host_list(torch.randint(_INT64_MIN, _INT64_MAX, (batch,), dtype=torch.int64))
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed] * batch
    if isinstance(seed, (torch.Tensor, Sequence)):
        seeds = torch.as_tensor(seed.cpu() if isinstance(seed, torch.Tensor) else list(seed))
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or tuple(seeds.shape) != (batch,):
            raise ValueError(f"seed must be an int or {batch} ints (one per row), got {seed!r}")
        return host_list(seeds.to(torch.int64))
    raise TypeError(f"seed must be an int, a sequence of ints or a [B] tensor, got {type(seed).__name__}")


def check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be finite and >= {low:g}, got {value}")
    return float(value)


def _token_list(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "flatten") and hasattr(value, "tolist"):
        value = value.flatten().tolist()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, set, frozenset)):
        raise TypeError(f"{name} must be token ids (ints), got {value!r}")
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be token ids (ints >= 0), got {value!r}")
    return values


def _float32(value: float) -> float:
    """``value`` rounded to float32 (inf beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _bias_map(value: Any) -> dict[int, float]:
    """``logit_bias`` as {token id: bias}, every bias a finite number in [-100, 100] (OpenAI's range)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"logit_bias must be a mapping of token id -> bias, got {type(value).__name__}")
    biases = {}
    for token, bias in value.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
        bias = _check_float("logit_bias", bias, low=-100.0)
        if bias > 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        biases[int(token)] = bias
    return biases


def _check_range(name: str, ids: Sequence[int], vocab: int) -> None:
    for v in ids:
        if not 0 <= v < vocab:
            raise RequestError(f"{name} must be token ids in [0, {vocab}), got {list(ids)!r}")


def _set(params: SamplingParams, name: str, value: Any) -> None:
    object.__setattr__(params, name, value)  # NOTE: frozen dataclass; normalised once, here
