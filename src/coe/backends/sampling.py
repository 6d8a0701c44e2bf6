"""Choosing the next token from a model's logits: one module for every backend.

A decoder hands each sequence's next-token logits (float32 [V], a numpy view of the backend's own
buffer where it can) to that sequence's ``TokenSampler`` and gets a ``Token`` back. Sampling runs
next to the model, so what leaves a decoder step is token ids and a few numbers, never a logit
vector. Order, as in llama.cpp's default chain: repetition penalty, then (unless greedy) top-k,
top-p and min-p on the model's own distribution, then temperature, then one draw from a generator
of the sequence's own (seeded: reproducible).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from coe.types import SamplingParams


@dataclass(frozen=True)
class SamplerDefaults:
    """What an expert's params add to a request's SamplingParams (OpenAI requests carry only
    temperature and top_p): llama.cpp's server defaults for GGUF experts."""

    top_k: int = 0  # keep the k most likely tokens (0: all)
    min_p: float = 0.0  # keep tokens at least this likely relative to the most likely one
    repeat_penalty: float = (
        1.0  # divide (multiply, if negative) the logits of recent tokens by this
    )
    penalty_last_n: int = 64  # generated tokens the repetition penalty looks back over


@dataclass(frozen=True)
class Token:
    """One sequence's result of one decoder step."""

    id: int
    scored: tuple[
        float, ...
    ] = ()  # log-probabilities of SamplingParams.score_ids (the evaluation's letters)
    cached_prompt_tokens: int = (
        0  # on a sequence's first token: prompt tokens its prefill reused from cache
    )


class TokenSampler:
    """The sampling state of one sequence. Contract: ``pick`` reads ``logits`` and never writes it
    (it may be a view of the backend's buffer); one call per generated token."""

    def __init__(self, sampling: SamplingParams, defaults: SamplerDefaults = SamplerDefaults()):
        self.sampling, self.defaults = sampling, defaults
        self._recent: deque[int] = deque(maxlen=max(1, defaults.penalty_last_n))
        self._rng = np.random.default_rng(
            sampling.seed
        )  # seed None: fresh entropy for this sequence only

    def pick(self, logits: np.ndarray, cached_prompt_tokens: int = 0) -> Token:
        """The next token from ``logits`` [V] (float32)."""
        logits = self._penalised(logits)
        if self.sampling.temperature == 0.0:
            token_id = int(np.argmax(logits))
        else:
            token_id = self._draw(logits)
        self._recent.append(token_id)
        scored = _log_softmax_at(logits, self.sampling.score_ids) if self.sampling.score_ids else ()
        return Token(token_id, scored, cached_prompt_tokens)

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        penalty = self.defaults.repeat_penalty
        if penalty == 1.0 or not self._recent:
            return logits
        ids = np.fromiter(set(self._recent), dtype=np.int64)
        out = logits.copy()
        values = out[ids]
        out[ids] = np.where(values > 0, values / penalty, values * penalty)
        return out

    def _draw(self, logits: np.ndarray) -> int:
        """top-k, top-p and min-p on the model's distribution, then temperature, then a draw."""
        top = float(logits.max())
        candidates = np.flatnonzero(logits > -np.inf)
        if (
            self.defaults.min_p > 0.0
        ):  # cheapest cut first: p >= min_p * p_max  <=>  logit >= max + ln(min_p)
            candidates = np.flatnonzero(logits >= top + math.log(self.defaults.min_p))
        values = logits[candidates]
        k = self.defaults.top_k
        if 0 < k < len(candidates):
            keep = np.argpartition(values, -k)[-k:]
            candidates, values = candidates[keep], values[keep]
        order = np.argsort(-values, kind="stable")
        candidates, values = candidates[order], values[order].astype(np.float64)
        if self.sampling.top_p < 1.0:
            probs = np.exp(values - values[0])
            probs /= probs.sum()
            kept = int(np.searchsorted(np.cumsum(probs) - probs, self.sampling.top_p, side="left"))
            candidates, values = candidates[: max(kept, 1)], values[: max(kept, 1)]
        weights = np.exp((values - values[0]) / self.sampling.temperature)
        cumulative = np.cumsum(weights)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


def _log_softmax_at(logits: np.ndarray, ids: tuple[int, ...]) -> tuple[float, ...]:
    top = float(logits.max())
    log_total = top + math.log(float(np.exp(logits.astype(np.float64) - top).sum()))
    return tuple(float(logits[i]) - log_total for i in ids)
