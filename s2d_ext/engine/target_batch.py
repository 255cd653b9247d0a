"""``TargetBatch``: the rows of one target, their KV cache and pending tokens, and its part of a step.

Each target keeps its own batch: the rows of the requests it serves, in the order they joined. A step runs
one forward over every row's block ``[pending, drafts]`` (:meth:`TargetBatch.verify`), applies each row's
logits processors at every position with its own prefix, verifies, and leaves the results in the step's
readout; after the read it keeps the pending token and the accepted drafts in its cache
(:meth:`TargetBatch.commit`). KV caches: see :mod:`s2d_ext.target`.
"""

from __future__ import annotations

import torch

from s2d_ext.draft.policies import make_policy
from s2d_ext.draft.protocol import Proposal
from s2d_ext.engine import host_reads
from s2d_ext.engine.filters import min_p_logits
from s2d_ext.engine.logprobs import block_width, logprob_block
from s2d_ext.engine.models import TargetConfig, target_window
from s2d_ext.engine.profile import Clock
from s2d_ext.engine.readout import StepReadout
from s2d_ext.engine.request import Request, RequestOutput
from s2d_ext.ops import verify
from s2d_ext.target import CachedLM, input_device


class TargetBatch:
    """Per-call state of one target: its rows, their cache and pending tokens (its configuration is separate).

    Attributes
    ----------
    requests : list of Request
        The rows, in cache order (finished rows stay until a drop).
    runner : CachedLM or None
        The rows' KV cache.
    pending : torch.Tensor or None
        [b] int64 on the target's device: each row's token not yet in the cache (the last one emitted).
    draft_rows : torch.Tensor or None
        [b] int64 on the draft's device: each row's row in the draft's batch.
    sampling : dict of str to torch.Tensor
        [b] per-row verify arguments on the target's device (temperature, top_k, top_p, seeds).
    width : int
        The longest draft of these rows in the last step.
    """

    def __init__(self, name: str, config: TargetConfig) -> None:
        self.name, self.config = name, config
        self.policy = make_policy(config.draft_length, config.num_draft_tokens, config.stop_threshold)
        self.device = input_device(config.model)
        self.window = target_window(config.model)
        self.runner: CachedLM | None = None
        self.requests: list[Request] = []
        self.pending: torch.Tensor | None = None
        self.draft_rows: torch.Tensor | None = None
        self.sampling: dict[str, torch.Tensor] = {}
        self.width = 0

    @property
    def running(self) -> bool:
        return any(not r.finished for r in self.requests)

    # ------------------------------------------------------------------------------ joins and leaves
    def prefill(self, requests: list[Request]) -> tuple[CachedLM, torch.Tensor]:
        """A cache of ``requests``' prompts but their last tokens, and those last tokens ([b] pending)."""
        ids, mask, _ = left_padded([r.prompt for r in requests])
        ids, live = ids.to(self.device), mask.to(self.device).bool()
        runner = CachedLM(self.config.model, len(requests))
        if ids.shape[1] > 1:
            runner.forward(ids[:, :-1], live[:, :-1], logits_to_keep=1)
            # NOTE: left padding: the last prefilled column holds a token of every row that has one.
            runner.commit(live[:, :-1].sum(-1), dead_tail=0)
        for r in requests:
            r.target_live = len(r.prompt) - 1
            if r.processors:
                r.context = torch.zeros(
                    len(r.prompt) + r.params.max_new_tokens, dtype=torch.int64, device=self.device
                )
                r.context[: len(r.prompt)] = host_reads.to_device(r.prompt, torch.int64, self.device)
        return runner, ids[:, -1].clone()

    def append(self, requests: list[Request], runner: CachedLM, pending: torch.Tensor) -> None:
        """Rows prefilled by :meth:`prefill` join the batch (after the current rows)."""
        if self.runner is None or not self.requests:
            self.runner, self.pending, self.requests = runner, pending, list(requests)
        else:
            self.runner = CachedLM.concat([self.runner, runner])
            self.pending = torch.cat([self.pending, pending])
            self.requests = self.requests + list(requests)

    def drop_finished(self) -> int:
        """Drop the finished rows (a cache gather). Returns the compactions this took (0 or 1)."""
        keep = [j for j, r in enumerate(self.requests) if not r.finished]
        if not keep:
            self.runner, self.pending, self.requests = None, None, []
            return 0
        longest = max(self.requests[j].target_live for j in keep)
        index = host_reads.to_device(keep, torch.int64, self.device)
        self.runner.compact(index, longest=longest)
        self.pending = self.pending.index_select(0, index)
        self.requests = [self.requests[j] for j in keep]
        return 1

    def refresh(self, draft_device: torch.device) -> None:
        """Per-row tensors for verify, rebuilt whenever the batch (or the draft's) changes."""
        requests, device = self.requests, self.device
        if not requests:
            self.runner, self.pending = None, None
            return
        self.draft_rows = host_reads.to_device([r.draft_row for r in requests], torch.int64, draft_device)
        own_filters = [r.params.min_p > 0 and not r.params.greedy for r in requests]
        self.sampling = {
            "temperature": host_reads.to_device(
                [r.params.temperature for r in requests], torch.float32, device
            ),
            # NOTE: min-p rows get every filter applied before the op (filters.min_p_logits).
            "top_k": host_reads.to_device(
                [0 if own else r.params.top_k for r, own in zip(requests, own_filters)], torch.int64, device
            ),
            "top_p": host_reads.to_device(
                [1.0 if own else r.params.top_p for r, own in zip(requests, own_filters)],
                torch.float32,
                device,
            ),
            "seeds": host_reads.to_device([r.seed for r in requests], torch.int64, device),
        }

    # ------------------------------------------------------------------------------------------- step
    def verify(
        self, proposal: Proposal, n_draft: list[int], readout: StepReadout, clock: Clock
    ) -> list[RequestOutput]:
        """Score the rows' drafts in one forward, process, verify; the results go into ``readout``.

        ``n_draft``: the drafts each draft row asked for. Returns the outputs of the requests whose logits
        processors raised (they fail; the step goes on).
        """
        requests, device = self.requests, self.device
        width = max(n_draft[r.draft_row] for r in requests)  # this target's longest draft
        if proposal.tokens.shape[1] < width:
            raise RuntimeError(f"the draft proposed {proposal.tokens.shape[1]} columns for k={width}")
        n_proposed = proposal.num_draft[self.draft_rows].to(device)  # [b]
        drafts = proposal.tokens[self.draft_rows, :width].to(device)  # [b, w]
        tokens = torch.cat([self.pending[:, None], drafts], dim=1)  # [b, w+1]
        active = host_reads.to_device([not r.finished for r in requests], torch.bool, device)
        live = (torch.arange(width + 1, device=device)[None, :] <= n_proposed[:, None]) & active[:, None]
        offsets = host_reads.to_device([r.steps for r in requests], torch.int64, device)
        clock.lap("other")
        logits = self.runner.forward(tokens, live)  # [b, w+1, V]
        clock.lap("target")
        processed = [j for j, r in enumerate(requests) if r.needs_logits and not r.finished]
        outcomes = [self._process(requests[j], logits, j, drafts) for j in processed]
        failed = [output for output in outcomes if output is not None]
        blocked = None  # [b] int64: the first position the processors masked entirely (w + 1: none)
        if processed:
            # NOTE: only processors can mask a whole position (min-p and the op's filters keep the top
            # token); rows without any have model logits here, never all -inf.
            masked = torch.isneginf(logits).all(-1)  # [b, w+1]
            blocked = torch.where(masked.any(-1), masked.to(torch.int64).argmax(-1), width + 1)
        verify_device = logits.device  # NOTE: the last stage's device of a model spread over devices
        probs = None
        if proposal.probs is not None:
            probs = proposal.probs[self.draft_rows.to(proposal.probs.device), :width]  # [b, w, V]
            probs = probs.to(verify_device)
        sampling = {name: values.to(verify_device) for name, values in self.sampling.items()}
        out, n_accepted = verify(
            logits,
            drafts.to(verify_device),
            probs,
            n_proposed.to(verify_device),
            offsets=offsets.to(verify_device),
            **sampling,
        )  # out [b, w+1], n_accepted [b]
        self.pending = out.gather(1, n_accepted.long()[:, None]).squeeze(1).to(device)
        readout.scatter(self.draft_rows, out, n_accepted, blocked, self._logprobs(logits, out, readout))
        self.width = width
        clock.lap("verify")
        return failed

    def _process(
        self, r: Request, logits: torch.Tensor, j: int, drafts: torch.Tensor
    ) -> RequestOutput | None:
        """Apply r's processors (and min-p) to its row ``j`` of ``logits`` [b, w+1, V] in place, at every
        position with its own prefix; a processor that raises fails the request (not the step)."""
        n_context = len(r.prompt) + len(r.generated)
        positions = logits.shape[1]
        try:
            row = logits[j].float()
            if r.processors:
                token_ids = torch.cat(
                    [r.context[:n_context], drafts[j, : positions - 1].to(r.context.device)]
                )
                prefix_lengths = [n_context + p for p in range(positions)]
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
            return r.fail(exc, f"logits processor failed: {type(exc).__name__}: {exc}")
        return None

    def _logprobs(self, logits: torch.Tensor, out: torch.Tensor, readout: StepReadout) -> torch.Tensor | None:
        """[b, (k+1)(1+2n)] float64 log-probability blocks of the rows that ask for them (None: none does)."""
        requests, top_n = self.requests, readout.top_n
        if top_n < 0 or all(r.params.logprobs is None for r in requests):
            return None
        width = block_width(readout.k, top_n)
        blocks = torch.zeros((len(requests), width), dtype=torch.float64, device=logits.device)
        for j, r in enumerate(requests):
            if r.params.logprobs is not None and not r.finished:
                blocks[j] = logprob_block(logits[j], out[j], r.params, readout.k, top_n)
        return blocks

    def update_lengths(self, readout: StepReadout, running: list[bool]) -> None:
        """The draft-length policy of the rows that took part in the step (``running``: per draft row)."""
        stepped = [r for r in self.requests if running[r.draft_row]]
        if not stepped:
            return
        rows = [readout.row(r.draft_row) for r in stepped]
        current = torch.tensor([r.length for r in stepped], dtype=torch.int64)
        accepted = torch.tensor([row.n_accepted for row in rows], dtype=torch.int64)
        proposed = torch.tensor([row.n_proposed for row in rows], dtype=torch.int64)
        lengths = host_reads.host_list(self.policy.update(current, accepted, proposed))
        for r, n in zip(stepped, lengths):
            r.length = int(n)

    def commit(self, readout: StepReadout, running: list[bool]) -> int:
        """Keep each row's pending token and accepted drafts in the cache, then compact within the waste
        bound. Returns the compactions this took (0 or 1)."""
        keep = [readout.row(r.draft_row).n_accepted + 1 if running[r.draft_row] else 0 for r in self.requests]
        for r, n in zip(self.requests, keep):
            r.target_live += n
        # NOTE: a row's live tokens of this step are the first n_draft + 1 columns of the step's block
        # and it keeps the first ``keep`` of them, so the columns after the longest keep are holes in
        # every row: the host knows the tail to crop without reading the mask back.
        most = max(keep)
        self.runner.commit(
            host_reads.to_device(keep, torch.int64, self.device),
            dead_tail=self.width + 1 - most if most else None,
        )
        return int(self.runner.maybe_compact(longest=max(r.target_live for r in self.requests)))


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[B, L] int64 ids and mask of left-padded ``prompts`` (on the host) and each row's padding."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for p, pad in zip(prompts, pads)], dtype=torch.int64)
    mask = torch.tensor([[0] * pad + [1] * len(p) for p, pad in zip(prompts, pads)], dtype=torch.int64)
    return ids, mask, pads
