"""Idle unload on a real server: an unused expert moves down a tier per `cache.idle_unload_s`, and
a request's `keep_alive` (Ollama's field) overrides it for its expert."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import TWO_EXPERTS, running

CONFIG = TWO_EXPERTS + """  enabled: false
cache:
  idle_unload_s: 2
"""


def tiers(base_url: str) -> dict[str, str]:
    shape = httpx.get(base_url + "/v1/experts", timeout=10).json()
    return {row["name"]: row["tier"] for row in shape["experts"]}


def wait_for(base_url: str, wanted: dict[str, str], timeout_s: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = tiers(base_url)
        if all(now[name] == tier for name, tier in wanted.items()):
            return now
        time.sleep(0.2)
    return tiers(base_url)


def chat(base_url: str, model: str, **fields) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}], **fields}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("idle"), CONFIG) as server:
        yield server


def test_an_unused_expert_moves_down_a_tier_per_idle_time_and_keep_alive_overrides_it(server):
    assert chat(server.base_url, "gemma3-270m", keep_alive=-1).status_code == 200  # forever
    assert chat(server.base_url, "smollm2-135m").status_code == 200
    assert tiers(server.base_url)["smollm2-135m"] == "device"
    assert wait_for(server.base_url, {"smollm2-135m": "host"})["smollm2-135m"] == "host"
    assert wait_for(server.base_url, {"smollm2-135m": "disk"})["smollm2-135m"] == "disk"
    assert tiers(server.base_url)["gemma3-270m"] == "device"  # keep_alive -1 held it
    stats = httpx.get(server.base_url + "/v1/experts", timeout=10).json()["stats"]
    assert stats["idle_unloads"] == 2

    assert chat(server.base_url, "smollm2-135m", keep_alive="10m").status_code == 200
    time.sleep(4)  # two idle times: it would have left the device
    assert tiers(server.base_url)["smollm2-135m"] == "device"
    assert chat(server.base_url, "smollm2-135m", keep_alive=0).status_code == 200  # Ollama's unload
    assert wait_for(server.base_url, {"smollm2-135m": "host"}, 5.0)["smollm2-135m"] == "host"


def test_a_bad_keep_alive_is_a_400_naming_it(server):
    response = chat(server.base_url, "smollm2-135m", keep_alive="soon")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "keep_alive"
