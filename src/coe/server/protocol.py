"""OpenAI request schemas (pydantic). Responses are built as plain dicts in app.py.

Fields of OpenAI's API that coe does not use (``user``, ``metadata``, penalties...) are accepted
and ignored, so OpenAI clients keep working; any other field is refused with 400 naming it, and
so are parameters coe cannot honour (n > 1, logprobs, images).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def unknown_fields(schema: type[BaseModel], data: dict) -> list[str]:
    """Top-level fields that are neither the schema's nor OpenAI fields coe ignores."""
    known = set(schema.model_fields) | set(getattr(schema, "IGNORED", ()))
    return sorted(k for k in data if k not in known)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict] | None = None  # read by the router (tool-use category); not executed
    logprobs: Literal[False] | None = Field(default=None, description="not supported: only false")
    top_logprobs: int | None = Field(default=None, ge=0, le=0, description="not supported: only 0")

    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
            "user",
            "metadata",
            "store",
            "service_tier",
            "response_format",
            "tool_choice",
            "parallel_tool_calls",
            "functions",
            "function_call",
            "modalities",
            "prediction",
            "reasoning_effort",
            "web_search_options",
            "audio",
        }
    )


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=0, description="not supported: only 0")
    echo: Literal[False] = Field(default=False, description="not supported: only false")
    best_of: int | None = Field(default=None, ge=1, le=1)

    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"frequency_penalty", "presence_penalty", "logit_bias", "user", "suffix"}
    )

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None
