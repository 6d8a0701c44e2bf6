"""Property-based fuzzing of the HTTP API with schemathesis, against the server's own OpenAPI schema.

The app runs in-process (schemathesis's ASGI client, which also runs the lifespan and so the
engine thread) on fake experts (tests/unit/fakes.py), so a case costs milliseconds.

The schema is ``app.openapi()`` with one addition made here, only where the server's schema lacks
it:

- a ``requestBody`` for the two generation routes, from the pydantic models in
  ``coe.server.protocol`` (the handlers parse the body themselves, so FastAPI cannot see it),
  closed (``additionalProperties: false``, with the OpenAI fields the server ignores listed) when
  the model names such fields (``IGNORED``), since the server refuses any other;

and most positive cases are steered (after generation) to name a model, expert or tier the
server knows, and half keep max_tokens within the limit, so that they reach the happy path and not
only 404s and 400s.

For every case: no 5xx; every 4xx body is an OpenAI error ``{"error": {"message", "type",
"param", "code"}}``; a 2xx JSON answer passes schemathesis's content-type and response-schema
checks; a streamed (``text/event-stream``) answer is checked here as SSE instead (each block
``data: <json>``, ending in ``data: [DONE]``); negative (schema-violating) data is refused with a
4xx. Failures are collected per operation without stopping, de-duplicated, and reported at once
with the smallest request that showed each.
"""
from __future__ import annotations

import copy
import json
import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

from fakes import fake_engine  # noqa: E402

from coe.config import ROUTED_MODEL, ServerConfig  # noqa: E402
from coe.server import create_app  # noqa: E402
from coe.server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402

EXPERTS = ("a", "b")
MAX_TOKENS_LIMIT = 64  # a larger max_tokens is a 400; the fake backend makes the rest instant
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REQUEST_BODIES = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}

# (method, path) -> (positive cases, negative cases). Hypothesis stops early on a strategy with
# less to vary (an operation without parameters is one case); the total is checked at the end.
BUDGET = {
    ("POST", CHAT): (300, 150),
    ("POST", COMPLETIONS): (250, 120),
    ("GET", "/v1/models/{model_id}"): (80, 0),  # a string path parameter has no negative form
    ("GET", "/v1/routing"): (60, 30),
    ("POST", "/v1/experts/{name}/pin"): (50, 0),
    ("POST", "/v1/experts/{name}/unpin"): (50, 0),
    ("POST", "/v1/experts/{name}/prefetch"): (60, 30),
    ("GET", "/health"): (5, 0),
    ("GET", "/metrics"): (5, 0),
    ("GET", "/v1/models"): (5, 0),
    ("GET", "/v1/experts"): (5, 0),
}
MIN_TOTAL_CASES = 1000

CASES: Counter = Counter()  # "METHOD path" -> cases sent
STATUSES: Counter = Counter()  # ("METHOD path", status) -> responses


# ---- the schema ---------------------------------------------------------------------------------

def _lift_defs(schema: dict, components: dict) -> dict:
    """A pydantic JSON schema with its $defs moved to components/schemas (refs already point there)."""
    schema = copy.deepcopy(schema)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    return schema


def build_schema(app) -> dict:
    """app.openapi(), with a request body for each generation route that documents none."""
    raw = copy.deepcopy(app.openapi())
    components = raw.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_BODIES.items():
        operation = raw["paths"][path]["post"]
        if "requestBody" not in operation:
            body = _lift_defs(model.model_json_schema(ref_template="#/components/schemas/{model}"), components)
            ignored = getattr(model, "IGNORED", None)
            if ignored is not None:
                # The server refuses unknown top-level fields (400) except OpenAI's that it ignores:
                # say so, so that positive cases are not refused for an invented field and
                # negative cases try invented ones.
                body["additionalProperties"] = False
                for name in sorted(ignored):
                    body.setdefault("properties", {}).setdefault(name, {})
            components.setdefault(model.__name__, body)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return raw


# ---- steering: most positive cases name a model, expert or tier the server knows ----------------

KNOWN = {"model": (ROUTED_MODEL, *EXPERTS), "model_id": (ROUTED_MODEL, *EXPERTS), "name": EXPERTS,
         "tier": ("device", "host")}


def _steer(drawn) -> object:
    """Put known names into a generated positive case (the free-form ones mostly 404), in some
    cases keep max_tokens within the limit so that generation runs, and in some ask for a stream."""
    case, pick, clamp, stream = drawn
    if pick is not None:
        for container in (case.path_parameters, case.query):
            for key in set(container or {}) & set(KNOWN):
                container[key] = KNOWN[key][pick % len(KNOWN[key])]
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = KNOWN["model"][pick % len(KNOWN["model"])]
    if clamp and isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
                case.body[key] = int(value) % MAX_TOKENS_LIMIT + 1
    if stream is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["stream"] = True
        case.body["stream_options"] = {"include_usage": stream}
    return case


def case_strategy(operation, mode: GenerationMode):
    cases = operation.as_strategy(generation_mode=mode)
    if mode is not GenerationMode.POSITIVE:
        return cases  # negative cases stay as generated: they must be refused
    picks = st.one_of(st.none(), st.integers(0, 11))  # None: leave the generated name
    streams = st.sampled_from([None, None, False, True])  # None: leave "stream" as generated
    return st.tuples(cases, picks, st.booleans(), streams).map(_steer)


# ---- the app ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    from schemathesis.python import asgi

    engine = fake_engine(tmp_path_factory.mktemp("fuzz"), names=EXPERTS,
                         server=ServerConfig(max_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=8,
                                             request_timeout_s=30.0))
    app = create_app(engine)
    # An explicit config: no schemathesis.toml is discovered, and a whole stream is read (the default
    # stops after 20 events; a stream here has at most MAX_TOKENS_LIMIT + 3).
    config = schemathesis.Config.from_dict({"max-stream-events": 10 * MAX_TOKENS_LIMIT})
    schema = schemathesis.openapi.from_dict(build_schema(app), config=config)
    with asgi.get_client(app) as client:  # starts the lifespan (the engine thread) for every test here
        assert client.get(f"http://{asgi.HOST}/health").status_code == 200
    started = time.monotonic()
    yield app, schema
    asgi.shutdown_lifespans()  # schemathesis's client started the lifespan; this stops the engine thread
    engine.stop()
    print(f"\nfuzz: {sum(CASES.values())} cases in {time.monotonic() - started:.1f} s")
    for label, count in sorted(CASES.items()):
        statuses = ", ".join(f"{status}: {n}" for (op, status), n in sorted(STATUSES.items(), key=str) if op == label)
        print(f"  {count:5d}  {label}  ({statuses})")


# ---- the checks ---------------------------------------------------------------------------------

def _json(response):
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def _is_sse(response) -> bool:
    return any(v.startswith("text/event-stream") for v in response.headers.get("content-type", []))


def openai_error_problem(response) -> str | None:
    """Why a 4xx/5xx body is not an OpenAI error, or None when it is one."""
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "the body is not {'error': {...}}"
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        return f"error lacks {sorted(missing)}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "error.message is not a non-empty string"
    if not isinstance(error["type"], str) or not error["type"]:
        return "error.type is not a non-empty string"
    for key in ("param", "code"):
        if error[key] is not None and not isinstance(error[key], str):
            return f"error.{key} is neither a string nor null"
    return None


def sse_problem(response, path: str) -> str | None:
    """Why a streamed answer is not well-formed OpenAI SSE, or None."""
    if getattr(response, "stream_cut_short", False):
        return "the client stopped reading the stream early (max-stream-events or its timeout)"
    text = response.content.decode("utf-8", errors="replace")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if not blocks or blocks[-1] != "data: [DONE]":
        return "the stream does not end with 'data: [DONE]'"
    expected = "chat.completion.chunk" if path == CHAT else "text_completion"
    for block in blocks[:-1]:
        if not block.startswith("data: "):
            return f"a block is not 'data: ...': {block[:80]!r}"
        try:
            payload = json.loads(block[len("data: "):])
        except ValueError:
            return f"a data block is not JSON: {block[:80]!r}"
        if "error" in payload:
            return f"the stream carries an error: {payload['error']}"
        if payload.get("object") != expected or not isinstance(payload.get("choices"), list):
            return f"a chunk is not a {expected}: {block[:120]!r}"
    return None


def check_case(case, response) -> list[tuple[str, str]]:
    """(kind, detail) for each problem with this response."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance)

    problems = []
    status = response.status_code
    if status >= 400:
        problem = openai_error_problem(response)
        if problem:
            problems.append((f"{status} not an OpenAI error", problem))
    if 200 <= status < 300 and _is_sse(response):
        problem = sse_problem(response, case.operation.path)
        if problem:
            problems.append(("bad SSE stream", problem))
        checks = [not_a_server_error, negative_data_rejection]
    else:
        checks = [not_a_server_error, negative_data_rejection, content_type_conformance,
                  response_schema_conformance]
    try:
        case.validate_response(response, checks=checks)
    except FailureGroup as group:
        for failure in group.exceptions:
            problems.append((failure.title, getattr(failure, "message", "") or str(failure)))
    return problems


# ---- the tests ----------------------------------------------------------------------------------

def _request_text(response) -> str:
    request = response.request
    body = request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="backslashreplace")
    return f"{request.method} {request.url}" + (f"\n    body: {body}" if body else "")


def _fuzz_operation(app, schema, method: str, path: str, mode: GenerationMode, max_examples: int):
    operation = schema[path][method]
    label = f"{method} {path}"
    found: dict[tuple, tuple[int, str]] = {}  # (status, kind) -> (size, report) of the smallest case

    @given(case=case_strategy(operation, mode))
    @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    def run(case):
        try:
            response = case.call(app=app)
        except Exception as exc:  # the app raised: Starlette sent a 500 and re-raised it to the client
            CASES[label] += 1
            STATUSES[label, "raised"] += 1
            request = case.as_curl_command()
            key = (500, f"unhandled {type(exc).__name__}")
            if key not in found or len(request) < found[key][0]:
                found[key] = (len(request), f"{key[1]} [{mode.value}]\n  {request}\n  -> 500 {exc!r:.400}")
            return
        CASES[label] += 1
        STATUSES[label, f"{response.status_code} sse" if _is_sse(response) else response.status_code] += 1
        for kind, detail in check_case(case, response):
            request = _request_text(response)
            report = (f"{kind} [{mode.value}]\n  {request}\n  -> {response.status_code} "
                      f"{response.content[:400].decode('utf-8', errors='replace')}\n  {detail[:600]}")
            key = (response.status_code, kind)
            if key not in found or len(request) < found[key][0]:
                found[key] = (len(request), report)

    run()
    assert not found, f"{label}: {len(found)} distinct failure(s)\n\n" + "\n\n".join(r for _, r in found.values())


def _operations(mode_index: int):
    return [pytest.param(method, path, budget[mode_index], id=f"{method} {path}")
            for (method, path), budget in BUDGET.items() if budget[mode_index]]


@pytest.mark.parametrize("method, path, max_examples", _operations(0))
def test_positive_cases(fuzz, method, path, max_examples):
    app, schema = fuzz
    _fuzz_operation(app, schema, method, path, GenerationMode.POSITIVE, max_examples)


@pytest.mark.parametrize("method, path, max_examples", _operations(1))
def test_negative_cases(fuzz, method, path, max_examples):
    app, schema = fuzz
    _fuzz_operation(app, schema, method, path, GenerationMode.NEGATIVE, max_examples)


# Requests a generator does not write (hypothesis draws no lone surrogates, no 1000-deep JSON, no
# seed past 64 bits) but clients can: each must be refused with an OpenAI 4xx error. With the
# fake experts some would pass; with the real backends they are 500s (see each note).
def _chat(**extra) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def _deep(depth: int) -> str:
    return '{"x":' * depth + "1" + "}" * depth


EDGE_CASES = [
    # json.loads raises RecursionError: 500 internal_error
    ("deep JSON in tools", CHAT, json.dumps(_chat()).replace('"max_tokens"', f'"tools": [{_deep(5000)}], "max_tokens"')),
    ("deep JSON in an ignored field", CHAT, json.dumps(_chat()).replace('"max_tokens"', f'"user": {_deep(1000)}, "max_tokens"')),
    ("deep JSON array", CHAT, "[" * 100_000 + "]" * 100_000),
    # the unknown-field message and param echo the key; JSONResponse cannot encode it: 500
    ("unknown field named by a lone surrogate", CHAT, json.dumps(_chat(**{"\ud800": 1}))),
    # the real backends' tokenizers cannot encode it: 500 generation_error, then the expert backs off (503)
    ("lone surrogate in a message", CHAT, json.dumps(_chat(messages=[{"role": "user", "content": "hi\udc00"}]))),
    ("lone surrogate in a prompt", COMPLETIONS, json.dumps({"model": "a", "prompt": "x\ud800", "max_tokens": 2})),
    # torch.Generator.manual_seed overflows past 64 bits: 500 generation_error
    ("seed of 2**64", CHAT, json.dumps(_chat(seed=2**64))),
    ("seed below -2**63", CHAT, json.dumps(_chat(seed=-2**63 - 1))),
]


@pytest.mark.parametrize("path, body", [pytest.param(p, b, id=name) for name, p, b in EDGE_CASES])
def test_edge_case_bodies_are_refused_with_an_openai_error(fuzz, path, body):
    from schemathesis.core.transport import Response
    from schemathesis.python import asgi

    app, _ = fuzz
    try:
        with asgi.get_client(app) as client:
            response = Response.from_any(client.post(f"http://{asgi.HOST}{path}", data=body.encode(),
                                                     headers={"content-type": "application/json"}, timeout=10))
    except Exception as exc:  # the app raised: Starlette sent a 500 and re-raised it to the client
        pytest.fail(f"500: the app raised {exc!r:.300}")
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    assert openai_error_problem(response) is None, response.content[:300]


def test_the_schema_covers_every_operation_and_the_request_bodies(fuzz):
    _, schema = fuzz
    raw = schema.raw_schema
    documented = {(m.upper(), p) for p, methods in raw["paths"].items() for m in methods}
    assert documented == set(BUDGET), documented ^ set(BUDGET)
    for path in REQUEST_BODIES:
        assert "application/json" in raw["paths"][path]["post"]["requestBody"]["content"]


def test_enough_cases_ran():
    """Last in the file: the budget above adds up to >= MIN_TOTAL_CASES cases actually sent."""
    if len(CASES) < len(BUDGET):
        pytest.skip("only part of the fuzz tests ran")
    total = sum(CASES.values())
    assert total >= MIN_TOTAL_CASES, dict(CASES)
