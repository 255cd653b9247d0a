"""``AsyncEngine``: one :class:`~s2d_ext.engine.Engine` stepped by a thread of its own, fed from asyncio.

The engine is not thread-safe, so only its thread touches it: ``add`` and ``abort`` post commands that it
runs between two steps (requests join and leave the batch there), and every step's outputs go to each
request's asyncio queue. While no request is running the thread sleeps on its command queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence

from s2d_ext.engine import Engine, RequestOutput, SamplingParams


class AsyncEngine:
    """Runs ``engine`` in a daemon thread; :meth:`generate` streams one request's outputs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.aborted = 0  # requests aborted (client gone) so far
        self.steps = 0
        self.step_seconds = 0.0  # wall time of the engine's steps so far
        self._thread = threading.Thread(target=self._run, name="s2d-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- asyncio side
    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, target: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; a caller that stops early (a client that
        disconnected: ``GeneratorExit`` / cancellation) aborts it."""
        loop = asyncio.get_running_loop()
        request_id = f"srv-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        self._streams[request_id] = (loop, outputs)
        self._commands.put(("add", request_id, list(prompt_ids), params, target, added))
        finished = False
        try:
            await added  # NOTE: raises the engine's RequestError for a bad request
            while True:
                out = await outputs.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and added.done() and added.exception() is None:
                self._commands.put(("abort", request_id))

    async def call(self, fn):
        """``fn()`` run by the engine thread between two steps (it may use the models); returns its result
        or raises its exception."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._commands.put(("call", fn, loop, done))
        return await done

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        """Commands (mostly new requests) posted to the engine thread and not yet taken in."""
        return self._commands.qsize()

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    # -------------------------------------------------------------------------------------- engine side
    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            self._drain(block)
            if not self.engine.has_unfinished():
                continue
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 (a bug must not kill the server: fail what is running)
                traceback.print_exc()
                outputs = self._fail_all(exc)
            self.steps += 1
            self.step_seconds += time.perf_counter() - start
            for out in outputs:
                self._deliver(out.request_id, out)

    def _drain(self, block: bool) -> None:
        """Run the pending commands (waiting for one when ``block``)."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params, target, added = command
                try:
                    self.engine.add_request(prompt, params, target=target, request_id=request_id)
                    self._resolve(request_id, added, None)
                except Exception as exc:  # noqa: BLE001 (reported to that request only)
                    self._resolve(request_id, added, exc)
            elif kind == "call":
                _, fn, loop, done = command
                try:
                    result, error = fn(), None
                except Exception as exc:  # noqa: BLE001 (handed to the caller)
                    result, error = None, exc
                loop.call_soon_threadsafe(_settle, done, result, error)
            elif kind == "abort":
                with contextlib.suppress(ValueError):  # NOTE: it may have finished meanwhile
                    self.engine.abort(command[1])
                    self.aborted += 1

    def _resolve(self, request_id: str, future: asyncio.Future, exc: BaseException | None) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            if exc is None:  # NOTE: the client left before its request was added
                with contextlib.suppress(ValueError):
                    self.engine.abort(request_id)
            return
        loop = stream[0]

        def settle():
            if not future.done():
                future.set_exception(exc) if exc is not None else future.set_result(None)

        loop.call_soon_threadsafe(settle)

    def _deliver(self, request_id: str, out: RequestOutput) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, out)

    def _fail_all(self, exc: BaseException) -> list[RequestOutput]:
        failed = []
        for request_id in self.engine.request_ids():
            with contextlib.suppress(ValueError):
                self.engine.abort(request_id)
            failed.append(
                RequestOutput(
                    request_id, [], finished=True, finish_reason="error", error=f"engine step failed: {exc}"
                )
            )
        return failed


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
