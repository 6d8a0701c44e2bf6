"""The remote backend against scripted OpenAI-compatible answers (httpx.MockTransport): streaming,
retries with backoff, 4xx passed on, broken streams, cancellation, API keys, and the engine routing
around a failed remote expert. The real counterpart is tests/integration/test_remote_real.py (a
second `coe serve` process as the remote)."""
from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from fakes import fake_engine

from coe.backends.remote import RemoteExpert
from coe.config import ExpertConfig, RouterConfig, from_dict
from coe.errors import CoEError, ConfigError, ExpertUnavailable, InvalidRequest
from coe.router.base import Router
from coe.router.mapping import ScoreTable
from coe.router.service import ExpertRouter
from coe.server import create_app
from coe.types import ChatMessage, Request, SamplingParams


def sse(*pieces: str, finish: str = "stop", usage=(7, None)) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1] or len(pieces)}})
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def ok(*pieces: str, **kw):
    return httpx.Response(200, content=sse(*pieces, **kw), headers={"content-type": "text/event-stream"})


class Script:
    """Answers requests in order from a list (the last one repeats); records what it was sent."""

    def __init__(self, *answers):
        self.answers, self.sent = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def remote(handler, params=None, environ=None, sleeps=None) -> RemoteExpert:
    expert = ExpertConfig("far", "http://remote.test:8000", backend="remote",
                          params={"num_params": "7B", "model": "their-name", **(params or {})})
    return RemoteExpert(expert, environ=environ or {}, transport=httpx.MockTransport(handler),
                        sleep=(sleeps.append if sleeps is not None else lambda _: None))


def chat_request(**sampling) -> Request:
    return Request(expert="far", messages=(ChatMessage("user", "Hello"),),
                   sampling=SamplingParams(max_tokens=5, **sampling))


def test_streams_deltas_and_usage_and_forwards_the_request():
    script = Script(ok("Hel", "lo", usage=(7, 2)))
    events = list(remote(script).stream(chat_request(stop=("\n",), seed=3, temperature=0.0)))
    assert [e.delta for e in events[:-1]] == ["Hel", "lo"]
    done = events[-1].completion
    assert (done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("Hello", "stop", 7, 2)
    sent = script.sent[0]
    assert sent.url == "http://remote.test:8000/v1/chat/completions"
    body = json.loads(sent.content)
    assert body["model"] == "their-name" and body["stream"] is True and body["stop"] == ["\n"]
    assert body["seed"] == 3 and body["max_tokens"] == 5 and body["messages"] == [{"role": "user", "content": "Hello"}]


def test_a_prompt_goes_to_completions():
    def answer(request):
        assert request.url.path == "/v1/completions" and json.loads(request.content)["prompt"] == "1+1="
        chunk = {"choices": [{"index": 0, "text": "2", "finish_reason": "length"}]}
        return httpx.Response(200, content=b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")

    events = list(remote(answer).stream(Request(expert="far", prompt="1+1=")))
    assert events[0].delta == "2" and events[-1].completion.finish_reason == "length"
    assert events[-1].completion.completion_tokens == 1  # no usage sent: counted from the chunks


def test_retries_503_and_connect_errors_with_doubling_backoff_then_serves():
    sleeps = []
    script = Script(httpx.Response(503, json={"error": {"message": "warming up"}}),
                    httpx.ConnectError("refused"), ok("fine"))
    events = list(remote(script, {"retries": 2, "backoff_s": 0.25}, sleeps=sleeps).stream(chat_request()))
    assert events[-1].completion.text == "fine" and len(script.sent) == 3
    assert sleeps == [0.25, 0.5]


def test_retry_after_of_a_429_is_followed():
    sleeps = []
    script = Script(httpx.Response(429, headers={"retry-after": "3"}, json={"error": {"message": "busy"}}), ok("x"))
    list(remote(script, sleeps=sleeps).stream(chat_request()))
    assert sleeps == [3.0]


def test_an_endpoint_that_keeps_failing_is_unavailable_with_the_reason():
    script = Script(httpx.ConnectError("connection refused"))
    with pytest.raises(ExpertUnavailable, match="failed 3 times .*connection refused"):
        list(remote(script).stream(chat_request()))
    assert len(script.sent) == 3


def test_a_bad_request_is_passed_on_and_a_bad_key_makes_the_expert_unavailable():
    too_long = Script(httpx.Response(400, json={"error": {"message": "context length exceeded"}}))
    with pytest.raises(InvalidRequest, match="refused the request: context length exceeded"):
        list(remote(too_long).stream(chat_request()))
    assert len(too_long.sent) == 1  # not retried
    bad_key = Script(httpx.Response(401, json={"error": {"message": "invalid api key"}}))
    with pytest.raises(ExpertUnavailable, match="HTTP 401: invalid api key"):
        list(remote(bad_key).stream(chat_request()))
    assert len(bad_key.sent) == 1


class BreaksAfterFirstChunk(httpx.SyncByteStream):
    def __iter__(self):
        yield sse("partial")[: sse("partial").index(b"\n\n") + 2]
        raise httpx.ReadError("connection reset")


def test_a_stream_broken_after_the_first_token_ends_with_an_error_not_a_retry():
    script = Script(httpx.Response(200, stream=BreaksAfterFirstChunk()))
    events = list(remote(script).stream(chat_request()))
    assert events[0].delta == "partial"
    assert "broke after the first token" in events[-1].error.message and len(script.sent) == 1


def test_cancellation_stops_reading():
    request = chat_request()

    def answer(_):
        request.cancel()
        return ok("a", "b", "c")

    events = list(remote(answer).stream(request))
    assert events[-1].completion.finish_reason == "cancelled" and not any(e.delta for e in events)


def test_the_api_key_comes_from_the_named_environment_variable():
    script = Script(ok("x"))
    list(remote(script, {"api_key_env": "FAR_KEY"}, environ={"FAR_KEY": "s3cret"}).stream(chat_request()))
    assert script.sent[0].headers["authorization"] == "Bearer s3cret"
    with pytest.raises(CoEError, match="FAR_KEY, which is not set"):
        remote(script, {"api_key_env": "FAR_KEY"})


@pytest.mark.parametrize("params, field", [({}, "params.num_params"), ({"num_params": "7B", "retry": 1}, "params.retry"),
                                           ({"num_params": "7B", "timeout_s": 0}, "params.timeout_s")])
def test_config_names_the_bad_remote_field(params, field):
    with pytest.raises(ConfigError, match=f"experts\\[0\\].{field}"):
        from_dict({"experts": [{"name": "far", "source": "http://h:1", "backend": "remote", "params": params}]})
    with pytest.raises(ConfigError, match="cache.pins\\[0\\]: expected a local expert"):
        from_dict({"experts": [{"name": "far", "source": "http://h:1", "backend": "remote",
                                "params": {"num_params": 1e9}}], "cache": {"pins": ["far"]}})


# ---- through the engine and the HTTP API -----------------------------------------------------------

class AlwaysMath(Router):
    def __init__(self):
        super().__init__(("math", "code"), 0.25, "chat")

    def probabilities(self, texts):
        return [[0.9, 0.1] for _ in texts]


def routed_engine(tmp_path, handler):
    """Local experts a and b; remote expert far is best at math and "coe" sends math to it."""
    engine = fake_engine(tmp_path, names=("a", "b"), remote={"far": handler}, router=RouterConfig(default_expert="a"))
    table = ScoreTable.from_dict({"source": "test", "scores": {"math": {"far": 0.9, "b": 0.7, "a": 0.1},
                                                                "code": {"far": 0.1, "b": 0.2, "a": 0.3}}})
    engine.routing.router = ExpertRouter(AlwaysMath(), {"math": "far", "code": "a", "chat": "a"}, table=table)
    return engine


def ask(client, model, stream=False):
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 3, "stream": stream,
                                                      "messages": [{"role": "user", "content": "2+2"}]})


def test_a_routed_request_is_streamed_from_the_remote_expert_and_counted(tmp_path):
    engine = routed_engine(tmp_path, Script(ok("fo", "ur", usage=(9, 2))))
    with TestClient(create_app(engine)) as client:
        response = ask(client, "coe")
        answer = response.json()
        assert answer["choices"][0]["message"]["content"] == "four" and response.headers["x-coe-expert"] == "far"
        assert answer["usage"]["prompt_tokens"] == 9 and response.headers["x-coe-tier"] == "remote"
        streamed = ask(client, "coe", stream=True).text
        assert '"four"' not in streamed and '"fo"' in streamed and "[DONE]" in streamed
        experts = {e["name"]: e for e in client.get("/v1/experts").json()["experts"]}
        assert experts["far"]["tier"] == "remote" and experts["far"]["num_params"] == 10**9
        assert experts["far"]["requests"] == 2
        metrics = client.get("/metrics").text
        assert 'coe_requests_total{expert="far",outcome="completed"} 2.0' in metrics
        assert "far" in client.get("/health").json()["experts"]
        assert client.post("/v1/experts/far/pin").status_code == 400


def test_a_failing_remote_expert_degrades_to_the_next_best_and_named_requests_get_503(tmp_path):
    engine = routed_engine(tmp_path, Script(httpx.ConnectError("connection refused")))
    with TestClient(create_app(engine)) as client:
        answer = ask(client, "coe")
        assert answer.status_code == 200 and answer.headers["x-coe-expert"] == "b"  # next best for math
        named = ask(client, "far")
        assert named.status_code == 503 and int(named.headers["retry-after"]) >= 1
        assert "far" in client.get("/health").json()["unhealthy"]
        again = ask(client, "coe")  # backing off: routed straight to b, the remote is not tried
        assert again.headers["x-coe-expert"] == "b"
