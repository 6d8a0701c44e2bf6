"""The shared sampler (coe.backends.sampling) on hand-made logits: greedy, penalties, logit_bias,
masks, log-probabilities and seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coe.backends.sampling import SamplerDefaults, TokenSampler
from coe.types import SamplingParams

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], dtype=np.float32)


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


def test_greedy_takes_the_argmax_and_leaves_the_input_alone():
    logits = LOGITS.copy()
    sampler = TokenSampler(SamplingParams(temperature=0.0, logit_bias=((4, 10.0),)))
    assert sampler.pick(logits).id == 4
    assert np.array_equal(logits, LOGITS)  # the backend's buffer is never written


def test_logprobs_are_of_the_shaped_logits_sorted_and_the_greedy_token_first():
    sampler = TokenSampler(SamplingParams(temperature=0.0, logprobs=3))
    token = sampler.pick(LOGITS)
    expected = log_softmax(LOGITS)
    assert token.id == 1 and token.logprob == pytest.approx(expected[1])
    assert [i for i, _ in token.top] == [1, 2, 0]
    assert [lp for _, lp in token.top] == pytest.approx([expected[1], expected[2], expected[0]])
    assert all(lp <= 0 for _, lp in token.top)
    assert TokenSampler(SamplingParams(temperature=0.0, logprobs=0)).pick(LOGITS).top == ()
    assert TokenSampler(SamplingParams(temperature=0.0)).pick(LOGITS).logprob is None


def test_frequency_and_presence_penalties_follow_openai():
    """logit -= count * frequency_penalty + (count > 0) * presence_penalty, over generated tokens."""
    sampler = TokenSampler(
        SamplingParams(temperature=0.0, frequency_penalty=0.6, presence_penalty=0.5, logprobs=5)
    )
    assert sampler.pick(LOGITS).id == 1  # nothing generated yet: no penalty
    second = sampler.pick(LOGITS)  # token 1 once: 3.0 - 0.6 - 0.5 = 1.9 < 2.0
    assert second.id == 2
    shaped = LOGITS.copy()
    shaped[1] -= 1.1
    assert dict(second.top)[1] == pytest.approx(log_softmax(shaped)[1])
    third = sampler.pick(LOGITS)  # 1: 1.9, 2: 2.0 - 1.1 = 0.9, 0: 1.0 -> 1 again
    assert third.id == 1
    assert sampler.pick(LOGITS).id == 1  # 1 twice: 3.0 - 1.2 - 0.5 = 1.3 > 1.0
    assert sampler.pick(LOGITS).id == 0  # 1 three times: 0.7 < 1.0


def test_a_negative_presence_penalty_makes_repeats_likelier():
    sampler = TokenSampler(
        SamplingParams(temperature=0.0, presence_penalty=-2.0, logit_bias=((1, -1.5),))
    )
    assert sampler.pick(LOGITS).id == 2  # 3.0 - 1.5 = 1.5 < 2.0
    assert sampler.pick(LOGITS).id == 2  # 2.0 + 2.0 stays on top


def test_logit_bias_of_minus_100_bans_a_token_and_plus_100_forces_it():
    rng_params = dict(temperature=1.5, seed=3)
    banned = TokenSampler(SamplingParams(logit_bias=((1, -100.0),), **rng_params))
    assert all(banned.pick(LOGITS).id != 1 for _ in range(200))
    forced = TokenSampler(SamplingParams(logit_bias=((3, 100.0),), **rng_params))
    assert {forced.pick(LOGITS).id for _ in range(50)} == {3}


class EvenOnly:
    """A mask allowing even token ids; records what it consumed."""

    def __init__(self):
        self.consumed = []

    def allowed(self):
        return np.arange(len(LOGITS)) % 2 == 0

    def consume(self, token_id):
        self.consumed.append(token_id)


def test_a_mask_limits_every_draw_and_sees_every_token():
    mask = EvenOnly()
    sampler = TokenSampler(
        SamplingParams(temperature=2.0, seed=1, logprobs=2), SamplerDefaults(top_k=40), mask
    )
    picks = [sampler.pick(LOGITS) for _ in range(100)]
    assert {p.id for p in picks} <= {0, 2, 4} and len({p.id for p in picks}) > 1
    assert mask.consumed == [p.id for p in picks]
    allowed = LOGITS.copy()
    allowed[[1, 3]] = -np.inf
    assert dict(picks[0].top) == pytest.approx(
        {2: log_softmax(allowed)[2], 0: log_softmax(allowed)[0]}
    )


def test_tokens_a_mask_excludes_are_never_listed_as_alternatives():
    sampler = TokenSampler(SamplingParams(temperature=0.0, logprobs=5), mask=EvenOnly())
    token = sampler.pick(LOGITS)
    assert [i for i, _ in token.top] == [2, 0, 4]  # fewer than asked: only three are allowed
    assert all(math.isfinite(lp) for _, lp in token.top)


def test_seeded_draws_repeat_and_differ_between_seeds():
    def draws(seed):
        sampler = TokenSampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.pick(LOGITS).id for _ in range(40)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


def test_top_p_keeps_the_smallest_set_over_p_and_min_p_cuts_relative_to_the_best():
    probs = np.exp(log_softmax(LOGITS))  # 1: 0.61, 2: 0.22, 0: 0.08, ...
    narrow = TokenSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {narrow.pick(LOGITS).id for _ in range(100)} == {1}
    two = TokenSampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {two.pick(LOGITS).id for _ in range(200)} == {1, 2}
    relative = TokenSampler(
        SamplingParams(temperature=1.0, seed=0), SamplerDefaults(min_p=probs[0] / probs[1] * 1.01)
    )
    assert {relative.pick(LOGITS).id for _ in range(200)} == {1, 2}
