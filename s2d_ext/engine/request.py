"""A request's host-side state (:class:`Request`) and what a step returns for it (:class:`RequestOutput`)."""

from __future__ import annotations

import dataclasses

import torch

from s2d_ext.engine import host_reads
from s2d_ext.engine.logprobs import fill_logprobs
from s2d_ext.engine.params import RequestError, SamplingParams
from s2d_ext.engine.readout import RowReadout


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


class Request:
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
        self.draft_row = -1  # its row in the draft's batch (set whenever that batch changes)
        self.target_live = 0  # live tokens of the row in its target's cache
        self.context: torch.Tensor | None = None  # [prompt + max_new] on the target device (processors)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.generated)

    @property
    def draft_length(self) -> int:
        """Drafts to ask for at the next step: the policy's length, capped so that the step's tokens
        (drafts + 1) never pass ``max_new_tokens``; 0 once finished."""
        return 0 if self.finished else max(0, min(self.length, self.remaining - 1))

    @property
    def needs_logits(self) -> bool:
        """Whether the target's logits need more than the verify op does (processors or min-p)."""
        return bool(self.processors) or (self.params.min_p > 0 and not self.params.greedy)

    def fail(self, exc: BaseException, error: str) -> RequestOutput:
        """Finish with an error; the output that says so."""
        self.finished, self.reason, self.exception = True, "error", exc
        return RequestOutput(
            self.id,
            [],
            finished=True,
            finish_reason="error",
            num_generated=len(self.generated),
            error=error,
            exception=exc,
        )

    def take(self, row: RowReadout, top_n: int) -> RequestOutput:
        """Take this step's tokens (up to the first stop id) from its row of the readout; decide whether it
        finished ("stop", "length", or "error": a position where the processors allowed no token)."""
        count = len(row.tokens)
        for j, token in enumerate(row.tokens):
            if token in self.stop_ids:
                count, self.reason = j + 1, "stop"
                break
        new = row.tokens[:count]
        self.generated += new
        self.steps += 1
        error = None
        if self.reason is None and row.blocked:
            self.reason = "error"
            error = (
                f"no token is allowed at generated position {len(self.generated)}: the logits processors "
                "(allowed_token_ids, bad_words_ids, min_new_tokens, ...) masked every token"
            )
            self.exception = RequestError(error)
        if self.reason is None and self.remaining <= 0:
            self.reason = "length"
        self.finished = self.reason is not None
        output = RequestOutput(
            self.id,
            new,
            finished=self.finished,
            finish_reason=self.reason,
            num_generated=len(self.generated),
            error=error,
            exception=self.exception if error else None,
        )
        if self.params.logprobs is not None:
            fill_logprobs(output, row.logprobs, top_n, self.params.logprobs)
        if self.context is not None:
            start = len(self.prompt) + len(self.generated) - len(new)
            self.context[start : start + len(new)] = host_reads.to_device(
                new, torch.int64, self.context.device
            )
        return output
