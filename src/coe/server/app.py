"""The OpenAI-compatible HTTP server: ``create_app(engine)`` builds it; nothing runs at import."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from coe.config import ROUTED_MODEL
from coe.engine import Engine
from coe.engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coe.errors import CoEError, GenerationError, InvalidRequest, PayloadTooLarge, RequestTimeout
from coe.server.auth import KeyAuth
from coe.server.console import install_console
from coe.server.openai import (
    Reply,
    chat_messages,
    keep_alive_s,
    sampling_of,
    tools_of,
    with_expert_defaults,
)
from coe.server.protocol import ChatCompletionRequest, CompletionRequest, unknown_fields
from coe.server.shapes import health_json, snapshot_json, state_word
from coe.types import ChatMessage, Completion, Request, SamplingParams, StreamEvent, Tools


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    auth = KeyAuth(
        engine.config.server.api_keys,
        engine.config.server.public_paths,
        engine.config.server.rate_limit_per_minute,
    )

    async def check_key(http: HTTPRequest) -> None:
        auth.check(http.url.path, http.headers)

    app = FastAPI(
        title="coe", version="0.1.0", lifespan=lifespan, dependencies=[Depends(check_key)]
    )
    app.state.engine = engine
    app.state.started_s = int(time.time())
    _install_error_handlers(app)
    _install_routes(app, engine)
    install_console(app, engine)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented override
    return app


REQUEST_BODIES: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request bodies the generation handlers parse themselves: closed
    (the server refuses unknown fields), listing the OpenAI fields it accepts and ignores."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            body["properties"].update({name: {} for name in sorted(model.IGNORED)})
            body["additionalProperties"] = False
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                    }
                },
            }
        app.openapi_schema = schema
    return app.openapi_schema


# ---- errors: one translation to the OpenAI format ----------------------------------------------


def _error_response(
    status: int, message: str, error_type: str, code: str | None, param: str | None = None
):
    return JSONResponse(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}},
        status_code=status,
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CoEError)
    async def coe_error(_: HTTPRequest, exc: CoEError):
        headers = (
            {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
            if exc.retry_after_s is not None
            else None
        )
        return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HTTPRequest, exc: RequestValidationError):
        message, param = _describe_validation(exc.errors())
        return _error_response(400, message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(Exception)
    async def unexpected(_: HTTPRequest, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}", "internal_error", None)


# ---- routes ------------------------------------------------------------------------------------


def _install_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health():
        snapshot = await asyncio.to_thread(engine.views.snapshot)
        return {
            "status": "ok",
            "queue_depth": engine.queue_depth(),
            "experts": {e.name: state_word(e) for e in snapshot.experts},
            "unhealthy": {
                name: health_json(record)
                for name, record in engine.health.snapshot(time.monotonic()).items()
                if not record.healthy
            },
        }

    @app.get(
        "/metrics",
        responses={
            200: {
                "content": {METRICS_CONTENT_TYPE: {}},
                "description": "Prometheus text exposition format",
            }
        },
    )
    async def metrics():
        """Prometheus text format: requests, tokens, queues, latencies, switches, cache, router."""
        body = await asyncio.to_thread(engine.metrics.exposition)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/experts")
    async def list_experts():
        """Each expert's tier and measured footprint, the tier budgets, the cache's counters and
        the requests waiting per expert."""
        snapshot = await asyncio.to_thread(engine.views.snapshot)
        return {**snapshot_json(snapshot), "queue_depth": engine.queued_by_expert()}

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": await asyncio.to_thread(_model_cards, engine, app.state.started_s),
        }

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in await asyncio.to_thread(_model_cards, engine, app.state.started_s):
            if card["id"] == model_id:
                return card
        engine.routing.resolve(model_id)  # raises UnknownExpert with the list of models
        raise InvalidRequest(f"model {model_id!r} not found")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await _parse_body(http, ChatCompletionRequest, engine.config.server)
        tools = tools_of(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = await asyncio.to_thread(
            sampling_of, body, max_tokens, engine.config.server, tools
        )
        return await _serve(
            engine,
            body,
            http,
            "chat.completion",
            sampling,
            messages=chat_messages(body),
            tools=tools,
        )

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await _parse_body(http, CompletionRequest, engine.config.server)
        prompt = body.prompt_text()
        if prompt is None:
            raise InvalidRequest(
                "prompt: exactly one prompt string per request is supported", param="prompt"
            )
        sampling = sampling_of(body, body.max_tokens, engine.config.server)
        return await _serve(engine, body, http, "text_completion", sampling, prompt=prompt)


async def _parse_body(http: HTTPRequest, schema: type[BaseModel], limits):
    """JSON body -> schema, whatever the content-type; every failure is a 4xx naming the field."""
    raw = await _read_body(http, limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:  # JSON may carry unpaired UTF-16 surrogates ("\ud800"), which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    unknown = unknown_fields(schema, data)
    if unknown:
        raise InvalidRequest(
            f"{unknown[0]}: unknown field (not an OpenAI parameter coe accepts)", param=unknown[0]
        )
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages: at most {limits.max_messages} messages per request "
            f"(server.max_messages), got {len(messages)}",
            param="messages",
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = _describe_validation(exc.errors())
        raise InvalidRequest(message, param=param) from None


async def _read_body(http: HTTPRequest, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``max_bytes``. The rest of a
    refused body is read and discarded first (bounded), so a client that sends the whole body
    before reading the answer gets the 413 rather than a connection reset."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        await _discard_body(http, 0)
        raise PayloadTooLarge(
            f"the request body has {declared} bytes; the limit is {max_bytes} "
            f"(server.max_body_bytes)",
            param="body",
        )
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > max_bytes:
            await _discard_body(http, size)
            raise PayloadTooLarge(
                f"the request body is larger than {max_bytes} bytes (server.max_body_bytes)",
                param="body",
            )
        chunks.append(chunk)
    return b"".join(chunks)


DISCARD_MAX_BYTES = (
    64 * 2**20
)  # of a refused body, read at most this much (nginx's lingering close)
DISCARD_MAX_S = 5.0  # ... for at most this long; then the connection closes unread


async def _discard_body(http: HTTPRequest, read_bytes: int) -> None:
    """Read what is left of a refused body, up to DISCARD_MAX_BYTES in all and DISCARD_MAX_S."""

    async def drain() -> None:
        size = read_bytes
        async for chunk in http.stream():
            size += len(chunk)
            if size > DISCARD_MAX_BYTES:
                return

    try:
        await asyncio.wait_for(drain(), DISCARD_MAX_S)
    except RuntimeError:  # starlette: "Stream consumed", the body had all arrived
        pass
    except (asyncio.TimeoutError, ClientDisconnect, OSError):  # a slow or gone client: close unread
        pass


def _describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first pydantic error as (message, param)."""
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def _model_cards(engine: Engine, created_s: int) -> list[dict]:
    router = engine.routing.router
    routed = {
        "routed": router is not None,
        "default_expert": engine.config.default_expert,
        "map": dict(router.assignment) if router else None,
        "scores_source": router.score_source if router else None,
        "unavailable_reason": engine.routing.router_error,
    }
    cards = [
        {
            "id": ROUTED_MODEL,
            "object": "model",
            "created": created_s,
            "owned_by": "coe",
            "coe": routed,
        }
    ]
    for state in engine.views.expert_states():
        expert = engine.config.expert(state.name)
        cards.append(
            {
                "id": state.name,
                "object": "model",
                "created": created_s,
                "owned_by": "coe",
                "coe": {
                    "source": expert.source,
                    "backend": state.backend,
                    "state": state_word(state),
                    "num_params": state.num_params,
                    "num_bytes": state.num_bytes,
                    "description": expert.description,
                },
            }
        )
    return cards


class _ClientGone(Exception):
    """The client disconnected while waiting for a non-streamed answer."""


class _AsyncSink:
    """Carries StreamEvents from the engine thread into the request's event loop, with the
    request's deadline (server.request_timeout_s from arrival)."""

    _POLL_S = 1.0  # how often a non-streamed request checks that its client is still there

    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.timeout_s = timeout_s
        self.deadline_s = time.monotonic() + timeout_s

    def put(self, event: StreamEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client is gone
            pass

    async def get(
        self, requests: Sequence[Request], http: HTTPRequest | None = None
    ) -> StreamEvent:
        """The next event of any of ``requests``. Past the deadline they are cancelled and
        RequestTimeout raised; with ``http``, a client that left cancels them (raises _ClientGone)."""
        while True:
            remaining_s = self.deadline_s - time.monotonic()
            if remaining_s <= 0:
                _cancel(requests, "timeout")
                raise RequestTimeout(
                    f"the request took longer than server.request_timeout_s = {self.timeout_s} s"
                )
            try:
                return await asyncio.wait_for(self._queue.get(), min(remaining_s, self._POLL_S))
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    _cancel(requests)
                    raise _ClientGone() from None
            except asyncio.CancelledError:
                _cancel(requests)
                raise


def _cancel(requests: Sequence[Request], reason: str = "cancelled") -> None:
    for request in requests:
        request.cancel(reason)


async def _serve(
    engine: Engine,
    body: ChatCompletionRequest | CompletionRequest,
    http: HTTPRequest,
    kind: str,
    sampling: SamplingParams,
    *,
    messages: tuple[ChatMessage, ...] | None = None,
    prompt: str | None = None,
    tools: Tools | None = None,
):
    """Route, submit the ``n`` requests of one call (seeded ones get seed, seed + 1, ...) and
    answer: JSON when they have all ended, or one SSE stream of all their chunks."""
    expert, route = await asyncio.to_thread(
        engine.routing.resolve, body.model, messages, prompt, tools
    )
    sampling = with_expert_defaults(
        sampling, body, engine.config.expert(expert).sampling_defaults(), engine.config.server
    )
    sink = _AsyncSink(engine.config.server.request_timeout_s)
    keep_alive = keep_alive_s(body)
    requests = [
        Request(
            expert=expert,
            messages=messages,
            prompt=prompt,
            tools=tools,
            sink=sink.put,
            route=route,
            sampling=replace(sampling, seed=None if sampling.seed is None else sampling.seed + i),
            keep_alive_s=keep_alive,
        )
        for i in range(body.n)
    ]
    try:
        for request in requests:
            engine.submit(request)
    except CoEError:
        _cancel(requests)  # the ones already queued end as cancelled
        raise
    try:
        first = await sink.get(requests, http)
        _raise_if_error(first)
        reply = Reply(kind, body.model, requests)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(reply, first, sink, include_usage),
                media_type="text/event-stream",
                headers=reply.headers(),
            )
        finals: dict[str, Completion] = {}
        event = first
        while True:
            if event.completion is not None:
                finals[event.request_id] = event.completion
            if len(finals) == len(requests):
                break
            event = await sink.get(requests, http)
            _raise_if_error(event)
        return JSONResponse(reply.full([finals[r.id] for r in requests]), headers=reply.headers())
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    except CoEError:
        _cancel(requests)  # one choice failed: the others stop too
        raise


def _raise_if_error(event: StreamEvent) -> None:
    if event.error is None:
        return
    if isinstance(event.error, CoEError):
        raise event.error
    raise GenerationError(str(event.error))


def _sse_data(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _sse(
    reply: Reply, first: StreamEvent, sink: _AsyncSink, include_usage: bool
) -> AsyncIterator[bytes]:
    """Every request's chunks as they come; each choice starts with its role and ends with its
    finish reason (tool calls in the last chunk that carries them); usage once all have ended."""
    event, started, finals = first, set(), {}
    offsets = dict.fromkeys(reply.index, 0)  # text offsets, for completions' logprobs
    try:
        while True:
            if event.error is not None:
                error = (
                    event.error
                    if isinstance(event.error, CoEError)
                    else GenerationError(str(event.error))
                )
                yield _sse_data(error.to_openai())
                break
            rid = event.request_id
            if event.delta or event.logprobs or rid not in started:
                yield _sse_data(
                    reply.chunk(
                        rid,
                        event.delta,
                        first=rid not in started,
                        logprobs=event.logprobs,
                        offset=offsets[rid],
                    )
                )
                offsets[rid] += len(event.delta)
                started.add(rid)
            if event.completion is not None:
                finals[rid] = event.completion
                yield _sse_data(
                    reply.chunk(
                        rid,
                        None,
                        finish_reason=event.completion.finish_reason,
                        tool_calls=event.completion.tool_calls,
                    )
                )
                if len(finals) == len(reply.requests):
                    if include_usage:
                        yield _sse_data(reply.usage_chunk([finals[r.id] for r in reply.requests]))
                    break
            try:
                event = await sink.get(reply.requests)
            except RequestTimeout as exc:
                event = StreamEvent(reply.requests[0].id, error=exc)
        yield _sse_data("[DONE]")
    finally:
        _cancel(reply.requests)  # no-op when finished; stops generation when the client left
