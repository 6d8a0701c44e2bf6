"""API keys on a real `coe serve` (keys from COE_API_KEYS), called by the official openai client."""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

KEYS = ("sk-real-test-key-1", "sk-real-test-key-2")


@pytest.fixture
def keyed_server(server_with_config, two_experts, monkeypatch):
    monkeypatch.setenv("COE_API_KEYS", ",".join(KEYS))
    return server_with_config(two_experts + "server:\n  rate_limit_per_minute: 5\n")


def ask(server, key: str):
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    return client.chat.completions.create(model="smollm2-135m", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])


def test_keys_guard_the_api_and_the_server_keeps_serving(keyed_server):
    assert ask(keyed_server, KEYS[0]).choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError) as info:
        ask(keyed_server, "sk-not-a-key")
    assert info.value.status_code == 401 and "sk-not-a-key" not in str(info.value.body)
    assert httpx.get(keyed_server.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(keyed_server.base_url + "/metrics", timeout=10).status_code == 401
    metrics = httpx.get(keyed_server.base_url + "/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert metrics.status_code == 200 and "coe_requests_total" in metrics.text
    assert ask(keyed_server, KEYS[1]).choices  # still serving after the refusals


def test_a_key_over_its_rate_gets_429_and_others_do_not(keyed_server):
    for _ in range(5):
        ask(keyed_server, KEYS[0])
    with pytest.raises(openai.RateLimitError) as info:
        ask(keyed_server, KEYS[0])
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert ask(keyed_server, KEYS[1]).choices


def test_no_key_reaches_the_server_log(keyed_server):
    ask(keyed_server, KEYS[0])
    with pytest.raises(openai.AuthenticationError):
        ask(keyed_server, "sk-leaked-if-logged")
    log = keyed_server.log.read_text()
    assert "API key" in log or "serving" in log  # the log is there
    assert all(secret not in log for secret in (*KEYS, "sk-leaked-if-logged"))
