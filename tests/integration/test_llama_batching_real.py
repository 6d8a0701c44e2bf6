"""llama.cpp decoding several sequences in one context, with a real packaged expert: a batch, and
requests joining a running batch (continuous batching) in sequence slots freed by finished ones.
Greedy decoding must give every request the text it gets alone. (On prompts with a confident
answer: where two tokens are all but tied, a different order of KV cells, hence of the floating
point sums, may pick the other one, as in any batched inference.)"""
from __future__ import annotations

import pytest

from coe.backends.llama_cpp import LlamaCppBackend
from coe.backends.memory import HostBufferPool
from coe.config import ExpertConfig
from coe.models import ModelStore
from coe.types import ChatMessage, Request, SamplingParams

pytestmark = pytest.mark.integration

SMALL = "smollm2-135m"
LONG = "List the numbers from 1 to 20, separated by commas."
QUESTIONS = ("Name three colors.", "What is 2 + 2?")


@pytest.fixture(scope="module")
def runner(coe_home):
    pytest.importorskip("llama_cpp")
    store = ModelStore(coe_home)
    if store.status(SMALL) == "not installed":
        pytest.skip(f"packaged model {SMALL} is not installed (make setup)")
    expert = ExpertConfig(SMALL, SMALL, params={"n_ctx": 1024, "max_sequences": 2})
    backend = LlamaCppBackend()
    host = backend.read(expert, store.ensure(SMALL), HostBufferPool())
    runner = backend.materialize(host)
    yield runner
    runner.close()
    host.release()


def ask(question: str, max_tokens: int) -> Request:
    return Request(SMALL, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                   messages=(ChatMessage("user", question),))


def texts(events) -> dict[str, str]:
    finals = {e.request_id: e for e in events if e.is_final}
    assert all(e.error is None for e in finals.values()), [e.error for e in finals.values()]
    return {rid: e.completion.text for rid, e in finals.items()}


def alone(runner, question: str, max_tokens: int) -> str:
    request = ask(question, max_tokens)
    return texts(runner.generate([request]))[request.id]


def test_a_batch_decoded_together_gives_each_request_its_own_text(runner):
    requests = [ask(LONG, 30), ask(QUESTIONS[0], 6)]
    together = texts(runner.generate(requests))
    assert [together[r.id] for r in requests] == [alone(runner, LONG, 30), alone(runner, QUESTIONS[0], 6)]


def test_requests_joining_a_running_batch_reuse_freed_slots_and_get_their_own_text(runner):
    """Two slots: a long request runs, a short one joins after two steps, and the next one joins
    once that finished (taking the slot and KV cells it left)."""
    first = ask(LONG, 40)
    joiners = [ask(q, 6) for q in QUESTIONS]
    offered, calls = list(joiners), []

    def join(count: int):
        calls.append(count)
        if len(calls) < 3 or not offered or count == 0:
            return []
        return [offered.pop(0)]

    got = texts(runner.generate([first], join))
    assert not offered and 1 in calls and max(calls) <= 2  # one free slot of two while the long one runs
    assert got[first.id] == alone(runner, LONG, 40)
    for request, question in zip(joiners, QUESTIONS):
        assert got[request.id] == alone(runner, question, 6), question
