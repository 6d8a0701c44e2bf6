"""llama.cpp decoding several sequences in one context, with a real packaged expert: a batch, and
requests joining a running batch (continuous batching) in sequence slots freed by finished ones.
Greedy decoding must give every request the text it gets alone. (On prompts with a confident
answer: where two tokens are all but tied, a different order of KV cells, hence of the floating
point sums, may pick the other one, as in any batched inference.) Prefix caching: a new sequence
starts from the KV cells of the longest prompt prefix any sequence holds."""
from __future__ import annotations

import math

import pytest

from coe.backends.llama_cpp import LlamaCppBackend
from coe.backends.memory import HostBufferPool
from coe.config import ExpertConfig
from coe.engine.batch import RunningBatch, generate, next_token_logprobs, prompt_of
from coe.models import ModelStore
from coe.types import ChatMessage, Request, SamplingParams

pytestmark = pytest.mark.integration

SMALL = "smollm2-135m"
LONG = "List the numbers from 1 to 20, separated by commas."
QUESTIONS = ("Name three colors.", "What is 2 + 2?")


def open_runner(coe_home, params: dict):
    pytest.importorskip("llama_cpp")
    store = ModelStore(coe_home)
    if store.status(SMALL) == "not installed":
        pytest.skip(f"packaged model {SMALL} is not installed (make setup)")
    backend = LlamaCppBackend()
    host = backend.read(ExpertConfig(SMALL, SMALL, params=params), store.ensure(SMALL), HostBufferPool())
    return host, backend.materialize(host)


@pytest.fixture(scope="module")
def runner(coe_home):
    host, runner = open_runner(coe_home, {"n_ctx": 1024, "max_sequences": 2})
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
    return texts(generate(runner, [request]))[request.id]


def test_a_batch_decoded_together_gives_each_request_its_own_text(runner):
    requests = [ask(LONG, 30), ask(QUESTIONS[0], 6)]
    together = texts(generate(runner, requests))
    assert [together[r.id] for r in requests] == [alone(runner, LONG, 30), alone(runner, QUESTIONS[0], 6)]


def test_requests_joining_a_running_batch_reuse_freed_slots_and_get_their_own_text(runner):
    """Two slots: a long request runs, a short one joins after two steps, and the next one joins
    once that finished (taking the slot and KV cells it left)."""
    first = ask(LONG, 40)
    joiners = [ask(q, 6) for q in QUESTIONS]
    batch = RunningBatch(runner)
    events = batch.admit([first]) + batch.step() + batch.step()
    for joiner in joiners:
        events += batch.admit([joiner])
        while len(batch.running) + len(batch.waiting) == 2:  # until the joiner (the short one) ends
            events += batch.step()
    while not batch.done:
        events += batch.step()
    batch.close()
    got = texts(events)
    assert got[first.id] == alone(runner, LONG, 40)
    for request, question in zip(joiners, QUESTIONS):
        assert got[request.id] == alone(runner, question, 6), question


def test_a_request_after_a_long_one_sees_none_of_its_kv_cells(runner):
    """Between requests only the cells' metadata is cleared (the buffer keeps the old numbers):
    the next prompt's logits must be exactly those of a context that never held anything else."""
    prompt_ids = runner.vocab.encode(QUESTIONS[1])
    before = all_logprobs(runner, prompt_ids)[0]
    alone(runner, LONG, 40)
    assert all_logprobs(runner, prompt_ids)[0] == before


def completions(events) -> dict[str, object]:
    return {e.request_id: e.completion for e in events if e.is_final}


def prompt_ids(runner, question: str) -> list[int]:
    return runner.vocab.encode(prompt_of(runner.vocab, ask(question, 1))[0])


def all_logprobs(runner, ids: list[int]) -> tuple[list[float], int]:
    """The next token's log-probabilities over the whole vocabulary, and the prompt tokens the
    prefill took from cached cells."""
    decoder = runner.open_decoder()
    try:
        decoder.add(0, ids, SamplingParams(max_tokens=1, temperature=0.0, score_ids=tuple(range(runner.n_vocab))))
        token = decoder.step()[0]
        return list(token.scored), token.cached_prompt_tokens
    finally:
        decoder.close()


def test_a_reused_prefix_gives_exactly_the_logits_of_the_prompt_evaluated_in_two_parts(runner):
    """Prefix caching evaluates only the prompt's new tokens: the same numbers as evaluating the
    prompt in two chunks split there (not bit-equal to one chunk: llama.cpp's kernels round
    differently for other batch sizes, as with any chunked prefill)."""
    ids = prompt_ids(runner, LONG + " Then name three colors.")
    split = len(ids) // 2
    runner.forget_all()
    next_token_logprobs(runner, ids[:split], [0])  # leaves the first half in the cells
    reused, cached = all_logprobs(runner, ids)
    assert cached == split
    runner.forget_all()
    runner.decode([(token, k, 0) for k, token in enumerate(ids[:split])], all_logits=False)
    runner.decode([(token, split + k, 0) for k, token in enumerate(ids[split:])], all_logits=False)
    n_vocab = runner.n_vocab
    logits = runner.lib.llama_get_logits_ith(runner.ctx.ctx, -1)
    two_parts = [logits[i] for i in range(n_vocab)]
    best = max(range(n_vocab), key=two_parts.__getitem__)
    assert max(range(n_vocab), key=reused.__getitem__) == best
    top = max(two_parts)
    norm = top + math.log(sum(math.exp(x - top) for x in two_parts))
    assert max(abs(r - (x - norm)) for r, x in zip(reused, two_parts)) < 1e-9


def test_sequences_of_one_batch_share_the_prompt_prefix_they_have_in_common(runner):
    runner.forget_all()
    requests = [ask(QUESTIONS[0], 4), ask(QUESTIONS[1], 4)]
    done = completions(generate(runner, requests))
    common = 0
    for a, b in zip(prompt_ids(runner, QUESTIONS[0]), prompt_ids(runner, QUESTIONS[1])):
        if a != b:
            break
        common += 1
    assert common > 0  # the chat template's system prompt and turn header
    assert [done[r.id].cached_tokens for r in requests] == [0, common]


def test_prompt_caching_can_be_turned_off(coe_home):
    host, runner = open_runner(coe_home, {"n_ctx": 512, "cache_prompt": False})
    try:
        for _ in range(2):
            request = ask(QUESTIONS[1], 2)
            assert completions(generate(runner, [request]))[request.id].cached_tokens == 0
    finally:
        runner.close()
        host.release()


def test_two_interleaved_conversations_each_keep_their_cells(runner):
    runner.forget_all()
    first = {q: completions(generate(runner, [ask(q, 6)])) for q in QUESTIONS}
    for question in QUESTIONS:
        turn1 = next(iter(first[question].values()))
        follow_up = Request(SMALL, SamplingParams(max_tokens=4, temperature=0.0), messages=(
            ChatMessage("user", question), ChatMessage("assistant", turn1.text), ChatMessage("user", "Why?")))
        assert completions(generate(runner, [follow_up]))[follow_up.id].cached_tokens >= turn1.prompt_tokens


def test_cells_left_by_finished_requests_make_room_when_a_prompt_needs_it(coe_home):
    """A context of 256 cells: each long prompt needs most of them, so every request must evict
    what the previous ones left, and none fails for lack of room."""
    host, runner = open_runner(coe_home, {"n_ctx": 256, "max_sequences": 2})
    try:
        for n in range(4):
            request = ask(f"{n} " + "Please repeat these words back to me. " * 20, 8)
            done = completions(generate(runner, [request]))[request.id]
            assert done.completion_tokens >= 1 and 150 < done.prompt_tokens < 248
    finally:
        runner.close()
        host.release()
