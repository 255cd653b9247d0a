"""The decode engine: one speculative decoding loop with a step API (continuous batching).

``Engine`` owns the draft, the targets and their caches; ``SamplingParams`` holds every per-request
setting; ``RequestOutput`` is what a step returns per request. ``speculate()``, ``Speculator.generate()``,
``custom_generate``, the CLI and the server are loops over it.
"""

from s2d_ext.engine.engine import Engine, EngineStats, RequestOutput
from s2d_ext.engine.models import TargetConfig
from s2d_ext.engine.params import RequestError, SamplingParams
from s2d_ext.engine.penalties import FrequencyPresencePenalty, LogitBias
from s2d_ext.engine.processors import (
    AllowedTokens,
    BadWords,
    HFLogitsProcessor,
    LogitsProcessor,
    RepetitionPenalty,
    TokenMask,
)

__all__ = [
    "AllowedTokens",
    "BadWords",
    "Engine",
    "EngineStats",
    "FrequencyPresencePenalty",
    "HFLogitsProcessor",
    "LogitBias",
    "LogitsProcessor",
    "RepetitionPenalty",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "TargetConfig",
    "TokenMask",
]
