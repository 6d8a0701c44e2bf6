"""What agents and programs need of an OpenAI-compatible server, through the official `openai`
SDK against a real `coe serve` with the real Qwen and SmolLM2 experts: tool calls (a round trip,
streamed deltas, required, named, parallel), structured outputs (20 JSON schemas at temperature
0.8, json_object), logprobs, n, penalties and logit_bias, a real agent library's tool loop, and
routing: a request with tools goes to an expert that can call them."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import openai
import pytest

from conftest import running

pytestmark = pytest.mark.integration

SMALL_QWEN, LARGE_QWEN, SMOL = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"
CONFIG = f"""
experts:
  - name: {LARGE_QWEN}
    source: {LARGE_QWEN}
  - name: {SMALL_QWEN}
    source: {SMALL_QWEN}
  - name: {SMOL}
    source: {SMOL}
router:
  enabled: false
cache:
  max_hot_experts: 3
"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now",
        "parameters": {"type": "object", "properties": {}},
    },
}
PARIS = [{"role": "user", "content": "What is the temperature in Paris right now?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("contract"), CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def arguments(call) -> dict:
    return json.loads(call.function.arguments)


# ---- tools ---------------------------------------------------------------------------------------


def test_a_tool_round_trip_call_result_answer(client):
    messages = [
        {"role": "system", "content": "Use the tools when needed, then answer in plain English."},
        *PARIS,
    ]
    first = client.chat.completions.create(
        model=LARGE_QWEN,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert arguments(call)["city"].lower() == "paris"
    messages += [
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": "The temperature in Paris is 23 degrees Celsius and the sky is sunny.",
        },
    ]
    answer = client.chat.completions.create(
        model=LARGE_QWEN,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=60,
    )
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "23" in answer.choices[0].message.content  # the answer uses the tool's result


def test_streamed_tool_call_deltas_are_assembled_by_the_sdk(client):
    with client.chat.completions.stream(
        model=SMALL_QWEN,
        messages=PARIS,
        tools=[WEATHER],
        temperature=0,
        tool_choice="required",
        max_tokens=150,
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(arguments(call), WEATHER["function"]["parameters"])


def test_a_named_tool_choice_calls_that_function_even_when_the_prompt_wants_another(client):
    reply = client.chat.completions.create(
        model=SMALL_QWEN,
        messages=PARIS,
        tools=[WEATHER, TIME],
        temperature=0.8,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]


def test_required_with_parallel_calls_allows_several_and_parallel_off_allows_one(client):
    twice = [{"role": "user", "content": "Get the weather in Paris and the weather in Rome."}]
    reply = client.chat.completions.create(
        model=LARGE_QWEN,
        messages=twice,
        tools=[WEATHER],
        temperature=0,
        tool_choice="required",
        max_tokens=120,
    )
    cities = [arguments(c)["city"] for c in reply.choices[0].message.tool_calls]
    assert cities == ["Paris", "Rome"]
    single = client.chat.completions.create(
        model=LARGE_QWEN,
        messages=twice,
        tools=[WEATHER],
        temperature=0,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
    )
    assert len(single.choices[0].message.tool_calls) == 1


def test_an_expert_without_a_tool_format_gets_coes_and_its_calls_are_read(client):
    reply = client.chat.completions.create(
        model=SMOL,
        messages=PARIS,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in arguments(call)


def test_a_real_agent_library_drives_a_tool_loop(server):
    """The OpenAI Agents SDK: the model calls a Python function, the SDK runs it and sends the
    result back, and the model answers."""
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # the SDK would send traces to OpenAI
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"The weather in {city} is 23 degrees Celsius and sunny."

    model = OpenAIChatCompletionsModel(
        model=LARGE_QWEN,
        openai_client=openai.AsyncOpenAI(
            base_url=server.v1, api_key="unused", max_retries=0, timeout=300
        ),
    )
    agent = Agent(
        name="weather",
        instructions="Use the tools when needed, then answer the user in plain English.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=80),
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=8))
    assert calls and all(
        city == "Paris" for city in calls
    )  # the SDK ran the function the model called
    assert (
        len(result.raw_responses) == len(calls) + 1
    )  # each call's result went back to the model ...
    assert isinstance(
        result.final_output, str
    )  # ... until it answered (a 1.5B model may answer "")
    assert not any(
        type(item).__name__ == "ResponseFunctionToolCall"
        for item in result.raw_responses[-1].output
    )


# ---- structured outputs --------------------------------------------------------------------------


def schema(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": required or list(properties),
        "additionalProperties": False,
    }


SCHEMAS = [
    schema({"name": {"type": "string", "maxLength": 30}}),
    schema({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    schema({"price": {"type": "number", "minimum": 0.5, "maximum": 99.5}}),
    schema({"ok": {"type": "boolean"}}),
    schema({"color": {"enum": ["red", "green", "blue"]}}),
    schema(
        {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    schema(
        {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 5},
                "minItems": 2,
                "maxItems": 4,
            }
        }
    ),
    schema(
        {
            "person": schema(
                {
                    "first": {"type": "string", "maxLength": 20},
                    "last": {"type": "string", "maxLength": 20},
                }
            )
        }
    ),
    schema(
        {
            "city": {"type": "string", "maxLength": 25},
            "country": {"type": "string", "maxLength": 25},
            "population": {"type": "integer", "minimum": 0},
        }
    ),
    schema(
        {
            "title": {"type": "string", "maxLength": 40},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        },
        ["title"],
    ),
    schema({"answer": {"type": "integer"}, "explanation": {"type": "string", "maxLength": 60}}),
    schema(
        {
            "status": {"enum": ["open", "closed"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 10},
        }
    ),
    schema({"point": schema({"x": {"type": "number"}, "y": {"type": "number"}})}),
    schema(
        {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": schema(
                    {
                        "id": {"type": "integer", "minimum": 1},
                        "label": {"type": "string", "maxLength": 10},
                    }
                ),
            }
        }
    ),
    schema(
        {
            "language": {"enum": ["python", "rust", "go"]},
            "version": {"type": "string", "maxLength": 8},
        }
    ),
    schema(
        {"yes": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}
    ),
    schema(
        {
            "nested": schema(
                {"inner": schema({"value": {"type": "integer", "minimum": -5, "maximum": 5}})}
            )
        }
    ),
    schema(
        {
            "words": {
                "type": "array",
                "items": {"enum": ["alpha", "beta", "gamma"]},
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    schema(
        {"email": {"type": "string", "maxLength": 40}, "verified": {"type": "boolean"}}, ["email"]
    ),
    schema(
        {
            "matrix": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            }
        }
    ),
    schema(
        {
            "level": {"type": "integer", "minimum": 1, "maximum": 3},
            "note": {"type": "string", "maxLength": 20},
        },
        ["level"],
    ),
]


def test_twenty_json_schemas_at_temperature_0_8_every_output_validates(client):
    assert len(SCHEMAS) >= 20
    for n, spec in enumerate(SCHEMAS):
        reply = client.chat.completions.create(
            model=SMALL_QWEN,
            temperature=0.8,
            max_tokens=200,
            seed=n,
            messages=[{"role": "user", "content": "Fill in an example record."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{n}", "schema": spec, "strict": True},
            },
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (n, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), spec)


def test_json_object_is_a_json_object(client):
    reply = client.chat.completions.create(
        model=SMALL_QWEN,
        max_tokens=400,  # a sampled object cut off by max_tokens is not JSON (finish_reason length)
        temperature=0.8,
        seed=3,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_an_unsupported_schema_is_a_400_naming_the_feature(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=SMALL_QWEN,
            messages=PARIS,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
                },
            },
        )
    assert "dependentSchemas" in refused.value.message


# ---- logprobs, n, penalties, logit_bias -----------------------------------------------------------


def test_greedy_logprobs_the_chosen_token_is_the_top_one(client):
    reply = client.chat.completions.create(
        model=SMALL_QWEN,
        messages=PARIS,
        logprobs=True,
        top_logprobs=5,
        max_tokens=12,
        temperature=0,
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and e.logprob <= 0 and all(lp <= 0 for lp in tops)
        assert tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(
            e.logprob
        )


def test_completions_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(
        model=SMOL, prompt="The capital of France is", logprobs=2, max_tokens=5, temperature=0
    )
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_n_choices_are_distinct_samples_of_one_prompt(client):
    def ask():
        return client.chat.completions.create(
            model=SMALL_QWEN,
            messages=[{"role": "user", "content": "Name a color."}],
            n=3,
            temperature=1.0,
            seed=11,
            max_tokens=12,
        )

    first = ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in first.choices)
    assert len({c.message.content for c in first.choices}) > 1  # seeds seed, seed + 1, seed + 2
    assert first.usage.completion_tokens <= 3 * 12
    assert (
        ask().usage.prompt_tokens_details.cached_tokens > 0
    )  # the prompt's cells stay for the next call


def token_id(coe_home, expert: str, token: str) -> int:
    """The id of ``token`` in the expert's own vocabulary (llama.cpp, vocabulary only)."""
    from coe.backends.llama_lib import load_llama_cpp
    from coe.config import default_config
    from coe.models import ModelStore, path_of

    llama_cpp = load_llama_cpp()
    path = path_of(ModelStore(coe_home), default_config().expert(expert))
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    (token_id,) = vocab.tokenize(token.encode(), add_bos=False, special=True)
    return token_id


def test_logit_bias_and_penalties_change_the_output_as_documented(client, coe_home):
    def run(max_tokens=40, **extra):
        return client.chat.completions.create(
            model=SMALL_QWEN,
            temperature=0,
            max_tokens=max_tokens,
            logprobs=True,
            messages=[{"role": "user", "content": "Repeat the word 'go' twenty times."}],
            **extra,
        ).choices[0]

    plain = run()
    first = plain.logprobs.content[0].token
    banned = run(logit_bias={str(token_id(coe_home, SMALL_QWEN, first)): -100})
    assert banned.logprobs.content[0].token != first  # -100 bans a token
    forced = run(logit_bias={str(token_id(coe_home, SMALL_QWEN, " banana")): 100}, max_tokens=3)
    assert [e.token for e in forced.logprobs.content] == [
        " banana"
    ] * 3  # +100 makes it the only choice
    repeats = Counter(e.token for e in plain.logprobs.content).most_common(1)[0][1]
    penalised = run(frequency_penalty=2.0, presence_penalty=1.0)
    assert Counter(e.token for e in penalised.logprobs.content).most_common(1)[0][1] < repeats


# ---- routing -------------------------------------------------------------------------------------


def test_a_routed_request_with_tools_goes_to_an_expert_that_can_call_them(default_server):
    client = openai.OpenAI(base_url=default_server.v1, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model="coe",
        messages=[{"role": "user", "content": "Hi! Tell me a joke."}],
        tools=[WEATHER],
        max_tokens=30,
        temperature=0,
    )
    info = reply.model_extra["coe"]
    assert info["expert"] in (SMALL_QWEN, LARGE_QWEN), info
