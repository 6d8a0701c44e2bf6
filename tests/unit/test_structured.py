"""Grammar-constrained decoding end to end on a tiny random torch expert (byte vocabulary): even a
model that writes noise writes valid JSON, a schema's bounds hold, a required tool call is
well-formed, and constraints llguidance cannot enforce are refused naming the feature."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

from coe.backends.memory import HostBufferPool
from coe.backends.torch import TorchBackend
from coe.config import ExpertConfig
from coe.engine.batch import generate
from coe.engine.structured import json_object_grammar, json_schema_grammar, tool_call_grammar
from coe.engine.tools import parse_tool_calls
from coe.errors import InvalidRequest
from coe.types import Request, SamplingParams, Tools

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMAS = [
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tag": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["tag", "ok"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
    {
        "type": "object",
        "properties": {
            "inner": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "required": ["inner"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    backend = TorchBackend()
    expert = ExpertConfig("tiny", str(tiny_checkpoint), backend="torch_hf")
    return backend.materialize(backend.read(expert, tiny_checkpoint, HostBufferPool()))


def complete(runner, grammar: str, seed: int, max_tokens: int = 120, prompt: str = "data: "):
    request = Request(
        "tiny",
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=grammar),
        prompt=prompt,
    )
    (final,) = [e for e in generate(runner, [request]) if e.is_final]
    assert final.error is None, final.error
    return final.completion


@pytest.mark.parametrize("schema", SCHEMAS)
def test_sampled_noise_under_a_schema_is_valid_json_that_validates(runner, schema):
    grammar = json_schema_grammar(schema)
    for seed in range(4):
        completion = complete(runner, grammar, seed)
        assert completion.finish_reason == "stop", (
            completion
        )  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_is_any_object_unless_cut_at_max_tokens(runner):
    finished = 0
    for seed in range(4):
        completion = complete(runner, json_object_grammar(), seed, max_tokens=300)
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
            finished += 1
        else:  # noise may write one long string: cut, as OpenAI's are at max_tokens
            assert completion.finish_reason == "length" and completion.text.startswith("{")
    assert finished


def test_a_required_call_is_one_of_the_offered_functions_with_valid_arguments(runner):
    weather = {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    }
    tools = Tools(
        (
            weather,
            {
                "name": "noop",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            },
        ),
        "required",
        False,
    )
    for seed in range(4):
        text = complete(runner, tool_call_grammar(tools), seed).text
        _, calls = parse_tool_calls(text, tools.names)
        assert len(calls) == 1 and calls[0].name in tools.names, text
        if calls[0].name == "get_weather":
            jsonschema.validate(json.loads(calls[0].arguments), weather["parameters"])
    named = Tools(tools.functions, "noop", False)
    _, calls = parse_tool_calls(complete(runner, tool_call_grammar(named), 0).text, tools.names)
    assert [c.name for c in calls] == ["noop"]


def test_parallel_required_calls_are_one_list_without_undeclared_arguments(runner):
    weather = {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}},
    }
    tools = Tools((weather,), "required", True)
    lists = 0
    for seed in range(6):
        completion = complete(runner, tool_call_grammar(tools), seed, max_tokens=300)
        if completion.finish_reason != "stop":
            continue  # noise kept adding calls until max_tokens
        body = completion.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        assert isinstance(json.loads(body), list), completion.text  # one block, closed by "]"
        _, calls = parse_tool_calls(completion.text, tools.names)
        assert calls and all(set(json.loads(c.arguments)) <= {"unit"} for c in calls), (
            completion.text
        )
        lists += 1
    assert lists


def test_a_schema_feature_llguidance_cannot_enforce_is_refused_by_name():
    with pytest.raises(InvalidRequest, match="dependentSchemas") as refused:
        json_schema_grammar({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}})
    assert refused.value.param == "response_format"
    with pytest.raises(InvalidRequest, match="not a JSON schema"):
        json_schema_grammar("not a schema")  # type: ignore[arg-type]


def test_logprobs_penalties_and_bias_through_the_runner(runner):
    def ids_of(**sampling):
        request = Request(
            "tiny",
            SamplingParams(max_tokens=40, temperature=0.0, **sampling),
            prompt="The quick brown",
        )
        (final,) = [e for e in generate(runner, [request]) if e.is_final]
        return final.completion

    plain = ids_of(logprobs=2)
    assert len(plain.logprobs) == plain.completion_tokens
    assert all(
        e.logprob <= 0 and e.top[0][0] == e.token for e in plain.logprobs
    )  # greedy: chosen is top-1
    first = plain.logprobs[0].token
    banned = ids_of(logit_bias=((first[0], -100.0),), logprobs=0)
    assert banned.text[:1].encode() != first and first not in [e.token for e in banned.logprobs]
    penalised = ids_of(frequency_penalty=2.0, logprobs=0)
    most = Counter(e.token for e in plain.logprobs).most_common(1)[0][1]
    assert Counter(e.token for e in penalised.logprobs).most_common(1)[0][1] < most
