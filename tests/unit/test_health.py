"""Expert health: backoff after failures, routed requests moving to the next-best healthy expert
before any byte is sent, 503 + Retry-After for a named expert that is backing off (fake experts;
the real counterpart is tests/integration/test_faults_real.py)."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from fakes import LetterBackend, fake_engine

from coe.config import RouterConfig
from coe.engine.health import ExpertHealth, HealthState
from coe.errors import LoadError
from coe.router.base import Router
from coe.router.mapping import ScoreTable
from coe.router.service import ExpertRouter
from coe.server import create_app


def test_backoff_doubles_caps_and_clears_on_success():
    health = ExpertHealth(base_backoff_s=5, max_backoff_s=12)
    assert health.is_healthy("a", 0.0)
    assert health.failed("a", 0.0, "boom") == 5
    assert not health.is_healthy("a", 4.9) and health.retry_after_s("a", 1.0) == pytest.approx(4.0)
    assert health.is_healthy("a", 5.0)
    assert health.failed("a", 5.0, "boom") == 10
    assert health.failed("a", 15.0, "boom") == 12  # capped
    assert health.snapshot(16.0)["a"] == HealthState(healthy=False, failures=3, retry_after_s=11.0, reason="boom")
    assert health.reason("a") == "boom" and health.reason("never-failed") == ""
    health.succeeded("a")
    assert health.is_healthy("a", 16.0) and health.snapshot(16.0) == {}


class AlwaysMath(Router):
    def __init__(self):
        super().__init__(("math", "code"), 0.25, "chat")

    def probabilities(self, texts):
        return [[0.9, 0.1] for _ in texts]


@pytest.fixture
def broken_a(tmp_path):
    """Experts a (best at math, but its weights fail to load), b and c; "coe" routes math to a."""
    backend = LetterBackend()
    backend.fail_read["a"] = LoadError("expert a: the weights are truncated")
    engine = fake_engine(tmp_path, names=("a", "b", "c"), backend=backend, router=RouterConfig(default_expert="c"))
    table = ScoreTable.from_dict({"source": "test", "scores": {"math": {"a": 0.9, "b": 0.7, "c": 0.1},
                                                                "code": {"a": 0.1, "b": 0.2, "c": 0.3}}})
    engine.routing.router = ExpertRouter(AlwaysMath(), {"math": "a", "code": "c", "chat": "c"}, table=table)
    with TestClient(create_app(engine)) as client:
        yield client, engine


def ask(client, model: str):
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": "2+2"}]})


def test_a_routed_request_moves_to_the_next_best_healthy_expert(broken_a):
    client, engine = broken_a
    response = ask(client, "coe")
    assert response.status_code == 200, response.text
    info = response.json()["coe"]
    assert info["expert"] == "b" and info["planned_expert"] == "a"  # b scores next best on math
    assert "a is unavailable" in info["reason"] and "truncated" in info["reason"]
    assert response.headers["x-coe-expert"] == "b"
    assert not engine.health.is_healthy("a", time.monotonic())
    reads = engine.fake.reads["a"]
    again = ask(client, "coe")  # a is backing off: routed straight to b, no new load attempt
    assert again.status_code == 200 and again.json()["coe"]["expert"] == "b"
    assert engine.fake.reads["a"] == reads


def test_a_named_expert_that_is_backing_off_is_503_with_retry_after(broken_a):
    client, _ = broken_a
    first = ask(client, "a")
    assert first.status_code == 503 and "truncated" in first.json()["error"]["message"]
    assert int(first.headers["retry-after"]) >= 1
    second = ask(client, "a")
    assert second.status_code == 503 and second.json()["error"]["code"] == "expert_unavailable"
    assert int(second.headers["retry-after"]) >= 1
    assert ask(client, "b").status_code == 200 and ask(client, "c").status_code == 200  # the others serve


def test_a_runner_crash_mid_stream_marks_the_expert_unhealthy(tmp_path):
    backend = LetterBackend()
    backend.runner_options["a"] = {"fail_after": 1}
    engine = fake_engine(tmp_path, backend=backend)
    with TestClient(create_app(engine)) as client:
        response = client.post("/v1/chat/completions", json={
            "model": "a", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 200 and '"error"' in response.text  # the stream ends with an error
        assert ask(client, "a").status_code == 503
        assert ask(client, "b").status_code == 200


def test_running_out_of_memory_while_loading_is_reported_not_fatal(tmp_path):
    backend = LetterBackend()
    backend.fail_read["a"] = MemoryError()
    engine = fake_engine(tmp_path, backend=backend)
    with TestClient(create_app(engine)) as client:
        response = ask(client, "a")
        assert response.status_code == 503 and "MemoryError" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert ask(client, "b").status_code == 200
        assert client.get("/health").json()["unhealthy"]["a"]["reason"].endswith("MemoryError: ")
