"""An expert served elsewhere behind an OpenAI-compatible API (vLLM, Ollama, llama.cpp server,
another coe): requests are forwarded as they are and the answer is streamed back token by token.

Like every OffloadedExpert it holds no weights here and runs its requests on its own worker
threads, not through the scheduler. Failures before the first token are retried with doubling backoff (connect
errors, timeouts, 429, 5xx), then reported as ExpertUnavailable, so a routed request can still move
to another expert; a failure after the first token ends the request with a GenerationError.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping

from coe.backends.offload import OffloadedExpert
from coe.config import ExpertConfig, RemoteSettings, openai_endpoint, remote_settings
from coe.errors import CoEError, ExpertUnavailable, GenerationError, InvalidRequest
from coe.types import Completion, Request, StreamEvent

_RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 30.0  # a remote's Retry-After is followed up to this long


class _Retry(Exception):
    """This attempt failed before the first token in a way worth trying again."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.reason, self.wait_s = reason, wait_s


class RemoteExpert(OffloadedExpert):
    """An expert behind another OpenAI-compatible server."""

    kind = "remote"

    def __init__(
        self,
        expert: ExpertConfig,
        environ: dict[str, str] | None = None,
        transport=None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import httpx

        self.expert = expert
        self.settings: RemoteSettings = remote_settings(expert)
        env: Mapping[str, str] = os.environ if environ is None else environ
        key = None
        if self.settings.api_key_env:
            key = env.get(self.settings.api_key_env)
            if not key:
                raise CoEError(
                    f"{expert.name}: params.api_key_env names {self.settings.api_key_env}, "
                    f"which is not set in the environment"
                )
        base, headers = openai_endpoint(self.settings.url, key)
        self._client = httpx.Client(
            base_url=base,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s),
        )
        self._sleep = sleep
        super().__init__(expert.name, int(self.settings.num_params), self.settings.max_concurrency)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """The request's events, ending with a completion or an error event. Raises
        ExpertUnavailable when every attempt failed before the first token."""
        reasons: list[tuple[str, float]] = []  # (why an attempt failed, the wait before the next)
        for attempt in range(self.settings.retries + 1):
            if attempt:
                self._sleep(reasons[-1][1])
            try:
                yield from self._attempt(request)
                return
            except _Retry as failure:
                backoff_s = self.settings.backoff_s * 2**attempt
                wait_s = (
                    min(failure.wait_s, MAX_RETRY_AFTER_S)
                    if failure.wait_s is not None
                    else backoff_s
                )
                reasons.append((failure.reason, wait_s))
            if request.cancelled:
                break
        tries = len(reasons)
        raise ExpertUnavailable(
            f"{self.name}: the remote endpoint {self.settings.url} failed "
            f"{tries} time{'s' if tries > 1 else ''} ({reasons[-1][0]})"
        )

    def _attempt(self, request: Request) -> Iterator[StreamEvent]:
        import httpx

        path, body = self._body(request)
        started = False  # a token reached the client: nothing can be retried any more
        try:
            with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    self._refuse(response)
                events = self._events(request, response)
                for event in events:
                    started = True
                    yield event
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if started:
                yield StreamEvent(
                    request.id,
                    error=GenerationError(
                        f"{self.name}: the remote stream broke after the first token ({reason})"
                    ),
                )
                return
            raise _Retry(reason) from None

    def _body(self, request: Request) -> tuple[str, dict]:
        s = request.sampling
        body = {
            "model": self.settings.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/chat/completions", body
        body["prompt"] = request.prompt or ""
        return "/completions", body

    def _refuse(self, response) -> None:
        """An error status before the stream: retried, or the remote's own 4xx passed on."""
        response.read()
        message = _error_message(response)
        status = response.status_code
        if status in _RETRIED_STATUS:
            raise _Retry(f"HTTP {status}: {message}", _retry_after_s(response))
        if status in (
            400,
            413,
            422,
        ):  # the request itself (context too long, bad stop...): the client's to fix
            raise InvalidRequest(f"{self.name} (remote) refused the request: {message}")
        # 401/403/404...: our configuration of this expert is wrong; it is unavailable, not the client's fault
        raise ExpertUnavailable(
            f"{self.name}: the remote endpoint {self.settings.url} answered "
            f"HTTP {status}: {message}"
        )

    def _events(self, request: Request, response) -> Iterator[StreamEvent]:
        text: list[str] = []
        finish: str | None = None
        usage: dict = {}
        for data in _sse_data(response.iter_lines()):
            if request.cancelled:
                finish = "cancelled"
                break
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise GenerationError(f"{self.name} (remote): {_message_of(chunk)}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                delta = (
                    choice.get("text")
                    if "text" in choice
                    else (choice.get("delta") or {}).get("content")
                )
                finish = choice.get("finish_reason") or finish
                if delta:
                    text.append(delta)
                    yield StreamEvent(request.id, delta=delta)
        yield StreamEvent(
            request.id,
            completion=Completion(
                "".join(text),
                _finish_reason(finish),
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or len(text)),
                _cached_tokens(usage),
            ),
        )

    def close(self) -> None:
        super().close()
        self._client.close()


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "cancelled") else "stop"


def _error_message(response) -> str:
    try:
        return _message_of(response.json())
    except ValueError:
        return response.text[:300] or response.reason_phrase


def _message_of(body) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error or body)[:300]


def _retry_after_s(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _cached_tokens(usage: dict) -> int:
    details = usage.get("prompt_tokens_details")
    return int((details.get("cached_tokens") if isinstance(details, dict) else 0) or 0)
