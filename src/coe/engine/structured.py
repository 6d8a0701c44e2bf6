"""Output constraints as llguidance grammars: OpenAI's ``response_format`` (``json_object``,
``json_schema``) and a required or named tool call. Each is checked when the request arrives, so
a schema llguidance cannot enforce is a 400 naming the feature, never ignored.

JSON is written in one layout, ``{"key": value, "other": [1, 2]}`` (json.dumps' default, what models
have read most): no free whitespace, so a model cannot spend its tokens on blanks.
Tool calls are written in the format every coe expert reads back (``coe.engine.tools``):
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, parallel ones as a JSON list
in one block.
"""

from __future__ import annotations

import json

from coe.backends.grammar import check_grammar, llguidance
from coe.errors import InvalidRequest
from coe.types import Tools

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict, param: str = "response_format") -> str:
    """The grammar of JSON that validates against ``schema`` (a JSON Schema)."""
    try:
        grammar = llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"{param}: not a JSON schema ({exc})", param=param) from None
    _checked(grammar, param)
    return grammar


def json_object_grammar() -> str:
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


def tool_call_grammar(tools: Tools) -> str:
    """The calls a required (any offered function) or named tool choice allows, each one's
    arguments valid against the function's parameter schema: one call, or with parallel calls to
    a required choice a JSON list of one or more in one block. In a list the model says it is
    done by closing it, as it closes any JSON; separate blocks would make it choose between the
    block's end and another block at a newline, where a token like ``>\n`` crosses into the next
    call (qwen2.5-coder-0.5b repeated one call to max_tokens that way on 9 of 40 BFCL items)."""
    names = tools.names if tools.choice == "required" else (tools.choice,)
    options = [_call_schema(f) for f in tools.functions if f["name"] in names]
    call = options[0] if len(options) == 1 else {"anyOf": options}
    if tools.parallel and tools.choice == "required":
        call = {"type": "array", "items": call, "minItems": 1}
    schema = {**call, "x-guidance": _JSON_OPTIONS}
    lark = f'start: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n'
    grammar = llguidance().LLMatcher.grammar_from_lark(lark)
    _checked(grammar, "tools")
    return grammar


def _call_schema(function: dict) -> dict:
    """A call of ``function``; arguments it does not declare only where its schema allows them
    (``additionalProperties``), as a function would refuse an unknown keyword."""
    parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
    if "properties" in parameters and "additionalProperties" not in parameters:
        parameters["additionalProperties"] = False
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _checked(grammar: str, param: str) -> None:
    try:
        check_grammar(grammar)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{param}: {exc.message}", param=param) from None
