"""The structured-output fields of a request -> one grammar (:mod:`s2d_ext.engine.grammar`).

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``), ``tools`` with ``tool_choice``
``"required"`` or a named function, and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` (Lark) and ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``). At most one of them may constrain a request. Each choice of a request gets its own
processor (grammar state is per sequence), from :meth:`StructuredOutput.processor`.

Tools (vLLM's rules): a named function constrains the output to that function's arguments (its
``parameters`` schema); ``"required"`` constrains it to a JSON array of one or more calls
``{"name": ..., "parameters": {...}}`` of the given functions. ``"auto"`` with tools is refused (it needs a
model-specific parser to tell a call from text); ``"none"`` generates text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from s2d_ext.server.protocol import BadRequest

#: Longest regex / grammar / schema text a request may send (bytes of its JSON), and most choices.
MAX_GRAMMAR_CHARS = 64_000
MAX_CHOICES = 256


@dataclass
class StructuredOutput:
    """One request's grammar: ``kind`` ("json_schema", "regex", "choice", "lark"), its ``value`` and the
    request ``field`` it came from (named in errors). ``tool_mode``: None, "named" or "required";
    ``tool_names``: the functions a tool call may name."""

    field: str
    kind: str
    value: Any
    tool_mode: str | None = None
    tool_names: list[str] = field(default_factory=list)
    any_whitespace: bool = True  # JSON: whitespace anywhere JSON allows it (vLLM's default)

    def processor(self, grammars: Any) -> Any:
        """A fresh :class:`~s2d_ext.engine.grammar.GrammarProcessor` (raises GrammarError)."""
        if self.kind == "json_schema":
            return grammars.json_schema(self.value, self.any_whitespace)
        if self.kind == "regex":
            return grammars.regex(self.value)
        if self.kind == "choice":
            return grammars.choice(self.value)
        return grammars.lark(self.value)


def structured_output(body: Mapping, chat: bool) -> StructuredOutput | None:
    """The request's grammar, or None; a malformed field is a :class:`BadRequest` naming it."""
    found: list[StructuredOutput] = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(spec)
    for name, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
    ):
        if body.get(name) is not None:
            found.append(_checked(StructuredOutput(name, kind, body[name])))
    if body.get("guided_grammar") is not None:
        found.append(_checked(StructuredOutput("guided_grammar", "lark", body["guided_grammar"])))
    if body.get("structured_outputs") is not None:
        found.append(_structured_outputs(body["structured_outputs"]))
    tools = _tools(body) if chat else None
    if tools is not None:
        found.append(tools)
    if len(found) > 1:
        raise BadRequest(
            f"at most one structured-output field per request, got {', '.join(s.field for s in found)}",
            found[1].field,
        )
    return found[0] if found else None


def _response_format(fmt: Any) -> StructuredOutput | None:
    if not isinstance(fmt, Mapping) or not isinstance(fmt.get("type"), str):
        raise BadRequest("response_format must be an object with a type", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("response_format", "json_schema", {"type": "object"})
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, Mapping):
            raise BadRequest("response_format.json_schema must be an object", "response_format")
        schema = inner.get("schema", {})  # NOTE: OpenAI's default: no schema, any JSON
        return _checked(StructuredOutput("response_format", "json_schema", schema))
    raise BadRequest(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        "response_format",
    )


def _structured_outputs(value: Any) -> StructuredOutput:
    if not isinstance(value, Mapping):
        raise BadRequest("structured_outputs must be an object", "structured_outputs")
    kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "lark"}
    set_keys = [k for k in (*kinds, "json_object") if value.get(k) not in (None, False)]
    unknown = sorted(set(value) - {*kinds, "json_object", "disable_any_whitespace"})
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r} in structured_outputs", "structured_outputs")
    if len(set_keys) != 1:
        raise BadRequest(
            "structured_outputs must set exactly one of json, regex, choice, grammar, json_object",
            "structured_outputs",
        )
    key = set_keys[0]
    compact = value.get("disable_any_whitespace", False)
    if not isinstance(compact, bool):
        raise BadRequest("structured_outputs.disable_any_whitespace must be a boolean", "structured_outputs")
    if key == "json_object":
        spec = StructuredOutput("structured_outputs", "json_schema", {"type": "object"})
    else:
        spec = _checked(StructuredOutput("structured_outputs", kinds[key], value[key]))
    spec.any_whitespace = not compact
    return spec


def _checked(spec: StructuredOutput) -> StructuredOutput:
    """Types and sizes of a spec's value (the grammar library checks the content)."""
    value = spec.value
    if spec.kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise BadRequest(f"{spec.field}: the schema is not valid JSON", spec.field) from None
        if not isinstance(value, (Mapping, bool)):
            raise BadRequest(f"{spec.field}: a JSON schema must be an object or a boolean", spec.field)
        if len(json.dumps(value)) > MAX_GRAMMAR_CHARS:
            raise BadRequest(
                f"{spec.field}: the schema is longer than {MAX_GRAMMAR_CHARS} characters", spec.field
            )
    elif spec.kind == "choice":
        if (
            not isinstance(value, list)
            or not value
            or len(value) > MAX_CHOICES
            or any(not isinstance(c, str) or not c for c in value)
        ):
            raise BadRequest(
                f"{spec.field} must be a list of 1 to {MAX_CHOICES} non-empty strings", spec.field
            )
    else:
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{spec.field} must be a non-empty string", spec.field)
        if len(value) > MAX_GRAMMAR_CHARS:
            raise BadRequest(f"{spec.field} is longer than {MAX_GRAMMAR_CHARS} characters", spec.field)
        if "\x00" in value:
            raise BadRequest(f"{spec.field} must not contain a NUL character", spec.field)
    spec.value = value
    return spec


def _tools(body: Mapping) -> StructuredOutput | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            # NOTE: vLLM refuses a tool call asked for without tools too.
            raise BadRequest(f"tool_choice={choice!r} needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise BadRequest("tools must be a non-empty list of functions", "tools")
    functions = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type") != "function"
            or not isinstance(fn, Mapping)
            or not isinstance(fn.get("name"), str)
            or not fn["name"]
        ):
            raise BadRequest("every tool must be {'type': 'function', 'function': {'name': ...}}", "tools")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, (Mapping, bool)):
            raise BadRequest(f"tools: the parameters of {fn['name']!r} must be a JSON schema object", "tools")
        functions[fn["name"]] = params
    if choice is None or choice == "none":
        return None  # NOTE: OpenAI's default with tools is "auto"; vLLM's without a parser is "none"
    if choice == "auto":
        raise BadRequest(
            "tool_choice='auto' is not supported (it needs a model-specific tool-call parser); "
            "use 'required' or name a function",
            "tool_choice",
        )
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, params in functions.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return _checked(StructuredOutput("tools", "json_schema", schema, "required", list(functions)))
    name = None
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise BadRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in functions:
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return _checked(StructuredOutput("tools", "json_schema", functions[name], "named", [name]))
