"""``speculate()``: lossless speculative decoding of a Hugging Face target with a (sorted) draft.

One step, for every unfinished row at once::

    n     = policy lengths, capped by the tokens the row may still emit        # [B]
    prop  = draft.propose(state, max(n), n, ...)                               # drafts + q
    for each target (one for speculate(), several under a Speculator):
        logits = target([pending, drafts])                                     # [b, k+1, V], one forward
        out, n_acc = s2d_ext.ops.verify(logits, drafts, q, ...)                # accepted drafts + 1 token
        target cache keeps pending + accepted drafts (the rest become holes)
    rows append their new tokens, stop at EOS / stop tokens / max_new_tokens
    draft.advance(state, n_acc, emitted, active); pending = emitted

Randomness: row b draws every random number from Philox keyed by ``seeds[b]`` with counter offset = the
number of steps row b has taken (draft: STREAM_DRAFT; verify: STREAM_ACCEPT / STREAM_SAMPLE). So a row's
output depends only on its prompt, seed and settings, never on the rest of the batch. ``seed=None`` draws
the seeds from torch's default generator; an int seeds every row with that int (identical prompts then
give identical outputs); a list / tensor gives one seed per row.

KV cache: see :mod:`s2d_ext.target` (holes + explicit position ids, compaction with ``kv_compact``);
between steps a target cache holds at most ``(1 + 0.25) * longest_row + 64`` columns. Finished rows draft
nothing and are dropped from a target's batch once a quarter of its rows are done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from s2d_ext import _cache_compat
from s2d_ext.ops import verify
from s2d_ext.target import CachedLM

DRAFT_LENGTHS = ("fixed", "heuristic", "confidence")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class SpeculateStats:
    """What a :func:`speculate` call did and where its time went (seconds)."""

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
    other_fraction: float = 0.0  # time_other / time_total

    @property
    def drafted_tokens(self) -> int:
        """Alias of ``draft_tokens``."""
        return self.draft_tokens

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.time_total if self.time_total > 0 else 0.0


@dataclass
class SpeculateOutput:
    """sequences: [B, prompt_len + new] int64 laid out like ``generate()``; stats: :class:`SpeculateStats`."""

    sequences: torch.Tensor
    stats: SpeculateStats


def speculate(
    target: torch.nn.Module,
    draft: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    num_draft_tokens: int = 5,
    draft_length: str = "heuristic",
    thresholds: Sequence[float] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    streamer: Any = None,
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
    max_new_tokens : int
        At most this many new tokens per row, >= 1 (``generate()`` rejects 0 too).
    num_draft_tokens : int
        Draft tokens per step (the start value of "heuristic", the cap of "confidence").
    draft_length : str
        "fixed", "heuristic" (+2 after a fully accepted step, -1 otherwise) or "confidence" (stop a row's
        drafting at a token whose confidence is below the policy's stop threshold).
    thresholds : sequence of float, optional
        Exit thresholds of a sorted draft (one per exit); None = the draft's own.
    temperature, top_k, top_p : float, int, float
        Sampling as in ``generate()`` (temperature 0 = greedy; the filters apply only when sampling).
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

    Returns
    -------
    SpeculateOutput
        ``sequences`` [B, L + max new] and ``stats``.
    """
    from s2d_ext.speculator import Speculator

    spec = Speculator(
        draft,
        targets={"target": target},
        thresholds={"target": thresholds} if thresholds is not None else None,
        num_draft_tokens={"target": num_draft_tokens},
        draft_length=draft_length,
    )
    return spec.generate(
        input_ids,
        attention_mask,
        target="target",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_token_ids=stop_token_ids,
        streamer=streamer,
    )


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class TargetGroup:
    """One target model and the batch rows it verifies."""

    name: str
    model: torch.nn.Module
    rows: torch.Tensor  # [b] int64 (CPU): global rows, in the order of the runner's batch
    num_draft_tokens: int
    thresholds: Sequence[float] | None
    draft_length: str = "heuristic"
    stop_threshold: float | None = None
    runner: CachedLM | None = None
    pending: torch.Tensor | None = None  # [b] int64 on the target's input device
    policy: Any = None
    all_rows: torch.Tensor | None = None  # [b0] int64: the rows the group started with (policy order)


@dataclass
class Settings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seeds: torch.Tensor  # [B] int64 CPU
    stop_ids: torch.Tensor  # [n_stop] int64 CPU
    pad_token_id: int
    streamer: Any


class _Clock:
    """Splits wall time into buckets; on CUDA it synchronises so each bucket holds its own kernels."""

    def __init__(self, devices: Sequence[torch.device]):
        self.cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)  # every device the models use
        self.spent = {"draft": 0.0, "target": 0.0, "verify": 0.0, "other": 0.0}
        self.start = self.last = time.perf_counter()

    def lap(self, bucket: str) -> None:
        for device in self.cuda:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.spent[bucket] += now - self.last
        self.last = now


@torch.no_grad()
def run_speculation(
    draft: Any,
    groups: list[TargetGroup],
    input_ids: torch.Tensor,  # [B, L] int64, validated
    attention_mask: torch.Tensor,  # [B, L] bool, validated
    settings: Settings,
) -> SpeculateOutput:
    """The decoding loop shared by :func:`speculate` and :class:`~s2d_ext.speculator.Speculator`."""
    from s2d_ext.draft.policies import make_policy

    batch, prompt_len = input_ids.shape
    max_new = settings.max_new_tokens
    clock = _Clock([draft.device] + [p.device for g in groups for p in g.model.parameters()])
    stats = SpeculateStats()
    generated = torch.full((batch, max(max_new, 1)), settings.pad_token_id, dtype=torch.int64)  # CPU
    n_gen = torch.zeros(batch, dtype=torch.int64)
    finished = torch.zeros(batch, dtype=torch.bool)
    steps_taken = torch.zeros(batch, dtype=torch.int64)  # per row; also the Philox counter offset
    lengths = torch.zeros(batch, dtype=torch.int64)  # per-row draft length from the policies
    stop_threshold = torch.zeros(batch, dtype=torch.float32)
    accepted_at, proposed_at = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    real_len = attention_mask.sum(-1)
    thresholds = _row_thresholds(draft, groups, batch)
    dd = draft.device
    if settings.streamer is not None:
        settings.streamer.put(input_ids.cpu())
    streamed = 0

    for g in groups:
        g.all_rows = g.rows.clone()
        g.policy = make_policy(g.draft_length, g.num_draft_tokens, stop_threshold=g.stop_threshold)
        lengths[g.rows] = g.policy.initial(len(g.rows), torch.device("cpu")).to(torch.int64)
        if g.policy.stop_threshold is not None:
            stop_threshold[g.rows] = float(g.policy.stop_threshold)
    k_cap = max(g.policy.max_tokens for g in groups)
    for g in groups:
        g.runner = CachedLM(g.model, len(g.rows))
        _check_sliding_window(g, int(real_len.max()) + max_new)
    # NOTE: drafts are capped by the tokens a row may still emit, so no row's context (prompt + kept
    # tokens + drafts) ever exceeds its prompt + max_new_tokens.
    state = draft.begin(input_ids.to(dd), attention_mask.to(dd).long(), int(real_len.max()) + max_new)
    clock.lap("draft")
    for g in groups:
        device = g.runner.device
        ids, live = input_ids[g.rows].to(device), attention_mask[g.rows].to(device)
        if prompt_len > 1:
            g.runner.forward(ids[:, :-1], live[:, :-1], logits_to_keep=1)
            g.runner.commit(live[:, :-1].sum(-1))
        g.pending = ids[:, -1].clone()
    clock.lap("target")
    use_stop = any(g.policy.stop_threshold is not None for g in groups)
    draft_kwargs = {  # per-row draft settings, constant over the call: moved to the draft's device once
        "temperature": torch.full((batch,), float(settings.temperature), device=dd),
        "top_k": torch.full((batch,), int(settings.top_k), dtype=torch.int64, device=dd),
        "top_p": torch.full((batch,), float(settings.top_p), device=dd),
        "seeds": settings.seeds.to(dd),
        "thresholds": None if thresholds is None else thresholds.to(dd),
        "stop_threshold": stop_threshold.to(dd) if use_stop else None,
    }

    while not bool(finished.all()):
        # 1. How many drafts each row asks for.
        remaining = max_new - n_gen
        n_ask = torch.minimum(lengths.clamp(0, k_cap), remaining - 1).clamp(min=0)
        n_ask[finished] = 0
        k = int(n_ask.max())
        active = ~finished
        clock.lap("other")

        # 2. Draft.
        prop = draft.propose(state, k, n_ask.to(dd), offsets=steps_taken.to(dd), **draft_kwargs)
        n_prop = prop.num_draft.cpu()
        clock.lap("draft")

        # 3. Each target scores its rows' drafts in one forward; verification keeps a prefix + 1 token.
        out_all = torch.full((batch, k + 1), -1, dtype=torch.int64)
        n_acc_all = torch.zeros(batch, dtype=torch.int64)
        for g in groups:
            if len(g.rows) == 0:
                continue
            out, n_acc = _target_step(g, prop, n_prop, active, settings, steps_taken, clock)
            out_all[g.rows, : out.shape[1]] = out
            n_acc_all[g.rows] = n_acc

        # 4. Bookkeeping: new tokens, stops, lengths, stats.
        count = torch.where(active, n_acc_all + 1, 0)
        column = torch.arange(k + 1)
        is_stop = torch.isin(out_all, settings.stop_ids) & (column < count[:, None])
        has_stop = is_stop.any(-1)
        count = torch.where(has_stop, is_stop.to(torch.int64).argmax(-1) + 1, count)
        write = column < count[:, None]
        _write_tokens(generated, n_gen[:, None] + column, out_all, write)
        n_gen += count
        finished |= has_stop | (n_gen >= max_new)
        steps_taken += active
        stats.steps += 1
        accepted_at, proposed_at = _count_positions(accepted_at, proposed_at, n_acc_all, n_prop, active)
        _count_exits(stats.exit_histogram, prop.exits.cpu(), n_prop)
        for g in groups:
            lengths[g.all_rows] = g.policy.update(
                lengths[g.all_rows], n_acc_all[g.all_rows], n_prop[g.all_rows]
            ).to(torch.int64)
        streamed = _stream(settings.streamer, generated, n_gen, finished, streamed)
        clock.lap("other")

        # 5. Roll the caches forward: targets keep pending + accepted, the draft does the same.
        emitted = out_all.gather(1, n_acc_all[:, None]).squeeze(1).clamp(min=0)
        for g in groups:
            if len(g.rows):
                stats.compactions += _commit_target(g, n_acc_all, active, finished)
                stats.max_cache_columns = max(stats.max_cache_columns, g.runner.num_columns)
        clock.lap("target")
        if not bool(finished.all()):
            draft.advance(state, n_acc_all.to(dd), emitted.to(dd), (active & ~finished).to(dd))
        clock.lap("draft")

    if settings.streamer is not None:
        _stream(settings.streamer, generated, n_gen, torch.ones_like(finished), streamed)
        settings.streamer.end()
    width = int(n_gen.max()) if batch else 0
    sequences = torch.cat([input_ids.cpu(), generated[:, :width]], dim=1).to(input_ids.device)
    _finish_stats(stats, clock, n_gen, steps_taken, accepted_at, proposed_at)
    return SpeculateOutput(sequences=sequences, stats=stats)


def _target_step(g, prop, n_prop, active, settings, steps_taken, clock):
    """Forward ``[pending, drafts]`` through g's target, verify; returns CPU out [b, k_g+1], n_acc [b]."""
    rows = g.rows
    device = g.runner.device
    n_draft = n_prop[rows]
    k_g = int(n_draft.max())
    drafts = prop.tokens[rows.to(prop.tokens.device), :k_g].to(device)
    tokens = torch.cat([g.pending[:, None], drafts], dim=1)
    live = (torch.arange(k_g + 1)[None, :] <= n_draft[:, None]) & active[rows][:, None]
    live = live.to(device)
    clock.lap("other")
    logits = g.runner.forward(tokens, live)  # [b, k_g+1, V]
    clock.lap("target")
    vd = logits.device
    probs = None if prop.probs is None else prop.probs[rows.to(prop.probs.device), :k_g].to(vd)
    out, n_acc = verify(
        logits,
        drafts.to(vd),
        probs,
        n_draft.to(vd),
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seeds=settings.seeds[rows].to(vd),
        offsets=steps_taken[rows].to(vd),
    )
    g.pending = out.gather(1, n_acc.long()[:, None]).squeeze(1).to(device)
    out_cpu, n_acc_cpu = out.cpu(), n_acc.cpu().to(torch.int64)
    clock.lap("verify")
    return out_cpu, n_acc_cpu


def _commit_target(g, n_acc_all, active, finished) -> int:
    """Keep pending + accepted tokens in g's cache; drop finished rows / compact. Returns compactions."""
    rows = g.rows
    g.runner.commit(torch.where(active[rows], n_acc_all[rows] + 1, 0))
    done = finished[rows]
    n_done = int(done.sum())
    if n_done == len(rows):
        g.rows = rows[:0]
        return 0
    if n_done and 4 * n_done >= len(rows):  # NOTE: dropping costs one cache gather; batch it
        keep = (~done).nonzero().squeeze(1)
        g.runner.compact(keep)
        g.rows, g.pending = rows[keep], g.pending[keep.to(g.pending.device)]
        return 1
    return int(g.runner.maybe_compact())


def _write_tokens(generated, dest, out_all, write) -> None:
    rows, cols = write.nonzero(as_tuple=True)
    generated[rows, dest[rows, cols]] = out_all[rows, cols]


def _count_positions(accepted_at, proposed_at, n_acc, n_prop, active):
    k = int(n_prop.max()) if n_prop.numel() else 0
    if k > accepted_at.numel():
        pad = k - accepted_at.numel()
        accepted_at = torch.cat([accepted_at, torch.zeros(pad, dtype=torch.int64)])
        proposed_at = torch.cat([proposed_at, torch.zeros(pad, dtype=torch.int64)])
    position = torch.arange(accepted_at.numel())
    proposed_at += ((position[None, :] < n_prop[:, None]) & active[:, None]).sum(0)
    accepted_at += ((position[None, :] < n_acc[:, None]) & active[:, None]).sum(0)
    return accepted_at, proposed_at


def _count_exits(histogram: dict[int, int], exits: torch.Tensor, n_prop: torch.Tensor) -> None:
    if exits.numel() == 0:
        return
    valid = torch.arange(exits.shape[1])[None, :] < n_prop[:, None]
    layers, counts = exits[valid].unique(return_counts=True)
    for layer, count in zip(layers.tolist(), counts.tolist()):
        histogram[layer] = histogram.get(layer, 0) + count


def _stream(streamer, generated, n_gen, finished, streamed: int) -> int:
    """Send the columns every row has produced (finished rows count as full), like generate() does."""
    if streamer is None:
        return streamed
    ready = int(torch.where(finished, generated.shape[1], n_gen).min())
    ready = min(ready, int(n_gen.max()))
    if ready <= streamed:
        return streamed
    if generated.shape[0] == 1:
        streamer.put(generated[0, streamed:ready].clone())
    else:
        for column in range(streamed, ready):
            streamer.put(generated[:, column].clone())
    return ready


def _finish_stats(stats, clock, n_gen, steps_taken, accepted_at, proposed_at) -> None:
    clock.lap("other")
    stats.new_tokens = n_gen.tolist()
    stats.mat_per_row = [n / s if s else 0.0 for n, s in zip(stats.new_tokens, steps_taken.tolist())]
    total_steps = int(steps_taken.sum())
    stats.mat = sum(stats.new_tokens) / total_steps if total_steps else 0.0
    stats.draft_tokens, stats.accepted_tokens = int(proposed_at.sum()), int(accepted_at.sum())
    stats.acceptance_by_position = [
        a / p if p else 0.0 for a, p in zip(accepted_at.tolist(), proposed_at.tolist())
    ]
    stats.time_draft, stats.time_target = clock.spent["draft"], clock.spent["target"]
    stats.time_verify, stats.time_other = clock.spent["verify"], clock.spent["other"]
    stats.time_total = clock.last - clock.start
    stats.other_fraction = stats.time_other / stats.time_total if stats.time_total > 0 else 0.0
    stats.exit_histogram = dict(sorted(stats.exit_histogram.items()))


def _check_sliding_window(group: TargetGroup, reach: int) -> None:
    """Holes shift cache indices, and HF slides its window over indices: keep every row inside it."""
    window = _cache_compat.sliding_window_of(group.runner.cache)
    if window is not None and reach >= window:
        raise ValueError(
            f"max_new_tokens: target {group.name!r} uses sliding-window attention (window {window}) and "
            f"prompt + max_new_tokens ({reach}) must stay below it"
        )


def _row_thresholds(draft, groups: list[TargetGroup], batch: int) -> torch.Tensor | None:
    """[B, n_exits] float32 exit thresholds per row, or None when every group uses the draft's own."""
    if all(g.thresholds is None for g in groups):
        return None
    n_exits = len(draft.exits)
    own = getattr(draft, "thresholds", None)
    table = torch.zeros((batch, n_exits), dtype=torch.float32)
    for g in groups:
        values = g.thresholds if g.thresholds is not None else own
        if values is None:
            values = [0.0] * n_exits
        table[g.rows] = torch.as_tensor(list(values), dtype=torch.float32)
    return table
