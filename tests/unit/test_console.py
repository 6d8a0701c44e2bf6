"""The web console's page and JSON routes, in-process on fake experts (the browser tests in
tests/integration/test_console_browser.py drive the same page with a real expert in Chromium)."""
from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from fakes import fake_engine

from coe.config import RouterConfig
from coe.router.base import Router
from coe.router.service import ExpertRouter
from coe.server import create_app


class MathOrCode(Router):
    """Prompts mentioning 'code' are code, the rest math."""

    def __init__(self):
        super().__init__(("math", "code"), 0.25, "chat")

    def probabilities(self, texts):
        return [[0.1, 0.9] if "code" in t else [0.9, 0.1] for t in texts]


@pytest.fixture
def client(tmp_path):
    engine = fake_engine(tmp_path, router=RouterConfig(default_expert="b", budget_params="1B"))
    engine.routing.router = ExpertRouter(MathOrCode(), {"math": "a", "code": "b", "chat": "b"})
    with TestClient(create_app(engine)) as client:
        yield client


def ask(client, text: str):
    return client.post("/v1/chat/completions", json={"model": "coe", "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": text}]})


def test_the_page_is_served_with_every_asset_inline(client):
    response = client.get("/ui")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" in page and "<style>" in page and "coe console" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no CDN, no external asset
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"


def test_routing_counts_recent_decisions_per_category_and_expert(client):
    assert client.get("/v1/routing").json()["decisions"] == {}
    for text in ("add 2 and 2", "multiply 3 by 4", "write code to sort"):
        assert ask(client, text).status_code == 200
    routing = client.get("/v1/routing").json()
    assert routing["decisions"] == {"math": {"a": 2}, "code": {"b": 1}}
    assert routing["map"] == {"math": "a", "code": "b", "chat": "b"} and routing["budget_params"] == 1e9
    assert client.get("/v1/routing?window_s=0.000001").json()["decisions"] == {}


@pytest.mark.parametrize("query", ["window_s=0", "window_s=-5", "window_s=1e9", "window_s=abc"])
def test_a_bad_window_is_a_400_naming_it(client, query):
    response = client.get("/v1/routing?" + query)
    assert response.status_code in (400, 422) and "window_s" in response.text
    assert response.json()["error"]["message"]


def test_pin_unpin_and_prefetch_move_the_expert(client):
    pinned = client.post("/v1/experts/a/pin").json()
    assert pinned["pinned"] and pinned["tier"] == "device"
    assert not client.post("/v1/experts/a/unpin").json()["pinned"]
    client.post("/v1/experts/b/prefetch?tier=host")
    for _ in range(100):
        if client.get("/v1/experts").json()["experts"][1]["tier"] != "disk":
            break
        time.sleep(0.05)
    assert client.get("/v1/experts").json()["experts"][1]["tier"] in ("host", "device")


def test_expert_actions_refuse_unknown_experts_and_tiers(client):
    response = client.post("/v1/experts/ghost/pin")
    assert response.status_code == 404 and "ghost" in response.json()["error"]["message"]
    response = client.post("/v1/experts/a/prefetch?tier=moon")
    assert response.status_code == 400 and response.json()["error"]["param"] == "tier"


def test_experts_show_queue_depth(client):
    body = client.get("/v1/experts").json()
    assert body["queue_depth"] == {} and {e["name"] for e in body["experts"]} == {"a", "b"}
