"""``Engine``: the one speculative decoding loop, as a step API that requests join and leave.

::

    engine = Engine(draft, targets={"large": model})
    engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for out in engine.step():            # RequestOutput: new tokens, logprobs, finished, reason
            ...

One step, for every running request at once::

    admit      drop finished rows (batched), prefill joining requests in a batch of their own and
               append them to the draft's and each target's batch
    n          = draft length of each row (its target's policy), capped by the tokens it may still emit
    prop       = draft.propose(state, max(n), n, ...)                        # drafts + q, every row
    per target: logits = target([pending, drafts])                           # [b, k+1, V], one forward
                logits = processors(logits) at every position, with its own prefix   (lossless)
                out, n_acc = verify(logits, drafts, q, ...)                  # accepted drafts + 1 token
    read       one packed device-to-host copy: tokens, accept counts, drafts proposed, exits (+ logprobs)
    host       stops (EOS / stop ids / max_new_tokens), outputs, draft-length policies, stats
    commit     targets keep pending + accepted; the draft advances the rows still running

Randomness: a request draws every random number from Philox keyed by its seed, with counter offset =
the steps it has taken (draft: STREAM_DRAFT; verify: STREAM_ACCEPT / STREAM_SAMPLE), so its output
depends only on its prompt, seed and settings, never on the other requests or when it joined.

KV caches: see :mod:`s2d_ext.target` (holes + explicit position ids, compaction with ``kv_compact``);
joins concatenate caches (:mod:`s2d_ext.engine.draft_rows`, :meth:`CachedLM.concat`), so every row keeps
its slots and positions.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from s2d_ext.engine import host_reads
from s2d_ext.engine.draft_masks import draft_mask_for
from s2d_ext.engine.draft_rows import concat_states, select_rows, supports_row_ops, with_capacity
from s2d_ext.engine.filters import filtered_scores, min_p_logits
from s2d_ext.engine.models import TargetConfig, as_draft, check_length, draft_limit, target_window
from s2d_ext.engine.params import RequestError, SamplingParams, seeds_for
from s2d_ext.engine.processors import processors_for
from s2d_ext.engine.profile import Clock
from s2d_ext.ops import verify
from s2d_ext.target import CachedLM, input_device

_PADDING = "padding"  # the reason of an idle draft row (static draft shapes)


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request.

    Attributes
    ----------
    request_id : str
    new_token_ids : list of int
        Tokens emitted by this step (the stop token included when it stopped on one).
    logprobs : list of float or None
        Processed target log-probability of each new token (requests with ``logprobs`` set).
    top_logprobs : list of list of (int, float) or None
        The ``logprobs`` most probable (token, log-probability) pairs at each new token's position.
    finished : bool
    finish_reason : str or None
        "stop" (EOS / stop id), "length" (max_new_tokens), "abort" or "error".
    num_generated : int
        Tokens generated so far, these included.
    error : str or None
        Why the request failed (``finish_reason == "error"``).
    """

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_generated: int = 0
    error: str | None = None
    exception: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)


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


class _Request:
    """One request's host-side state (Python values only: reading them never touches a device)."""

    def __init__(self, request_id, target, params, prompt, seed, processors, length):
        self.id: str = request_id
        self.target: str = target
        self.params: SamplingParams = params
        self.prompt: list[int] = prompt
        self.seed: int = seed
        self.processors: list = processors
        self.stop_ids = params.stop_ids
        self.generated: list[int] = []
        self.steps = 0  # steps taken: the Philox counter offset
        self.length = length  # the draft-length policy's current value
        self.finished = False
        self.reason: str | None = None
        self.exception: BaseException | None = None
        self.target_live = 0  # live tokens of the row in its target's cache
        self.draft_pad = 0  # left padding of the row in the draft state
        self.context: torch.Tensor | None = None  # [prompt + max_new] on the target device (processors)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.generated)

    @property
    def needs_logits(self) -> bool:
        """Whether the target's logits need more than the verify op does (processors or min-p)."""
        return bool(self.processors) or (self.params.min_p > 0 and not self.params.greedy)


class _TargetBatch:
    """Per-call state of one target: its rows, their cache and pending tokens (config is separate)."""

    def __init__(self, name: str, config: TargetConfig) -> None:
        from s2d_ext.draft.policies import make_policy

        self.name, self.config = name, config
        self.policy = make_policy(config.draft_length, config.num_draft_tokens, config.stop_threshold)
        self.device = input_device(config.model)
        self.window = target_window(config.model)
        self.runner: CachedLM | None = None
        self.requests: list[_Request] = []
        self.pending: torch.Tensor | None = None  # [b] int64 on the target's device
        self.draft_rows: torch.Tensor | None = None  # [b] int64: the rows in the draft's batch
        self.sampling: dict[str, torch.Tensor] = {}

    def refresh(self, row_of: dict[str, int], draft_device: torch.device) -> None:
        """Row tensors for verify, rebuilt whenever the batch changes."""
        reqs = self.requests
        self.draft_rows = host_reads.to_device([row_of[id(r)] for r in reqs], torch.int64, draft_device)
        own_filters = [r.params.min_p > 0 and not r.params.greedy for r in reqs]
        d = self.device
        self.sampling = {
            "temperature": host_reads.to_device([r.params.temperature for r in reqs], torch.float32, d),
            # NOTE: min-p rows get every filter applied before the op (filters.min_p_logits).
            "top_k": host_reads.to_device(
                [0 if own else r.params.top_k for r, own in zip(reqs, own_filters)], torch.int64, d
            ),
            "top_p": host_reads.to_device(
                [1.0 if own else r.params.top_p for r, own in zip(reqs, own_filters)], torch.float32, d
            ),
            "seeds": host_reads.to_device([r.seed for r in reqs], torch.int64, d),
        }


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
        self.draft_batch_multiple = draft_batch_multiple
        self.draft_capacity = draft_capacity
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
        self._batches = {name: _TargetBatch(name, c) for name, c in self.configs.items()}
        self._draft_limit = draft_limit(self.draft)
        self._requests: dict[str, _Request] = {}  # waiting + running
        self._waiting: list[_Request] = []
        self._rows: list[_Request] = []  # the draft state's rows, in order
        self._state: Any = None
        self._draft_args: dict[str, Any] = {}
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
        check_length(
            target,
            config.model,
            self._batches[target].window,
            len(prompt),
            params.max_new_tokens,
            "prompt_ids",
        )
        if self._draft_limit is not None and len(prompt) + params.max_new_tokens > self._draft_limit:
            raise RequestError(
                f"max_new_tokens={params.max_new_tokens}: prompt ({len(prompt)}) + new tokens exceeds the "
                f"draft's context of {self._draft_limit}"
            )
        seed = params.seed if params.seed is not None else seeds_for(None, 1)[0]
        batch = self._batches[target]
        length = host_reads.host_list(batch.policy.initial(1))[0]
        request = _Request(request_id, target, params, prompt, seed, processors_for(params), length)
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
        outputs: list[RequestOutput] = []
        self._admit(outputs)
        rows = self._rows
        running = [not r.finished for r in rows]
        if not any(running):
            return outputs
        self._failed = outputs  # NOTE: a processor that raises reports its request here
        draft, dd = self.draft, self.draft.device
        n_ask = [0 if r.finished else max(0, min(r.length, r.remaining - 1)) for r in rows]
        k = max(n_ask)
        self.clock.lap("other")

        # 1. Draft.
        # NOTE: rows under a grammar draft inside it (engine/draft_masks.py); no mask: the call as before.
        mask = draft_mask_for(draft, rows, self.vocab_size)
        prop = draft.propose(
            self._state,
            k,
            host_reads.to_device(n_ask, torch.int64, dd),
            offsets=host_reads.to_device([r.steps for r in rows], torch.int64, dd),
            **self._draft_args,
            **({} if mask is None else {"logits_mask": mask}),
        )
        self.clock.lap("draft")

        # 2. Each target scores its rows' drafts in one forward; verification keeps a prefix + 1 token.
        batch = len(rows)
        top_n = max(
            (r.params.logprobs for r in rows if r.params.logprobs is not None and not r.finished), default=-1
        )
        lp_width = (k + 1) * (1 + 2 * top_n) if top_n >= 0 else 0
        out_all = torch.full((batch, k + 1), -1, dtype=torch.int64, device=dd)
        n_acc_all = torch.zeros(batch, dtype=torch.int64, device=dd)
        blocked_all = torch.full((batch,), k + 1, dtype=torch.int64, device=dd)
        lp_all = torch.zeros((batch, lp_width), dtype=torch.float64, device=dd) if lp_width else None
        stepped: list[_TargetBatch] = []
        widths: dict[str, int] = {}
        for tb in self._batches.values():
            if not any(not r.finished for r in tb.requests):
                continue
            out, n_acc, lp, blocked, k_g = self._target_step(tb, prop, n_ask, k, top_n)
            drows = tb.draft_rows
            out_all[drows, : k_g + 1] = out.to(dd)
            n_acc_all[drows] = n_acc.to(dd, torch.int64)
            if blocked is not None:
                blocked_all[drows] = blocked.to(dd)
            if lp is not None:
                lp_all[drows] = lp.to(dd)
            stepped.append(tb)
            widths[tb.name] = k_g

        # 3. The one device-to-host read of the step.
        keep_of: dict[int, int] = {}
        parts = [
            out_all,
            n_acc_all[:, None],
            prop.num_draft.to(torch.int64)[:, None],
            prop.exits[:, :k],
            blocked_all[:, None],
        ]
        if lp_all is not None:
            parts.append(lp_all.view(torch.int64))
        host = host_reads.read(torch.cat(parts, dim=1))
        self.clock.lap("other")

        # 4. Host bookkeeping: new tokens, stops, outputs, policies, stats.
        n_acc_host = [0] * batch
        still = [False] * batch
        stats = self.stats
        stats.steps += 1
        if len(stats.accepted_at) < k:
            pad = k - len(stats.accepted_at)
            stats.accepted_at += [0] * pad
            stats.proposed_at += [0] * pad
        for i, r in enumerate(rows):
            if not running[i]:
                continue
            line = host[i]
            n_acc, n_prop = line[k + 1], line[k + 2]
            keep_of[id(r)] = n_acc + 1
            if r.finished:  # NOTE: a processor failed on it in this step
                continue
            n_acc_host[i] = n_acc
            tokens = line[: n_acc + 1]
            # NOTE: a position where the processors left no token: what verify returned there (and after
            # it) is no sample of anything; emit the tokens before it and fail the request.
            blocked = line[2 * k + 3] <= n_acc
            if blocked:
                tokens = tokens[: line[2 * k + 3]]
            count = len(tokens)
            for j, t in enumerate(tokens):
                if t in r.stop_ids:
                    count, r.reason = j + 1, "stop"
                    break
            new = tokens[:count]
            r.generated += new
            r.steps += 1
            error = None
            if r.reason is None and blocked:
                r.reason = "error"
                error = (
                    f"no token is allowed at generated position {len(r.generated)}: the logits processors "
                    "(allowed_token_ids, bad_words_ids, min_new_tokens, ...) masked every token"
                )
                r.exception = RequestError(error)
            if r.reason is None and r.remaining <= 0:
                r.reason = "length"
            r.finished = r.reason is not None
            still[i] = not r.finished
            stats.draft_tokens += n_prop
            stats.accepted_tokens += n_acc
            for j in range(n_prop):
                stats.proposed_at[j] += 1
                stats.accepted_at[j] += j < n_acc
                layer = line[k + 3 + j]
                stats.exit_histogram[layer] = stats.exit_histogram.get(layer, 0) + 1
            output = RequestOutput(
                r.id,
                new,
                finished=r.finished,
                finish_reason=r.reason,
                num_generated=len(r.generated),
                error=error,
                exception=r.exception if error else None,
            )
            if r.params.logprobs is not None:
                values = host_reads.bits_to_floats(line[2 * k + 4 :])
                _fill_logprobs(output, values, top_n, r.params.logprobs)
            if r.context is not None:
                start = len(r.prompt) + len(r.generated) - len(new)
                r.context[start : start + len(new)] = host_reads.to_device(new, torch.int64, r.context.device)
            outputs.append(output)
            if r.finished:
                self._requests.pop(r.id, None)
        ran = {id(r): i for i, r in enumerate(rows) if running[i]}
        for tb in stepped:
            self._update_lengths(tb, ran, n_acc_host, host, k)
        self.clock.lap("other")

        # 5. Roll the caches forward: targets keep pending + accepted, the draft does the same.
        for tb in stepped:
            self._commit(tb, keep_of, widths[tb.name])
        self.clock.lap("target")
        if any(still):
            draft.advance(
                self._state,
                n_acc_all,
                out_all.gather(1, n_acc_all[:, None]).squeeze(1).clamp(min=0),
                host_reads.to_device(still, torch.bool, dd),
            )
        self.clock.lap("draft")
        return outputs

    def _target_step(self, tb: _TargetBatch, prop: Any, n_ask: list[int], k: int, top_n: int):
        """Forward ``[pending, drafts]`` through tb's target, process, verify.

        Returns out [b, k_g+1], n_acc [b] (target device), the log-prob block [b, (k+1)(1+2n)] or None,
        the first position where the processors masked every token ([b] int64, k_g + 1 = none; None when
        no row was processed), and k_g.
        """
        device = tb.device
        reqs = tb.requests
        row_of = {id(r): i for i, r in enumerate(self._rows)}
        k_g = max(n_ask[row_of[id(r)]] for r in reqs)
        if prop.tokens.shape[1] < k_g:
            raise RuntimeError(f"the draft proposed {prop.tokens.shape[1]} columns for k={k_g}")
        drows = tb.draft_rows
        n_draft = prop.num_draft[drows].to(device)
        drafts = prop.tokens[drows, :k_g].to(device)
        tokens = torch.cat([tb.pending[:, None], drafts], dim=1)
        active = host_reads.to_device([not r.finished for r in reqs], torch.bool, device)
        live = (torch.arange(k_g + 1, device=device)[None, :] <= n_draft[:, None]) & active[:, None]
        offsets = host_reads.to_device([r.steps for r in reqs], torch.int64, device)
        self.clock.lap("other")
        logits = tb.runner.forward(tokens, live)  # [b, k_g+1, V]
        self.clock.lap("target")
        processed = False
        for j, r in enumerate(reqs):
            if r.needs_logits and not r.finished:
                self._process(r, logits, j, drafts)
                processed = True
        blocked = None
        if processed:
            # NOTE: only processors can mask a whole position (min-p and the op's filters keep the top
            # token); rows without any have model logits here, never all -inf.
            masked = torch.isneginf(logits).all(-1)  # [b, k_g+1]
            blocked = torch.where(masked.any(-1), masked.to(torch.int64).argmax(-1), k_g + 1)
        vd = logits.device
        probs = None if prop.probs is None else prop.probs[drows.to(prop.probs.device), :k_g].to(vd)
        s = tb.sampling
        out, n_acc = verify(
            logits,
            drafts.to(vd),
            probs,
            n_draft.to(vd),
            temperature=s["temperature"].to(vd),
            top_k=s["top_k"].to(vd),
            top_p=s["top_p"].to(vd),
            seeds=s["seeds"].to(vd),
            offsets=offsets.to(vd),
        )
        tb.pending = out.gather(1, n_acc.long()[:, None]).squeeze(1).to(device)
        lp = None
        if top_n >= 0 and any(r.params.logprobs is not None for r in reqs):
            lp = torch.zeros((len(reqs), (k + 1) * (1 + 2 * top_n)), dtype=torch.float64, device=vd)
            for j, r in enumerate(reqs):
                if r.params.logprobs is not None and not r.finished:
                    lp[j] = _logprob_block(logits[j], out[j], r.params, k, top_n)
        self.clock.lap("verify")
        return out, n_acc, lp, blocked, k_g

    def _process(self, r: _Request, logits: torch.Tensor, j: int, drafts: torch.Tensor) -> None:
        """Apply r's processors (and min-p) to its row ``j`` of ``logits`` in place; a processor that
        raises fails the request (not the step)."""
        n_ctx = len(r.prompt) + len(r.generated)
        positions = logits.shape[1]
        try:
            row = logits[j].float()
            if r.processors:
                token_ids = torch.cat([r.context[:n_ctx], drafts[j, : positions - 1].to(r.context.device)])
                prefix_lengths = [n_ctx + p for p in range(positions)]
                for processor in r.processors:
                    row = processor(token_ids, len(r.prompt), prefix_lengths, row)
                    if not isinstance(row, torch.Tensor) or tuple(row.shape) != tuple(logits.shape[1:]):
                        raise ValueError(
                            f"logits processor {processor!r} must return a [{positions}, {logits.shape[2]}] "
                            f"tensor, got {getattr(row, 'shape', type(row).__name__)}"
                        )
            p = r.params
            if p.min_p > 0 and not p.greedy:
                row = min_p_logits(row, p.temperature, p.top_k, p.top_p, p.min_p)
            logits[j] = row.to(logits.dtype)
        except Exception as exc:  # noqa: BLE001 (a user's processor may raise anything)
            r.finished, r.reason, r.exception = True, "error", exc
            self._requests.pop(r.id, None)
            self._failed.append(
                RequestOutput(
                    r.id,
                    [],
                    finished=True,
                    finish_reason="error",
                    num_generated=len(r.generated),
                    error=f"logits processor failed: {type(exc).__name__}: {exc}",
                    exception=exc,
                )
            )

    def _update_lengths(self, tb: _TargetBatch, running: dict[int, int], n_acc_host, host, k) -> None:
        """The draft-length policy of tb's rows that took part in this step (host tensors only)."""
        stepped = [r for r in tb.requests if id(r) in running]
        if not stepped:
            return
        idx = [running[id(r)] for r in stepped]
        current = torch.tensor([r.length for r in stepped], dtype=torch.int64)
        accepted = torch.tensor([n_acc_host[i] for i in idx], dtype=torch.int64)
        proposed = torch.tensor([host[i][k + 2] for i in idx], dtype=torch.int64)
        lengths = host_reads.host_list(tb.policy.update(current, accepted, proposed))
        for r, n in zip(stepped, lengths):
            r.length = int(n)

    def _commit(self, tb: _TargetBatch, keep_of: dict[int, int], k_g: int) -> None:
        """Keep pending + accepted tokens in tb's cache, then compact within the waste bound."""
        keep = [keep_of.get(id(r), 0) for r in tb.requests]
        for r, n in zip(tb.requests, keep):
            r.target_live += n
        # NOTE: a row's live tokens of this step are the first n_draft + 1 columns of the step's block
        # and it keeps the first ``keep`` of them, so the columns after the longest keep are holes in
        # every row: the host knows the tail to crop without reading the mask back.
        most = max(keep)
        tb.runner.commit(
            host_reads.to_device(keep, torch.int64, tb.device), dead_tail=k_g + 1 - most if most else None
        )
        longest = max(r.target_live for r in tb.requests)
        self.stats.compactions += int(tb.runner.maybe_compact(longest=longest))
        self.stats.max_cache_columns = max(self.stats.max_cache_columns, tb.runner.num_columns)

    # ------------------------------------------------------------------------------ joins and leaves
    def _admit(self, outputs: list[RequestOutput]) -> None:
        """Drop finished rows (batched: a cache gather each) and prefill + append waiting requests."""
        joining, self._waiting = self._waiting, []
        if self.max_running is not None:
            room = max(0, self.max_running - sum(not r.finished for r in self._rows))
            joining, self._waiting = joining[:room], joining[room:]
        done = sum(r.finished and r.reason != _PADDING for r in self._rows)
        # NOTE: dropping costs one cache gather: batch it (a quarter of the rows done, or a join).
        drop_draft = bool(done) and (4 * done >= len(self._rows) or bool(joining))
        changed = False
        for tb in self._batches.values():
            done_t = sum(r.finished for r in tb.requests)
            if done_t and (drop_draft or 4 * done_t >= len(tb.requests)):
                self._drop_target_rows(tb)
                changed = True
        if drop_draft:
            self._drop_draft_rows()
            self._pad_draft_rows()
        elif changed:
            self._refresh_rows()
        if not joining:
            return
        self.clock.lap("other")
        try:
            state, pads = self._prefill_draft(joining)
            self.clock.lap("draft")
            per_target = {}
            for name in dict.fromkeys(r.target for r in joining):
                per_target[name] = self._prefill_target(
                    self._batches[name], [r for r in joining if r.target == name]
                )
            self.clock.lap("target")
        except Exception as exc:  # noqa: BLE001 (prefill failures fail the joining requests only)
            for r in joining:
                r.finished, r.reason, r.exception = True, "error", exc
                self._requests.pop(r.id, None)
                outputs.append(
                    RequestOutput(
                        r.id,
                        [],
                        finished=True,
                        finish_reason="error",
                        error=f"prefill failed: {exc}",
                        exception=exc,
                    )
                )
            return
        # Every prefill succeeded: append (nothing above touched the running batch).
        for r, pad in zip(joining, pads):
            r.draft_pad = pad
        if self._state is None or not self._rows:
            self._state, self._rows = state, list(joining)
        elif supports_row_ops(self._state):
            max_pads = [max(r.draft_pad for r in self._rows), max(pads)]
            self._state = concat_states([self._state, state], max_pads, self.draft_capacity or 0)
            self._rows = self._rows + list(joining)
        else:
            self._rows = self._rows + list(joining)
            self._state = self._rebuild_draft(self._rows)
        if self.draft_capacity:
            self._state = with_capacity(self._state, self.draft_capacity)
        for name, (runner, pending, reqs) in per_target.items():
            tb = self._batches[name]
            if tb.runner is None or not tb.requests:
                tb.runner, tb.pending, tb.requests = runner, pending, reqs
            else:
                tb.runner = CachedLM.concat([tb.runner, runner])
                tb.pending = torch.cat([tb.pending, pending])
                tb.requests = tb.requests + reqs
        self._pad_draft_rows()
        self._refresh_rows()
        self.clock.lap("other")

    def _prefill_draft(self, joining: list[_Request]) -> tuple[Any, list[int]]:
        ids, mask, pads = _left_padded([r.prompt for r in joining])
        max_length = max(len(r.prompt) + r.params.max_new_tokens for r in joining)
        dd = self.draft.device
        if self._state is not None and self._rows and not supports_row_ops(self._state):
            return None, pads  # NOTE: rebuilt over every row in _admit
        state = self.draft.begin(ids.to(dd), mask.to(dd), max_length)
        return state, pads

    def _rebuild_draft(self, rows: list[_Request]) -> Any:
        """A fresh draft state over every row's context (drafts whose state has no row operations)."""
        contexts = [r.prompt + r.generated for r in rows]
        ids, mask, pads = _left_padded(contexts)
        for r, pad in zip(rows, pads):
            r.draft_pad = pad
        max_length = max(len(r.prompt) + r.params.max_new_tokens for r in rows)
        dd = self.draft.device
        return self.draft.begin(ids.to(dd), mask.to(dd), max_length)

    def _prefill_target(self, tb: _TargetBatch, reqs: list[_Request]):
        ids, mask, _ = _left_padded([r.prompt for r in reqs])
        ids, live = ids.to(tb.device), mask.to(tb.device).bool()
        runner = CachedLM(tb.config.model, len(reqs))
        if ids.shape[1] > 1:
            runner.forward(ids[:, :-1], live[:, :-1], logits_to_keep=1)
            # NOTE: left padding: the last prefilled column holds a token of every row that has one.
            runner.commit(live[:, :-1].sum(-1), dead_tail=0)
        for r in reqs:
            r.target_live = len(r.prompt) - 1
            if r.processors:
                r.context = torch.zeros(
                    len(r.prompt) + r.params.max_new_tokens, dtype=torch.int64, device=tb.device
                )
                r.context[: len(r.prompt)] = host_reads.to_device(r.prompt, torch.int64, tb.device)
        return runner, ids[:, -1].clone(), list(reqs)

    def _drop_target_rows(self, tb: _TargetBatch) -> None:
        keep = [j for j, r in enumerate(tb.requests) if not r.finished]
        if not keep:
            tb.runner, tb.pending, tb.requests = None, None, []
            return
        longest = max(tb.requests[j].target_live for j in keep)
        index = host_reads.to_device(keep, torch.int64, tb.device)
        tb.runner.compact(index, longest=longest)
        self.stats.compactions += 1
        tb.pending = tb.pending.index_select(0, index)
        tb.requests = [tb.requests[j] for j in keep]

    def _drop_draft_rows(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        rows = [self._rows[i] for i in keep]
        if not rows:
            self._state, self._rows = None, []
        elif supports_row_ops(self._state):
            self._state = select_rows(self._state, host_reads.to_device(keep, torch.int64, self.draft.device))
            self._rows = rows
        else:
            self._rows = rows
            self._state = self._rebuild_draft(rows)
        self._refresh_rows()

    def _pad_draft_rows(self) -> None:
        """Idle rows (copies of row 0, never drafting) up to a multiple of ``draft_batch_multiple``."""
        m = self.draft_batch_multiple
        if not m or not self._rows or not supports_row_ops(self._state):
            return
        missing = -len(self._rows) % m
        if not missing:
            return
        copies = select_rows(self._state, host_reads.to_device([0] * missing, torch.int64, self.draft.device))
        pad = self._rows[0].draft_pad
        self._state = concat_states([self._state, copies], [max(r.draft_pad for r in self._rows), pad])
        for _ in range(missing):
            idle = _Request(_PADDING, self._rows[0].target, self._rows[0].params, [], 0, [], 0)
            idle.finished, idle.reason, idle.draft_pad = True, _PADDING, pad
            self._rows.append(idle)
        self._refresh_rows()

    def _refresh_rows(self) -> None:
        """Per-row tensors of the draft and the targets, rebuilt whenever a batch changes."""
        rows, dd = self._rows, self.draft.device
        row_of = {id(r): i for i, r in enumerate(rows)}
        for tb in self._batches.values():
            if tb.requests:
                tb.refresh(row_of, dd)
            else:
                tb.runner, tb.pending = None, None
        if not rows:
            self._draft_args = {}
            return
        own = getattr(self.draft, "thresholds", None)
        n_exits = len(self.draft.exits)
        configs = [self.configs[r.target] for r in rows]
        use_tau = any(c.thresholds is not None for c in configs)
        stops = [self._batches[r.target].policy.stop_threshold for r in rows]
        self._draft_args = {
            "temperature": host_reads.to_device([r.params.temperature for r in rows], torch.float32, dd),
            "top_k": host_reads.to_device([r.params.top_k for r in rows], torch.int64, dd),
            "top_p": host_reads.to_device([r.params.top_p for r in rows], torch.float32, dd),
            "seeds": host_reads.to_device([r.seed for r in rows], torch.int64, dd),
            "thresholds": host_reads.to_device(
                [
                    list(c.thresholds if c.thresholds is not None else (own or [0.0] * n_exits))
                    for c in configs
                ],
                torch.float32,
                dd,
            )
            if use_tau
            else None,
            "stop_threshold": host_reads.to_device([s or 0.0 for s in stops], torch.float32, dd)
            if any(s is not None for s in stops)
            else None,
        }


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[B, L] int64 ids and mask of left-padded ``prompts`` (on the host) and each row's padding."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for p, pad in zip(prompts, pads)], dtype=torch.int64)
    mask = torch.tensor([[0] * pad + [1] * len(p) for p, pad in zip(prompts, pads)], dtype=torch.int64)
    return ids, mask, pads


def _logprob_block(logits: torch.Tensor, out: torch.Tensor, params: SamplingParams, k: int, top_n: int):
    """[(k+1) * (1 + 2 top_n)] float64: per position, the emitted token's log-probability, then top_n
    (id, log-probability) pairs, under the distribution the token was drawn from."""
    p = params
    if p.min_p > 0 and not p.greedy:
        # NOTE: a min-p row's logits were filtered already (min_p_logits, in _process); filtering them
        # again would renormalise before top-p and cut tokens that were drawn. Only the temperature is left.
        scores = filtered_scores(logits, p.temperature, 0, 1.0, 0.0)
    else:
        scores = filtered_scores(logits, p.temperature, p.top_k, p.top_p, p.min_p)  # [P, V]
    logp = torch.log_softmax(scores, dim=-1)
    positions = logp.shape[0]
    block = torch.zeros((k + 1, 1 + 2 * top_n), dtype=torch.float64, device=logits.device)
    block[:positions, 0] = logp.gather(1, out[:positions].clamp(min=0)[:, None]).squeeze(1).double()
    if top_n:
        top = logp.topk(min(top_n, logp.shape[1]), dim=-1)
        n = top.values.shape[1]
        block[:positions, 1 : 1 + 2 * n : 2] = top.indices.double()
        block[:positions, 2 : 2 + 2 * n : 2] = top.values.double()
    return block.flatten()


def _fill_logprobs(output: RequestOutput, values: list[float], top_n: int, want: int) -> None:
    width = 1 + 2 * top_n
    output.logprobs, output.top_logprobs = [], []
    for j in range(len(output.new_token_ids)):
        cell = values[j * width : (j + 1) * width]
        output.logprobs.append(cell[0])
        pairs = [(int(cell[1 + 2 * i]), cell[2 + 2 * i]) for i in range(min(want, top_n))]
        output.top_logprobs.append(pairs)
