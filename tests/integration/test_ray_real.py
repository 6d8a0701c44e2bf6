"""`coe serve --ray` for real: a local Ray cluster on this machine, an ingress and 2 expert replicas
serving the packaged SmolLM2 and Gemma experts, called through the official `openai` client."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import running

pytestmark = pytest.mark.integration
pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed (pip install 'coe[ray]')")

RAY_CONFIG = """
experts:
  - name: smollm2-135m
    source: smollm2-135m
    params: {n_threads: 1}
  - name: gemma3-270m
    source: gemma3-270m
    params: {n_threads: 1}
router:
  default_expert: smollm2-135m
  pins: {code: gemma3-270m}
ray:
  replicas: 2
"""


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("ray"), RAY_CONFIG, ("--ray",)) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def ask(server, model: str, content: str = "Hello", **extra) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 6, "messages": [{"role": "user", "content": content}], **extra})


def test_a_routed_request_is_answered_through_the_ingress(ray_server):
    raw = client(ray_server).chat.completions.with_raw_response.create(
        model="coe", max_tokens=8, messages=[{"role": "user", "content": "Write a Python function that "
                                              "returns the sum of a list of integers."}])
    answer = raw.parse()
    assert raw.headers["x-coe-expert"] == "gemma3-270m" and raw.headers["x-coe-category"] == "code"
    assert raw.headers["x-coe-replica"] and raw.headers["x-coe-tier"] in ("device", "host", "disk")
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0


def test_streaming_through_the_ingress(ray_server):
    stream = client(ray_server).chat.completions.create(
        model="smollm2-135m", max_tokens=8, stream=True, temperature=0.0,
        messages=[{"role": "user", "content": "Count from one to five."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_each_expert_sticks_to_a_replica_and_both_replicas_serve(ray_server):
    replicas: dict[str, set[str]] = {"smollm2-135m": set(), "gemma3-270m": set()}
    for model in replicas:  # first sight of each expert; give the replica time to report it holds it
        replicas[model].add(ask(ray_server, model).headers["x-coe-replica"])
        time.sleep(2)
    for _ in range(3):
        for model in replicas:
            response = ask(ray_server, model)
            assert response.status_code == 200, response.text
            replicas[model].add(response.headers["x-coe-replica"])
    assert all(len(ids) == 1 for ids in replicas.values()), replicas  # multiplexing: back to the holder
    assert len(set.union(*replicas.values())) == 2, replicas          # the two experts on two replicas


def test_errors_keep_their_status_through_the_replicas(ray_server):
    too_long = ask(ray_server, "smollm2-135m", content="word " * 9000)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert ask(ray_server, "no-such-expert").status_code == 404
    models = [m["id"] for m in httpx.get(ray_server.v1 + "/models", timeout=10).json()["data"]]
    assert models == ["coe", "smollm2-135m", "gemma3-270m"]


def test_the_ingress_shows_the_replicas_caches(ray_server):
    for model in ("smollm2-135m", "gemma3-270m"):
        assert ask(ray_server, model).status_code == 200
    deadline = time.monotonic() + 30  # replicas report every 2 s
    while True:
        snapshot = httpx.get(ray_server.v1 + "/experts", timeout=10).json()
        experts = {e["name"]: e for e in snapshot["experts"]}
        if all(experts[m]["state"] == "hot" for m in ("smollm2-135m", "gemma3-270m")) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(snapshot["replicas"]) == 2, snapshot
    for model in ("smollm2-135m", "gemma3-270m"):
        assert experts[model]["state"] == "hot" and experts[model]["device_bytes"] > 0, experts[model]
        assert "hot" in experts[model]["replicas"].values()
    health = httpx.get(ray_server.base_url + "/health", timeout=10).json()
    assert health["experts"] == {"smollm2-135m": "hot", "gemma3-270m": "hot"}, health
    metrics = httpx.get(ray_server.base_url + "/metrics", timeout=10).text
    lookups = [line for line in metrics.splitlines() if line.startswith("coe_cache_lookups_total")]
    assert sum(float(line.split()[-1]) for line in lookups) >= 2, lookups
