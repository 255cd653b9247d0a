"""The HTTP layer: a FastAPI app over an :class:`~s2d_ext.server.async_engine.AsyncEngine`.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI bodies, :mod:`.protocol`), both with
``"stream": true`` for server-sent events (``data: {chunk}`` ... ``data: [DONE]``); ``GET /v1/models``;
``GET /health`` (also the engine's unfinished / aborted request counts); ``GET /metrics`` (Prometheus,
:mod:`.metrics`); ``GET /version``. A bad request gets a 400 (404 for an unknown model) with an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body. A request with several prompts or
``n`` > 1 runs one engine request per choice (:mod:`.choices`); a streaming client that disconnects
aborts them all: the engine drops their rows at a later step.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from s2d_ext.engine import Engine
from s2d_ext.server import openapi
from s2d_ext.server.async_engine import AsyncEngine
from s2d_ext.server.choices import Choice, collect, stream_events
from s2d_ext.server.protocol import MAX_N, MAX_PROMPTS, BadRequest, engine_error, parse, served_model
from s2d_ext.server.structured_output import structured_output


def build_app(
    engine: AsyncEngine,
    tokenizer: Any,
    model_names: dict[str, str] | None = None,
    *,
    max_n: int = MAX_N,
    max_prompts: int = MAX_PROMPTS,
):
    """The FastAPI app. ``model_names``: served model name -> engine target (default: the targets).
    ``max_n`` / ``max_prompts``: the most choices per prompt and prompts per completions request."""
    from s2d_ext.server.metrics import CONTENT_TYPE, ServerMetrics

    names = model_names or {name: name for name in engine.engine.configs}
    app = FastAPI(title="s2d_ext", description="Sorted speculative decoding, OpenAI-compatible")
    contexts = {target: engine.engine.context_limit(target) for target in set(names.values())}
    metrics = ServerMetrics(engine)
    grammars = _LazyGrammars(engine.engine, tokenizer)

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ANN001
        return error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):  # noqa: ANN001 (404 / 405 ...: a JSON error body too)
        return error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "unfinished": engine.num_unfinished,
            "aborted": engine.aborted,
            "steps": engine.steps,
        }

    @app.get("/version")
    async def version():
        import torch
        import transformers

        return {
            "version": importlib.metadata.version("s2d_ext"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "s2d_ext"} for n in names]
        return {"object": "list", "data": data}

    async def serve(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        response = await _serve(request, chat)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _serve(request: Request, chat: bool):
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            return error(400, "the request body is not valid JSON")
        try:
            model = served_model(body, names)
            target = names[model]
            req = parse(
                body,
                tokenizer,
                chat,
                context=contexts[target],
                vocab_size=engine.engine.vocab_size,
                max_n=max_n,
                max_prompts=max_prompts,
            )
            spec = structured_output(body, chat)
        except BadRequest as exc:
            return error(exc.status, str(exc), exc.param)
        count = len(req.prompts) * req.n
        processors: list[Any] = [None] * count
        if spec is not None:
            try:
                # NOTE: off the event loop: the first grammar builds the tokenizer's index (seconds).
                processors = await asyncio.to_thread(
                    lambda: [spec.processor(grammars.get()) for _ in range(count)]
                )
            except ValueError as exc:  # GrammarError, or no tokenizer / EOS for a grammar
                return error(400, f"{spec.field}: {exc}", spec.field)
        choices = []
        for p, prompt in enumerate(req.prompts):
            for i in range(req.n):
                params = req.choice_params(i)
                processor = processors[p * req.n + i]
                if processor is not None:
                    params = params.replace(logits_processors=[*params.logits_processors, processor])
                text = req.prompt_texts[p] if req.prompt_texts else None
                stream = engine.generate(prompt, params, target)
                choices.append(Choice(p * req.n + i, prompt, text, stream))
        firsts = await asyncio.gather(*(anext(c.stream) for c in choices), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            for c in choices:
                await c.stream.aclose()
            if isinstance(failed, ValueError):  # the engine refused the request (RequestError)
                refused = engine_error(str(failed), body, chat)
                return error(refused.status, str(refused), refused.param)
            raise failed
        for c, first in zip(choices, firsts):
            c.first = first
        if req.echo and req.params.logprobs is not None:
            await _prompt_logprobs(engine, target, choices, req.params.logprobs)
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": model,
        }
        if req.stream:
            return StreamingResponse(
                stream_events(choices, req, meta, tokenizer, spec, metrics), media_type="text/event-stream"
            )
        whole = await collect(choices, req, meta, tokenizer, spec, metrics)
        if "error" in whole:
            return error(whole["status"], whole["error"])
        return JSONResponse(whole)

    @app.post("/v1/completions", openapi_extra=openapi.body(openapi.COMPLETION_REQUEST))
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=openapi.body(openapi.CHAT_REQUEST))
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


async def _prompt_logprobs(engine: AsyncEngine, target: str, choices: list[Choice], top_n: int) -> None:
    """Each choice's prompt log-probabilities (echo): one forward per distinct prompt, engine thread."""
    from s2d_ext.server.prompt_logprobs import prompt_logprobs

    model = engine.engine.configs[target].model
    # NOTE: a tensor-parallel rank 0 (server/tp/lockstep.py) has its own, which runs the forward on every
    # rank (its collectives need them all); a plain engine has none.
    forward = getattr(engine.engine, "prompt_logprobs", None) or (
        lambda _target, prompt, n: prompt_logprobs(model, prompt, n)
    )
    done: dict[tuple, Any] = {}
    for c in choices:
        key = tuple(c.prompt)
        if key not in done:
            done[key] = await engine.call(lambda prompt=c.prompt: forward(target, prompt, top_n))
        c.prompt_logprobs = done[key]


class _LazyGrammars:
    """The server's :class:`~s2d_ext.engine.grammar.Grammars`, made on the first structured request."""

    def __init__(self, engine: Engine, tokenizer: Any) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self._grammars: Any = None

    def get(self) -> Any:
        if self._grammars is None:
            from s2d_ext.engine.grammar import Grammars
            from s2d_ext.engine.params import generation_default_ids

            if self.tokenizer is None:
                raise ValueError("structured output needs a tokenizer, and this server has none")
            eos = []
            for config in self.engine.configs.values():
                eos += generation_default_ids(getattr(config.model, "generation_config", None))
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
            eos += [] if tokenizer_eos is None else [int(tokenizer_eos)]
            self._grammars = Grammars(self.tokenizer, self.engine.vocab_size, sorted(set(eos)))
        return self._grammars
