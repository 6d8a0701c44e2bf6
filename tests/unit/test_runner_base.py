"""The policy every Runner shares (coe.backends.base), driven by a scripted fake runner."""
from typing import Iterator

import pytest

from coe.backends.base import Decoder, Runner, Vocab
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


# ---- batched decoding: groups of sequences in one Decoder -------------------------------------

class EchoDecoder(Decoder):
    """Sequence i generates its own prompt bytes over and over. Records every ``active`` list;
    ``fail_at`` (a step number, from 0) raises RuntimeError('decoder lost') instead of answering."""

    def __init__(self, prompts, samplings, fail_at=None):
        self.prompts, self.samplings, self.fail_at = prompts, samplings, fail_at
        self.steps: list[list[int]] = []
        self.closes = 0

    def step(self, active):
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            raise RuntimeError("decoder lost")
        n = len(self.steps)
        assert n < 100 and set(active) <= set(range(len(self.prompts))), "a finished sequence came back"
        self.steps.append(list(active))
        return {i: self.prompts[i][n % len(self.prompts[i])] for i in active}

    def close(self):
        self.closes += 1


class BatchRunner(ScriptRunner):
    """Decodes up to ``max_batch_size`` sequences together within ``capacity`` tokens; a group of
    one goes through ``_sample``, which echoes the prompt too. ``fail_at[k]`` makes the k-th
    decoder fail at that step; ``open_error`` makes opening a decoder raise it."""

    def __init__(self, max_batch_size=4, capacity=1000, fail_at=None, open_error=None):
        super().__init__(b"", context_length=1000)
        self.max_batch_size, self.capacity = max_batch_size, capacity
        self.fail_at, self.open_error = fail_at or {}, open_error
        self.decoders: list[EchoDecoder] = []
        self.singles: list[list[int]] = []

    def _batch_token_capacity(self):
        return self.capacity

    def _open_decoder(self, prompts, samplings):
        if self.open_error is not None:
            raise self.open_error
        decoder = EchoDecoder(prompts, samplings, self.fail_at.get(len(self.decoders)))
        self.decoders.append(decoder)
        return decoder

    def _sample(self, prompt_ids, sampling):
        self.singles.append(prompt_ids)
        while True:
            yield from prompt_ids


def outcomes(runner, requests) -> dict:
    """{request id: (text of its deltas, its one final event)}; nothing follows a request's final event."""
    texts, done = {r.id: "" for r in requests}, {}
    for event in runner.generate(requests):
        assert event.request_id not in done, f"{event.request_id} has an event after its final one"
        texts[event.request_id] += event.delta
        if event.is_final:
            done[event.request_id] = (texts[event.request_id], event)
    assert set(done) == set(texts), "every request ends with exactly one final event"
    return {r.id: done[r.id] for r in requests}


def test_groups_hold_at_most_max_batch_size_sequences():
    runner = BatchRunner(max_batch_size=2)
    requests = [prompt(p, max_tokens=3) for p in ("ab", "cd", "ef", "gh", "ij")]
    results = outcomes(runner, requests)
    assert [d.prompts for d in runner.decoders] == [[list(b"ab"), list(b"cd")], [list(b"ef"), list(b"gh")]]
    assert runner.singles == [list(b"ij")]  # the last group has one sequence
    assert [results[r.id][0] for r in requests] == ["aba", "cdc", "efe", "ghg", "iji"]
    assert all(results[r.id][1].completion.finish_reason == "length" for r in requests)
    assert all(d.closes == 1 for d in runner.decoders)


def test_groups_share_the_batch_token_capacity():
    runner = BatchRunner(max_batch_size=8, capacity=12)
    # prompt + max_tokens: 6, 13, 6, 6 tokens
    requests = [prompt("ab", max_tokens=4), prompt("cd", max_tokens=11), prompt("ef", max_tokens=4),
                prompt("gh", max_tokens=4)]
    results = outcomes(runner, requests)
    assert runner.singles == [list(b"ab"), list(b"cd")]  # neither fits beside the next one
    assert [d.prompts for d in runner.decoders] == [[list(b"ef"), list(b"gh")]]  # 6 + 6 = 12 fits
    assert results[requests[1].id][1].completion.completion_tokens == 11


def test_finished_sequences_leave_the_active_set():
    runner = BatchRunner()
    requests = [prompt("ab", max_tokens=1), prompt("cd", max_tokens=3), prompt("ef", max_tokens=2)]
    results = outcomes(runner, requests)
    (decoder,) = runner.decoders
    assert decoder.steps == [[0, 1, 2], [1, 2], [1]]
    assert [results[r.id][0] for r in requests] == ["a", "cdc", "ef"]
    assert [results[r.id][1].completion.completion_tokens for r in requests] == [1, 3, 2]
    assert results[requests[0].id][1].completion.prompt_tokens == 2


def test_a_stop_string_ends_one_sequence_while_the_others_continue():
    runner = BatchRunner()
    requests = [prompt("xyz", max_tokens=9, stop=("z",)), prompt("ab", max_tokens=4)]
    results = outcomes(runner, requests)
    assert results[requests[0].id][0] == "xy"
    assert results[requests[0].id][1].completion.finish_reason == "stop"
    assert results[requests[1].id][0] == "abab"
    assert runner.decoders[0].steps[3:] == [[1]]


def test_a_decoder_failure_ends_only_the_unfinished_requests_of_its_group():
    runner = BatchRunner(max_batch_size=3, fail_at={0: 2})  # the first decoder fails at its third step
    requests = [prompt("ab", max_tokens=1), prompt("cd", max_tokens=5), prompt("ef", max_tokens=5),
                prompt("gh", max_tokens=3), prompt("ij", max_tokens=3)]
    results = outcomes(runner, requests)
    first, second, third = (results[r.id] for r in requests[:3])
    assert first[0] == "a" and first[1].completion.finish_reason == "length"  # finished before the failure
    for text, final in (second, third):
        assert isinstance(final.error, GenerationError)
        assert final.error.message == "scripted: generation failed: decoder lost"
        assert len(text) == 2  # what was generated before the failure still arrived
    assert [results[r.id][0] for r in requests[3:]] == ["ghg", "iji"]  # the next group is unaffected
    assert all(results[r.id][1].completion is not None for r in requests[3:])
    assert [d.closes for d in runner.decoders] == [1, 1]  # closed on failure too


def test_a_decoder_that_cannot_open_fails_its_group_with_the_coe_error_itself():
    error = GenerationError("out of memory for the batch")
    runner = BatchRunner(max_batch_size=2, open_error=error)
    requests = [prompt("ab", max_tokens=2), prompt("cd", max_tokens=2), prompt("ef", max_tokens=2)]
    results = outcomes(runner, requests)
    assert results[requests[0].id][0] == "" and results[requests[1].id][0] == ""
    assert results[requests[0].id][1].error is error and results[requests[1].id][1].error is error
    assert results[requests[2].id][0] == "ef"  # a group of one does not open a decoder


def test_a_request_cancelled_mid_batch_ends_cancelled_and_the_others_complete():
    runner = BatchRunner()
    requests = [prompt("ab", max_tokens=6), prompt("cd", max_tokens=6)]
    texts = {r.id: "" for r in requests}
    finals = {}
    for event in runner.generate(requests):
        texts[event.request_id] += event.delta
        if event.is_final:
            finals[event.request_id] = event
        if texts[requests[0].id] == "ab":
            requests[0].cancel()
    assert finals[requests[0].id].completion.finish_reason == "cancelled"
    assert texts[requests[0].id] == "ab"
    assert finals[requests[1].id].completion.finish_reason == "length"
    assert texts[requests[1].id] == "cdcdcd"


def test_requests_rejected_before_decoding_do_not_join_a_group():
    runner = BatchRunner(max_batch_size=4)
    too_long = prompt("x" * 10, max_tokens=995)  # context 1000
    requests = [prompt("ab", max_tokens=2), too_long, prompt("cd", max_tokens=2)]
    results = outcomes(runner, requests)
    assert isinstance(results[too_long.id][1].error, ContextLengthExceeded)
    assert [d.prompts for d in runner.decoders] == [[list(b"ab"), list(b"cd")]]
