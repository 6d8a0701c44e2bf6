"""Tool calls: how they are shown to a model that has no tool format of its own, and how they are
read back out of what a model wrote.

Read: Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (any number),
Mistral ``[TOOL_CALLS] [{...}, ...]``, Llama 3 ``<|python_tag|>{"name": ..., "parameters": {...}}``,
and bare JSON (an object, or a list of objects, naming an offered function), also in a Markdown
code fence. A call that names a function the request did not offer stays text.

Shown (``tool_prompt``): experts whose chat template has no tool support, and base models, get
this documented format in a system message: the functions as JSON in ``<tools></tools>``, and the
instruction to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
earlier calls and results are written the same way (``<tool_response>...</tool_response>``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

from coe.types import ChatMessage, ToolCall, Tools

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>")
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, offered: Sequence[str]) -> tuple[str, tuple[ToolCall, ...]]:
    """(the text that is not a call, the calls) of a model's answer."""
    if CALL_OPEN in text:
        calls = [c for block in _BLOCK.findall(text) for c in _calls_in(block, offered)]
        if calls:
            return _BLOCK.sub("", text).strip(), tuple(calls)
        return text, ()
    stripped = text.strip()
    for prefix in _PREFIXES:
        if stripped.startswith(prefix):
            calls = _calls_in(stripped[len(prefix) :], offered)
            return ("", tuple(calls)) if calls else (text, ())
    fenced = _FENCE.match(stripped)
    if fenced is not None:
        stripped = fenced.group(1).strip()
    if stripped[:1] in ("{", "["):
        calls = _calls_in(stripped, offered)
        if calls:
            return "", tuple(calls)
    return text, ()


def _calls_in(text: str, offered: Sequence[str]) -> list[ToolCall]:
    """The calls in JSON text: one object, a list, or several objects separated by ; or newlines."""
    decoder, values, position = json.JSONDecoder(), [], 0
    text = text.strip()
    while position < len(text):
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return []
        values.extend(value if isinstance(value, list) else [value])
        position = end
        while position < len(text) and text[position] in " \t\r\n;,":
            position += 1
    calls = [_call_of(v, offered) for v in values]
    return [c for c in calls if c is not None] if all(c is not None for c in calls) else []


def _call_of(value: object, offered: Sequence[str]) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    inner = value.get("function")
    function: dict = inner if isinstance(inner, dict) else value
    name = function.get("name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if not isinstance(name, str) or name not in offered:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Streams a tool-enabled answer's text while holding back what may be a tool call.

    Held: everything from a ``<tool_call>`` (or a part of one at the end of the text so far), and
    the whole answer when it starts with ``[TOOL_CALLS]``, ``<|python_tag|>``, ``{``, ``[`` or a
    code fence whose first line of code does.
    ``finish`` reads the calls out of what was held; text that was no call is released then."""

    def __init__(self, tools: Tools):
        self.offered = tools.names
        self._sent = ""  # text emitted so far
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held) that can be shown now."""
        pending = self._held + text
        if not self._sent.strip() and self._may_be_call(pending.lstrip()):
            self._held = pending
            return ""
        cut = pending.find(CALL_OPEN)
        if cut < 0:
            cut = _partial_suffix(pending, CALL_OPEN)
        shown, self._held = pending[:cut], pending[cut:]
        self._sent += shown
        return shown

    def _may_be_call(self, text: str) -> bool:
        if not text or text[0] in "{[":
            return True
        if text.startswith("```") or "```".startswith(text):
            _, newline, code = text.partition("\n")
            return not newline or not code.strip() or code.lstrip()[0] in "{["
        return any(p.startswith(text) or text.startswith(p) for p in (*_PREFIXES, CALL_OPEN))

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """(the text still to show, the calls) at the end of the answer."""
        rest, calls = parse_tool_calls(self._held, self.offered)
        held, self._held = self._held, ""
        return (rest, calls) if calls else (held, ())


def _partial_suffix(text: str, marker: str) -> int:
    """Where a proper prefix of ``marker`` starts at the end of ``text`` (len(text) if none)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return len(text)


def tool_prompt(tools: Tools) -> str:
    """The system text that shows the functions to an expert without a tool format of its own."""
    listing = "\n".join(
        json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in tools.functions
    )
    return (
        "You may call one or more functions to help with the user's request. The functions are "
        f"listed as JSON within <tools></tools>:\n<tools>\n{listing}\n</tools>\n\nTo call a "
        "function, answer with a JSON object within <tool_call></tool_call> tags, one per call:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>'
    )


def with_tool_prompt(
    messages: Sequence[ChatMessage], tools: Tools | None
) -> tuple[ChatMessage, ...]:
    """The conversation in plain messages: the tool prompt in the system message, earlier calls and
    results written in the documented format (for templates and transcripts without tools)."""
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(
                f'{CALL_OPEN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{CALL_CLOSE}'
                for c in m.tool_calls
            )
            out.append(ChatMessage("assistant", (m.content + "\n" if m.content else "") + calls))
        elif m.role == "tool":
            out.append(ChatMessage("user", f"<tool_response>\n{m.content}\n</tool_response>"))
        else:
            out.append(ChatMessage(m.role, m.content))
    if tools is None or tools.choice == "none":
        return tuple(out)
    prompt = tool_prompt(tools)
    if out and out[0].role == "system":
        return (ChatMessage("system", out[0].content + "\n\n" + prompt), *out[1:])
    return (ChatMessage("system", prompt), *out)
