"""API keys and per-key rate limits, in-process (the real-server counterpart is in
tests/integration/test_server_real.py and the browser test of the console)."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from fakes import fake_engine

from coe.config import ServerConfig
from coe.server import create_app
from coe.server.auth import KeyAuth

KEY, OTHER = "sk-test-0123456789", "sk-other-abcdef"


def make_client(tmp_path, **server):
    engine = fake_engine(tmp_path, server=ServerConfig(api_keys=(KEY, OTHER), **server))
    return TestClient(create_app(engine))


def chat(client, headers=None):
    return client.post("/v1/chat/completions", headers=headers or {}, json={
        "model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as client:
        yield client


@pytest.mark.parametrize("headers", [None, bearer("sk-wrong"), {"Authorization": "Basic abc"}, bearer("")])
def test_v1_routes_need_a_valid_key(client, headers):
    for response in (chat(client, headers), client.get("/v1/models", headers=headers or {}),
                     client.get("/v1/experts", headers=headers or {})):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "sk-wrong" not in response.text and KEY not in response.text


def test_a_valid_key_as_bearer_or_x_api_key(client):
    assert chat(client, bearer(KEY)).status_code == 200
    assert chat(client, {"x-api-key": OTHER}).status_code == 200
    assert client.get("/v1/models", headers=bearer(OTHER)).status_code == 200


def test_health_is_public_metrics_protected_and_the_page_public_by_default(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(KEY)).status_code == 200
    assert client.get("/ui").status_code == 200


def test_public_paths_are_configurable(tmp_path):
    with make_client(tmp_path, public_paths=("/metrics",)) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/metrics").status_code == 200


def test_each_key_has_its_own_rate_limit(tmp_path):
    with make_client(tmp_path, rate_limit_per_minute=3) as client:
        assert [chat(client, bearer(KEY)).status_code for _ in range(3)] == [200, 200, 200]
        limited = chat(client, bearer(KEY))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert chat(client, bearer(OTHER)).status_code == 200  # another key is not affected


def test_the_window_slides():
    now = [0.0]
    auth = KeyAuth([KEY], rate_limit_per_minute=2, clock=lambda: now[0])
    headers = {"authorization": f"Bearer {KEY}"}
    auth.check("/v1/models", headers)
    auth.check("/v1/models", headers)
    with pytest.raises(Exception) as info:
        auth.check("/v1/models", headers)
    assert info.value.http_status == 429 and 59 <= info.value.retry_after_s <= 60
    now[0] = 60.0
    auth.check("/v1/models", headers)


def test_no_keys_means_no_auth(tmp_path):
    with TestClient(create_app(fake_engine(tmp_path))) as client:
        assert chat(client).status_code == 200 and client.get("/metrics").status_code == 200


def test_keys_never_reach_the_logs(client, caplog):
    with caplog.at_level(logging.DEBUG):
        chat(client, bearer("sk-wrong-secret"))
        chat(client, bearer(KEY))
    assert "sk-wrong-secret" not in caplog.text and KEY not in caplog.text


def test_empty_or_blank_keys_are_a_config_error():
    from coe.errors import ConfigError

    with pytest.raises(ConfigError, match="api_keys"):
        ServerConfig(api_keys=("",))
    with pytest.raises(ConfigError, match="public_paths"):
        ServerConfig(public_paths=("/v1/models",))
