"""Training data a chat target writes itself, with no download: prompts, answers and the target's own
next-token distributions, for distilling a draft (SoFT) toward it.

Prompts come from two sources, neither of which is an evaluation set:

* **Magpie** (arXiv 2406.08464): the target is given only its chat template's *user header* (the template
  rendered up to where a user message would start, system prompt included) and samples the user turn itself
  (temperature 1). Turns that do not end, are too short or too long, or repeat are dropped.
* **Standard-library docstrings**: questions built from the first paragraph of the docstrings of public
  functions and classes of the running interpreter's standard library (parsed with ``ast``, nothing is
  imported), through a few fixed question templates.

No prompt equal to a Spec-Bench question (any turn, compared after collapsing whitespace and case) is kept:
:func:`evaluation_prompts` lists them and the build filters them out, and the tests check it.

The target then answers every prompt through its chat template: a fixed share greedily, the rest sampled at
temperatures in 0.7-1 (``SelfDataSpec.temperatures`` cycles over the prompts). For every answer token the
build records the target's top-``top_k`` next-token log-probabilities (temperature 1, the distribution a
draft is distilled toward) at the position that predicts it.

Cache: ``<root>/<name>/`` (``root`` = ``--cache-dir``, else ``$S2D_SELF_DATA_DIR``, else
``~/.cache/s2d_ext/self_data``), like the model family: every shard is written under a temporary name and
renamed into place, with a ``.json`` sidecar holding its SHA-256 and the build's fingerprint (spec + target
weights); ``manifest.json`` is written last. An interrupted build resumes at the first missing or damaged
shard; a finished one is verified and reused. Deterministic for a given seed, target, torch version and
thread count (each shard draws from its own seeded generator)."""

from __future__ import annotations

from s2d_ext.train.self_data.build import build_self_data
from s2d_ext.train.self_data.decoding import Decoded, decode_batch
from s2d_ext.train.self_data.load import SelfData, check_self_data, load_self_data
from s2d_ext.train.self_data.prompts import (
    DOCSTRING_TEMPLATES,
    chat_prompt_ids,
    docstring_entries,
    docstring_prompts,
    evaluation_prompts,
    normalize_prompt,
    user_header,
)
from s2d_ext.train.self_data.spec import FORMAT_VERSION, MANIFEST, PROMPTS_FILE, SelfDataSpec, self_data_dir

__all__ = [
    "DOCSTRING_TEMPLATES",
    "Decoded",
    "FORMAT_VERSION",
    "MANIFEST",
    "PROMPTS_FILE",
    "SelfData",
    "SelfDataSpec",
    "build_self_data",
    "chat_prompt_ids",
    "check_self_data",
    "decode_batch",
    "docstring_entries",
    "docstring_prompts",
    "evaluation_prompts",
    "load_self_data",
    "normalize_prompt",
    "self_data_dir",
    "user_header",
]
