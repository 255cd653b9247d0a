"""OpenAI request bodies -> engine requests (prompt ids + :class:`~s2d_ext.engine.SamplingParams`).

Accepted fields of ``/v1/completions``: ``model``, ``prompt`` (a string or a list of token ids),
``max_tokens`` (16), ``temperature`` (1.0, as OpenAI), ``top_p``, ``n`` (1 only), ``stream``, ``stop``
(strings), ``seed``, ``logprobs`` (top-n), ``echo`` (false only), and the vLLM-style extensions
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``bad_words`` (strings), ``allowed_token_ids`` and ``return_token_ids`` (the ids of the new tokens in
every choice / chunk). ``/v1/chat/completions`` takes ``messages`` instead of ``prompt`` (rendered with
the tokenizer's chat template), ``max_completion_tokens`` as well as ``max_tokens``, and ``logprobs``
(bool) with ``top_logprobs``, and ``tool_choice`` "none" / "auto" only (no tools). ``stream_options``
(``include_usage``) needs ``stream``. Anything else that would change the output (``presence_penalty``,
``frequency_penalty``, a non-empty ``logit_bias``, ``best_of`` > 1, ``suffix``, ...) is refused with a
400, as is a field of the wrong type; the error's ``param`` names the request's field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from s2d_ext.engine import SamplingParams


class BadRequest(ValueError):
    """A request the server refuses: status 400 (or ``status``) with ``message`` naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    stop: list[str]
    return_token_ids: bool
    chat: bool
    include_usage: bool = False


_REFUSED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
    "best_of": 1,
    "tools": None,
    "response_format": None,
}
_KNOWN_COMPLETION = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "logprobs",
    "echo", "user", "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
    "ignore_eos", "bad_words", "allowed_token_ids", "return_token_ids", *_REFUSED,
}  # fmt: skip
_KNOWN_CHAT = (_KNOWN_COMPLETION - {"prompt", "echo", "logprobs"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tool_choice", "parallel_tool_calls",
}  # fmt: skip


def served_model(body: Any, names: Mapping[str, str]) -> str:
    """The served model name a request asks for (the first one when it names none)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        return next(iter(names))
    if not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {type(model).__name__}", "model")
    if model not in names:
        raise BadRequest(f"model {model!r} is not served here (models: {sorted(names)})", "model", 404)
    return model


# NOTE: the chat default of max_tokens is what the context leaves (vLLM's default); a model whose context
# is unknown gets this many instead of an unbounded request.
DEFAULT_CHAT_TOKENS = 256


def parse(
    body: Any, tokenizer: Any, chat: bool, max_logprobs: int = 20, context: int | None = None
) -> EngineRequest:
    """Check an OpenAI request body and translate it (raises :class:`BadRequest`).

    ``context``: the most tokens (prompt + new) the model takes, None when unknown; a chat request without
    ``max_tokens`` asks for what its prompt leaves of it.
    """
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    _get(body, "user", str, None)
    unknown = sorted(set(body) - (_KNOWN_CHAT if chat else _KNOWN_COMPLETION))
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r}", unknown[0])
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, Mapping):
        raise BadRequest("logit_bias must be an object (token id -> bias)", "logit_bias")
    for name, default in _REFUSED.items():
        value = body.get(name, default)
        if name == "logit_bias" and value == {}:
            continue  # NOTE: an empty logit_bias biases nothing: accepted as a no-op
        # NOTE: True == 1 in Python: best_of=true must not pass as best_of=1
        if isinstance(value, bool) or (value not in (default, None) and value != default):
            raise BadRequest(f"{name}={value!r} is not supported by this server", name)
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto"):
        # NOTE: "none" / "auto" without tools generate plain text; anything else asks for a tool call,
        # and tools are refused above (vLLM refuses tool_choice without tools too).
        raise BadRequest(
            f"tool_choice={tool_choice!r} needs tools, which this server does not support", "tool_choice"
        )
    _get(body, "parallel_tool_calls", bool, None)
    if _get(body, "n", int, 1) != 1:
        raise BadRequest("n must be 1 (one choice per request)", "n")
    if chat:
        prompt_ids = _chat_prompt(body.get("messages"), tokenizer)
    else:
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
        prompt_ids = _completion_prompt(body.get("prompt"), tokenizer)
    max_tokens = _get(body, "max_completion_tokens", int, None) if chat else None
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, None if chat else 16)
    if max_tokens is None and context is None:
        max_tokens = DEFAULT_CHAT_TOKENS
    elif max_tokens is None:
        max_tokens = context - len(prompt_ids)
        if max_tokens < 1:
            raise BadRequest(
                f"messages: the prompt of {len(prompt_ids)} tokens leaves no room in the model's context "
                f"of {context}",
                "messages",
            )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop) or len(stop) > 16:
        raise BadRequest("stop must be a string or a list of at most 16 strings", "stop")
    stream = _get(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise BadRequest("stream_options must be an object", "stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options can only be set when stream is true", "stream_options")
    unknown = sorted(set(options or {}) - {"include_usage"})
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r} in stream_options", "stream_options")
    include_usage = _get(options or {}, "include_usage", bool, False, "stream_options.include_usage")
    top_k = _get(body, "top_k", int, 0)
    if top_k < -1:
        raise BadRequest(f"top_k must be -1 or 0 (off) or >= 1, got {top_k}", "top_k")
    min_tokens = _get(body, "min_tokens", int, 0)
    # NOTE: a max_tokens < 1 is SamplingParams' to refuse (naming max_tokens), not a min_tokens error
    if isinstance(max_tokens, int) and 1 <= max_tokens < min_tokens:
        raise BadRequest(f"min_tokens must be <= max_tokens ({max_tokens}), got {min_tokens}", "min_tokens")
    logprobs: int | None
    if chat:
        logprobs = _get(body, "top_logprobs", int, 0) if _get(body, "logprobs", bool, False) else None
        if body.get("top_logprobs") is not None and logprobs is None:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
    else:
        logprobs = _get(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        name = "top_logprobs" if chat else "logprobs"
        raise BadRequest(f"{name} must be in [0, {max_logprobs}], got {logprobs}", name)
    eos = [] if _get(body, "ignore_eos", bool, False) else None
    bad_words = body.get("bad_words") or []
    if not isinstance(bad_words, list) or any(not isinstance(w, str) for w in bad_words):
        raise BadRequest("bad_words must be a list of strings", "bad_words")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=min_tokens,
            temperature=_get(body, "temperature", float, 1.0),
            top_k=max(top_k, 0),  # NOTE: -1 is vLLM's old "off", 0 its new one
            top_p=_get(body, "top_p", float, 1.0),
            min_p=_get(body, "min_p", float, 0.0),
            seed=_get(body, "seed", int, None),
            eos_token_id=eos,
            stop_token_ids=body.get("stop_token_ids") or (),
            logprobs=logprobs,
            repetition_penalty=_get(body, "repetition_penalty", float, 1.0),
            bad_words_ids=[_encode(w, tokenizer) for w in bad_words],
            allowed_token_ids=body.get("allowed_token_ids"),
        )
    except (TypeError, ValueError) as exc:
        raise engine_error(str(exc), body, chat) from None
    return EngineRequest(
        prompt_ids=prompt_ids,
        params=params,
        stream=stream,
        stop=stop,
        return_token_ids=_get(body, "return_token_ids", bool, False),
        chat=chat,
        include_usage=include_usage,
    )


_ENGINE_WORD = re.compile(r"\b(max_new_tokens|min_new_tokens|bad_words_ids|prompt_ids)\b")


def engine_error(message: str, body: Mapping, chat: bool) -> BadRequest:
    """A 400 for a message of ``SamplingParams`` / ``Engine.add_request``, in the request's words.

    NOTE: the engine names its own parameters (``max_new_tokens``, ``prompt_ids``, ...); a client sent
    ``max_tokens`` / ``max_completion_tokens``, ``prompt`` / ``messages``, ..., so the message and ``param``
    say those. ``param`` is the field the message starts with, None when it names none.
    """
    max_name = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    words = {
        "max_new_tokens": max_name,
        "min_new_tokens": "min_tokens",
        "bad_words_ids": "bad_words",
        "prompt_ids": "messages" if chat else "prompt",
    }
    message = _ENGINE_WORD.sub(lambda m: words[m.group(1)], message)
    first = re.match(r"[a-z_]+", message)
    fields = _KNOWN_CHAT if chat else _KNOWN_COMPLETION
    return BadRequest(message, first.group() if first and first.group() in fields else None)


def _get(body: Mapping, name: str, kind: type, default: Any, shown: str | None = None) -> Any:
    """``body[name]`` checked to be a ``kind`` (``shown``: the name in the error, default ``name``)."""
    value = body.get(name, default)
    name = shown or name
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an ' + kind.__name__}", name)
    return value


def _encode(text: str, tokenizer: Any) -> list[int]:
    if tokenizer is None:
        raise BadRequest("this server has no tokenizer: send token ids", "prompt")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _completion_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # NOTE: a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
        ids = list(tokenizer.encode(prompt)) if tokenizer is not None else _encode(prompt, None)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("prompt: send one prompt per request", "prompt")
    else:
        raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("prompt encodes to no tokens", "prompt")
    return ids


def _chat_prompt(messages: Any, tokenizer: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    for m in messages:
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRequest("every message needs a string role and a string content", "messages")
    if tokenizer is None:
        raise BadRequest("this server has no tokenizer: chat needs one", "messages")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    else:
        # NOTE: a tokenizer without a chat template gets a plain one: "role: content" lines.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
    return _encode(text, tokenizer)
