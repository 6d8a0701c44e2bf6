"""Fault injection on a real `coe serve` with the real packaged experts: a truncated weight file,
a missing one, and an expert pinned to a category that cannot load. The server stays up, the
other experts keep serving, routed requests move to the next-best healthy expert before any byte
is sent, and named requests get 503 with Retry-After. (Client disconnects, SIGTERM during streams
and request timeouts are injected in test_serving_real.py; crashes mid-stream in
tests/unit/test_health.py.)"""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def faulty_server(server_with_config, coe_home, tmp_path):
    smollm = next((coe_home / "models").glob("**/*SmolLM2*.gguf"), None) or next(coe_home.glob("**/*.gguf"))
    truncated = tmp_path / "truncated.gguf"
    data = smollm.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    config = f"""
experts:
  - name: smollm2-135m
    source: smollm2-135m
  - name: truncated
    source: {truncated}
  - name: missing
    source: {tmp_path / "gone.gguf"}
router:
  default_expert: smollm2-135m
  pins: {{writing: truncated}}
"""
    return server_with_config(config)


def chat(server, model: str, content: str = "Hello", **extra):
    return httpx.post(server.v1 + "/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra})


@pytest.mark.parametrize("model, words", [("truncated", "truncated"), ("missing", "gone.gguf")])
def test_a_broken_expert_is_503_with_retry_after_and_the_others_serve(faulty_server, model, words):
    first = chat(faulty_server, model)
    assert first.status_code == 503, first.text
    assert int(first.headers["retry-after"]) >= 1 and first.json()["error"]["message"]
    second = chat(faulty_server, model)  # backing off: refused at once
    assert second.status_code == 503 and second.json()["error"]["code"] in ("expert_unavailable", "load_failed",
                                                                            "model_unavailable")
    assert chat(faulty_server, "smollm2-135m").status_code == 200
    health = httpx.get(faulty_server.base_url + "/health", timeout=10).json()
    assert model in health["unhealthy"] and health["status"] == "ok"


def test_a_routed_request_falls_back_before_any_byte_is_sent(faulty_server):
    client = openai.OpenAI(base_url=faulty_server.v1, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="coe", max_tokens=8, stream=True,
        messages=[{"role": "user", "content": "Write a short poem about autumn leaves."}])
    chunks = list(stream)
    info = chunks[0].model_extra["coe"]
    assert info["category"] == "writing" and info["planned_expert"] == "truncated"
    assert info["expert"] == "smollm2-135m" and "truncated is unavailable" in info["reason"]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    again = chat(faulty_server, "coe", "Write a limerick about a cat.")
    assert again.status_code == 200 and again.json()["coe"]["expert"] == "smollm2-135m"
