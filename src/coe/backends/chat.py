"""Render chat messages with a model's own Jinja chat template, or as a plain transcript."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from functools import lru_cache

from coe.errors import InvalidRequest
from coe.types import ChatMessage

# Base models have no chat template: they continue a plain transcript.
PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}
PLAIN_STOP = ("\nUser:",)


def render_chat(
    template: str | None,
    messages: Sequence[ChatMessage],
    *,
    bos_text: str = "",
    eos_text: str = "",
    tools: Sequence[dict] | None = None,
) -> str:
    """The prompt of a conversation. ``tools`` (OpenAI's function definitions) are given to the
    template, for templates that render them (``supports_tools``)."""
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if template is None:
        return render_plain(messages)
    extra = {"tools": [{"type": "function", "function": f} for f in tools]} if tools else {}
    try:
        return _compile(template).render(
            messages=[template_message(m) for m in messages],
            add_generation_prompt=True,
            bos_token=bos_text,
            eos_token=eos_text,
            **extra,
        )
    except InvalidRequest:
        raise
    except Exception as exc:  # jinja2 errors: the conversation does not fit the template
        raise InvalidRequest(
            f"the model's chat template rejected these messages: {exc}", param="messages"
        ) from None


def supports_tools(template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` listing (and so has a tool-call format)."""
    return template is not None and "tools" in template and "tool_call" in template


def template_message(m: ChatMessage) -> dict:
    """A message as chat templates read it: OpenAI's shape, a call's arguments parsed to an object
    (templates write them with ``tojson``)."""
    shape: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        shape["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        shape["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        shape["name"] = m.name
    return shape


def _arguments(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def render_plain(messages: Sequence[ChatMessage]) -> str:
    lines = [PLAIN_ROLES.get(m.role, f"{m.role.title()}: ") + m.content for m in messages]
    return "\n".join(lines) + "\nAssistant:"


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_template_error(message: str):
    raise InvalidRequest(
        f"the model's chat template rejected these messages: {message}", param="messages"
    )
