"""OpenAI request bodies -> engine requests (prompt ids + :class:`~s2d_ext.engine.SamplingParams`).

Accepted fields of ``/v1/completions``: ``model``, ``prompt`` (a string, a list of token ids, or a list of
either: one prompt each, at most ``max_prompts``), ``max_tokens`` (16), ``temperature`` (1.0, as OpenAI),
``top_p``, ``n`` (choices per prompt, at most ``max_n``), ``stream``, ``stop`` (strings), ``seed``,
``logprobs`` (top-n), ``echo`` (the prompt before the completion, with its logprobs when ``logprobs`` is
set), ``presence_penalty`` / ``frequency_penalty`` (generated tokens only), ``logit_bias`` (token id ->
bias in [-100, 100]), ``response_format`` and the vLLM-style extensions ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``bad_words`` (strings),
``allowed_token_ids``, ``return_token_ids`` (the ids of the new tokens in every choice / chunk) and the
structured-output fields ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``,
``structured_outputs`` (:mod:`.structured_output`). ``/v1/chat/completions`` takes ``messages`` instead
of ``prompt`` (rendered with the tokenizer's chat template; text content or text parts), no ``echo``,
``max_completion_tokens`` as well as ``max_tokens``, ``logprobs`` (bool) with ``top_logprobs``, and
``tools`` with ``tool_choice`` "none", "required" or a named function. ``stream_options``
(``include_usage``) needs ``stream``. ``best_of`` > 1 and ``suffix`` are refused with a 400, as is a field
of the wrong type or an unknown field; the error's ``param`` names the request's field.

A request with several prompts and ``n`` choices each runs ``len(prompts) * n`` engine requests; choice
``i`` of prompt ``p`` has index ``p * n + i``, and with a ``seed`` it uses seed ``seed + i`` (vLLM's rule;
wrapped into int64), so choice 0 equals the same request with ``n = 1``.
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
    prompts: list[list[int]]  # one engine prompt each (a chat request has one)
    params: SamplingParams
    stream: bool
    stop: list[str]
    return_token_ids: bool
    chat: bool
    include_usage: bool = False
    n: int = 1
    echo: bool = False
    prompt_texts: list[str | None] | None = None  # the prompts sent as text (echo), None for token ids

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    def choice_params(self, index: int) -> SamplingParams:
        """The params of choice ``index`` (of each prompt): seed + index when a seed is set."""
        seed = self.params.seed
        if seed is None or index == 0:
            return self.params
        wrapped = (seed + index + 2**63) % 2**64 - 2**63  # NOTE: int64, as Philox keys are
        return self.params.replace(seed=wrapped)


#: Defaults of the caps on a request's size (``build_app`` takes others).
MAX_N = 16
MAX_PROMPTS = 64

_REFUSED = {
    "suffix": None,
    "best_of": 1,
}
_STRUCTURED = {
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
}  # fmt: skip
_KNOWN_COMPLETION = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "logprobs",
    "echo", "user", "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
    "ignore_eos", "bad_words", "allowed_token_ids", "return_token_ids", "presence_penalty",
    "frequency_penalty", "logit_bias", *_REFUSED, *_STRUCTURED,
}  # fmt: skip
_KNOWN_CHAT = (_KNOWN_COMPLETION - {"prompt", "echo", "logprobs"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tool_choice", "parallel_tool_calls",
    "tools",
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
    body: Any,
    tokenizer: Any,
    chat: bool,
    max_logprobs: int = 20,
    context: int | None = None,
    *,
    vocab_size: int | None = None,
    max_n: int = MAX_N,
    max_prompts: int = MAX_PROMPTS,
) -> EngineRequest:
    """Check an OpenAI request body and translate it (raises :class:`BadRequest`).

    ``context``: the most tokens (prompt + new) the model takes, None when unknown; a chat request without
    ``max_tokens`` asks for what its prompt leaves of it. ``vocab_size``: checks ``logit_bias`` ids.
    ``max_n`` / ``max_prompts``: caps on ``n`` and on the prompts of one completions request.
    """
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    _get(body, "user", str, None)
    unknown = sorted(set(body) - (_KNOWN_CHAT if chat else _KNOWN_COMPLETION))
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r}", unknown[0])
    logit_bias = _logit_bias(body.get("logit_bias"), vocab_size)
    for name, default in _REFUSED.items():
        value = body.get(name, default)
        # NOTE: True == 1 in Python: best_of=true must not pass as best_of=1
        if isinstance(value, bool) or (value not in (default, None) and value != default):
            raise BadRequest(f"{name}={value!r} is not supported by this server", name)
    _get(body, "parallel_tool_calls", bool, None)
    n = _get(body, "n", int, 1)
    if not 1 <= n <= max_n:
        raise BadRequest(f"n must be in [1, {max_n}], got {n}", "n")
    echo, texts = False, None
    if chat:
        prompts = [_chat_prompt(body.get("messages"), tokenizer, body.get("tools"))]
    else:
        echo = _get(body, "echo", bool, False)
        prompts = _completion_prompts(body.get("prompt"), tokenizer, max_prompts)
        sent = body.get("prompt")
        sent = sent if isinstance(sent, list) and all(isinstance(p, (str, list)) for p in sent) else [sent]
        texts = [p if isinstance(p, str) else None for p in sent]
    prompt_ids = max(prompts, key=len)  # NOTE: the longest prompt bounds the default and the checks
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
            presence_penalty=_get(body, "presence_penalty", float, 0.0),
            frequency_penalty=_get(body, "frequency_penalty", float, 0.0),
            logit_bias=logit_bias,
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
        prompts=prompts,
        params=params,
        stream=stream,
        stop=stop,
        return_token_ids=_get(body, "return_token_ids", bool, False),
        chat=chat,
        include_usage=include_usage,
        n=n,
        echo=echo,
        prompt_texts=texts,
    )


def _logit_bias(bias: Any, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (JSON keys are strings) as {id: bias}; keys must be ids in the vocabulary."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise BadRequest("logit_bias must be an object (token id -> bias)", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise BadRequest(
                f"logit_bias key {key!r} is outside the vocabulary [0, {vocab_size})", "logit_bias"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out[token] = float(value)
    return out or None


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


def _completion_prompts(prompt: Any, tokenizer: Any, max_prompts: int) -> list[list[int]]:
    """The prompts of a completions request: a string or token ids, or a list of either."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > max_prompts:
            raise BadRequest(
                f"prompt: at most {max_prompts} prompts per request, got {len(prompt)}", "prompt"
            )
        return [_completion_prompt(p, tokenizer) for p in prompt]
    return [_completion_prompt(prompt, tokenizer)]


def _completion_prompt(prompt: Any, tokenizer: Any) -> list[int]:
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
    else:
        raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("prompt encodes to no tokens", "prompt")
    return ids


def _content(m: Mapping) -> str | None:
    """A message's text: a string, text parts joined, or None (an assistant turn of tool calls only)."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text") if isinstance(p, Mapping) and p.get("type") == "text" else None for p in content
        ]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
        raise BadRequest("messages: only text content parts are supported", "messages")
    if content is None and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
        return None
    raise BadRequest("every message needs a string role and a string content (or text parts)", "messages")


def _chat_prompt(messages: Any, tokenizer: Any, tools: Any = None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    plain = []
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise BadRequest("every message needs a string role and a string content", "messages")
        message = {"role": m["role"], "content": _content(m)}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                message[key] = m[key]
        plain.append(message)
    if tokenizer is None:
        raise BadRequest("this server has no tokenizer: chat needs one", "messages")
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                plain,
                tools=tools if isinstance(tools, list) else None,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # noqa: BLE001 (a template may raise anything on odd messages)
            raise BadRequest(f"messages: the chat template failed: {exc}", "messages") from None
    else:
        # NOTE: a tokenizer without a chat template gets a plain one: "role: content" lines.
        text = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in plain) + "assistant:"
    return _encode(text, tokenizer)
