"""vLLM's ``custom_class`` speculative proposer, backed by an s2d_ext sorted draft.

Use
---
::

    vllm serve TARGET \\
        --speculative-config '{"method": "custom_class", "model": "s2d_ext.integrations.vllm.S2DProposer",
                               "num_speculative_tokens": 4}' \\
        --additional-config '{"s2d_draft": "/path/to/sorted/draft"}'

(or ``LLM(..., speculative_config={...}, additional_config={"s2d_draft": ...})``). The draft must share the
target's vocabulary. Each step, every request gets ``num_speculative_tokens`` greedy draft tokens, each
leaving the draft at its first exit whose top probability reaches that exit's threshold (the draft's own
early exits). vLLM verifies token-only proposals as deterministic (one-hot) drafts, so the output is the
target's own at any temperature: a greedy draft changes the speed, never the text.

The contract (as read)
----------------------
Read from vLLM's source, ``vllm/v1/spec_decode/custom_class_proposer.py`` (identical in the wheels of
vLLM 0.22.0 and 0.27.0, and on ``main`` at commit f7490e78408ff2ca158d93d61c012ba5bd2c1f54; the hook came
with vLLM PR #39487) and ``vllm/v1/worker/gpu_model_runner.py`` of 0.27.0:

* ``create_custom_proposer`` imports the dotted class path in ``speculative_config.model`` and calls
  ``cls(vllm_config)``; the instance must have a callable ``propose``. ``method`` is inferred as
  ``"custom_class"`` from a dotted ``model``, or can be given.
* ``load_model(target_model)`` is called when the class has one (the runner's ``hasattr`` check), with the
  target ``nn.Module``; this class loads its draft there (on the target's device), or on the first
  ``propose`` when nothing called it.
* After the step's bookkeeping, the runner calls ``propose(sampled_token_ids, input_batch.num_tokens_no_spec,
  input_batch.token_ids_cpu, slot_mappings=...)`` and takes back ``list[list[int]]``, one list per request
  row (an empty list: no drafts). By then the bookkeeping has written the sampled tokens into
  ``token_ids_cpu`` and counted them in ``num_tokens_no_spec``, so row ``i``'s context is
  ``token_ids_cpu[i, :num_tokens_no_spec[i]]``, the sampled tokens at its end. A row with no sampled tokens
  (a prefill chunk that is not the last) gets no drafts, as vLLM's n-gram proposer does.
* The runner's ``getattr(drafter, "model")`` checks treat a ``model`` attribute as a vLLM model (MoE, LoRA,
  CUDA-graph paths), so this class keeps its draft in ``draft``, never ``model``.

``custom_class`` is experimental in vLLM and is **not** in vLLM 0.34.0 (the newest wheel on PyPI when this
was written): that release replaced it with registered V2 speculators (``register_speculative_method``,
``BaseSpeculator`` in ``vllm/v1/worker/gpu/spec_decode/``), a different contract this class does not
implement. Use a vLLM from 0.22.0 to 0.27.0 (the versions read); ``tools/vllm_e2e.sh`` runs one end to end.

Configuration
-------------
``speculative_config.model`` holds the class path, so the draft's path cannot go there, and vLLM's
``SpeculativeConfig`` accepts no extra keys. The proposer reads ``vllm_config.additional_config`` (a free-form
dict vLLM forwards to its workers, ``--additional-config``):

==================== ==============================================================================
``s2d_draft``        the sorted draft checkpoint folder (required; else the ``S2D_VLLM_DRAFT``
                     environment variable). A draft saved with a reference to its target's embedding
                     and head loads them as :func:`s2d_ext.checkpoints.load_draft` does.
``s2d_exits``        exits, e.g. ``[6, 9, 12]`` (default: the checkpoint's ``s2d_exits``)
``s2d_thresholds``   one per exit (default: the checkpoint's ``s2d_thresholds``)
``s2d_device``       the draft's device (default: the target model's, else CUDA when present, else CPU)
``s2d_dtype``        ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default: the checkpoint's)
``s2d_max_idle_steps`` steps a cached request may go unseen before its caches are freed (default 8)
``s2d_max_cached``   cached requests at most (default ``2 * scheduler_config.max_num_seqs``, at least 16)
==================== ==============================================================================

An unknown ``s2d_*`` key is refused, naming it. From ``speculative_config`` the proposer reads
``num_speculative_tokens``; from ``model_config`` ``max_model_len``.

Caches across steps
-------------------
``propose`` gets no request ids, so the proposer keeps one draft state (a one-row
:class:`~s2d_ext.draft.static_cache.SortedDraftState`) per request it has seen, and matches the rows of a
step to them by their tokens: first the state last used by the same row index whose context is a prefix of
the row's (the usual decode step); then, for a row that moved, the free state whose context the row's
extends; a new row gets a copy of the state sharing the longest prefix with it (a common prompt), else a
fresh one. A state moves only to a row that extends its context, so a request vLLM leaves out of a step
keeps its caches. A matched state is rewound to the common prefix with the row's context (drafts vLLM
rejected are forgotten: their KV and deferred hidden states are dropped by lowering the state's
``filled`` counts, as :meth:`SortedDraft.advance` does) and the row's new tokens are appended; the draft's
own ``propose`` then feeds them and drafts. A state not matched for ``s2d_max_idle_steps`` steps (a request
that finished) is freed, and at most ``s2d_max_cached`` are kept (the longest idle go first).

Rows are drafted one at a time (each with its own state): simple and exact, but a GPU would rather draft
all rows as one batch (a persistent multi-row state with joins and leaves, as
:class:`~s2d_ext.engine.Engine`'s ``DraftBatch`` does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DRAFT_KEY = "s2d_draft"
DRAFT_ENV = "S2D_VLLM_DRAFT"
OPTION_KEYS = (
    DRAFT_KEY,
    "s2d_exits",
    "s2d_thresholds",
    "s2d_device",
    "s2d_dtype",
    "s2d_max_idle_steps",
    "s2d_max_cached",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_IDLE_STEPS = 8
CAPACITY_STEP = 64  # a state's slots grow in multiples of this (doubling), never past the length limit


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` or ``obj[name]`` (vLLM passes config objects; tests and scripts may pass dicts)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclass(frozen=True)
class ProposerOptions:
    """What :class:`S2DProposer` takes from vLLM's config (see the module docstring for the keys)."""

    draft: str
    num_speculative_tokens: int
    max_model_len: int
    exits: tuple[int, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    device: str | None = None
    dtype: torch.dtype | None = None
    max_idle_steps: int = DEFAULT_MAX_IDLE_STEPS
    max_cached: int = 16

    @staticmethod
    def from_vllm_config(vllm_config: Any) -> ProposerOptions:
        """Options from a ``VllmConfig`` (or any object / dict with the same fields).

        Raises ValueError with one line naming the key at fault: no draft path (``s2d_draft``), a path
        that is not a folder, an unknown ``s2d_*`` key, a missing ``num_speculative_tokens``.
        """
        extra = _field(vllm_config, "additional_config") or {}
        if not isinstance(extra, Mapping):
            extra = {}
        unknown = sorted(
            k for k in extra if isinstance(k, str) and k.startswith("s2d_") and k not in OPTION_KEYS
        )
        if unknown:
            raise ValueError(
                f"S2DProposer: unknown additional_config key {unknown[0]!r} (known: {', '.join(OPTION_KEYS)})"
            )
        draft = extra.get(DRAFT_KEY) or os.environ.get(DRAFT_ENV)
        if not draft:
            raise ValueError(
                f"S2DProposer: no sorted draft given: set additional_config[{DRAFT_KEY!r}] "
                f'(--additional-config \'{{"{DRAFT_KEY}": "/path/to/draft"}}\') or the {DRAFT_ENV} '
                "environment variable"
            )
        if not os.path.isdir(draft):
            raise ValueError(f"S2DProposer: additional_config[{DRAFT_KEY!r}] = {draft!r} is not a folder")
        spec = _field(vllm_config, "speculative_config")
        k = _field(spec, "num_speculative_tokens")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"S2DProposer: speculative_config.num_speculative_tokens must be an int >= 1, got {k!r}"
            )
        max_model_len = _field(_field(vllm_config, "model_config"), "max_model_len")
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(
                f"S2DProposer: model_config.max_model_len must be an int >= 1, got {max_model_len!r}"
            )
        dtype = extra.get("s2d_dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"S2DProposer: additional_config['s2d_dtype'] must be one of {sorted(DTYPES)}")
        max_num_seqs = _field(_field(vllm_config, "scheduler_config"), "max_num_seqs") or 8
        exits, thresholds = extra.get("s2d_exits"), extra.get("s2d_thresholds")
        return ProposerOptions(
            draft=str(draft),
            num_speculative_tokens=k,
            max_model_len=max_model_len,
            exits=None if exits is None else tuple(int(e) for e in exits),
            thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
            device=extra.get("s2d_device"),
            dtype=None if dtype is None else DTYPES[dtype],
            max_idle_steps=_positive(extra, "s2d_max_idle_steps", DEFAULT_MAX_IDLE_STEPS),
            max_cached=_positive(extra, "s2d_max_cached", max(16, 2 * int(max_num_seqs))),
        )


def _positive(extra: Mapping, key: str, default: int) -> int:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"S2DProposer: additional_config[{key!r}] must be an int >= 1, got {value!r}")
    return value


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D token arrays.

    Parameters
    ----------
    a, b : numpy.ndarray
        [n] and [m] integer token ids.

    Returns
    -------
    int
        The largest p with ``a[:p] == b[:p]``.
    """
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass
class _Cached:
    """One request's draft state, as the proposer last left it."""

    state: Any  # SortedDraftState, one row, pad 0
    tokens: np.ndarray  # [m] int64: the state's slots: the context it drafted from, then those drafts
    context_len: int  # tokens of that context (the rest of ``tokens`` are drafts)
    row: int  # the vLLM row it was last proposed for
    idle: int = 0  # steps since it was last matched


@dataclass
class ProposerStats:
    """Counters over the proposer's life (tests and logs read them)."""

    steps: int = 0
    rows: int = 0  # rows drafted for
    fresh: int = 0  # rows that started a new state
    forked: int = 0  # rows that copied a state another row of the step took
    reused_tokens: int = 0  # context tokens whose draft KV came from an earlier step
    fed_tokens: int = 0  # tokens the draft's first exit group ran this life (context catch-up + drafts)
    evicted: int = 0


class S2DProposer:
    """vLLM ``custom_class`` proposer: greedy sorted-draft proposals, per-request caches kept across steps.

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig or duck-typed equivalent
        Read through :meth:`ProposerOptions.from_vllm_config` (``additional_config['s2d_draft']``,
        ``speculative_config.num_speculative_tokens``, ``model_config.max_model_len``, ...).

    Raises
    ------
    ValueError
        One line naming the configuration key at fault (see :class:`ProposerOptions`).
    """

    def __init__(self, vllm_config: Any) -> None:
        self.options = ProposerOptions.from_vllm_config(vllm_config)
        self.k = self.options.num_speculative_tokens
        self.draft = None  # SortedDraft, loaded by load_model() or the first propose()
        self.stats = ProposerStats()
        self._cached: list[_Cached] = []
        self._limit = self.options.max_model_len

    # ------------------------------------------------------------------ loading
    def load_model(self, target_model: Any = None, *args: Any, **kwargs: Any) -> None:
        """Load the sorted draft (vLLM calls this with the target model once it is loaded).

        The device is ``s2d_device``, else the target model's (its first parameter's), else CUDA when
        present, else CPU.
        """
        if self.draft is not None:
            return
        from s2d_ext.checkpoints import load_draft

        device = self.options.device
        if device is None and isinstance(target_model, torch.nn.Module):
            first = next(iter(target_model.parameters()), None)
            device = None if first is None else str(first.device)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {} if self.options.dtype is None else {"dtype": self.options.dtype}
        draft = load_draft(
            self.options.draft,
            exits=self.options.exits,
            thresholds=self.options.thresholds,
            device=device,
            **kwargs,
        )
        context = getattr(draft.config, "max_position_embeddings", None)
        self._limit = min(self.options.max_model_len, int(context)) if context else self.options.max_model_len
        self.draft = draft

    # ------------------------------------------------------------------ the contract
    def propose(
        self,
        sampled_token_ids: list[list[int]],  # [num_reqs][0..k+1]: each row's tokens sampled this step
        num_tokens_no_spec: np.ndarray,  # [>= num_reqs] int: each row's context length, sampled included
        token_ids_cpu: np.ndarray,  # [max_num_reqs, max_model_len] int32: row i's context is [i, :n_i]
        slot_mappings: Any = None,  # vLLM's KV slot mappings (the target's: unused)
    ) -> list[list[int]]:
        """Draft tokens for every request row of the step.

        Parameters
        ----------
        sampled_token_ids : list of list of int
            [num_reqs] lists: the tokens vLLM sampled for each row this step (accepted drafts + one); an
            empty list means the row produced nothing (a non-final prefill chunk) and gets no drafts.
        num_tokens_no_spec : numpy.ndarray
            [max_num_reqs] (at least num_reqs) integers: row i's context length, its sampled tokens included.
        token_ids_cpu : numpy.ndarray
            [max_num_reqs, max_model_len] integer token ids: row i's context is ``token_ids_cpu[i, :n_i]``.
        slot_mappings : object, optional
            Passed by vLLM for its own drafters; unused.

        Returns
        -------
        list of list of int
            [num_reqs] lists of draft token ids: ``min(num_speculative_tokens, limit - n_i)`` each (limit: the
            smaller of ``max_model_len`` and the draft's context), [] for rows with nothing sampled or at
            the limit.
        """
        self.load_model()
        self.stats.steps += 1
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        rows: list[tuple[int, np.ndarray, int]] = []  # (row, context [n] int64, drafts to make)
        for i, sampled in enumerate(sampled_token_ids):
            if len(sampled) == 0:
                continue
            n = int(num_tokens_no_spec[i])
            k = min(self.k, self._limit - n)
            if n < 1 or k < 1:
                continue
            context = np.asarray(token_ids_cpu[i, :n], dtype=np.int64)
            if int(context.min()) < 0 or int(context.max()) >= self.draft.vocab_size:
                raise ValueError(
                    f"S2DProposer: row {i} holds token ids outside the draft's vocabulary "
                    f"[0, {self.draft.vocab_size}): the draft must share the target's vocabulary"
                )
            rows.append((i, context, k))
        used = set()
        for (i, context, k), cached in zip(rows, self._match(rows), strict=True):
            cached = self._draft_row(i, context, k, cached)
            out[i] = cached.tokens[cached.context_len :].tolist()
            used.add(id(cached))
        self._evict(used)
        return out

    # ------------------------------------------------------------------ matching rows to states
    def _match(self, rows: Sequence[tuple[int, np.ndarray, int]]) -> list[_Cached | None]:
        """A cached state for each row (None: start fresh); a state is matched to one row at most, and a
        row sharing a prefix only with a state another row took gets a copy of it."""
        found: list[_Cached | None] = [None] * len(rows)
        taken: set[int] = set()
        by_row = {c.row: c for c in self._cached}
        # 1. The usual step: the state this row index used last, whose context the row's extends.
        for r, (i, context, _) in enumerate(rows):
            cached = by_row.get(i)
            if cached is None or id(cached) in taken or cached.context_len > len(context):
                continue
            if np.array_equal(cached.tokens[: cached.context_len], context[: cached.context_len]):
                found[r] = cached
                taken.add(id(cached))
        # 2. Rows that moved (their context extends a free state's): that state, the longest such.
        #    Other rows (new ones): a copy of the state sharing the longest prefix with them, else fresh.
        # NOTE: a state is moved only to a row that extends its context, so a request vLLM left out of this
        # step keeps its caches; copies are made now, before the row that took a state drafts on it.
        for r, (_, context, _) in enumerate(rows):
            if found[r] is not None:
                continue
            best, best_len, extended, extended_len = None, 0, None, -1
            for cached in self._cached:
                p = common_prefix_length(cached.tokens, context)
                if p > best_len:
                    best, best_len = cached, p
                if id(cached) not in taken and p >= cached.context_len and p > extended_len:
                    extended, extended_len = cached, p
            if extended is not None:
                found[r] = extended
                taken.add(id(extended))
            elif best is not None and best_len > 1:
                found[r] = _Cached(best.state.select([0]), best.tokens.copy(), best.context_len, best.row)
                self._cached.append(found[r])
                taken.add(id(found[r]))
                self.stats.forked += 1
        return found

    def _evict(self, matched: set[int]) -> None:
        """Age the states no row used this step (``matched``: the ids of those used); free those idle too
        long, then the longest idle past ``max_cached``."""
        for cached in self._cached:
            cached.idle = 0 if id(cached) in matched else cached.idle + 1
        keep = [c for c in self._cached if c.idle <= self.options.max_idle_steps]
        keep.sort(key=lambda c: c.idle)  # stable: the states of this step (idle 0) first
        keep = keep[: max(self.options.max_cached, len(matched))]
        self.stats.evicted += len(self._cached) - len(keep)
        self._cached = keep

    # ------------------------------------------------------------------ one row
    def _draft_row(self, row: int, context: np.ndarray, k: int, cached: _Cached | None) -> _Cached:
        """Bring ``cached`` (or a fresh state) to ``context`` ([n] int64), draft ``k`` greedy tokens."""
        draft = self.draft
        n = len(context)
        need = n + k  # context + this step's drafts
        device = draft.device
        if cached is None:
            state = draft.begin(
                torch.as_tensor(context[None, :], device=device), None, self._capacity_for(need)
            )
            before = 0
            self.stats.fresh += 1
            cached = _Cached(state, context, n, row)
            self._cached.append(cached)
        else:
            state = cached.state
            if state.pads != [0]:
                raise AssertionError("S2DProposer keeps one-row states without padding")
            if state.max_length < need:
                capacity = self._capacity_for(need)
                state = state.with_capacity(capacity)
                state.max_length = capacity
                cached.state = state
            # Rewind to the common prefix, then append the row's new tokens.
            # NOTE: slots >= p hold other tokens (drafts vLLM rejected): their KV and the deferred hidden
            # states are forgotten by lowering filled, as SortedDraft.advance rolls back; propose() feeds
            # slots [filled, n) again before drafting.
            p = common_prefix_length(cached.tokens, context)
            if p < n:
                state.tokens[0, p:n] = torch.as_tensor(context[p:], device=device)
            state.length.fill_(n)
            state.filled.clamp_(max=min(p, n - 1))
            state.last_num_draft.zero_()
            before = int(state.filled[0, 0])
            self.stats.reused_tokens += before
        proposal = draft.propose(state, k)  # temperature 0: greedy at the draft's exits and thresholds
        made = int(proposal.num_draft[0])
        after = int(state.filled[0, 0])
        self.stats.fed_tokens += after - before
        self.stats.rows += 1
        cached.tokens = np.concatenate(
            [context, np.asarray(proposal.tokens[0, :made].tolist(), dtype=np.int64)]
        )
        cached.context_len = n
        cached.row = row
        return cached

    def _capacity_for(self, need: int) -> int:
        """Slots for a state that must hold ``need`` tokens: a multiple of CAPACITY_STEP with room to grow,
        at most the length limit."""
        steps = -(-(need + need // 2) // CAPACITY_STEP)
        return max(need, min(self._limit, steps * CAPACITY_STEP))
