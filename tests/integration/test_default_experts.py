"""`coe serve` with no config answers a chat completion from each of the four packaged experts."""
from __future__ import annotations

import openai
import pytest

from coe.config import default_config
from conftest import running

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("expert", [e.name for e in default_config().experts])
def test_each_default_expert_answers(default_server, expert):
    client = openai.OpenAI(base_url=default_server.v1, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=expert, messages=[{"role": "user", "content": "What is 2 + 2? Answer briefly."}],
        max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip() != ""
    assert reply.usage.completion_tokens >= 1


def test_default_models_are_listed_with_header_facts(default_server):
    client = openai.OpenAI(base_url=default_server.v1, api_key="unused", max_retries=0)
    cards = {m.id: m.model_extra.get("coe", {}) for m in client.models.list().data}
    assert set(cards) == {"coe", "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert 1.7e9 < cards["qwen2.5-coder-1.5b"]["num_params"] < 1.8e9
    assert cards["gemma3-270m"]["backend"] == "llama_cpp"


def test_an_unsure_request_gets_the_mapped_generalist_not_the_weakest_expert(default_server, tmp_path):
    """With the default config nobody pins the fallback category: the map chooses its expert
    from the score table's chat row within the budget, so a question the router was unsure about
    is answered by a strong generalist, and the budget is met by the confident categories."""
    import httpx

    from coe.router.service import load_score_table

    card = httpx.get(default_server.v1 + "/models/coe", timeout=30).json()["coe"]
    table = load_score_table(None)
    chat = table.scores["chat"]
    weakest = min(chat, key=chat.get)
    assert card["map"]["chat"] != weakest
    assert chat[card["map"]["chat"]] == max(chat.values())
    # The calibrated threshold decides how unsure is unsure (on chat-style prompts it may be 0:
    # the top category was right however unsure); a server that doubts everything shows the path.
    default = default_config()
    experts = "".join(f"  - name: {e.name}\n    source: {e.source}\n" for e in default.experts)
    unsure = (f"experts:\n{experts}router:\n  budget_params: {default.router.budget_params}\n"
              "  threshold: 0.999\n")
    with running(tmp_path, unsure) as server:
        assert httpx.get(server.v1 + "/models/coe", timeout=30).json()["coe"]["map"] == card["map"]
        reply = httpx.post(server.v1 + "/chat/completions", timeout=300, json={
            "model": "coe", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What causes inflation?"}]}).json()
    assert reply["coe"]["fallback"] is True
    assert reply["coe"]["expert"] == card["map"]["chat"] != weakest
