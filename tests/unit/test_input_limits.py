"""Bad input gets the right 4xx naming the field, and the server keeps serving (fake experts)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fakes import fake_engine

from coe.config import ServerConfig
from coe.server import create_app

LIMITS = ServerConfig(max_body_bytes=2048, max_messages=4, max_tokens_limit=64)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = fake_engine(tmp_path_factory.mktemp("limits"), server=LIMITS)
    with TestClient(create_app(engine)) as client:
        yield client


def chat(client, **fields):
    body = {"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **fields}
    return client.post("/v1/chat/completions", json=body)


def assert_refused(response, status: int, param: str | None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413_with_or_without_a_length(client):
    big = {"model": "a", "messages": [{"role": "user", "content": "x" * 4096}]}
    assert_refused(client.post("/v1/chat/completions", json=big), 413, "body")
    chunks = iter([json.dumps(big).encode()[i:i + 512] for i in range(0, 5000, 512)])
    assert_refused(client.post("/v1/chat/completions", content=chunks), 413, "body")
    assert chat(client).status_code == 200


def test_too_many_messages_is_400(client):
    messages = [{"role": "user", "content": "hi"}] * 5
    assert_refused(chat(client, messages=messages), 400, "messages")


def test_unknown_fields_are_refused_and_openai_ones_ignored(client):
    assert_refused(chat(client, temprature=0.5), 400, "temprature")
    assert chat(client, user="someone", frequency_penalty=0.1, metadata={"k": "v"}).status_code == 200


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": [1]}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"), ({"n": 17}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"dependentSchemas": {"a": {}}}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities.1"), ({"web_search_options": {}}, "web_search_options"),
    ({"keep_alive": "5 minutes"}, "keep_alive"), ({"keep_alive": [5]}, "keep_alive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"max_tokens": 65}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role")])
def test_out_of_range_parameters_name_the_field(client, fields, param):
    assert_refused(chat(client, **fields), 400, param)


@pytest.mark.parametrize("fields, param", [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
                                           ({"logprobs": 6}, "logprobs"), ({"prompt": ["a", "b"]}, "prompt"),
                                           ({"suffix": "x"}, "suffix")])
def test_completions_refuse_what_coe_cannot_honour(client, fields, param):
    response = client.post("/v1/completions", json={"model": "a", "max_tokens": 2, "prompt": "hi", **fields})
    assert_refused(response, 400, param)


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc/passwd", "a/../b", "~root", "a\x00"])
def test_model_names_never_reach_the_filesystem(client, model):
    response = chat(client, model=model)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "passwd" not in response.json()["error"]["message"].replace(model, "")


def test_the_server_still_serves_after_all_that(client):
    assert chat(client).status_code == 200
