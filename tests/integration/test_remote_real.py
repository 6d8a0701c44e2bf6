"""A remote expert for real: a second `coe serve` process serves SmolLM2, the first one lists it as
``backend: remote`` next to a local Gemma expert. Requests routed to it and requests naming it are
streamed through; a remote endpoint that is down degrades to the next-best expert."""
from __future__ import annotations

import httpx
import openai
import pytest

from conftest import _free_port, running

pytestmark = pytest.mark.integration

REMOTE_SIDE = """
experts:
  - name: smollm2-135m
    source: smollm2-135m
router:
  enabled: false
"""


def front_config(remote_url: str) -> str:
    return f"""
experts:
  - name: gemma3-270m
    source: gemma3-270m
  - name: far-smollm
    source: {remote_url}
    backend: remote
    params: {{model: smollm2-135m, num_params: 135M, retries: 1, backoff_s: 0.2, connect_timeout_s: 2}}
router:
  default_expert: gemma3-270m
  pins: {{writing: far-smollm}}
"""


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    with running(tmp_path_factory.mktemp("remote-side"), REMOTE_SIDE) as remote_side:
        with running(tmp_path_factory.mktemp("front"), front_config(remote_side.v1)) as front_server:
            yield front_server, remote_side


WRITING = "Write a short poem about autumn leaves falling in the park."


def test_a_routed_request_streams_from_the_remote_expert(front):
    server, remote_side = front
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
            model="coe", max_tokens=16, stream=True, temperature=0.0,
            messages=[{"role": "user", "content": WRITING}]) as response:
        assert response.headers["x-coe-expert"] == "far-smollm" and response.headers["x-coe-tier"] == "remote"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    # the same prompt asked of the remote server directly gives the same greedy text
    direct = openai.OpenAI(base_url=remote_side.v1, api_key="unused", max_retries=0).chat.completions.create(
        model="smollm2-135m", max_tokens=16, temperature=0.0, messages=[{"role": "user", "content": WRITING}])
    assert direct.choices[0].message.content == text


def test_a_named_remote_expert_answers_and_is_listed(front):
    server, remote_side = front
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="far-smollm", max_tokens=8,
                                            messages=[{"role": "user", "content": "Say hello."}])
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > 0
    experts = {e["name"]: e for e in httpx.get(server.v1 + "/experts", timeout=10).json()["experts"]}
    assert experts["far-smollm"]["tier"] == "remote" and experts["far-smollm"]["num_params"] == 135_000_000
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert 'coe_requests_total{expert="far-smollm",outcome="completed"}' in metrics
    assert 'coe_requests_total{expert="smollm2-135m",outcome="completed"}' in httpx.get(
        remote_side.base_url + "/metrics", timeout=10).text


def test_a_remote_endpoint_that_is_down_degrades_to_the_next_best(server_with_config):
    server = server_with_config(front_config(f"http://127.0.0.1:{_free_port()}/v1"))
    routed = httpx.post(server.v1 + "/chat/completions", timeout=300, json={
        "model": "coe", "max_tokens": 8, "messages": [{"role": "user", "content": WRITING}]})
    assert routed.status_code == 200 and routed.headers["x-coe-expert"] == "gemma3-270m"
    named = httpx.post(server.v1 + "/chat/completions", timeout=300, json={
        "model": "far-smollm", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    assert named.status_code == 503 and int(named.headers["retry-after"]) >= 1
    assert "far-smollm" in httpx.get(server.base_url + "/health", timeout=10).json()["unhealthy"]
