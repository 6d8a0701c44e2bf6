"""Render chat messages with a model's own Jinja chat template, or as a plain transcript."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from functools import lru_cache

from coe.errors import InvalidRequest
from coe.types import ChatMessage

# Base models have no chat template: they continue a plain transcript.
PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}
PLAIN_STOP = ("\nUser:",)


def render_chat(
    template: str | None, messages: Sequence[ChatMessage], *, bos_text: str = "", eos_text: str = ""
) -> str:
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if template is None:
        return render_plain(messages)
    try:
        return _compile(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=bos_text,
            eos_token=eos_text,
        )
    except InvalidRequest:
        raise
    except Exception as exc:  # jinja2 errors: the conversation does not fit the template
        raise InvalidRequest(
            f"the model's chat template rejected these messages: {exc}", param="messages"
        ) from None


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
