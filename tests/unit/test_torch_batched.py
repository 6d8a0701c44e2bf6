"""Batched generation on the torch backend: several sequences in one forward pass per decode step."""
import pytest
import torch

from coe.backends.memory import HostBufferPool
from coe.backends.torch import TorchBackend, TorchRunner
from coe.config import ExpertConfig
from coe.engine.batch import generate, next_token_logprobs
from coe.types import Request, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# different prompt lengths (BOS + bytes: 2, 20, 47, 9 tokens) and different max_tokens
PROMPTS = ["x", "The quick brown fox", "A longer prompt, so that the batch is padded.", "hello 42"]
MAX_TOKENS = [9, 20, 6, 14]


def load(path, **params) -> TorchRunner:
    backend = TorchBackend()
    expert = ExpertConfig("tiny", str(path), backend="torch_hf", params=params)
    return backend.materialize(backend.read(expert, path, HostBufferPool()))


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_checkpoint):
    return load(tiny_qwen2_checkpoint)


@pytest.fixture(params=["llama", "qwen2"])
def runner(request):
    return request.getfixturevalue(request.param)


def requests(prompts=PROMPTS, max_tokens=MAX_TOKENS, **sampling):
    return [Request("tiny", SamplingParams(max_tokens=n, **sampling), prompt=p) for p, n in zip(prompts, max_tokens)]


def completions(runner, batch):
    """{request id: (text joined from deltas, completion)}; every request ends with one completion."""
    texts, done = {r.id: "" for r in batch}, {}
    for event in generate(runner, batch):
        assert event.error is None, event.error
        assert event.request_id not in done
        texts[event.request_id] += event.delta
        if event.completion is not None:
            done[event.request_id] = (texts[event.request_id], event.completion)
    assert set(done) == set(texts)
    return [done[r.id] for r in batch]


def alone(runner, batch):
    """Each request generated on its own (the single-sequence path)."""
    return [completions(runner, [request])[0] for request in batch]


def decoder_ids(runner, prompts, samplings, steps):
    """Token ids from one decoder, every sequence kept for ``steps`` steps (EOS ignored)."""
    decoder = runner.open_decoder()
    try:
        for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            decoder.add(i, prompt, sampling)
        out = [[] for _ in prompts]
        for _ in range(steps):
            for i, token in decoder.step().items():
                out[i].append(token.id)
        return out
    finally:
        decoder.close()


def sample_ids(runner, prompt_ids, count, sampling):
    """The tokens of one sequence decoded alone."""
    return decoder_ids(runner, [prompt_ids], [sampling], count)[0]


class ForwardCalls:
    """Counts calls of the model module and records the batch shape of each."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.register_forward_pre_hook(lambda _, args: self.shapes.append(tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- the model's batched forward ---------------------------------------------------------------

def test_batched_forward_matches_each_sequence_alone(runner):
    """Right-padded prefill, then one decode step at different positions per row."""
    model = runner.model
    prompts = [runner.vocab.encode(p) for p in PROMPTS]
    lengths = [len(p) for p in prompts]
    ids = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    with torch.inference_mode():
        cache = runner.new_cache(len(prompts), max(lengths) + 1)
        prefill = model(ids, cache, 0, last=torch.tensor(lengths) - 1)  # [B, V]
        step = model(torch.tensor([[65]] * len(prompts)), cache, lengths)  # token 65 at each row's next position
        for row, prompt in enumerate(prompts):
            own = runner.new_cache(1, len(prompt) + 1)
            torch.testing.assert_close(prefill[row], model(torch.tensor([prompt]), own, 0)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[row], model(torch.tensor([[65]]), own, len(prompt))[0], atol=1e-5, rtol=1e-5)
    assert prefill.shape == step.shape == (len(prompts), 258)


# ---- greedy equivalence ------------------------------------------------------------------------

def test_greedy_batched_tokens_equal_each_sequence_alone(runner):
    prompts = [runner.vocab.encode(p) for p in PROMPTS]
    samplings = [SamplingParams(max_tokens=n, temperature=0.0) for n in MAX_TOKENS]
    batched = decoder_ids(runner, prompts, samplings, steps=min(MAX_TOKENS))
    for prompt, sampling, ids in zip(prompts, samplings, batched):
        assert ids == sample_ids(runner, prompt, len(ids), sampling)


def test_greedy_batched_completions_equal_each_request_alone(runner):
    batch = requests(temperature=0.0)
    assert runner.max_sequences == 8  # the default: all four in one decoder
    assert completions(runner, batch) == alone(runner, requests(temperature=0.0))
    assert [c.completion_tokens for _, c in completions(runner, batch)] != [0] * len(batch)


def test_max_sequences_bounds_the_rows_and_the_rest_join_as_rows_free(tiny_checkpoint, llama):
    small = load(tiny_checkpoint, max_sequences=2)
    assert small.max_sequences == 2
    prompts, max_tokens = PROMPTS + ["one more"], MAX_TOKENS + [5]
    with ForwardCalls(small.model) as calls:
        got = completions(small, requests(prompts, max_tokens, temperature=0.0))
    assert max(shape[0] for shape in calls.shapes if len(shape) == 2) == 2  # never more than 2 rows
    assert got == alone(llama, requests(prompts, max_tokens, temperature=0.0))


# ---- sequences finishing at different times ----------------------------------------------------

def test_a_request_cancelled_mid_batch_ends_cancelled_and_the_others_complete(llama, monkeypatch):
    batch = requests(max_tokens=[20] * len(PROMPTS), temperature=0.0)
    victim = batch[1]
    rows = []  # cache rows after each step
    open_decoder = llama.open_decoder

    def spying_open():
        decoder = open_decoder()
        step = decoder.step

        def spying_step():
            if len(rows) == 3:
                victim.cancel()  # during the 4th step
            tokens = step()
            rows.append(decoder.cache[0][0].shape[0])
            return tokens

        decoder.step = spying_step
        return decoder

    monkeypatch.setattr(llama, "open_decoder", spying_open)
    got = completions(llama, batch)
    expected = alone(llama, requests(max_tokens=[20] * len(PROMPTS), temperature=0.0))
    assert got[1][1].finish_reason == "cancelled"
    assert got[1][1].completion_tokens == 3  # tokens of steps 1-3; the 4th was dropped
    assert expected[1][1].text.startswith(got[1][1].text)
    assert [g for k, g in enumerate(got) if k != 1] == [e for k, e in enumerate(expected) if k != 1]
    assert rows[3] == len(PROMPTS) and all(r < len(PROMPTS) for r in rows[4:])  # its cache row left the batch


def test_a_stop_string_ends_one_request_early_while_the_others_continue(llama):
    full, _ = alone(llama, requests(PROMPTS[1:2], [40], temperature=0.0))[0]
    stop = full[10:12]
    expected_text = full[:full.index(stop)]
    batch = requests(max_tokens=[30, 40, 30, 30], temperature=0.0)
    batch[1] = Request("tiny", SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,)), prompt=PROMPTS[1])
    got = completions(llama, batch)
    assert got[1][0] == got[1][1].text == expected_text
    assert got[1][1].finish_reason == "stop"
    others = alone(llama, requests([PROMPTS[k] for k in (0, 2, 3)], [30, 30, 30], temperature=0.0))
    assert [got[k] for k in (0, 2, 3)] == others
    assert max(c.completion_tokens for _, c in others) > got[1][1].completion_tokens  # they went on longer


def test_an_end_token_ends_one_sequence_while_the_others_continue(llama, monkeypatch):
    """Whichever token one sequence samples at its 3rd step is declared an end token."""
    greedy = requests(max_tokens=[12] * len(PROMPTS), temperature=0.0)
    reference = alone(llama, greedy)
    prompts = [llama.vocab.encode(p) for p in PROMPTS]
    end_token = sample_ids(llama, prompts[2], 3, SamplingParams(temperature=0.0))[2]
    monkeypatch.setattr(llama.vocab, "is_end", lambda token_id: token_id == end_token)
    got = completions(llama, requests(max_tokens=[12] * len(PROMPTS), temperature=0.0))
    assert got[2][1].finish_reason == "stop"
    assert got[2][1].completion_tokens <= 2
    for (text, completion), (ref_text, ref) in zip(got, reference):
        assert ref_text.startswith(text)  # each one the greedy text, cut at its first end token
        assert completion.finish_reason == ("stop" if completion.completion_tokens < 12 else "length")
    assert any(c.completion_tokens == 12 for _, c in got)  # some sequence ran on to max_tokens


# ---- sampling ----------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_across_batched_runs(runner):
    def seeded():
        batch = requests(max_tokens=[16] * len(PROMPTS), temperature=1.0)
        for seed, request in enumerate(batch):
            request.sampling = SamplingParams(max_tokens=16, temperature=1.0, seed=100 + seed)
        return batch

    first, second = completions(runner, seeded()), completions(runner, seeded())
    assert first == second
    prompts = [runner.vocab.encode(p) for p in PROMPTS]
    sampled = decoder_ids(runner, prompts, [SamplingParams(temperature=1.0, seed=7)] * len(prompts), steps=16)
    assert sampled == decoder_ids(runner, prompts, [SamplingParams(temperature=1.0, seed=7)] * len(prompts), steps=16)
    assert sampled != decoder_ids(runner, prompts, [SamplingParams(temperature=1.0, seed=8)] * len(prompts), steps=16)


def test_each_sequence_samples_with_its_own_params(llama):
    """A greedy row in a batch of sampled rows stays greedy; a top_p ~ 0 row is greedy too."""
    prompts = [llama.vocab.encode(p) for p in PROMPTS]
    samplings = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.0),
                 SamplingParams(temperature=1.0, top_p=1e-6, seed=2), SamplingParams(temperature=2.0, seed=3)]
    got = decoder_ids(llama, prompts, samplings, steps=10)
    assert got[1] == sample_ids(llama, prompts[1], 10, SamplingParams(temperature=0.0))
    assert got[2] == sample_ids(llama, prompts[2], 10, SamplingParams(temperature=0.0))


def test_unseeded_batched_sampling_leaves_the_global_torch_rng_alone(llama):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    completions(llama, requests(temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


# ---- one forward pass per step -----------------------------------------------------------------

def test_decode_steps_are_one_forward_pass_for_all_sequences(llama):
    prompts = [llama.vocab.encode(p) for p in PROMPTS]
    samplings = [SamplingParams(temperature=0.0)] * len(prompts)
    with ForwardCalls(llama.model) as calls:
        decoder_ids(llama, prompts, samplings, steps=10)
    assert len(calls.shapes) == 10  # not 4 x 10
    assert calls.shapes[0] == (len(prompts), max(len(p) for p in prompts))  # one padded prefill
    assert calls.shapes[1:] == [(len(prompts), 1)] * 9


def test_generate_makes_about_one_forward_pass_per_token_not_per_sequence(llama):
    n, tokens = 5, 16
    batch = requests(["a", "bb", "ccc", "dddd", "eeeee"], [tokens] * n, temperature=0.0)
    with ForwardCalls(llama.model) as calls:
        got = completions(llama, batch)
    with ForwardCalls(llama.model) as sequential:
        alone(llama, requests(["a", "bb", "ccc", "dddd", "eeeee"], [tokens] * n, temperature=0.0))
    assert len(calls.shapes) <= tokens
    assert len(sequential.shapes) >= sum(c.completion_tokens for _, c in got)
    assert len(sequential.shapes) > 2 * len(calls.shapes)


def test_finished_rows_leave_the_forward_pass(llama):
    prompts = [llama.vocab.encode(p) for p in PROMPTS]
    decoder = llama.open_decoder()
    for i, prompt in enumerate(prompts):
        decoder.add(i, prompt, SamplingParams(temperature=0.0))
    with ForwardCalls(llama.model) as calls:
        first = decoder.step()
        decoder.remove(1)
        second = decoder.step()
        decoder.remove(0)
        decoder.remove(2)
        third = decoder.step()
    decoder.close()
    decoder.close()  # twice is harmless
    assert calls.shapes[1:] == [(3, 1), (1, 1)]
    assert set(first) == {0, 1, 2, 3} and set(second) == {0, 2, 3} and set(third) == {3}
    assert [t.id for t in (first[3], second[3], third[3])] == sample_ids(llama, prompts[3], 3, SamplingParams(temperature=0.0))
    assert [first[0].id, second[0].id] == sample_ids(llama, prompts[0], 2, SamplingParams(temperature=0.0))


def test_a_sequence_added_while_others_run_decodes_as_it_would_alone(llama):
    """Continuous batching on the torch decoder: a new row is prefilled beside the running ones."""
    prompts = [llama.vocab.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    decoder = llama.open_decoder()
    decoder.add(0, prompts[0], greedy)
    got = {0: [], 1: []}
    for step in range(8):
        if step == 3:
            decoder.add(1, prompts[1], greedy)
        for seq, token in decoder.step().items():
            got[seq].append(token.id)
    decoder.close()
    assert got[0] == sample_ids(llama, prompts[0], 8, greedy)
    assert got[1] == sample_ids(llama, prompts[1], 5, greedy)


def test_next_token_logprobs_are_a_distribution_led_by_the_greedy_token(runner):
    prompt_ids = runner.vocab.encode("The quick brown fox")
    logprobs = torch.tensor(next_token_logprobs(runner, prompt_ids, range(258)))
    assert torch.exp(logprobs).sum().item() == pytest.approx(1.0, abs=1e-4)
    greedy = sample_ids(runner, prompt_ids, 1, SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert int(torch.argmax(logprobs)) == greedy
