"""The real server with the real SmolLM2 expert, called over HTTP by the official openai client."""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

EXPERT = "smollm2-135m"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm_server):
    return openai.OpenAI(base_url=smollm_server.v1, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_experts_and_routed_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["coe", EXPERT, "gemma3-270m"]


def test_chat_completion_non_streaming(client):
    reply = client.chat.completions.create(model=EXPERT, messages=HELLO, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() != ""
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == EXPERT


def test_chat_completion_streaming_matches_non_streaming(client):
    kwargs = dict(model=EXPERT, messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_endpoint_plain_text(client):
    reply = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    assert reply.choices[0].text.strip() != ""
    assert reply.usage.completion_tokens <= 8


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=EXPERT, messages=HELLO, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_stop_sequence_truncates(client):
    reply = client.completions.create(model=EXPERT, prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0,
                                      stop=[" 8"])
    assert " 8" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_routed_model_reports_decision(smollm_server):
    response = httpx.post(smollm_server.v1 + "/chat/completions", timeout=120,
                          json={"model": "coe", "messages": HELLO, "max_tokens": 4})
    assert response.status_code == 200
    assert response.headers["x-coe-expert"] == EXPERT
    assert response.headers["x-coe-category"]
    assert response.json()["coe"]["expert"] == EXPERT


@pytest.mark.parametrize("body, status, code", [
    ({"model": "nope", "messages": HELLO}, 404, "model_not_found"),
    ({"model": EXPERT}, 400, "invalid_request"),
    ({"model": EXPERT, "messages": HELLO, "max_tokens": 0}, 400, "invalid_request"),
    ({"model": EXPERT, "messages": HELLO, "max_tokens": 100000}, 400, "invalid_request"),
    ({"model": EXPERT, "messages": HELLO, "temperature": 9}, 400, "invalid_request"),
    ({"model": EXPERT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ({"model": EXPERT, "messages": [{"role": "user", "content": "hi " * 2500}], "max_tokens": 2000},
     400, "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors_and_server_survives(smollm_server, body, status, code):
    response = httpx.post(smollm_server.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert httpx.get(smollm_server.base_url + "/health", timeout=10).status_code == 200


def test_malformed_json_is_400(smollm_server):
    response = httpx.post(smollm_server.v1 + "/chat/completions", content=b'{"model": ', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("declare_length", [True, False])
def test_a_client_that_sends_a_large_body_before_reading_gets_the_413(smollm_server, declare_length):
    """urllib writes the whole body before it reads anything: the server must read (and drop) the
    rest of a refused body, or the client sees a connection reset instead of the answer."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": EXPERT, "messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    data = body if declare_length else iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
    request = urllib.request.Request(smollm_server.v1 + "/chat/completions", data=data, method="POST",
                                     headers={"content-type": "application/json",
                                              **({} if declare_length else {"transfer-encoding": "chunked"})})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == "request_too_large" and error["param"] == "body"
    assert httpx.get(smollm_server.base_url + "/health", timeout=10).status_code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing-expert", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EXPERT, messages=HELLO, max_tokens=100000)


def test_client_disconnect_mid_stream_does_not_stall_the_server(smollm_server, client):
    with httpx.stream("POST", smollm_server.v1 + "/chat/completions", timeout=60,
                      json={"model": EXPERT, "messages": HELLO, "max_tokens": 2000, "stream": True,
                            "temperature": 1.0}) as response:
        assert response.status_code == 200
        for _ in zip(range(3), response.iter_lines()):
            pass
    reply = client.chat.completions.create(model=EXPERT, messages=HELLO, max_tokens=4)
    assert reply.usage.completion_tokens >= 1
    assert smollm_server.alive()


def test_a_follow_up_turn_reports_the_prompt_tokens_it_reused(client):
    """Prefix caching: the second turn's prompt starts with the first turn's, whose KV cells the
    expert still holds; usage says how many prompt tokens were not evaluated again."""
    question = [{"role": "user", "content": "Name a fruit that is yellow."}]
    first = client.chat.completions.create(model=EXPERT, messages=question, max_tokens=8, temperature=0)
    follow_up = question + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "And a red one?"}]
    second = client.chat.completions.create(model=EXPERT, messages=follow_up, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_the_server_process_runs_with_huge_pages_for_malloc(smollm_server):
    """`python -m coe` re-executed itself with the glibc tunable (where the kernel offers
    transparent huge pages), keeping its pid."""
    from pathlib import Path

    from coe.backends.memory import huge_page_environment

    if huge_page_environment({}) is None:
        pytest.skip("no transparent huge pages or not glibc here")
    environ = Path(f"/proc/{smollm_server.process.pid}/environ").read_bytes().split(b"\0")
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ
