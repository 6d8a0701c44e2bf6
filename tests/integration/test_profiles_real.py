"""Profiles over one shared base on a real server: twelve experts at the memory cost of one, no
switch between them, one batch for requests of different profiles, and what each profile adds
(system prompt, few-shot examples, sampling defaults) applied and cached as a prefix."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from coe.backends.memory import process_rss_bytes
from conftest import running

NUM_PROFILES = 12
BASE = """experts:
  - name: smollm2-135m
    source: smollm2-135m
"""
TAIL = """router:
  enabled: false
"""


def profiles_config() -> str:
    lines = [BASE]
    for i in range(NUM_PROFILES):
        lines.append(
            f"""  - name: helper-{i}
    base: smollm2-135m
    system_prompt: "You are helper {i} of a team of twelve. You answer in one short sentence."
    few_shot:
      - {{role: user, content: "What colour is the sky?"}}
      - {{role: assistant, content: "Blue, on a clear day."}}
    sampling: {{temperature: 0, max_tokens: {6 + i}}}
"""
        )
    return "".join(lines) + TAIL


def chat(base_url: str, model: str, content: str = "Name a fruit.", **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)


def experts(base_url: str) -> dict:
    return httpx.get(base_url + "/v1/experts", timeout=10).json()


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def single_rss_bytes(tmp_path_factory) -> int:
    """The base alone, after serving the same kind of requests."""
    with running(tmp_path_factory.mktemp("single"), BASE + TAIL) as server:
        for _ in range(NUM_PROFILES):
            assert chat(server.base_url, "smollm2-135m", max_tokens=8, temperature=0).status_code == 200
        return process_rss_bytes(server.process.pid)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("profiles"), profiles_config()) as server:
        yield server


def test_twelve_profiles_cost_one_base_in_memory_and_never_switch(server, single_rss_bytes):
    assert chat(server.base_url, "helper-0").status_code == 200  # loads the base once
    before = experts(server.base_url)["stats"]
    for i in range(1, NUM_PROFILES):
        response = chat(server.base_url, f"helper-{i}")
        assert response.status_code == 200, response.text
        assert response.json()["model"] == f"helper-{i}"
        assert float(response.headers["x-coe-switch-ms"]) < 1.0  # a hot lease, no move
    after = experts(server.base_url)
    for counter in ("switches", "misses", "warm_hits", "prefetches"):
        assert after["stats"][counter] == before[counter], counter
    assert after["stats"]["bytes_moved"] == before["bytes_moved"]
    rows = {row["name"]: row for row in after["experts"]}
    assert all(rows[f"helper-{i}"]["base"] == "smollm2-135m" for i in range(NUM_PROFILES))
    assert all(rows[f"helper-{i}"]["tier"] == "device" for i in range(NUM_PROFILES))
    assert sum(row["host_bytes"] for row in rows.values()) == rows["smollm2-135m"]["host_bytes"]
    assert process_rss_bytes(server.process.pid) <= 1.1 * single_rss_bytes


def test_four_profiles_arriving_together_decode_in_one_batch(server):
    chat(server.base_url, "helper-0")  # the base is hot
    batches, joined = metric(server.base_url, "coe_batch_size_count"), metric(
        server.base_url, "coe_requests_joined_total"
    )
    sizes = metric(server.base_url, "coe_batch_size_sum")
    wide_steps = wide(server.base_url)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda i: chat(server.base_url, f"helper-{i}", "Count from one to forty in words.",
                           max_tokens=48, temperature=0),
            range(4, 8),
        ))
    assert all(r.status_code == 200 for r in replies)
    assert metric(server.base_url, "coe_batch_size_count") == batches + 1  # one batch opened
    took = metric(server.base_url, "coe_batch_size_sum") - sizes
    assert took + metric(server.base_url, "coe_requests_joined_total") - joined == 4
    assert wide(server.base_url) > wide_steps  # the four profiles shared forward passes


def wide(base_url: str) -> float:
    """Forward passes that decoded more than two sequences together."""
    return metric(base_url, "coe_step_sequences_count") - metric(
        base_url, 'coe_step_sequences_bucket{le="2.0"}'
    )


def test_a_profile_adds_its_prompt_as_a_cached_prefix_and_its_sampling_defaults(server):
    plain = chat(server.base_url, "smollm2-135m", max_tokens=4).json()["usage"]
    first = chat(server.base_url, "helper-3", "Name a vegetable.").json()
    again = chat(server.base_url, "helper-3", "Name a vegetable.").json()
    added = first["usage"]["prompt_tokens"] - plain["prompt_tokens"]
    assert added > 20  # the system prompt and two example messages
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= added
    assert first["usage"]["completion_tokens"] <= 9  # the profile's max_tokens
    longer = chat(server.base_url, "helper-3", "Count from one to forty in words.", max_tokens=30)
    assert longer.json()["usage"]["completion_tokens"] > 9  # the request's own value wins
    own_system = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "helper-3", "messages": [{"role": "system", "content": "Be terse."},
                                          {"role": "user", "content": "Name a vegetable."}]},
        timeout=120).json()
    assert own_system["usage"]["prompt_tokens"] < first["usage"]["prompt_tokens"]  # replaced it
