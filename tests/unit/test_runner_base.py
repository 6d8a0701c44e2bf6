"""The policy every Runner shares (coe.backends.base), driven by a scripted fake runner."""
from typing import Iterator

import pytest

from coe.backends.base import Runner, Vocab
from coe.config import ExpertConfig
from coe.errors import ContextLengthExceeded, GenerationError, InvalidRequest
from coe.types import ChatMessage, Request, SamplingParams

END = -1


class ScriptVocab(Vocab):
    """Token ids are byte values; END is the end of generation."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def is_end(self, token_id: int) -> bool:
        return token_id == END


class ScriptRunner(Runner):
    def __init__(self, script: list[int] | bytes, context_length: int = 100, chat_template=None, fail_after=None):
        super().__init__(ExpertConfig("scripted", "/nowhere"), ScriptVocab(chat_template), context_length, 1)
        self.script, self.fail_after = list(script), fail_after
        self.pulled = 0
        self.closed_generators = 0

    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        try:
            for token in self.script:
                if self.fail_after is not None and self.pulled >= self.fail_after:
                    raise RuntimeError("backend crashed")
                self.pulled += 1
                yield token
            while True:  # a model never stops by itself
                self.pulled += 1
                yield ord("z")
        finally:
            self.closed_generators += 1


def run(runner, request):
    events = list(runner.generate([request]))
    return "".join(e.delta for e in events), events[-1]


def prompt(text="hi", **sampling):
    return Request("scripted", SamplingParams(**sampling), prompt=text)


def test_max_tokens_stops_and_closes_the_token_generator():
    runner = ScriptRunner(b"abcdef")
    text, final = run(runner, prompt(max_tokens=3))
    assert text == "abc"
    assert final.completion.finish_reason == "length"
    assert (final.completion.prompt_tokens, final.completion.completion_tokens) == (2, 3)
    assert runner.pulled == 3 and runner.closed_generators == 1


def test_end_token_finishes_with_stop_and_is_not_counted():
    text, final = run(ScriptRunner([*b"ok", END, *b"never"]), prompt(max_tokens=10))
    assert text == "ok"
    assert final.completion.finish_reason == "stop"
    assert final.completion.completion_tokens == 2


def test_stop_string_across_tokens():
    text, final = run(ScriptRunner(b"one. two"), prompt(max_tokens=20, stop=(". t",)))
    assert text == final.completion.text == "one"
    assert final.completion.finish_reason == "stop"


def test_chat_without_template_stops_at_the_next_user_turn():
    request = Request("scripted", SamplingParams(max_tokens=50), messages=(ChatMessage("user", "hi"),))
    text, final = run(ScriptRunner(b"Hello!\nUser: more"), request)
    assert text == "Hello!"
    assert final.completion.finish_reason == "stop"


def test_chat_with_template_has_no_implied_stop():
    request = Request("scripted", SamplingParams(max_tokens=17), messages=(ChatMessage("user", "hi"),))
    text, _ = run(ScriptRunner(b"Hello!\nUser: more", chat_template="{{ messages[0].content }}"), request)
    assert text == "Hello!\nUser: more"


def test_held_text_is_flushed_at_the_end():
    text, final = run(ScriptRunner(b"abc"), prompt(max_tokens=3, stop=("xyz",)))
    assert text == "abc" == final.completion.text


def test_context_check_happens_before_generation():
    runner = ScriptRunner(b"abc", context_length=10)
    (event,) = runner.generate([prompt("12345", max_tokens=6)])
    assert isinstance(event.error, ContextLengthExceeded)
    assert runner.pulled == 0
    _, final = run(runner, prompt("12345", max_tokens=5))
    assert final.completion is not None


def test_template_error_is_an_error_event():
    runner = ScriptRunner(b"abc", chat_template="{{ raise_exception('no system role') }}")
    request = Request("scripted", SamplingParams(max_tokens=2), messages=(ChatMessage("system", "x"),))
    (event,) = runner.generate([request])
    assert isinstance(event.error, InvalidRequest) and "no system role" in event.error.message


def test_backend_crash_is_a_generation_error_after_the_text_so_far():
    runner = ScriptRunner(b"abcdef", fail_after=2)
    events = list(runner.generate([prompt(max_tokens=10)]))
    assert [e.delta for e in events[:-1]] == ["a", "b"]
    assert isinstance(events[-1].error, GenerationError)
    assert "scripted: generation failed: backend crashed" in events[-1].error.message


def test_cancel_between_tokens():
    runner = ScriptRunner(b"abcdef")
    request = prompt(max_tokens=10)
    events = []
    for event in runner.generate([request]):
        events.append(event)
        if event.delta == "b":
            request.cancel()
    assert "".join(e.delta for e in events) == "ab"
    assert events[-1].completion.finish_reason == "cancelled"
    assert events[-1].completion.completion_tokens == 2


def test_a_batch_is_served_in_order():
    runner = ScriptRunner(b"xy")
    requests = [prompt("a", max_tokens=2), prompt("b", max_tokens=1)]
    finals = [e for e in runner.generate(requests) if e.is_final]
    assert [e.request_id for e in finals] == [r.id for r in requests]
    assert [e.completion.text for e in finals] == ["xy", "x"]


@pytest.mark.parametrize("data, expected", [("€".encode(), "€"), (b"\xe2\x82", "\ufffd")])
def test_multibyte_output(data, expected):
    text, final = run(ScriptRunner(data), prompt(max_tokens=len(data)))
    assert text == final.completion.text == expected
