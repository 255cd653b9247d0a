"""The choices of one OpenAI request: each is an engine request; here their outputs become the response.

A request with ``P`` prompts and ``n`` choices each has ``P * n`` choices (index ``p * n + i``). Streaming
(:func:`stream_events`) sends each choice's chunks as its engine outputs arrive, interleaved; the whole
response (:func:`collect`) waits for every choice. Stop strings, ``echo`` (the prompt's text, and its
log-probabilities when asked) and tool calls (the grammar-constrained text as ``tool_calls``) are applied
per choice. Closing the stream early (a client that disconnected) aborts every choice still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from s2d_ext.engine import RequestError, RequestOutput
from s2d_ext.server.detokenize import TextStream
from s2d_ext.server.protocol import EngineRequest


@dataclasses.dataclass
class Choice:
    """One engine request of an HTTP request."""

    index: int
    prompt: list[int]
    prompt_text: str | None  # the prompt as sent, when it was text (echo)
    stream: AsyncIterator[RequestOutput]
    first: RequestOutput | None = None
    prompt_logprobs: Any = None  # ([L] logprobs, [L] top lists), for echo with logprobs
    completion_tokens: int = 0


class _Failed(Exception):
    """A choice's engine request failed (``out.error``): status 400 when the request's own settings left
    no token to generate (a RequestError), else 500."""

    def __init__(self, out: RequestOutput) -> None:
        super().__init__(out.error)
        self.status = 400 if isinstance(out.exception, RequestError) else 500


def _reason(out: RequestOutput, text: TextStream | None) -> str | None:
    if text is not None and text.stopped:
        return "stop"
    if not out.finished:
        return None
    return {"stop": "stop", "length": "length"}.get(out.finish_reason, out.finish_reason)


def _trim(out: RequestOutput, keep: int) -> RequestOutput:
    """``out`` with only its first ``keep`` new tokens (and their logprobs)."""
    if keep >= len(out.new_token_ids):
        return out
    keep = max(keep, 0)
    return dataclasses.replace(
        out,
        new_token_ids=list(out.new_token_ids[:keep]),
        logprobs=None if out.logprobs is None else list(out.logprobs[:keep]),
        top_logprobs=None if out.top_logprobs is None else list(out.top_logprobs[:keep]),
    )


def _lp(value: float | None) -> float | None:
    # NOTE: a token that top_k / top_p / min_p filtered out has log-probability -inf, which JSON cannot
    # hold (a 500, or "-Infinity" in a stream); vLLM clamps to -9999.0 and so do we.
    return None if value is None else max(float(value), -9999.0)


async def _outputs(c: Choice, req: EngineRequest, tokenizer) -> AsyncIterator[tuple[str, RequestOutput, Any]]:
    """(text delta, output trimmed at a stop string, finish reason or None) per engine output of ``c``."""
    text = TextStream(tokenizer, req.stop, req.params.min_new_tokens) if tokenizer is not None else None
    generated = 0
    out = c.first
    while True:
        if out.error is not None:
            raise _Failed(out)
        delta = text.add(out.new_token_ids, final=out.finished) if text is not None else ""
        if text is not None and text.stopped:
            # NOTE: a speculative step can emit tokens past the one that completes a stop string. Ids,
            # logprobs and usage count the tokens up to and including that one and drop the rest, what vLLM
            # reports without speculation (one token a step, the request ends on the completing token) and
            # what its fix for speculative steps keeps (vllm-project/vllm#47616).
            out = _trim(out, text.num_tokens - generated)
        generated += len(out.new_token_ids)
        c.completion_tokens = generated
        reason = _reason(out, text)
        yield delta, out, reason
        if reason is not None:
            return
        out = await anext(c.stream)


def _logprobs(c: Choice, tokens, logprobs, tops, req: EngineRequest, tokenizer, with_prompt: bool) -> dict:
    text = lambda t: tokenizer.decode([t]) if tokenizer is not None else str(t)  # noqa: E731
    if req.chat:
        content = [
            {
                "token": text(t),
                "logprob": _lp(lp),
                "top_logprobs": [{"token": text(i), "logprob": _lp(v)} for i, v in top],
            }
            for t, lp, top in zip(tokens, logprobs, tops)
        ]
        return {"content": content}
    body = {
        "tokens": [text(t) for t in tokens],
        "token_logprobs": [_lp(v) for v in logprobs],
        "top_logprobs": [None if top is None else {text(i): _lp(v) for i, v in top} for top in tops],
    }
    if with_prompt and c.prompt_logprobs is not None:
        # NOTE: echo: the prompt's tokens first, the first of them without a log-probability (vLLM's layout)
        lps, ptops = c.prompt_logprobs
        body["tokens"] = [text(t) for t in c.prompt] + body["tokens"]
        body["token_logprobs"] = [_lp(v) for v in lps] + body["token_logprobs"]
        body["top_logprobs"] = [
            None if top is None else {text(i): _lp(v) for i, v in top} for top in ptops
        ] + body["top_logprobs"]
    return body


def _echo_text(c: Choice, tokenizer) -> str:
    if c.prompt_text is not None:
        return c.prompt_text
    return tokenizer.decode(c.prompt) if tokenizer is not None else ""


def _tool_calls(text: str, spec) -> list[dict] | None:
    """The ``tool_calls`` of a tool-constrained output, None when the text is not a complete call (cut)."""
    if spec.tool_mode == "named":
        calls = [{"name": spec.tool_names[0], "arguments": text}]
    else:
        try:
            parsed = json.loads(text)
            calls = [{"name": call["name"], "arguments": json.dumps(call["parameters"])} for call in parsed]
        except (ValueError, TypeError, KeyError):
            return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call} for call in calls]


def _usage(req: EngineRequest, choices: list[Choice]) -> dict:
    # NOTE: each prompt counts once, whatever n is (vLLM's usage)
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(metrics, req: EngineRequest, choices: list[Choice]) -> None:
    if metrics is not None:
        metrics.prompt_tokens.inc(sum(len(p) for p in req.prompts))
        metrics.generation_tokens.inc(sum(c.completion_tokens for c in choices))


async def _close(choices: list[Choice]) -> None:
    for c in choices:
        await c.stream.aclose()


async def collect(choices: list[Choice], req: EngineRequest, meta: dict, tokenizer, spec, metrics) -> dict:
    """The whole response ({"error": message} when an engine request failed)."""

    async def one(c: Choice) -> dict:
        content, tokens, logprobs, tops, reason = "", [], [], [], None
        async for delta, out, last in _outputs(c, req, tokenizer):
            reason = last
            content += delta
            tokens += out.new_token_ids
            logprobs += out.logprobs or []
            tops += out.top_logprobs or []
        choice: dict[str, Any] = {"index": c.index}
        if req.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            calls = _tool_calls(content, spec) if spec is not None and spec.tool_mode else None
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                reason = "tool_calls" if spec.tool_mode == "required" and reason == "stop" else reason
            choice["message"] = message
        else:
            choice["text"] = (_echo_text(c, tokenizer) if req.echo else "") + content
        choice["logprobs"] = (
            _logprobs(c, tokens, logprobs, tops, req, tokenizer, req.echo)
            if req.params.logprobs is not None
            else None
        )
        choice["finish_reason"] = reason
        if req.return_token_ids:
            choice["token_ids"] = tokens
        return choice

    try:
        results = await asyncio.gather(*(one(c) for c in choices), return_exceptions=True)
    finally:
        await _close(choices)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if isinstance(failed, _Failed):
        return {"error": str(failed), "status": failed.status}
    if failed is not None:
        raise failed
    _count(metrics, req, choices)
    kind = "chat.completion" if req.chat else "text_completion"
    return {**meta, "object": kind, "choices": list(results), "usage": _usage(req, choices)}


async def stream_events(choices: list[Choice], req: EngineRequest, meta: dict, tokenizer, spec, metrics):
    """Server-sent events of every choice, interleaved as their outputs arrive; closing the generator
    early (a client that disconnected) cancels the pumps, which aborts the engine requests."""
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for item in _outputs(c, req, tokenizer):
                await queue.put((c, item))
        except _Failed as exc:
            await queue.put((c, exc))
        finally:
            await queue.put((c, None))

    def chunk(choice: dict) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    tool_state: dict[int, Any] = {}
    try:
        if req.chat:
            for c in choices:
                yield chunk({"index": c.index, "delta": {"role": "assistant"}})
        if req.echo:
            for c in choices:
                if req.params.logprobs is not None and c.prompt_logprobs is not None:
                    echo_lp = _logprobs(c, [], [], [], req, tokenizer, True)
                else:
                    echo_lp = None
                yield chunk(
                    {
                        "index": c.index,
                        "text": _echo_text(c, tokenizer),
                        "logprobs": echo_lp,
                        "finish_reason": None,
                    }
                )
        running = len(choices)
        while running:
            c, item = await queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, _Failed):
                error_type = "invalid_request_error" if item.status < 500 else "server_error"
                yield f"data: {json.dumps({'error': {'message': str(item), 'type': error_type}})}\n\n"
                break
            delta, out, reason = item
            choice: dict[str, Any] = {"index": c.index}
            if req.chat and spec is not None and spec.tool_mode:
                choice["delta"] = _tool_delta(c, delta, reason, spec, tool_state)
            elif req.chat:
                choice["delta"] = {"content": delta}
            else:
                choice["text"] = delta
            lp = req.params.logprobs is not None
            choice["logprobs"] = (
                _logprobs(
                    c, out.new_token_ids, out.logprobs or [], out.top_logprobs or [], req, tokenizer, False
                )
                if lp
                else None
            )
            if (
                reason == "stop"
                and spec is not None
                and spec.tool_mode == "required"
                and tool_state.get(c.index)
            ):
                reason = "tool_calls"
            choice["finish_reason"] = reason
            if req.return_token_ids:
                choice["token_ids"] = list(out.new_token_ids)
            yield chunk(choice)
        else:
            _count(metrics, req, choices)
            if req.include_usage:
                usage = _usage(req, choices)
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(choices)


def _tool_delta(c: Choice, delta: str, reason, spec, state: dict) -> dict:
    """A chat chunk's delta under tools: a named function's arguments stream as they come; the calls of
    ``"required"`` (a JSON array) are sent whole with the last chunk."""
    if spec.tool_mode == "named":
        if c.index not in state:
            state[c.index] = f"call_{uuid.uuid4().hex[:24]}"
            call = {
                "index": 0,
                "id": state[c.index],
                "type": "function",
                "function": {"name": spec.tool_names[0], "arguments": delta},
            }
        else:
            call = {"index": 0, "function": {"arguments": delta}}
        return {"tool_calls": [call]}
    buffered = state.setdefault(("text", c.index), [])
    buffered.append(delta)
    if reason is None:
        return {}
    calls = _tool_calls("".join(buffered), spec)
    if calls is None:
        return {"content": "".join(buffered)}
    state[c.index] = True
    return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
