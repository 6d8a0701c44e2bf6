"""The trained default router end to end: real encoder, real artifact, real CLI and server."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import torch
import pytest

from coe.router import data
from coe.router.learned import LearnedRouter
from coe.router.service import default_artifact_dir

pytestmark = pytest.mark.integration

CODE_PROMPT = "Write a Python function that merges two sorted lists into one sorted list."
STORY_PROMPT = "Write a short poem about the sea at night, in the voice of an old sailor."



@pytest.fixture(scope="module")
def router(coe_home):
    return LearnedRouter.load(default_artifact_dir(coe_home), "chat")


def coe_cli(*args: str, stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coe", *args], input=stdin, capture_output=True,
                          timeout=300, cwd=cwd)


def test_real_router_on_mtbench_prompts(router):
    """MT-Bench is never trained on; the figure in the notes comes from `coe router train`."""
    held = data.mtbench_examples()
    decisions = router.classify([e.text for e in held])
    top = [max(d.probabilities, key=d.probabilities.get) for d in decisions]
    accuracy = sum(t == e.category for t, e in zip(top, held)) / len(held)
    assert accuracy >= 0.6, accuracy


def test_real_router_on_the_chat_style_test_set(router):
    """router/chat/test.jsonl: written by hand, never trained or calibrated on (floor; the
    figure in the notes comes from `coe router train`)."""
    held = [e for e in data.chat_test_examples() if e.source == data.CHAT_TEST_SOURCE]
    decisions = router.classify([e.text for e in held])
    top = [max(d.probabilities, key=d.probabilities.get) for d in decisions]
    assert sum(t == e.category for t, e in zip(top, held)) / len(held) >= 0.85


def test_artifact_records_its_evaluation(router):
    metrics = router.head.meta.metrics
    assert {"val", "test", "mtbench", "chat_dev", "chat_test"} <= set(metrics)
    # calibrated on chat-style prompts: some unsure ones go to the generalist, most do not
    assert 0 < router.head.meta.threshold < 0.9
    assert 0 < metrics["chat_test"]["fallback_rate"] < 0.25
    assert metrics["test"]["n"] > 1000
    assert len(metrics["test"]["confusion"]) == len(router.categories)


def test_default_router_serves_its_tuned_encoder_layers(router, coe_home):
    """`coe router train` tunes the encoder's top 2 layers; the served encoder is built with them
    (int8), and they are not the packaged weights."""
    from coe.router.encoder import SentenceEncoder
    from coe.router.head import LAYERS_FILE

    assert router.head.meta.encoder["tuned_layers"] == 2
    assert router.encoder.tuned_layers == 2 and router.encoder.precision == "int8"
    assert (default_artifact_dir(coe_home) / LAYERS_FILE).is_file()
    texts = ["Summarise this abstract for me: 'Participants were randomly assigned to two diets.'"]
    packaged = SentenceEncoder(max_tokens=router.encoder.max_tokens).encode(texts)
    assert torch.nn.functional.cosine_similarity(packaged, router.encoder.encode(texts)).item() < 0.99


def test_route_cli_prints_probabilities_and_expert():
    out = coe_cli("route", CODE_PROMPT)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "category: code" in text
    assert "expert: qwen2.5-coder-1.5b" in text  # the default map under the default budget
    assert "alternatives:" in text


def test_route_jsonl_survives_bad_lines():
    lines = [json.dumps({"prompt": CODE_PROMPT}).encode(), b"\xff\xfe not utf-8",
             json.dumps({"prompt": ""}).encode(), b"{not json", json.dumps({"text": "x"}).encode(),
             json.dumps({"prompt": "history " * 12_500}).encode(),  # 100k characters
             json.dumps({"prompt": "Solve 3x + 5 = 20 for x."}).encode()]
    out = coe_cli("route", "--jsonl", stdin=b"\n".join(lines) + b"\n")
    assert out.returncode == 1  # some lines failed, all were answered
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(rows) == len(lines)
    assert rows[0]["category"] == "code" and rows[0]["expert"] and 0 < rows[0]["confidence"] <= 1
    assert [r["line"] for r in rows if "error" in r] == [2, 3, 4, 5]
    assert "UTF-8" in rows[1]["error"]["message"] and "empty" in rows[2]["error"]["message"]
    assert rows[5]["category"] in data.CATEGORIES
    assert rows[6]["category"] == "math"


def test_route_cli_with_missing_or_corrupt_artifact(tmp_path, routed_config):
    missing = tmp_path / "missing.yaml"
    missing.write_text(routed_config + f"  artifact: {tmp_path / 'nowhere'}\n")
    out = coe_cli("route", "--config", str(missing), "hello")
    assert out.returncode == 2
    assert "no trained router" in out.stderr.decode() and "Traceback" not in out.stderr.decode()

    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "router.json").write_text("{ not json")
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text(routed_config + f"  artifact: {corrupt_dir}\n")
    out = coe_cli("route", "--config", str(corrupt), "hello")
    assert out.returncode == 2
    assert "corrupt router metadata" in out.stderr.decode()


def _chat(server, messages, **extra) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=120,
                      json={"model": "coe", "messages": messages, "max_tokens": 4,
                            "temperature": 0, **extra})


def test_model_coe_routes_through_the_server(routed_server):
    code = _chat(routed_server, [{"role": "user", "content": CODE_PROMPT}])
    assert code.status_code == 200, code.text
    assert code.headers["x-coe-category"] == "code"
    assert code.headers["x-coe-expert"] == "gemma3-270m"  # pinned in the config
    assert 0 < float(code.headers["x-coe-confidence"]) <= 1
    info = code.json()["coe"]
    assert info["category"] == "code" and info["expert"] == "gemma3-270m"
    assert len(info["alternatives"]) == 3 and all("probability" in a for a in info["alternatives"])

    poem = _chat(routed_server, [{"role": "user", "content": STORY_PROMPT}])
    assert poem.status_code == 200
    assert poem.headers["x-coe-category"] == "writing"
    chosen = httpx.get(routed_server.v1 + "/models/coe", timeout=30).json()["coe"]["map"]["writing"]
    assert poem.headers["x-coe-expert"] == chosen  # the measured map decides


def test_conversation_stays_on_its_expert(routed_server):
    turns = [{"role": "user", "content": CODE_PROMPT},
             {"role": "assistant", "content": "def merge(a, b): ..."},
             {"role": "user", "content": "Thanks! Can you make it shorter?"}]
    reply = _chat(routed_server, turns)
    assert reply.status_code == 200
    assert reply.headers["x-coe-expert"] == "gemma3-270m"


def test_tools_route_to_tool_use(routed_server):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    reply = _chat(routed_server, [{"role": "user", "content": "Is it raining in Paris?"}],
                  tools=tools)
    assert reply.status_code == 200
    assert reply.headers["x-coe-category"] == "tool_use"


def test_bad_routed_requests_get_4xx_and_the_server_lives(routed_server):
    empty = _chat(routed_server, [{"role": "user", "content": "   "}])
    assert empty.status_code == 400
    assert "no user message" in empty.json()["error"]["message"]
    system_only = _chat(routed_server, [{"role": "system", "content": "be nice"}])
    assert system_only.status_code == 400
    huge = _chat(routed_server, [{"role": "user", "content": "x" * 300_000}])
    assert huge.status_code == 400 and "characters" in huge.json()["error"]["message"]
    assert _chat(routed_server, [{"role": "user", "content": CODE_PROMPT}]).status_code == 200


def test_models_card_shows_the_map(routed_server):
    card = httpx.get(routed_server.v1 + "/models/coe", timeout=30).json()
    assert card["coe"]["routed"] is True
    assert card["coe"]["map"]["code"] == "gemma3-270m"
    assert card["coe"]["map"]["chat"] == "smollm2-135m"
    assert "measured by `coe eval" in card["coe"]["scores_source"]


def test_server_without_artifact_falls_back_and_says_why(tmp_path, server_with_config,
                                                        routed_config):
    server = server_with_config(routed_config + f"  artifact: {tmp_path / 'nowhere'}\n")
    reply = _chat(server, [{"role": "user", "content": CODE_PROMPT}])
    assert reply.status_code == 200
    info = reply.json()["coe"]
    assert info["expert"] == "smollm2-135m" and info["fallback"] is True
    assert "router unavailable" in info["reason"]


def test_real_encoder_int8_matches_float_and_ignores_batch_neighbours():
    from coe.router.encoder import SentenceEncoder

    texts = ["What is the derivative of x^2 sin x?", "Write a haiku about autumn.",
             "A 45-year-old man presents with chest pain radiating to his left arm.",
             "Which treaty ended the Thirty Years' War?", "word " * 500]
    exact = SentenceEncoder(precision="float32", cache_entries=0).encode(texts)
    int8 = SentenceEncoder(precision="int8", cache_entries=0)
    batched = int8.encode(texts)
    assert (exact * batched).sum(-1).min() > 0.99
    alone = torch.cat([int8.encode([t]) for t in texts])
    assert (alone * batched).sum(-1).min() > 0.9999
    similar = exact[0] @ SentenceEncoder(precision="float32").encode(
        ["Differentiate x squared times sine of x."])[0]
    assert similar > exact[0] @ exact[1]  # meaning, not noise
