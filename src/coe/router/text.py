"""What the router reads: one string per prompt, built the same way in training and in serving."""

from __future__ import annotations

from collections.abc import Sequence

from coe.types import ChatMessage

MAX_TOOL_CHARS = 1500


def tools_text(tools: Sequence[dict]) -> str:
    """A compact listing of callable functions (OpenAI ``tools`` or BFCL ``function`` entries)."""
    lines = []
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not isinstance(fn, dict):
            continue
        params = fn.get("parameters", {})
        names = list(params.get("properties", {})) if isinstance(params, dict) else []
        lines.append(
            f"- {fn.get('name', '?')}({', '.join(map(str, names))}): {fn.get('description', '')}"
        )
    return ("Available functions:\n" + "\n".join(lines))[:MAX_TOOL_CHARS] if lines else ""


def with_tools(prompt: str, tools: Sequence[dict] | None) -> str:
    listing = tools_text(tools or [])
    return f"{prompt}\n\n{listing}" if listing else prompt


def user_turns(messages: Sequence[ChatMessage]) -> list[str]:
    return [m.content for m in messages if m.role == "user" and m.content.strip()]


def conversation_text(messages: Sequence[ChatMessage]) -> str:
    """All user turns, oldest first; the encoder keeps the head and the tail of long texts."""
    return "\n\n".join(user_turns(messages))
