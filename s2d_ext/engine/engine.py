"""``Engine``: the one speculative decoding loop, as a step API that requests join and leave.

::

    engine = Engine(draft, targets={"large": model})
    engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for out in engine.step():            # RequestOutput: new tokens, logprobs, finished, reason
            ...

Vocabulary: a *row* is a request in a batch. The draft keeps one batch of every running request
(:class:`~s2d_ext.engine.draft_batch.DraftBatch`); each target keeps a batch of its own requests
(:class:`~s2d_ext.engine.target_batch.TargetBatch`), each row knowing its row in the draft's batch. A row's
*pending* token is the last one emitted, not yet in the caches.

One step (:meth:`Engine.step`), for every running request at once::

    admit      drop finished rows (batched), prefill joining requests in a batch of their own and
               append them to the draft's and each target's batch
    plan       n = draft length of each row (its target's policy), capped by the tokens it may still emit
    propose    prop = draft.propose(state, max(n), n, ...)                   # drafts + q, every row
    verify     per target: logits = target([pending, drafts])                # [b, k+1, V], one forward
                           logits = processors(logits) at every position, with its own prefix (lossless)
                           out, n_acc = verify(logits, drafts, q, ...)       # accepted drafts + 1 token
    read       one packed device-to-host copy (StepReadout): tokens, accept counts, drafts proposed,
               exits (+ logprobs)
    apply      host: stops (EOS / stop ids / max_new_tokens), outputs, draft-length policies, stats
    commit     targets keep pending + accepted; the draft advances the rows still running

Randomness: a request draws every random number from Philox keyed by its seed, with counter offset =
the steps it has taken (draft: STREAM_DRAFT; verify: STREAM_ACCEPT / STREAM_SAMPLE), so its output
depends only on its prompt, seed and settings, never on the other requests or when it joined.

KV caches: see :mod:`s2d_ext.target` (holes + explicit position ids, compaction with ``kv_compact``);
joins concatenate caches (the draft state's ``concat``, :meth:`CachedLM.concat`), so every row keeps its
slots and positions.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from s2d_ext.engine import host_reads
from s2d_ext.engine.draft_batch import PADDING, DraftBatch
from s2d_ext.engine.draft_masks import draft_mask_for
from s2d_ext.engine.models import TargetConfig, as_draft, check_length, draft_limit
from s2d_ext.engine.params import RequestError, SamplingParams, seeds_for
from s2d_ext.engine.processors import processors_for
from s2d_ext.engine.profile import Clock
from s2d_ext.engine.readout import RowReadout, StepReadout
from s2d_ext.engine.request import Request, RequestOutput
from s2d_ext.engine.target_batch import TargetBatch
from s2d_ext.target import context_length

__all__ = ["Engine", "EngineStats", "RequestOutput"]


@dataclasses.dataclass
class EngineStats:
    """Counters over the engine's life (every row that took part in a step)."""

    steps: int = 0  # decoding steps (one target forward per target with running rows)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_at: list[int] = dataclasses.field(default_factory=list)  # per draft position
    proposed_at: list[int] = dataclasses.field(default_factory=list)
    exit_histogram: dict[int, int] = dataclasses.field(default_factory=dict)  # exit layer -> drafts
    compactions: int = 0  # kv_compact passes over a target cache
    max_cache_columns: int = 0  # largest target cache (columns) seen between steps

    def count_step(self, k: int) -> None:
        """One more step, whose longest draft is ``k``."""
        self.steps += 1
        if len(self.accepted_at) < k:
            pad = k - len(self.accepted_at)
            self.accepted_at += [0] * pad
            self.proposed_at += [0] * pad

    def count_row(self, row: RowReadout) -> None:
        """A row's drafts: proposed, accepted (by position) and the exit each used."""
        self.draft_tokens += row.n_proposed
        self.accepted_tokens += row.n_accepted
        for j, layer in enumerate(row.exits):
            self.proposed_at[j] += 1
            self.accepted_at[j] += j < row.n_accepted
            self.exit_histogram[layer] = self.exit_histogram.get(layer, 0) + 1


class Engine:
    """Continuous-batching speculative decoding over one draft and one or more targets.

    Parameters
    ----------
    draft : SortedDraft, DraftModel or transformers.PreTrainedModel
        A plain HF causal LM is wrapped as a one-exit draft. Must share the targets' vocabulary.
    targets : transformers.PreTrainedModel or dict[str, PreTrainedModel or TargetConfig]
        One target (named "target") or several by name.
    num_draft_tokens, draft_length, thresholds, stop_threshold
        Defaults of the targets given as plain models (see :class:`TargetConfig`).
    profile : bool
        Split the time into draft / target / verify / other (:attr:`clock`); this synchronises the
        devices several times a step. Off by default.
    max_running : int, optional
        At most this many requests in the batch; the others wait (in arrival order). None: no limit.
    draft_batch_multiple, draft_capacity : int, optional
        Static draft shapes, so that a compiled draft (``SortedDraft(compile=True,
        compile_mode="reduce-overhead")``: CUDA graphs) replays the same few graphs while requests come
        and go: the draft's batch is padded with idle rows to a multiple of ``draft_batch_multiple``, and
        its caches hold at least ``draft_capacity`` slots per row. A SortedDraft only.
    """

    def __init__(
        self,
        draft: Any,
        targets: torch.nn.Module | Mapping[str, torch.nn.Module | TargetConfig],
        *,
        num_draft_tokens: int = 5,
        draft_length: str = "heuristic",
        thresholds: Sequence[float] | None = None,
        stop_threshold: float | None = None,
        profile: bool = False,
        max_running: int | None = None,
        draft_batch_multiple: int | None = None,
        draft_capacity: int | None = None,
    ) -> None:
        self.draft = as_draft(draft)
        if max_running is not None and (
            isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1
        ):
            raise ValueError(f"max_running must be an int >= 1 or None, got {max_running!r}")
        self.max_running = max_running
        if isinstance(targets, torch.nn.Module):
            targets = {"target": targets}
        if not isinstance(targets, Mapping) or not targets:
            raise TypeError("targets must be a model or a non-empty dict of name -> model / TargetConfig")
        self.configs: dict[str, TargetConfig] = {}
        for name, value in targets.items():
            config = value
            if not isinstance(value, TargetConfig):
                config = TargetConfig(value, num_draft_tokens, draft_length, thresholds, stop_threshold)
            self.configs[name] = config.checked(name, self.draft)
        self.vocab_size = int(self.draft.vocab_size)
        self._batches = {name: TargetBatch(name, c) for name, c in self.configs.items()}
        self._draft = DraftBatch(
            self.draft,
            {name: c.thresholds for name, c in self.configs.items()},
            {name: batch.policy.stop_threshold for name, batch in self._batches.items()},
            draft_batch_multiple,
            draft_capacity,
        )
        self._draft_limit = draft_limit(self.draft)
        self._requests: dict[str, Request] = {}  # waiting + running
        self._waiting: list[Request] = []
        self._ids = itertools.count()
        self.stats = EngineStats()
        devices = [self.draft.device] + [
            p.device for c in self.configs.values() for p in c.model.parameters()
        ]
        self.clock = Clock(devices, enabled=profile)

    # ------------------------------------------------------------------------------------- requests
    def add_request(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        target: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; it joins the batch at the next :meth:`step`. Returns its id.

        Raises :class:`~s2d_ext.engine.params.RequestError` (a ValueError) for a bad request, leaving the
        engine unchanged.
        """
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if target is None:
            if len(self.configs) != 1:
                raise RequestError(f"target: name one of {sorted(self.configs)}")
            target = next(iter(self.configs))
        if target not in self.configs:
            raise RequestError(
                f"target {target!r} is not held by this engine (it has {sorted(self.configs)})"
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self._requests:
                request_id = f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use by an unfinished request")
        prompt = self._prompt_list(prompt_ids)
        config = self.configs[target]
        params = params.resolve(self.vocab_size, getattr(config.model, "generation_config", None))
        self.check_length(target, len(prompt), params.max_new_tokens)
        if self._draft_limit is not None and len(prompt) + params.max_new_tokens > self._draft_limit:
            raise RequestError(
                f"max_new_tokens={params.max_new_tokens}: prompt ({len(prompt)}) + new tokens exceeds the "
                f"draft's context of {self._draft_limit}"
            )
        seed = params.seed if params.seed is not None else seeds_for(None, 1)[0]
        batch = self._batches[target]
        length = host_reads.host_list(batch.policy.initial(1))[0]
        request = Request(request_id, target, params, prompt, seed, processors_for(params), length)
        self._requests[request_id] = request
        self._waiting.append(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now; its row leaves the batch at a later step. Unknown ids raise RequestError."""
        request = self._requests.get(request_id)
        if request is None:
            raise RequestError(f"request_id {request_id!r} is not an unfinished request of this engine")
        del self._requests[request_id]
        if request in self._waiting:
            self._waiting.remove(request)
        request.finished, request.reason = True, "abort"

    def context_limit(self, target: str) -> int | None:
        """The most tokens (prompt + new) a request to ``target`` may hold, as :meth:`add_request` checks:
        the target's context, below its sliding window, and the draft's limit. None: no known limit."""
        batch = self._batches[target]
        context = context_length(batch.config.model)
        limits = [context, None if batch.window is None else batch.window - 1, self._draft_limit]
        limits = [v for v in limits if v is not None]
        return min(limits) if limits else None

    def check_length(
        self, target: str, prompt_tokens: int, max_new_tokens: int, arg: str = "prompt_ids"
    ) -> None:
        """Raise :class:`~s2d_ext.engine.params.RequestError` when a prompt of ``prompt_tokens`` tokens plus
        ``max_new_tokens`` does not fit ``target``'s context or stay below its sliding window (``arg``: the
        argument the message names)."""
        batch = self._batches[target]
        check_length(target, batch.config.model, batch.window, prompt_tokens, max_new_tokens, arg)

    def request_ids(self) -> list[str]:
        """The unfinished requests (waiting or running)."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def _prompt_list(self, prompt_ids: Any) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise RequestError(
                    f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} "
                    f"{tuple(prompt_ids.shape)}"
                )
            prompt = prompt_ids.tolist()
        elif isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, (str, bytes)):
            prompt = list(prompt_ids)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise RequestError("prompt_ids must hold ints (token ids)")
        else:
            raise RequestError(
                f"prompt_ids must be a list of token ids or a 1-D tensor, got {type(prompt_ids).__name__}"
            )
        if not prompt:
            raise RequestError("prompt_ids is empty; a request needs at least one prompt token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"prompt_ids must hold token ids in [0, {self.vocab_size})")
        return prompt

    # ----------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, run one speculative step for every running request, and return what
        each produced (requests that emitted tokens, finished or failed)."""
        outputs = self._admit()
        rows = self._draft.rows
        running = [not r.finished for r in rows]  # [B]: the rows this step runs
        if not any(running):
            return outputs
        n_draft = self._plan(rows)
        # NOTE: rows under a grammar draft inside it (engine/draft_masks.py); no mask: the call as before.
        proposal = self._draft.propose(n_draft, draft_mask_for(self.draft, rows, self.vocab_size))
        self.clock.lap("draft")
        readout = StepReadout(len(rows), max(n_draft), self._top_logprobs(rows), self.draft.device)
        verifying = [batch for batch in self._batches.values() if batch.running]
        for batch in verifying:
            outputs += batch.verify(proposal, n_draft, readout, self.clock)
        readout.read(proposal.num_draft, proposal.exits)
        self.clock.lap("other")
        outputs += self._apply(rows, running, readout, verifying)
        self._commit(rows, running, readout, verifying)
        return outputs

    def _plan(self, rows: list[Request]) -> list[int]:
        """Drafts each row asks for (0: a finished or idle row)."""
        n_draft = [r.draft_length for r in rows]
        self.clock.lap("other")
        return n_draft

    def _top_logprobs(self, rows: list[Request]) -> int:
        """The most top log-probabilities a running row asks for (-1: no row asks for log-probabilities)."""
        asked = (r.params.logprobs for r in rows if r.params.logprobs is not None and not r.finished)
        return max(asked, default=-1)

    def _apply(
        self, rows: list[Request], running: list[bool], readout: StepReadout, verified: list[TargetBatch]
    ) -> list[RequestOutput]:
        """Host bookkeeping of the rows that ran (``running``): new tokens, stops, outputs, stats and the
        draft-length policies."""
        self.stats.count_step(readout.k)
        outputs = []
        for i, r in enumerate(rows):
            if not running[i]:
                continue
            if not r.finished:  # NOTE: a row whose processors failed this step was finished (and reported)
                row = readout.row(i)
                outputs.append(r.take(row, readout.top_n))
                self.stats.count_row(row)
            if r.finished:
                self._requests.pop(r.id, None)
        for batch in verified:
            batch.update_lengths(readout, running)
        self.clock.lap("other")
        return outputs

    def _commit(
        self, rows: list[Request], running: list[bool], readout: StepReadout, verified: list[TargetBatch]
    ) -> None:
        """Roll the caches forward: targets keep pending + accepted, the draft does the same."""
        for batch in verified:
            self.stats.compactions += batch.commit(readout, running)
            self.stats.max_cache_columns = max(self.stats.max_cache_columns, batch.runner.num_columns)
        self.clock.lap("target")
        advancing = [running[i] and not r.finished for i, r in enumerate(rows)]  # [B]: rows that go on
        if any(advancing):
            self._draft.advance(readout, advancing)
        self.clock.lap("draft")

    # ------------------------------------------------------------------------------ joins and leaves
    def _admit(self) -> list[RequestOutput]:
        """Drop finished rows (batched: a cache gather each) and prefill + append waiting requests.
        Returns the outputs of the requests whose prefill failed."""
        joining, self._waiting = self._waiting, []
        if self.max_running is not None:
            room = max(0, self.max_running - sum(not r.finished for r in self._draft.rows))
            joining, self._waiting = joining[:room], joining[room:]
        changed = self._drop_finished(joining=bool(joining))
        failed = self._join(joining) if joining else []
        if changed or (joining and not failed):
            self._refresh()
        return failed

    def _drop_finished(self, joining: bool) -> bool:
        """Drop finished rows where enough are done. Returns whether a batch changed."""
        rows = self._draft.rows
        done = sum(r.finished and r.reason != PADDING for r in rows)
        # NOTE: dropping costs one cache gather: batch it (a quarter of the rows done, or a join).
        drop_draft = bool(done) and (4 * done >= len(rows) or joining)
        changed = False
        for batch in self._batches.values():
            done_here = sum(r.finished for r in batch.requests)
            if done_here and (drop_draft or 4 * done_here >= len(batch.requests)):
                self.stats.compactions += batch.drop_finished()
                changed = True
        if drop_draft:
            self._draft.drop_finished()
        return changed or drop_draft

    def _join(self, joining: list[Request]) -> list[RequestOutput]:
        """Prefill ``joining`` in a batch of their own (draft, then each target), then append them. Returns
        their failed outputs when a prefill raised (nothing was appended then)."""
        self.clock.lap("other")
        try:
            state = self._draft.prefill(joining)
            self.clock.lap("draft")
            prefilled = {}
            for name in dict.fromkeys(r.target for r in joining):
                requests = [r for r in joining if r.target == name]
                prefilled[name] = (requests, *self._batches[name].prefill(requests))
            self.clock.lap("target")
        except Exception as exc:  # noqa: BLE001 (prefill failures fail the joining requests only)
            for r in joining:
                self._requests.pop(r.id, None)
            return [r.fail(exc, f"prefill failed: {exc}") for r in joining]
        self._draft.append(joining, state)
        for name, (requests, runner, pending) in prefilled.items():
            self._batches[name].append(requests, runner, pending)
        return []

    def _refresh(self) -> None:
        """Per-row tensors of the draft and the targets, rebuilt whenever a batch changes."""
        self._draft.refresh()
        for batch in self._batches.values():
            batch.refresh(self.draft.device)
        self.clock.lap("other")
