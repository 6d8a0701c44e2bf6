"""Tool calls read out of model text (coe.engine.tools), streamed with the calls held back, the
tool prompt for experts without a tool format, and rendering through a template with tools."""

from __future__ import annotations

import json

import pytest

from coe.backends.chat import render_chat, supports_tools
from coe.engine.tools import ToolCallStream, parse_tool_calls, tool_prompt, with_tool_prompt
from coe.types import ChatMessage, ToolCall, Tools

WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = Tools((WEATHER, TIME))
OFFERED = TOOLS.names


def calls(text):
    rest, found = parse_tool_calls(text, OFFERED)
    return rest, [(c.name, json.loads(c.arguments)) for c in found]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            [("get_weather", {"city": "Paris"})],
        ),
        (
            'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
            [("get_weather", {"city": "Rome"}), ("get_time", {})],
        ),
        (
            '<tool_call>\n{"name": "get_time", "arguments": {}}',
            [("get_time", {})],
        ),  # cut at max_tokens
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
            [("get_weather", {"city": "Oslo"})],
        ),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}',
            [("get_weather", {"city": "Lima"})],
        ),
        (
            '{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": {}}',
            [("get_weather", {"city": "Lima"}), ("get_time", {})],
        ),
        (
            '[{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]',
            [("get_time", {})],
        ),
        (
            '```json\n{"name": "get_weather", "arguments": {"city": "Kyiv"}}\n```',
            [("get_weather", {"city": "Kyiv"})],
        ),
    ],
)
def test_every_format_of_a_call_is_read(text, expected):
    rest, found = calls(text)
    assert found == expected
    assert rest in ("", "Let me check.")


@pytest.mark.parametrize(
    "text",
    [
        "Paris is sunny today.",
        '{"name": "delete_everything", "arguments": {}}',  # a function that was not offered
        '{"temperature": 23}',  # JSON, but no call
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"temperature_c": 23}',  # a call and other JSON
        "<tool_call>not json</tool_call>",
        "```python\nprint(1)\n```",
    ],
)
def test_text_that_is_not_a_call_stays_text(text):
    assert calls(text) == (text, [])


def test_call_ids_are_unique_and_arguments_are_json_text():
    _, found = parse_tool_calls(
        '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]', OFFERED
    )
    assert len({c.id for c in found}) == 2 and all(c.id.startswith("call_") for c in found)
    assert all(c.arguments == "{}" for c in found)


def stream(pieces, tools=TOOLS):
    watcher = ToolCallStream(tools)
    shown = [watcher.feed(p) for p in pieces]
    rest, found = watcher.finish()
    return "".join(shown), rest, [c.name for c in found]


def test_a_streamed_answer_shows_text_and_holds_back_a_call():
    assert stream(["Hello", " there"]) == ("Hello there", "", [])
    pieces = [
        "I'll check. ",
        "<tool",
        '_call>\n{"name": "get_time", ',
        '"arguments": {}}\n</tool_call>',
    ]
    assert stream(pieces) == ("I'll check. ", "", ["get_time"])
    assert stream(["\n", '{"name": "get_time",', ' "arguments": {}}']) == ("", "", ["get_time"])


def test_held_text_that_is_no_call_is_released_at_the_end():
    assert stream(['{"a":', " 1}"]) == ("", '{"a": 1}', [])
    assert stream(["<to", "day>"]) == ("<today>", "", [])  # not the marker: shown once it cannot be
    assert stream(["```python\nprint(1)\n```"]) == ("```python\nprint(1)\n```", "", [])
    assert stream(["```json\n", '{"name": "get_time", "arguments": {}}\n```']) == (
        "",
        "",
        ["get_time"],
    )


def test_the_tool_prompt_lists_the_functions_and_the_format():
    text = tool_prompt(TOOLS)
    assert '"name": "get_weather"' in text and "<tool_call>" in text and "</tools>" in text
    history = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather?"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)
        ),
        ChatMessage("tool", "sunny", tool_call_id="c1"),
    )
    plain = with_tool_prompt(history, TOOLS)
    assert [m.role for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0].content.startswith("Be brief.\n\n") and "get_weather" in plain[0].content
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in plain[2].content
    )
    assert plain[3].content == "<tool_response>\nsunny\n</tool_response>"
    assert with_tool_prompt(history, Tools((WEATHER,), "none"))[0].content == "Be brief."


QWEN_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}{% endfor %}"
)


def test_a_template_with_tools_gets_the_listing_and_the_calls_as_objects():
    assert (
        supports_tools(QWEN_LIKE)
        and not supports_tools("{{ messages }}")
        and not supports_tools(None)
    )
    messages = (
        ChatMessage("user", "hi"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)
        ),
    )
    text = render_chat(QWEN_LIKE, messages, tools=[WEATHER])
    assert '"function": {"name": "get_weather"' in text
    assert (
        '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text
    )  # an object, not a quoted string
