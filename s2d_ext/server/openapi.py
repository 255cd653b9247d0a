"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions`` in the app's OpenAPI schema.

The endpoints read their bodies themselves (:mod:`.protocol` checks every field and answers a 400 naming
it), so FastAPI cannot derive these schemas; they are written here, field by field as the protocol takes
them, so that clients and fuzzers (schemathesis, ``python_tests/server/test_fuzz.py``) see the real surface.
Bounds are the ones the server enforces where they are static (``n``, penalties, ``logit_bias``, ``top_p``).
"""

from __future__ import annotations

from typing import Any

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}
_SCHEMA = {"anyOf": [{"type": "object"}, {"type": "boolean"}]}

COMMON: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "stream": _BOOL,
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": _BOOL},
        "additionalProperties": False,
    },
    "stop": _STOP,
    "seed": _INT,
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "logit_bias": {
        "type": "object",
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "user": {"type": "string"},
    "response_format": {
        "type": "object",
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": _SCHEMA}},
        },
        "required": ["type"],
    },
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "min_tokens": {"type": "integer", "minimum": 0},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "ignore_eos": _BOOL,
    "bad_words": {"type": "array", "items": {"type": "string"}},
    "allowed_token_ids": _TOKENS,
    "return_token_ids": _BOOL,
    "guided_json": _SCHEMA,
    "guided_regex": {"type": "string"},
    "guided_choice": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    "guided_grammar": {"type": "string"},
    "structured_outputs": {
        "type": "object",
        "properties": {
            "json": _SCHEMA,
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}},
            "grammar": {"type": "string"},
            "json_object": _BOOL,
            "disable_any_whitespace": _BOOL,
        },
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {
        **COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                _TOKENS,
                {
                    "type": "array",
                    "items": {"anyOf": [{"type": "string", "minLength": 1}, _TOKENS]},
                    "minItems": 1,
                },
            ]
        },
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": _BOOL,
        "best_of": {"type": "integer", "minimum": 1, "maximum": 1},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}

_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        "required": ["type", "text"],
                    },
                },
            ]
        },
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
    },
    "required": ["role", "content"],
}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1}, "parameters": {"type": "object"}},
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {
        **COMMON,
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": _BOOL,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "tools": {"type": "array", "items": _TOOL, "minItems": 1},
        "tool_choice": {
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "function"},
                        "function": {"type": "object", "properties": {"name": {"type": "string"}}},
                    },
                },
            ]
        },
        "parallel_tool_calls": _BOOL,
    },
    "required": ["messages"],
    "additionalProperties": False,
}

_ERROR = {
    "description": "a bad request: the error names the field",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
                        "required": ["message", "type"],
                    }
                },
                "required": ["error"],
            }
        }
    },
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of an endpoint whose JSON body follows ``schema``."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"400": _ERROR, "404": _ERROR},
    }
