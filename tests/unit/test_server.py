"""The OpenAI-compatible app in-process (TestClient runs the lifespan, so the engine thread runs).

Experts are tiny real torch checkpoints; one test swaps in a scripted runner to fail mid-stream.
The last section runs on fake backends (tests/unit/fakes.py): admission, /metrics, tiers, deadlines.
"""
import json
import time

import pytest
from fastapi.testclient import TestClient

from fakes import LetterBackend, LetterDecoder, LetterVocab, fake_engine

from coe.backends.base import Runner
from coe.cache import ModelCache
from coe.config import CacheConfig, CoEConfig, ExpertConfig, SchedulerConfig, ServerConfig
from coe.engine import Engine
from coe.models import ModelStore
from coe.server import create_app
from coe.types import Request, SamplingParams

N_CTX = 128
MAX_TOKENS_LIMIT = 1000


def make_app(tmp_path, checkpoint):
    config = CoEConfig(
        experts=(ExpertConfig("tiny", str(checkpoint), backend="torch_hf", description="tiny test expert",
                              params={"n_ctx": N_CTX}),
                 ExpertConfig("other", str(checkpoint), params={"n_ctx": N_CTX})),
        server=ServerConfig(max_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=8))
    engine = Engine(config, ModelCache(config, ModelStore(tmp_path / "home")))
    return create_app(engine), engine


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory):
    app, _ = make_app(tmp_path_factory.mktemp("server"), tiny_checkpoint)
    with TestClient(app) as client:
        yield client


def chat(client, **body):
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
               "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=payload)


def sse_payloads(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] if b == "data: [DONE]" else json.loads(b[len("data: "):]) for b in blocks]


def assert_error(response, status: int, code: str | None = None, error_type: str = "invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    assert error["type"] == error_type
    if code is not None:
        assert error["code"] == code
    return error


# ---- happy paths -------------------------------------------------------------------------------

def test_models_lists_coe_and_the_experts(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == ["coe", "tiny", "other"]
    assert cards["coe"]["coe"]["routed"] is False  # no trained router in this engine
    assert cards["coe"]["coe"]["unavailable_reason"]
    assert cards["coe"]["coe"]["default_expert"] == "tiny"
    assert cards["tiny"]["object"] == "model"
    assert cards["tiny"]["coe"]["backend"] == "torch_hf"
    assert cards["tiny"]["coe"]["num_params"] > 0
    assert cards["tiny"]["coe"]["description"] == "tiny test expert"
    assert cards["other"]["coe"]["backend"] == "torch_hf"  # auto: a folder is a torch checkpoint


def test_get_one_model(client):
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert set(body["experts"]) == {"tiny", "other"}


def test_experts_shows_tiers_budgets_and_counters(client, tiny_checkpoint):
    assert chat(client, max_tokens=2).status_code == 200  # tiny is hot now
    response = client.get("/v1/experts")
    assert response.status_code == 200
    body = response.json()
    assert body["policy"] == "lrfu" and body["device_kind"] in ("cpu", "cuda")
    assert set(body["tiers"]) == {"device", "host"}
    for tier in body["tiers"].values():
        assert tier["budget_bytes"] > 0 and 0 <= tier["used_bytes"] <= tier["budget_bytes"]
    assert body["tiers"]["host"]["used_bytes"] > 0
    stats = body["stats"]
    assert stats["activations"] >= 1 and stats["prefetches"] >= 1  # queued requests prefetch to host
    assert stats["misses"] + stats["warm_hits"] >= 1
    assert set(stats["bytes_moved"]) == {"disk->host", "host->device"}
    assert stats["bytes_moved"]["disk->host"] >= (tiny_checkpoint / "model.safetensors").stat().st_size
    assert set(stats["evictions"]) == {"device", "host"}
    experts = {e["name"]: e for e in body["experts"]}
    assert list(experts) == ["tiny", "other"]
    tiny = experts["tiny"]
    assert tiny["tier"] == "device" and tiny["state"] == "hot" and tiny["backend"] == "torch_hf"
    assert tiny["weight_bytes"] == (tiny_checkpoint / "model.safetensors").stat().st_size
    assert tiny["host_bytes"] >= tiny["weight_bytes"] and tiny["requests"] >= 1 and tiny["pinned"] is False
    assert tiny["read_s"] > 0 and tiny["materialize_s"] > 0
    assert experts["other"]["weight_bytes"] == tiny["weight_bytes"]
    assert experts["other"]["tier"] in ("disk", "host", "device")


def test_chat_completion(client):
    response = chat(client)
    assert response.status_code == 200, response.text
    assert response.headers["x-coe-expert"] == "tiny"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("User: Hello\nAssistant:") + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 5
    assert body["coe"]["expert"] == "tiny"


def test_greedy_chat_is_reproducible_and_matches_the_stream(client):
    first = chat(client, max_tokens=12).json()
    assert chat(client, max_tokens=12).json()["choices"][0]["message"] == first["choices"][0]["message"]
    payloads = sse_payloads(chat(client, max_tokens=12, stream=True))
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1] if p["choices"])
    assert streamed == first["choices"][0]["message"]["content"]


def test_default_max_tokens_from_the_config(client):
    response = client.post("/v1/chat/completions", json={"model": "tiny", "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 8 or response.json()["choices"][0]["finish_reason"] == "stop"


def test_routed_model_without_router_goes_to_the_default_expert(client):
    response = chat(client, model="coe")
    assert response.status_code == 200
    assert response.headers["x-coe-expert"] == "tiny"
    assert response.headers["x-coe-category"] == "chat"  # the fallback category
    body = response.json()
    assert body["model"] == "coe"
    assert body["coe"]["fallback"] is True and body["coe"]["expert"] == "tiny"


def test_streaming_chat(client):
    payloads = sse_payloads(chat(client, stream=True, max_tokens=6))
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_streaming_with_usage(client):
    payloads = sse_payloads(chat(client, stream=True, max_tokens=4, stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 4 or payloads[-3]["choices"][0]["finish_reason"] == "stop"


def test_text_completion(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["prompt_tokens"] == len("Once upon") + 1


def test_streaming_text_completion(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Once upon"], "max_tokens": 4,
                                                    "temperature": 0, "stream": True})
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    assert all(p["object"] == "text_completion" for p in payloads[:-1])
    assert payloads[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_sequence_in_request(client):
    full = chat(client, max_tokens=20).json()["choices"][0]["message"]["content"]
    stop = full[6:8]
    body = chat(client, max_tokens=20, stop=stop).json()
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


# ---- errors: OpenAI shape, right status, and the server keeps serving ---------------------------

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("method, path, body, status, code", [
    ("post", CHAT, b"{not json", 400, "invalid_request"),
    ("post", CHAT, b"[1, 2]", 400, "invalid_request"),
    ("post", CHAT, b"\xff\xfe", 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny"}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": []}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ("post", CHAT, {"model": "nope", "messages": USER}, 404, "model_not_found"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "n": 17}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "temperature": 3}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "max_tokens": N_CTX}, 400, "context_length_exceeded"),
    ("post", CHAT, {"model": "tiny", "messages": USER, "stream": True, "stop": [""]}, 400, "invalid_request"),
    ("post", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "invalid_request"),
    ("post", "/v1/completions", {"model": "tiny", "prompt": "x" * N_CTX, "max_tokens": 1}, 400,
     "context_length_exceeded"),
    ("get", "/v1/nowhere", None, 404, "not_found"),
    ("get", CHAT, None, 405, "method_not_allowed"),
])
def test_errors_have_the_openai_shape_and_the_server_keeps_serving(client, method, path, body, status, code):
    if body is None:
        response = getattr(client, method)(path)
    elif isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert_error(response, status, code)
    assert chat(client, max_tokens=2).status_code == 200


def test_streamed_request_errors_before_the_first_token_are_plain_http_errors(client):
    response = chat(client, stream=True, max_tokens=N_CTX)
    error = assert_error(response, 400, "context_length_exceeded")
    assert "context of 128 tokens" in error["message"]
    assert error["param"] == "max_tokens"


def test_unknown_field_is_ignored(client):
    assert chat(client, frequency_penalty=0.5, user="me", logit_bias={}).status_code == 200


def test_max_completion_tokens_wins(client):
    body = chat(client, max_tokens=50, max_completion_tokens=2).json()
    assert body["usage"]["completion_tokens"] <= 2


# ---- a scripted runner to fail in the middle of a stream ----------------------------------------

class FailingRunner(Runner):
    """Yields 'a', 'b', 'c' and then fails, like a backend crashing mid-generation."""

    delay_s, fail_after = 0.0, 3  # what LetterDecoder reads

    def __init__(self, expert: ExpertConfig):
        super().__init__(expert, LetterVocab(), context_length=1000, num_bytes=1)

    def open_decoder(self) -> LetterDecoder:
        return LetterDecoder(self)


@pytest.fixture
def failing_client(tiny_checkpoint, tmp_path, monkeypatch):
    app, engine = make_app(tmp_path, tiny_checkpoint)
    runner = FailingRunner(engine.config.expert("tiny"))
    monkeypatch.setattr(ModelCache, "activate", lambda self, name: runner)
    with TestClient(app) as client:
        yield client


def test_error_mid_stream_becomes_an_sse_error_then_done(failing_client):
    response = chat(failing_client, stream=True, max_tokens=10)
    assert response.status_code == 200
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["type"] == "generation_error"
    assert "device lost" in error["message"]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-2])
    assert text == "abc"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])


def test_error_mid_generation_without_stream_is_a_500(failing_client):
    error = assert_error(chat(failing_client, max_tokens=10), 500, error_type="generation_error")
    assert "device lost" in error["message"]
    assert failing_client.get("/v1/models").status_code == 200


# ---- fake backends: admission, /metrics, tiers, deadlines ---------------------------------------

def fake_app(tmp_path, backend=None, **sections):
    engine = fake_engine(tmp_path, backend=backend, **sections)
    return create_app(engine), engine


def ask(client, model="a", **body):
    payload = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, **body}
    return client.post("/v1/chat/completions", json=payload)


def test_a_full_queue_is_a_429_with_retry_after(tmp_path):
    app, engine = fake_app(tmp_path, scheduler=SchedulerConfig(max_queue=1))
    engine.submit(Request("a", prompt="waiting"))  # no lifespan, no engine thread: it stays queued
    engine.scheduler.record_service(80.0)  # slow batches: Retry-After grows with them
    client = TestClient(app)
    response = ask(client)
    error = assert_error(response, 429, "overloaded", error_type="rate_limit_error")
    assert "scheduler.max_queue" in error["message"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert int(retry_after) == int(engine.scheduler.retry_after_s(1)) > 1
    assert engine.metrics.registry.get_sample_value("coe_requests_total",
                                                    {"expert": "a", "outcome": "rejected"}) == 1
    engine.stop()


def test_metrics_endpoint_serves_the_prometheus_text(tmp_path):
    app, _ = fake_app(tmp_path)
    with TestClient(app) as client:
        assert ask(client).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE coe_requests_in_flight gauge" in text
    assert "coe_requests_in_flight 0.0" in text
    assert 'coe_requests_total{expert="a",outcome="completed"} 1.0' in text
    assert 'coe_tokens_total{expert="a",kind="completion"} 3.0' in text
    assert 'coe_expert_tier{expert="a",tier="device"} 1.0' in text


def test_served_requests_name_the_tier_and_switch_time(tmp_path):
    app, _ = fake_app(tmp_path, cache=CacheConfig(prefetch="none"))
    with TestClient(app) as client:
        cold, hot = ask(client), ask(client)
        streamed = ask(client, stream=True)
    for response, tier in ((cold, "disk"), (hot, "device")):
        assert response.status_code == 200, response.text
        assert response.headers["x-coe-tier"] == tier
        switch_ms = float(response.headers["x-coe-switch-ms"])
        assert switch_ms >= 0
        info = response.json()["coe"]
        assert info["tier"] == tier and info["switch_ms"] == pytest.approx(switch_ms, abs=0.051)
        assert info["expert"] == "a"
    assert streamed.headers["x-coe-tier"] == "device"
    assert float(streamed.headers["x-coe-switch-ms"]) >= 0
    chunks = sse_payloads(streamed)[:-1]
    assert chunks and all(c["coe"]["tier"] == "device" for c in chunks)


def test_a_request_past_the_deadline_is_a_408_and_is_cancelled(tmp_path):
    backend = LetterBackend(runner_options={"a": {"delay_s": 0.05}})
    app, engine = fake_app(tmp_path, backend=backend, server=ServerConfig(request_timeout_s=0.3))
    with TestClient(app) as client:
        started = time.monotonic()
        response = ask(client, max_tokens=200)  # 10 s of tokens
        assert time.monotonic() - started < 5
        error = assert_error(response, 408, "request_timeout", error_type="timeout_error")
        assert "server.request_timeout_s = 0.3" in error["message"]
        assert ask(client, model="b").status_code == 200  # the engine is free again
    value = engine.metrics.registry.get_sample_value
    ended = sum(value("coe_requests_total", {"expert": "a", "outcome": o}) or 0 for o in ("cancelled", "timeout"))
    assert ended == 1
    assert (value("coe_tokens_total", {"expert": "a", "kind": "completion"}) or 0) < 200
    assert value("coe_requests_in_flight") == 0


def test_a_stream_past_the_deadline_ends_with_a_timeout_error_event(tmp_path):
    backend = LetterBackend(runner_options={"a": {"delay_s": 0.05}})
    app, engine = fake_app(tmp_path, backend=backend, server=ServerConfig(request_timeout_s=0.3))
    with TestClient(app) as client:
        response = ask(client, max_tokens=200, stream=True)
    assert response.status_code == 200
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-2])
    assert 1 <= len(text) < 200
    assert engine.metrics.registry.get_sample_value("coe_requests_in_flight") == 0
