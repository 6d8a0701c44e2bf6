"""The token loop's postprocessing and batching (coe.engine.batch), on scripted decoders: prompt
rendering, context check, stop strings, max_tokens, cancellation, usage, sequences joining as
others finish, and failures. Each has a real counterpart in the backends' and serving tests."""
from __future__ import annotations

import pytest

from coe.backends.base import Decoder, Runner, Vocab
from coe.backends.sampling import Token
from coe.config import ExpertConfig
from coe.engine.batch import RunningBatch, generate, prompt_of
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


class ScriptDecoder(Decoder):
    """Every sequence generates ``runner.script`` (then "z" forever), or with ``echo`` its own
    prompt over and over. Records the live sequences of every step; ``fail_at`` (a step number,
    from 0) raises RuntimeError('decoder lost') instead of answering."""

    def __init__(self, runner: "ScriptRunner"):
        self.runner, self.max_sequences = runner, runner.max_sequences
        self.live: dict[int, tuple[list[int], int]] = {}  # seq -> (its token source, tokens given)
        self.need: dict[int, int] = {}
        self.steps: list[list[int]] = []
        self.added: list[tuple[int, list[int]]] = []  # (step it was added before, prompt)
        self.removed: list[int] = []
        self.closes = 0

    def has_room(self, need_tokens: int) -> bool:
        return (len(self.live) < self.max_sequences
                and sum(self.need.values()) + need_tokens <= self.runner.capacity)

    def add(self, seq, prompt_ids, sampling, adapter=None) -> None:
        source = prompt_ids if self.runner.echo else self.runner.script
        self.live[seq], self.need[seq] = (list(source), 0), len(prompt_ids) + sampling.max_tokens
        self.added.append((len(self.steps), list(prompt_ids)))

    def step(self):
        if self.runner.fail_at is not None and len(self.steps) == self.runner.fail_at:
            raise RuntimeError("decoder lost")
        assert len(self.steps) < 200
        self.steps.append(sorted(self.live))
        tokens = {}
        for seq, (source, given) in self.live.items():
            token = (source[given % len(source)] if self.runner.echo
                     else source[given] if given < len(source) else ord("z"))
            tokens[seq] = Token(token)
            self.live[seq] = (source, given + 1)
        self.runner.pulled += len(tokens)
        return tokens

    def remove(self, seq) -> None:
        del self.live[seq], self.need[seq]
        self.removed.append(seq)

    def close(self) -> None:
        self.closes += 1


class ScriptRunner(Runner):
    def __init__(self, script: bytes | list[int] = b"", context_length: int = 100, chat_template=None,
                 max_sequences: int = 4, capacity: int = 1000, echo: bool = False, fail_at: int | None = None,
                 open_error: Exception | None = None):
        super().__init__(ExpertConfig("scripted", "/nowhere"), ScriptVocab(chat_template), context_length, 1,
                         max_sequences=max_sequences)
        self.script, self.capacity, self.echo = list(script), capacity, echo
        self.fail_at, self.open_error = fail_at, open_error
        self.decoders: list[ScriptDecoder] = []
        self.pulled = 0

    def open_decoder(self) -> ScriptDecoder:
        if self.open_error is not None:
            raise self.open_error
        decoder = ScriptDecoder(self)
        self.decoders.append(decoder)
        return decoder


def prompt(text="hi", **sampling) -> Request:
    return Request("scripted", SamplingParams(**sampling), prompt=text)


def outcomes(runner, requests) -> dict:
    """{request id: (text of its deltas, its one final event)}; nothing follows a request's final event."""
    texts, done = {r.id: "" for r in requests}, {}
    for event in generate(runner, requests):
        assert event.request_id not in done, f"{event.request_id} has an event after its final one"
        texts[event.request_id] += event.delta
        if event.is_final:
            done[event.request_id] = (texts[event.request_id], event)
    assert set(done) == set(texts), "every request ends with exactly one final event"
    return {r.id: done[r.id] for r in requests}


def run(runner, request):
    text, final = outcomes(runner, [request])[request.id]
    return text, final


# ---- one request: postprocessing ---------------------------------------------------------------

def test_max_tokens_stops_and_the_decoder_is_closed():
    runner = ScriptRunner(b"abcdef")
    text, final = run(runner, prompt(max_tokens=3))
    assert text == "abc"
    assert final.completion.finish_reason == "length"
    assert (final.completion.prompt_tokens, final.completion.completion_tokens) == (2, 3)
    assert runner.pulled == 3 and runner.decoders[0].closes == 1 and runner.decoders[0].removed == [0]


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
    assert prompt_of(ScriptVocab(), request) == ("User: hi\nAssistant:", ("\nUser:",))


def test_chat_with_template_has_no_implied_stop():
    request = Request("scripted", SamplingParams(max_tokens=17), messages=(ChatMessage("user", "hi"),))
    text, _ = run(ScriptRunner(b"Hello!\nUser: more", chat_template="{{ messages[0].content }}"), request)
    assert text == "Hello!\nUser: more"


def test_held_text_is_flushed_at_the_end():
    text, final = run(ScriptRunner(b"abc"), prompt(max_tokens=3, stop=("xyz",)))
    assert text == "abc" == final.completion.text


def test_context_check_happens_before_generation():
    runner = ScriptRunner(b"abc", context_length=10)
    (event,) = generate(runner, [prompt("12345", max_tokens=6)])
    assert isinstance(event.error, ContextLengthExceeded)
    assert runner.pulled == 0 and runner.decoders[0].added == []
    _, final = run(runner, prompt("12345", max_tokens=5))
    assert final.completion is not None


def test_template_error_is_an_error_event():
    runner = ScriptRunner(b"abc", chat_template="{{ raise_exception('no system role') }}")
    request = Request("scripted", SamplingParams(max_tokens=2), messages=(ChatMessage("system", "x"),))
    (event,) = generate(runner, [request])
    assert isinstance(event.error, InvalidRequest) and "no system role" in event.error.message


def test_a_decoder_crash_is_a_generation_error_after_the_text_so_far():
    runner = ScriptRunner(b"abcdef", fail_at=2)
    events = list(generate(runner, [prompt(max_tokens=10)]))
    assert [e.delta for e in events[:-1]] == ["a", "b"]
    assert isinstance(events[-1].error, GenerationError)
    assert events[-1].error.message == "scripted: generation failed: decoder lost"
    assert runner.decoders[0].closes == 1  # closed on failure too


def test_cancel_between_tokens():
    runner = ScriptRunner(b"abcdef")
    request = prompt(max_tokens=10)
    events = []
    for event in generate(runner, [request]):
        events.append(event)
        if event.delta == "b":
            request.cancel()
    assert "".join(e.delta for e in events) == "ab"
    assert events[-1].completion.finish_reason == "cancelled"
    assert events[-1].completion.completion_tokens == 2


@pytest.mark.parametrize("data, expected", [("€".encode(), "€"), (b"\xe2\x82", "\ufffd")])
def test_multibyte_output(data, expected):
    text, final = run(ScriptRunner(data), prompt(max_tokens=len(data)))
    assert text == final.completion.text == expected


def test_the_first_token_reports_the_prompt_tokens_taken_from_cache():
    class Cached(ScriptDecoder):
        def step(self):
            first = not self.steps
            return {seq: Token(t.id, cached_prompt_tokens=5 if first else 0) for seq, t in super().step().items()}

    runner = ScriptRunner(b"abc")
    runner.open_decoder = lambda: Cached(runner)
    _, final = run(runner, prompt("a longer prompt", max_tokens=3))
    assert final.completion.cached_tokens == 5


# ---- several requests: one decoder, joining as others finish -----------------------------------

def test_at_most_max_sequences_run_and_the_rest_join_as_sequences_finish():
    runner = ScriptRunner(max_sequences=2, echo=True)
    requests = [prompt(p, max_tokens=3) for p in ("ab", "cd", "ef", "gh", "ij")]
    results = outcomes(runner, requests)
    (decoder,) = runner.decoders
    assert max(len(live) for live in decoder.steps) == 2
    assert [step for step, _ in decoder.added] == [0, 0, 3, 3, 6]  # a slot frees every 3 steps
    assert [results[r.id][0] for r in requests] == ["aba", "cdc", "efe", "ghg", "iji"]
    assert all(results[r.id][1].completion.finish_reason == "length" for r in requests)
    assert decoder.closes == 1


def test_sequences_wait_for_token_capacity_in_arrival_order():
    runner = ScriptRunner(max_sequences=8, capacity=12, echo=True)
    # prompt + max_tokens: 6, 13 (over the capacity: it runs alone), 6, 6 tokens
    requests = [prompt("ab", max_tokens=4), prompt("cd", max_tokens=11), prompt("ef", max_tokens=4),
                prompt("gh", max_tokens=4)]
    results = outcomes(runner, requests)
    (decoder,) = runner.decoders
    assert [step for step, _ in decoder.added] == [0, 4, 15, 15]  # "cd" waits for "ab"; the rest for "cd"
    assert results[requests[1].id][1].completion.completion_tokens == 11


def test_finished_sequences_leave_the_decoder():
    runner = ScriptRunner(echo=True)
    requests = [prompt("ab", max_tokens=1), prompt("cd", max_tokens=3), prompt("ef", max_tokens=2)]
    results = outcomes(runner, requests)
    (decoder,) = runner.decoders
    assert decoder.steps == [[0, 1, 2], [1, 2], [1]]
    assert decoder.removed == [0, 2, 1]
    assert [results[r.id][0] for r in requests] == ["a", "cdc", "ef"]
    assert [results[r.id][1].completion.completion_tokens for r in requests] == [1, 3, 2]


def test_a_stop_string_ends_one_sequence_while_the_others_continue():
    runner = ScriptRunner(echo=True)
    requests = [prompt("xyz", max_tokens=9, stop=("z",)), prompt("ab", max_tokens=4)]
    results = outcomes(runner, requests)
    assert results[requests[0].id][0] == "xy"
    assert results[requests[0].id][1].completion.finish_reason == "stop"
    assert results[requests[1].id][0] == "abab"
    assert runner.decoders[0].steps[3:] == [[1]]


def test_a_decoder_failure_ends_every_unfinished_request_and_keeps_what_was_sent():
    runner = ScriptRunner(max_sequences=3, echo=True, fail_at=2)  # fails at its third step
    requests = [prompt("ab", max_tokens=1), prompt("cd", max_tokens=5), prompt("ef", max_tokens=5),
                prompt("gh", max_tokens=3)]
    results = outcomes(runner, requests)
    first, second, third, waiting = (results[r.id] for r in requests)
    assert first[0] == "a" and first[1].completion.finish_reason == "length"  # finished before the failure
    for text, final in (second, third, waiting):
        assert isinstance(final.error, GenerationError)
        assert final.error.message == "scripted: generation failed: decoder lost"
    assert (second[0], third[0], waiting[0]) == ("cd", "ef", "g")  # the fourth joined when the first ended
    assert runner.decoders[0].closes == 1


def test_a_decoder_that_cannot_open_fails_every_request_with_the_error_itself():
    error = GenerationError("out of memory for the batch")
    runner = ScriptRunner(open_error=error)
    requests = [prompt("ab", max_tokens=2), prompt("cd", max_tokens=2)]
    results = outcomes(runner, requests)
    assert all(results[r.id] == ("", results[r.id][1]) and results[r.id][1].error is error for r in requests)


def test_a_request_cancelled_mid_batch_ends_cancelled_and_the_others_complete():
    runner = ScriptRunner(echo=True)
    requests = [prompt("ab", max_tokens=6), prompt("cd", max_tokens=6)]
    texts = {r.id: "" for r in requests}
    finals = {}
    for event in generate(runner, requests):
        texts[event.request_id] += event.delta
        if event.is_final:
            finals[event.request_id] = event
        if texts[requests[0].id] == "ab":
            requests[0].cancel()
    assert finals[requests[0].id].completion.finish_reason == "cancelled"
    assert texts[requests[0].id] == "ab"
    assert finals[requests[1].id].completion.finish_reason == "length"
    assert texts[requests[1].id] == "cdcdcd"


def test_requests_rejected_before_decoding_never_reach_the_decoder():
    runner = ScriptRunner(context_length=1000, echo=True)
    too_long = prompt("x" * 10, max_tokens=995)
    requests = [prompt("ab", max_tokens=2), too_long, prompt("cd", max_tokens=2)]
    results = outcomes(runner, requests)
    assert isinstance(results[too_long.id][1].error, ContextLengthExceeded)
    assert [p for _, p in runner.decoders[0].added] == [list(b"ab"), list(b"cd")]


def test_a_running_batch_admits_joiners_between_steps():
    runner = ScriptRunner(echo=True)
    batch = RunningBatch(runner)
    assert batch.admit([prompt("ab", max_tokens=4)]) == [] and batch.free_slots == 3
    events = batch.step() + batch.step()
    late = prompt("cd", max_tokens=2)
    batch.admit([late])
    while not batch.done:
        events += batch.step()
    batch.close()
    finals = {e.request_id: e.completion for e in events if e.is_final}
    assert finals[late.id].text == "cd" and len(finals) == 2
    assert [step for step, _ in runner.decoders[0].added] == [0, 2]


# ---- adapters --------------------------------------------------------------------------------

def test_each_sequence_gets_its_profile_adapter_and_an_unreadable_one_fails_only_its_request():
    from coe.backends.base import Adapter
    from coe.errors import LoadError
    from coe.types import Profile

    runner = ScriptRunner(b"ok")
    given: list = []
    original_add = ScriptDecoder.add

    def add(self, seq, prompt_ids, sampling, adapter=None):
        given.append(adapter)
        original_add(self, seq, prompt_ids, sampling, adapter)

    ScriptDecoder.add = add
    try:
        good = Adapter("tuned", None, 1.0, 10)

        def adapter_of(name: str):
            if name == "broken":
                raise OSError("disk went away")
            return good

        requests = [Request("tuned", SamplingParams(max_tokens=2), prompt="a",
                            profile=Profile("tuned", adapter="a.gguf")),
                    Request("broken", SamplingParams(max_tokens=2), prompt="b",
                            profile=Profile("broken", adapter="b.gguf")),
                    Request("scripted", SamplingParams(max_tokens=2), prompt="c")]
        finals = {}
        for event in generate(runner, requests, adapter_of):
            if event.is_final:
                finals[event.request_id] = event
    finally:
        ScriptDecoder.add = original_add
    assert finals[requests[0].id].completion.text == "ok"
    assert isinstance(finals[requests[1].id].error, LoadError)
    assert "disk went away" in finals[requests[1].id].error.message
    assert finals[requests[2].id].completion.text == "ok"
    assert given == [good, None]  # the broken one never reached the decoder
