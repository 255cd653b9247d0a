"""One engine step in lockstep on every rank of a tensor-parallel group.

Rank 0 owns the requests: its :class:`LockstepEngine` wraps its :class:`~s2d_ext.engine.Engine` behind the
methods :class:`~s2d_ext.server.async_engine.AsyncEngine` calls, records each ``add_request`` / ``abort``
(applied to its own engine at once, so errors reach the caller as before), and on ``step()`` broadcasts the
recorded operations and a step command to the other ranks before stepping itself (an echoed prompt's
log-probabilities, a forward of their own, go the same way: :meth:`LockstepEngine.prompt_logprobs`). The
other ranks run :func:`follower_loop`: receive, apply the same operations in the same order, step, until a
stop command.

Every rank's engine holds the same requests with the same ids and seeds (rank 0 draws the seed of a request
that has none before it is broadcast), and the whole draft runs on every rank (with gathered copies of a
sharded target's embedding and head, made once at load: :func:`s2d_ext.checkpoints.load_draft_model`): being
deterministic it proposes the same tokens everywhere, so no draft tokens are sent, and it has no
collectives. Running it on rank 0 alone would not be faster (the other ranks would wait for its proposals)
and would add a broadcast per step. The commands go over their own gloo group (``control``),
whose timeout is long: a follower waits there while the server is idle. The models' collectives use the
default group, whose timeout (``S2D_TP_TIMEOUT``) bounds how long a step waits for a rank that hangs; a rank
that dies closes its sockets and the others' collectives fail at once.

A failed step (a rank gone, or the ranks out of step) cannot be retried: the ranks' caches may differ. The
:class:`LockstepEngine` then turns failed: the step raises (the AsyncEngine fails every running request
with the error), later requests are refused with it, and ``on_failure`` runs (``s2d serve --tp`` stops its
server there and exits with status 1).
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from s2d_ext.engine import Engine, RequestError, RequestOutput, SamplingParams

STEP = ("step",)
STOP = ("stop",)


class LockstepEngine:
    """Rank 0's engine: every ``step()`` first sends the operations since the last one to the other ranks.

    Not thread-safe (like the engine): the AsyncEngine's thread is the only caller of add/abort/step.
    Everything else (configs, context_limit, vocab_size, stats, request_ids, ...) is the engine's own.
    """

    def __init__(
        self,
        engine: Engine,
        group: Any = None,
        *,
        on_failure: Callable[[str], None] | None = None,
        broadcast: Callable[[list], None] | None = None,
    ) -> None:
        self.engine = engine
        self.group = group
        self.on_failure = on_failure
        self.failed: str | None = None
        self.collective_seconds = 0.0  # wall time of the command broadcasts so far
        self._ops: list[tuple] = []
        self._broadcast = broadcast or (lambda ops: broadcast_ops(ops, group))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    # -------------------------------------------------------------------- what the AsyncEngine calls
    def add_request(
        self,
        prompt_ids: Any,
        params: SamplingParams | None = None,
        *,
        target: str | None = None,
        request_id: str | None = None,
    ) -> str:
        if self.failed is not None:
            raise RequestError(f"the tensor-parallel group failed ({self.failed}): restart the server")
        params = params if params is not None else SamplingParams()
        if params.seed is None:
            from s2d_ext.engine.params import seeds_for

            # NOTE: drawn here, not by each rank's engine: every rank must sample with the same seed.
            params = params.replace(seed=seeds_for(None, 1)[0])
        prompt = _ints(prompt_ids)
        request_id = self.engine.add_request(prompt, params, target=target, request_id=request_id)
        op = ("add", prompt, params, target, request_id)
        try:
            pickle.dumps(op)
        except Exception as exc:  # noqa: BLE001 (e.g. a logits processor that cannot be sent to the ranks)
            self.engine.abort(request_id)
            raise RequestError(
                f"this request cannot be sent to the other tensor-parallel ranks: {exc}"
            ) from None
        self._ops.append(op)
        return request_id

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)  # NOTE: raises for an unknown id before anything is sent
        if self.failed is None:
            self._ops.append(("abort", request_id))

    def step(self) -> list[RequestOutput]:
        if self.failed is not None:
            raise RuntimeError(f"the tensor-parallel group failed ({self.failed})")
        ops, self._ops = [*self._ops, STEP], []
        try:
            import time

            start = time.perf_counter()
            self._broadcast(ops)
            self.collective_seconds += time.perf_counter() - start
            return self.engine.step()
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {_first_line(exc)}")
            raise RuntimeError(
                f"tensor-parallel step failed, a rank is gone or out of step: {self.failed}"
            ) from exc

    def prompt_logprobs(self, target: str, prompt_ids: Sequence[int], top_n: int) -> tuple[list, list]:
        """:func:`~s2d_ext.server.prompt_logprobs.prompt_logprobs` of ``target``'s model on every rank (its
        forward's collectives need them all); rank 0's result. Between two steps, like every operation."""
        from s2d_ext.server.prompt_logprobs import prompt_logprobs

        if self.failed is not None:
            raise RequestError(f"the tensor-parallel group failed ({self.failed}): restart the server")
        prompt = [int(t) for t in prompt_ids]
        ops, self._ops = [*self._ops, ("prompt_logprobs", target, prompt, int(top_n))], []
        try:
            self._broadcast(ops)
            return prompt_logprobs(self.engine.configs[target].model, prompt, top_n)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {_first_line(exc)}")
            raise RuntimeError(
                f"tensor-parallel prompt forward failed, a rank is gone or out of step: {self.failed}"
            ) from exc

    def stop(self) -> None:
        """Tell the other ranks to leave :func:`follower_loop` (after the last step; never concurrently)."""
        if self.failed is None:
            with contextlib.suppress(Exception):
                self._broadcast([*self._ops, STOP])
            self._ops = []

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        self._ops = []
        if self.on_failure is not None:
            self.on_failure(reason)


def follower_loop(engine: Engine, group: Any = None, *, receive: Callable[[], list] | None = None) -> int:
    """A rank > 0: apply rank 0's operations and steps until it says stop (0) or is lost (1)."""
    receive = receive or (lambda: receive_ops(group))
    while True:
        try:
            ops = receive()
        except Exception as exc:  # noqa: BLE001 (rank 0 is gone)
            print(f"s2d: tensor-parallel rank 0 is gone: {_first_line(exc)}", file=sys.stderr)
            return 1
        for op in ops:
            kind = op[0]
            if kind == "add":
                _, prompt, params, target, request_id = op
                try:
                    engine.add_request(prompt, params, target=target, request_id=request_id)
                except Exception:  # noqa: BLE001 (rank 0 took it: a bug; the next step will show it)
                    traceback.print_exc()
            elif kind == "abort":
                with contextlib.suppress(ValueError):
                    engine.abort(op[1])
            elif kind == "step":
                try:
                    engine.step()
                except Exception as exc:  # noqa: BLE001 (a rank gone mid-step: nothing left to step with)
                    print(f"s2d: tensor-parallel step failed: {_first_line(exc)}", file=sys.stderr)
                    return 1
            elif kind == "prompt_logprobs":
                from s2d_ext.server.prompt_logprobs import prompt_logprobs

                _, target, prompt, top_n = op
                try:
                    prompt_logprobs(engine.configs[target].model, prompt, top_n)
                except Exception as exc:  # noqa: BLE001 (a rank gone mid-forward)
                    print(f"s2d: tensor-parallel prompt forward failed: {_first_line(exc)}", file=sys.stderr)
                    return 1
            elif kind == "stop":
                return 0


def broadcast_ops(ops: list, group: Any = None) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([ops], src=0, group=group)


def receive_ops(group: Any = None) -> list:
    import torch.distributed as dist

    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _ints(prompt_ids: Any) -> list[int] | Any:
    if isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, (str, bytes)):
        try:
            return [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            return prompt_ids  # NOTE: the engine's own check words the error
    if hasattr(prompt_ids, "tolist"):
        return prompt_ids.tolist()
    return prompt_ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    # NOTE: gloo's errors go on with advice ("This is typically caused by ... GLHF!"): the cause comes first.
    return text.splitlines()[0].split(" This is typically caused by")[0]
