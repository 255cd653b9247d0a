"""The HTTP layer: a FastAPI app over an :class:`~s2d_ext.server.async_engine.AsyncEngine`.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI bodies, :mod:`.protocol`), both with
``"stream": true`` for server-sent events (``data: {chunk}`` ... ``data: [DONE]``); ``GET /v1/models``;
``GET /health`` (also the engine's unfinished / aborted request counts). A bad request gets a 400 (404
for an unknown model) with an OpenAI-style ``{"error": {"message", "type", "param"}}`` body. A streaming
client that disconnects aborts its request: the engine drops its row at a later step.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from s2d_ext.engine import RequestOutput
from s2d_ext.server.async_engine import AsyncEngine
from s2d_ext.server.detokenize import TextStream
from s2d_ext.server.protocol import BadRequest, EngineRequest, engine_error, parse, served_model


def build_app(engine: AsyncEngine, tokenizer: Any, model_names: dict[str, str] | None = None):
    """The FastAPI app. ``model_names``: served model name -> engine target (default: the targets)."""
    names = model_names or {name: name for name in engine.engine.configs}
    app = FastAPI(title="s2d_ext", description="Sorted speculative decoding, OpenAI-compatible")
    contexts = {target: engine.engine.context_limit(target) for target in set(names.values())}

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ANN001
        return error(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "unfinished": engine.num_unfinished,
            "aborted": engine.aborted,
            "steps": engine.steps,
        }

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "s2d_ext"} for n in names]
        return {"object": "list", "data": data}

    async def serve(request: Request, chat: bool):
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            return error(400, "the request body is not valid JSON")
        try:
            model = served_model(body, names)
            req = parse(body, tokenizer, chat, context=contexts[names[model]])
        except BadRequest as exc:
            return error(exc.status, str(exc), exc.param)
        stream = engine.generate(req.prompt_ids, req.params, names[model])
        try:
            first = await anext(stream)
        except ValueError as exc:  # the engine refused the request (RequestError)
            refused = engine_error(str(exc), body, chat)
            return error(refused.status, str(refused), refused.param)
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": model,
        }
        if req.stream:
            return StreamingResponse(
                _events(stream, first, req, meta, tokenizer), media_type="text/event-stream"
            )
        return await _full_response(stream, first, req, meta, tokenizer, error)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


def _reason(out: RequestOutput, text: TextStream) -> str | None:
    if text.stopped:
        return "stop"
    if not out.finished:
        return None
    return out.finish_reason


def _choice(req: EngineRequest, delta: str, out: RequestOutput, reason: str | None, tokenizer, stream: bool):
    choice: dict[str, Any] = {"index": 0}
    if req.chat:
        key = "delta" if stream else "message"
        choice[key] = {"role": "assistant", "content": delta} if not stream else {"content": delta}
    else:
        choice["text"] = delta
    choice["logprobs"] = _logprobs(out, req, tokenizer) if req.params.logprobs is not None else None
    choice["finish_reason"] = reason
    if req.return_token_ids:
        choice["token_ids"] = list(out.new_token_ids)
    return choice


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


def _json_logprob(value: float) -> float:
    # NOTE: a token that top_k / top_p / min_p filtered out has log-probability -inf, which JSON cannot
    # hold (a 500, or "-Infinity" in a stream); vLLM clamps to -9999.0 and so do we.
    return max(float(value), -9999.0)


def _logprobs(out: RequestOutput, req: EngineRequest, tokenizer) -> dict:
    text = lambda t: tokenizer.decode([t]) if tokenizer is not None else str(t)  # noqa: E731
    tokens = out.new_token_ids
    if req.chat:
        content = [
            {
                "token": text(t),
                "logprob": _json_logprob(logprob),
                "top_logprobs": [{"token": text(i), "logprob": _json_logprob(v)} for i, v in top],
            }
            for t, logprob, top in zip(tokens, out.logprobs or [], out.top_logprobs or [])
        ]
        return {"content": content}
    return {
        "tokens": [text(t) for t in tokens],
        "token_logprobs": [_json_logprob(v) for v in out.logprobs or []],
        "top_logprobs": [{text(i): _json_logprob(v) for i, v in top} for top in (out.top_logprobs or [])],
    }


async def _events(stream, first: RequestOutput, req: EngineRequest, meta: dict, tokenizer):
    """Server-sent events of one request; closing ``stream`` early (disconnect, stop string) aborts it."""
    text = TextStream(tokenizer, req.stop, req.params.min_new_tokens) if tokenizer is not None else None
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    generated = 0
    try:
        if req.chat:
            head = {**meta, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            yield f"data: {json.dumps(head)}\n\n"
        out = first
        while True:
            if out.error is not None:
                yield f"data: {json.dumps({'error': {'message': out.error, 'type': 'server_error'}})}\n\n"
                break
            delta = text.add(out.new_token_ids, final=out.finished) if text is not None else ""
            if text is not None and text.stopped:
                out = _trim(
                    out, text.num_tokens - generated
                )  # NOTE: see _full_response on the tokens counted
            generated += len(out.new_token_ids)
            reason = _reason(out, text) if text is not None else (out.finish_reason if out.finished else None)
            chunk = {**meta, "object": kind, "choices": [_choice(req, delta, out, reason, tokenizer, True)]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if reason is not None:
                break
            out = await anext(stream)
        if req.include_usage:
            usage = _usage(len(req.prompt_ids), generated)
            yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()


async def _full_response(stream, first: RequestOutput, req: EngineRequest, meta: dict, tokenizer, error):
    outputs = [first]
    text = TextStream(tokenizer, req.stop, req.params.min_new_tokens) if tokenizer is not None else None
    content = text.add(first.new_token_ids, final=first.finished) if text is not None else ""
    try:
        while not outputs[-1].finished and not (text is not None and text.stopped):
            out = await anext(stream)
            outputs.append(out)
            if out.error is None and text is not None:
                content += text.add(out.new_token_ids, final=out.finished)
    finally:
        await stream.aclose()
    last = outputs[-1]
    if last.error is not None:
        return error(500, last.error)
    merged = RequestOutput(
        last.request_id,
        [t for o in outputs for t in o.new_token_ids],
        logprobs=[x for o in outputs for x in (o.logprobs or [])],
        top_logprobs=[x for o in outputs for x in (o.top_logprobs or [])],
        finished=True,
        finish_reason=last.finish_reason,
    )
    if text is not None and text.stopped:
        # NOTE: a speculative step can emit tokens past the one that completes a stop string. Ids,
        # logprobs and usage count the tokens up to and including that one and drop the rest, what vLLM
        # reports without speculation (one token a step, the request ends on the completing token) and
        # what its fix for speculative steps keeps (vllm-project/vllm#47616).
        merged = _trim(merged, text.num_tokens)
    reason = _reason(merged, text) if text is not None else merged.finish_reason
    kind = "chat.completion" if req.chat else "text_completion"
    choice = _choice(req, content, merged, reason, tokenizer, False)
    return {
        **meta,
        "object": kind,
        "choices": [choice],
        "usage": _usage(len(req.prompt_ids), len(merged.new_token_ids)),
    }


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
