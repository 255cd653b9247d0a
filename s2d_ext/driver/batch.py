"""Batch in, batch out over the engine: what ``speculate()`` and ``Speculator.generate()`` share.

:func:`generate_batch` checks a ``generate()``-style batch (left-padded ``input_ids`` + mask), turns each
row into an engine request with its own :class:`~s2d_ext.engine.SamplingParams` and seed, runs the engine
until every row is done, and lays the result out like ``generate()`` (``sequences`` [B, L + new], rows
that stopped early padded). Row ``b``'s output is what it would be alone with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from s2d_ext.engine import Engine, SamplingParams, TargetConfig
from s2d_ext.engine.params import check_int, generation_default_ids, seeds_for
from s2d_ext.target import input_device


@dataclass
class SpeculateStats:
    """What a :func:`speculate` call did and where its time went (seconds).

    The split into draft / target / verify / other is measured only with ``profile=True`` (it
    synchronises the devices); otherwise those four are 0 and ``time_total`` is the wall time.
    """

    steps: int = 0  # verification steps (one target forward per target per step)
    mat: float = 0.0  # mean tokens emitted per target forward, over the rows that took part
    mat_per_row: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)  # per row, == its tokens in ``sequences``
    acceptance_by_position: list[float] = field(default_factory=list)  # P(draft j accepted | proposed)
    exit_histogram: dict[int, int] = field(default_factory=dict)  # exit layer -> drafted tokens
    draft_tokens: int = 0  # drafts proposed
    accepted_tokens: int = 0  # drafts accepted
    compactions: int = 0  # kv_compact passes over a target cache
    max_cache_columns: int = 0  # largest target cache (columns) seen between steps
    time_draft: float = 0.0
    time_target: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    time_total: float = 0.0
    other_fraction: float = 0.0  # time_other / time_total (profile=True only)
    profiled: bool = False

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.time_total if self.time_total > 0 else 0.0


@dataclass
class SpeculateOutput:
    """sequences: [B, prompt_len + new] int64 laid out like ``generate()``; stats: :class:`SpeculateStats`."""

    sequences: torch.Tensor
    stats: SpeculateStats


@dataclass
class BatchRequest:
    """One batch to generate, as ``speculate()``, ``Speculator.generate()`` and ``custom_generate`` ask it of
    :func:`generate_batch` (the arguments as :func:`s2d_ext.speculate` documents them).

    Attributes
    ----------
    input_ids : torch.Tensor
        [B, L] left-padded prompts.
    attention_mask : torch.Tensor or None
        [B, L], 1 = token.
    targets : sequence of str
        The target of each row, by name.
    max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, pad_token_id, stop_token_ids
        Per-row settings; None: from the targets' ``generation_config`` (when ``from_generation_config``),
        else the defaults.
    streamer : transformers streamer, optional
    streamer_has_prompt : bool
        The streamer got the prompt already (from ``generate()``).
    profile : bool
        Measure the draft / target / verify / other time split.
    sampling : dict
        More :class:`SamplingParams` fields for every row (min_p, repetition_penalty, ...).
    from_generation_config : bool
        Settings left None (and processing fields absent from ``sampling``) come from the targets'
        ``generation_config`` as ``generate()`` takes them; False when the caller resolved them already
        (``custom_generate``, which gets generate()'s merged config).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    targets: Sequence[str]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: Any = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    stop_token_ids: Sequence[int] | None = None
    streamer: Any = None
    streamer_has_prompt: bool = False
    profile: bool = False
    sampling: Mapping[str, Any] = field(default_factory=dict)
    from_generation_config: bool = True


def generate_batch(draft: Any, configs: Mapping[str, TargetConfig], request: BatchRequest) -> SpeculateOutput:
    """Run every row of ``request.input_ids`` with its target ``request.targets[b]`` (see
    :func:`s2d_ext.speculate`)."""
    input_ids, attention_mask, names = request.input_ids, request.attention_mask, request.targets
    max_new_tokens, temperature, top_k, top_p = (
        request.max_new_tokens, request.temperature, request.top_k, request.top_p,
    )  # fmt: skip
    eos_token_id, pad_token_id, streamer = request.eos_token_id, request.pad_token_id, request.streamer
    input_ids = check_input_ids(input_ids)
    batch = input_ids.shape[0]
    used = list(dict.fromkeys(names))
    vocab = draft.vocab_size
    allowed = {torch.device("cpu")} | {input_device(configs[n].model) for n in used}
    if input_ids.device not in allowed:
        raise ValueError(
            f"input_ids is on {input_ids.device}; put it on the CPU or the target's input device "
            f"({', '.join(sorted(str(d) for d in allowed if d.type != 'cpu')) or 'cpu'})"
        )
    # NOTE: as generate() does, unset eos / pad come from the target's generation_config.
    if eos_token_id is None:
        eos_token_id = generation_default(configs, used, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = generation_default(configs, used, "pad_token_id")
    eos = [] if eos_token_id is None else eos_token_id
    extra = dict(request.sampling)
    _check_extra(extra)
    if request.from_generation_config:
        max_new_tokens, temperature, top_k, top_p = _config_defaults(
            configs, used, input_ids.shape[1], eos, extra, max_new_tokens, temperature, top_k, top_p
        )
    max_new_tokens = 128 if max_new_tokens is None else max_new_tokens
    temperature = 0.0 if temperature is None else temperature
    top_k, top_p = (0 if top_k is None else top_k), (1.0 if top_p is None else top_p)
    base = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos,
        stop_token_ids=() if request.stop_token_ids is None else request.stop_token_ids,
        **extra,
    ).resolve(vocab)
    eos = list(base.eos_token_id)
    if pad_token_id is not None:
        pad_token_id = check_int("pad_token_id", pad_token_id, low=0)
    infer_mask = attention_mask is None and pad_token_id is not None and pad_token_id not in eos
    inferred = infer_mask and bool((input_ids == pad_token_id).any())
    if inferred:
        attention_mask = input_ids != pad_token_id  # NOTE: what generate() infers too
    try:
        mask = check_mask(attention_mask, input_ids)
    except ValueError as err:
        if not inferred:
            raise
        # NOTE: the caller passed no mask; an error about "the" mask would point at nothing they gave.
        raise ValueError(
            f"no attention_mask was given, so it was inferred from pad_token_id={pad_token_id} (every "
            f"{pad_token_id} in input_ids taken as padding, as generate() does), and the inferred {err}; "
            f"when a prompt holds {pad_token_id} as a token, pass attention_mask=[B, L] (1 = token, "
            "left-padded)"
        ) from err
    if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        raise ValueError(f"input_ids must hold token ids in [0, {vocab})")
    longest = int(mask.sum(-1).max())
    engine = Engine(draft, {n: configs[n] for n in used}, profile=request.profile)
    for name in used:
        engine.check_length(name, longest, max_new_tokens, arg="input_ids")
    seeds = seeds_for(request.seed, batch)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    host_ids, host_mask = input_ids.cpu(), mask.cpu()
    prompts = [host_ids[b][host_mask[b]].tolist() for b in range(batch)]
    if streamer is not None and not request.streamer_has_prompt:
        streamer.put(host_ids)
    engine.clock.reset()
    wall = time.perf_counter()
    for b in range(batch):
        engine.add_request(prompts[b], base.replace(seed=seeds[b]), target=names[b], request_id=str(b))
    generated: list[list[int]] = [[] for _ in range(batch)]
    steps = [0] * batch
    finished = [False] * batch
    streamed = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise out.exception if out.exception is not None else RuntimeError(out.error)
            b = int(out.request_id)
            generated[b] += out.new_token_ids
            steps[b] += 1
            finished[b] = out.finished
        streamed = _stream(streamer, generated, finished, pad, streamed, max_new_tokens)
    if streamer is not None:
        _stream(streamer, generated, [True] * batch, pad, streamed, max_new_tokens)
        streamer.end()
    width = max(len(g) for g in generated)
    new = torch.full((batch, width), pad, dtype=torch.int64)
    for b, g in enumerate(generated):
        new[b, : len(g)] = torch.tensor(g, dtype=torch.int64)
    sequences = torch.cat([host_ids, new], dim=1).to(input_ids.device)
    stats = _stats(engine, generated, steps, time.perf_counter() - wall)
    return SpeculateOutput(sequences=sequences, stats=stats)


def _stream(streamer, generated, finished, pad, streamed: int, max_new: int) -> int:
    """Send the columns every row has produced (finished rows count as full), like generate() does."""
    if streamer is None:
        return streamed
    lengths = [len(g) for g in generated]
    ready = min(max_new if done else n for n, done in zip(lengths, finished))
    ready = min(ready, max(lengths))
    if ready <= streamed:
        return streamed
    if len(generated) == 1:
        streamer.put(torch.tensor(generated[0][streamed:ready], dtype=torch.int64))
    else:
        for column in range(streamed, ready):
            streamer.put(torch.tensor([g[column] if column < len(g) else pad for g in generated]))
    return ready


def _stats(engine: Engine, generated, steps, wall: float) -> SpeculateStats:
    es = engine.stats
    stats = SpeculateStats(
        steps=es.steps,
        new_tokens=[len(g) for g in generated],
        draft_tokens=es.draft_tokens,
        accepted_tokens=es.accepted_tokens,
        compactions=es.compactions,
        max_cache_columns=es.max_cache_columns,
        exit_histogram=dict(sorted(es.exit_histogram.items())),
    )
    stats.mat_per_row = [n / s if s else 0.0 for n, s in zip(stats.new_tokens, steps)]
    stats.mat = sum(stats.new_tokens) / sum(steps) if sum(steps) else 0.0
    stats.acceptance_by_position = [a / p if p else 0.0 for a, p in zip(es.accepted_at, es.proposed_at)]
    clock = engine.clock
    if clock.enabled:
        clock.lap("other")
        stats.profiled = True
        stats.time_draft, stats.time_target = clock.spent["draft"], clock.spent["target"]
        stats.time_verify, stats.time_other = clock.spent["verify"], clock.spent["other"]
        stats.time_total = clock.last - clock.start
        stats.other_fraction = stats.time_other / stats.time_total if stats.time_total > 0 else 0.0
    else:
        stats.time_total = wall
    return stats


# ------------------------------------------------------------------------------------------ validation
def check_input_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype in (
        torch.bool,
        torch.complex64,
        torch.complex128,
    ):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch (B=0); pass at least one prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has empty prompts (L=0); every row needs at least one token")
    return input_ids.long()


def check_mask(attention_mask: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool on input_ids' device; rows must end with a token (left padding) and hold one."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}"
        )
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: prompts must be left-padded (every row's last position a token)")
    # NOTE: a hole inside a prompt is not left padding either.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask: prompts must be left-padded (zeros, then ones, on every row)")
    return mask


#: generate() arguments with another name (or none) here, for the error message
_GENERATE_ONLY = {
    "max_length": "pass max_new_tokens (new tokens, not counting the prompt)",
    "min_length": "pass min_new_tokens (new tokens, not counting the prompt)",
    "do_sample": "pass temperature > 0 to sample (0 = greedy)",
    "generation_config": "pass its settings as arguments (unset ones come from target.generation_config)",
}


def _check_extra(extra: Mapping[str, Any]) -> None:
    """A TypeError naming a keyword argument that is no SamplingParams field (and what to pass instead)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    own = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "eos_token_id", "stop_token_ids"}
    for name in extra:
        if name not in fields or name in own:
            hint = _GENERATE_ONLY.get(name, "see s2d_ext.SamplingParams for the per-row settings")
            raise TypeError(f"unexpected keyword argument {name!r}: {hint}")


def _config_defaults(configs, used, width, eos, extra, max_new_tokens, temperature, top_k, top_p):
    """Fill what the caller left unset from the targets' generation_config, as ``generate()`` does:
    ``max_new_tokens``, the sampling settings (when ``temperature`` is None: ``do_sample`` decides) and
    ``repetition_penalty`` / ``bad_words_ids`` / ``min_new_tokens`` (into ``extra``, when absent).

    NOTE: an explicit ``temperature`` samples with exactly the filters passed (None = off), not with the
    config's top-k / top-p: the call says how it samples.
    """
    from s2d_ext.driver.generation_config import check_supported, processing_settings, sampling_settings

    gcs = {name: getattr(configs[name].model, "generation_config", None) for name in used}
    where = {
        name: "target.generation_config" if len(used) == 1 else f"target {name!r}'s generation_config"
        for name in used
    }
    for name, gc in gcs.items():
        if gc is not None:
            check_supported(gc, where[name])
    if max_new_tokens is None:
        max_new_tokens = _agreed(
            "max_new_tokens", {n: getattr(gc, "max_new_tokens", None) for n, gc in gcs.items()}
        )
    if temperature is None:
        neutral = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        settings = _agreed(
            "temperature",
            {n: sampling_settings(gc, where[n]) if gc is not None else neutral for n, gc in gcs.items()},
        )
        temperature = settings["temperature"]
        top_k = settings["top_k"] if top_k is None else top_k
        top_p = settings["top_p"] if top_p is None else top_p
        if settings["min_p"] and "min_p" not in extra:
            extra["min_p"] = settings["min_p"]
    neutral = {"repetition_penalty": 1.0, "bad_words_ids": [], "min_new_tokens": 0}
    processing = {
        n: processing_settings(gc, eos, width) if gc is not None else neutral for n, gc in gcs.items()
    }
    for key, value in neutral.items():
        if key in extra:
            continue
        got = _agreed(key, {n: settings[key] for n, settings in processing.items()})
        if got != value:
            extra[key] = got
    return max_new_tokens, temperature, top_k, top_p


def _agreed(field: str, values: Mapping[str, Any]) -> Any:
    """The one value the targets of this call agree on; a ValueError naming ``field`` when they differ."""
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        shown = ", ".join(f"{n!r}: {v!r}" for n, v in values.items())
        raise ValueError(
            f"{field}: the targets of this call take different values from their generation_config "
            f"({shown}); pass {field} explicitly"
        )
    return next(iter(values.values()), None)


def generation_default(configs: Mapping[str, TargetConfig], used: Sequence[str], field: str) -> Any:
    """``generation_config.<field>`` of the targets in use (None if unset); they must agree."""
    values = {}
    for name in used:
        ids = generation_default_ids(getattr(configs[name].model, "generation_config", None), field)
        values[name] = None if not ids else (ids[0] if len(ids) == 1 else ids)
    return _agreed(field, values)
