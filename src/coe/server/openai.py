"""OpenAI's API shapes: a request body becomes coe's messages, tools and SamplingParams; coe's
completions and events become OpenAI response bodies and stream chunks."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

from coe.config import ServerConfig
from coe.engine.structured import json_object_grammar, json_schema_grammar, tool_call_grammar
from coe.errors import InvalidRequest
from coe.server.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from coe.types import (
    ChatMessage,
    Completion,
    Request,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Tools,
)

# ---- requests ------------------------------------------------------------------------------------


def chat_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    return tuple(
        ChatMessage(
            "system" if m.role == "developer" else m.role,
            m.text(),
            tool_calls=tuple(
                ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()
            ),
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in body.messages
    )


def tools_of(body: ChatCompletionRequest) -> Tools | None:
    """The request's tools and tool choice; None when it offers none."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice: the request offers no tools", param="tool_choice")
        return None
    functions = tuple(t.function.model_dump(exclude_none=True) for t in body.tools)
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise InvalidRequest(f"tools: function names repeat: {names}", param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice: {choice.function.name!r} is not one of the tools ({', '.join(names)})",
                param="tool_choice",
            )
        chosen = choice.function.name
    else:
        chosen = choice or "auto"
    return Tools(functions, chosen, body.parallel_tool_calls is not False)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_s(body: ChatCompletionRequest | CompletionRequest) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds or a duration ("30s", "5m",
    "1h30m"); a negative one keeps the expert until another needs the room (math.inf)."""
    value = body.keep_alive
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = sign * float(text)  # "300": seconds
        except ValueError:
            parts = _DURATION.findall(text)
            if parts and "".join(n + u for n, u in parts) == text:
                seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds is None or math.isnan(seconds):
        raise InvalidRequest(
            f'keep_alive must be seconds or a duration like "5m" or "1h30m", got {value!r}',
            param="keep_alive",
        )
    return math.inf if seconds < 0 else seconds


def sampling_of(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    limits: ServerConfig,
    tools: Tools | None = None,
) -> SamplingParams:
    """SamplingParams of a request; its grammar from ``response_format`` or a required tool call."""
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be <= {limits.max_tokens_limit}, got {max_tokens}", param="max_tokens"
        )
    return SamplingParams(
        max_tokens=max_tokens or limits.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_tuple(),
        seed=body.seed,
        logprobs=_logprobs_of(body),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=_bias_of(body.logit_bias),
        grammar=_grammar_of(body, tools),
    )


def with_expert_defaults(
    sampling: SamplingParams,
    body: ChatCompletionRequest | CompletionRequest,
    defaults: dict,
    limits: ServerConfig,
) -> SamplingParams:
    """An expert's sampling defaults (``ExpertConfig.sampling_defaults``: a profile's) for the
    fields the request left unset."""
    given = body.model_fields_set
    unset = {
        key: min(value, limits.max_tokens_limit) if key == "max_tokens" else value
        for key, value in defaults.items()
        if key not in given and not (key == "max_tokens" and "max_completion_tokens" in given)
    }
    return replace(sampling, **unset) if unset else sampling


def _logprobs_of(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs: needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise InvalidRequest(f"logit_bias: keys are token ids, got {key!r}", param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _grammar_of(body: ChatCompletionRequest | CompletionRequest, tools: Tools | None) -> str | None:
    forced_call = tools is not None and tools.choice not in ("auto", "none")
    response_format = getattr(body, "response_format", None)
    if response_format is None or response_format.type == "text":
        return tool_call_grammar(tools) if forced_call and tools is not None else None
    if forced_call:
        raise InvalidRequest(
            "response_format and a required tool call cannot be combined", param="response_format"
        )
    if response_format.type == "json_object":
        return json_object_grammar()
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise InvalidRequest(
            "response_format.json_schema.schema: a JSON schema is required",
            param="response_format.json_schema",
        )
    return json_schema_grammar(spec.schema_, "response_format.json_schema.schema")


# ---- responses -----------------------------------------------------------------------------------


class Reply:
    """OpenAI response bodies and chunks for the ``n`` requests of one API call."""

    def __init__(self, kind: str, model: str, requests: Sequence[Request]):
        self.kind, self.model, self.requests = kind, model, list(requests)
        self.index = {r.id: i for i, r in enumerate(self.requests)}
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def coe_info(self) -> dict:
        request = self.requests[0]
        info = request.route.to_dict() if request.route is not None else {"expert": request.expert}
        if request.served_tier is not None:
            info.update(tier=request.served_tier, switch_ms=round(request.switch_s * 1000, 1))
        if request.served_by is not None:
            info["replica"] = request.served_by
        return info

    def headers(self) -> dict[str, str]:
        request = self.requests[0]
        headers = {"x-coe-expert": request.expert}
        if request.served_tier is not None:
            headers["x-coe-tier"] = request.served_tier
            headers["x-coe-switch-ms"] = f"{request.switch_s * 1000:.1f}"
        if request.served_by is not None:
            headers["x-coe-replica"] = request.served_by
        if request.route is not None:
            headers["x-coe-category"] = request.route.category
            headers["x-coe-confidence"] = f"{request.route.confidence:.4f}"
        return headers

    def _envelope(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "coe": self.coe_info(),
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def full(self, completions: Sequence[Completion]) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            logprobs = self._logprobs(completion.logprobs, self.requests[index], offset=0)
            if self.chat:
                message: dict = {"role": "assistant", "content": completion.text or None}
                if completion.tool_calls:
                    message["tool_calls"] = [_call_json(c) for c in completion.tool_calls]
                elif message["content"] is None:
                    message["content"] = ""
                choice = {"index": index, "message": message}
            else:
                choice = {"index": index, "text": completion.text}
            choices.append(
                {**choice, "logprobs": logprobs, "finish_reason": completion.finish_reason}
            )
        return self._envelope(self.kind, choices, usage(completions))

    def chunk(
        self,
        request_id: str,
        delta: str | None,
        *,
        first: bool = False,
        finish_reason: str | None = None,
        tool_calls: Sequence[ToolCall] = (),
        logprobs: Sequence[TokenLogprob] = (),
        offset: int = 0,
    ) -> dict:
        index = self.index[request_id]
        request = self.requests[index]
        if self.chat:
            content: dict = {} if delta is None else {"content": delta}
            if first:
                content = {"role": "assistant", **content}
            if tool_calls:
                content["tool_calls"] = [
                    {"index": k, **_call_json(c)} for k, c in enumerate(tool_calls)
                ]
            choice = {"index": index, "delta": content}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta or ""}
            obj = "text_completion"
        lp = self._logprobs(logprobs, request, offset) if logprobs else None
        return self._envelope(obj, [{**choice, "logprobs": lp, "finish_reason": finish_reason}])

    def usage_chunk(self, completions: Sequence[Completion]) -> dict:
        return self._envelope(
            "chat.completion.chunk" if self.chat else "text_completion", [], usage(completions)
        )

    def _logprobs(
        self, entries: Sequence[TokenLogprob], request: Request, offset: int
    ) -> dict | None:
        if request.sampling.logprobs is None:
            return None
        if self.chat:
            return {"content": [_logprob_json(e) for e in entries], "refusal": None}
        offsets, position = [], offset
        for e in entries:
            offsets.append(position)
            position += len(_text(e.token))
        return {
            "tokens": [_text(e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


def usage(completions: Sequence[Completion]) -> dict:
    prompt = completions[0].prompt_tokens if completions else 0
    generated = sum(c.completion_tokens for c in completions)
    cached = completions[0].cached_tokens if completions else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _call_json(call: ToolCall) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _logprob_json(entry: TokenLogprob) -> dict:
    return {
        "token": _text(entry.token),
        "logprob": entry.logprob,
        "bytes": list(entry.token),
        "top_logprobs": [
            {"token": _text(t), "logprob": lp, "bytes": list(t)} for t, lp in entry.top
        ],
    }
