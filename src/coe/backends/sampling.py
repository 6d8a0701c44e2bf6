"""Choosing the next token from a model's logits: one module for every backend.

A decoder hands each sequence's next-token logits (float32 [V], a numpy view of the backend's own
buffer where it can) to that sequence's ``TokenSampler`` and gets a ``Token`` back. Sampling runs
next to the model, so what leaves a decoder step is token ids and a few numbers, never a logit
vector.

Order: the logits are shaped first (the expert's repetition penalty, OpenAI's presence and
frequency penalties, ``logit_bias``, and a grammar's mask: disallowed tokens get -inf);
log-probabilities are those of the shaped logits (what the sampler saw); then greedy takes the
argmax, or, as in llama.cpp's default chain, top-k, min-p and top-p cut the distribution,
temperature scales what is left and one draw comes from a generator of the sequence's own
(seeded: reproducible).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from coe.types import SamplingParams

if TYPE_CHECKING:
    from coe.config import LlamaCppParams, TorchParams


@dataclass(frozen=True)
class SamplerDefaults:
    """What an expert's params add to a request's SamplingParams (OpenAI requests carry only
    temperature and top_p): llama.cpp's server defaults for GGUF experts."""

    top_k: int = 0  # keep the k most likely tokens (0: all)
    min_p: float = 0.0  # keep tokens at least this likely relative to the most likely one
    # divide (multiply, if negative) the logits of recent tokens by this
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64  # generated tokens the repetition penalty looks back over

    @classmethod
    def of(cls, params: LlamaCppParams | TorchParams) -> SamplerDefaults:
        """An expert's defaults, from its backend params."""
        return cls(top_k=params.top_k, min_p=params.min_p, repeat_penalty=params.repeat_penalty)


PLAIN = SamplerDefaults()  # no expert defaults: the request's parameters alone


class TokenMask(Protocol):
    """A constraint on the next token (a grammar: ``coe.backends.grammar.GrammarMask``)."""

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens that may come next."""
        ...

    def consume(self, token_id: int) -> None:
        """The token that came."""
        ...


@dataclass(frozen=True)
class Token:
    """One sequence's result of one decoder step."""

    id: int
    logprob: float | None = None  # when SamplingParams.logprobs is set
    top: tuple[tuple[int, float], ...] = ()  # the most likely (id, log-probability), best first
    scored: tuple[float, ...] = ()  # log-probabilities of SamplingParams.score_ids
    cached_prompt_tokens: int = 0  # on a sequence's first token: prompt tokens reused from cache


class TokenSampler:
    """The sampling state of one sequence. Contract: ``pick`` reads ``logits`` and never writes it
    (it may be a view of the backend's buffer); one call per generated token."""

    def __init__(
        self,
        sampling: SamplingParams,
        defaults: SamplerDefaults = PLAIN,
        mask: TokenMask | None = None,
    ):
        self.sampling, self.defaults, self.mask = sampling, defaults, mask
        self._recent: deque[int] = deque(maxlen=max(1, defaults.penalty_last_n))
        self._counts: dict[int, int] = {}  # generated tokens, for presence and frequency penalties
        self._rng = np.random.default_rng(sampling.seed)  # None: fresh entropy, this sequence only
        self._bias_ids = np.array([t for t, _ in sampling.logit_bias], dtype=np.int64)
        self._bias = np.array([b for _, b in sampling.logit_bias], dtype=np.float32)

    def pick(self, logits: np.ndarray, cached_prompt_tokens: int = 0) -> Token:
        """The next token from ``logits`` [V] (float32)."""
        logits = self._shaped(logits)
        sampling = self.sampling
        token_id = int(np.argmax(logits)) if sampling.temperature == 0.0 else self._draw(logits)
        self._recent.append(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        if self.mask is not None:
            self.mask.consume(token_id)
        scored = log_softmax_at(logits, sampling.score_ids) if sampling.score_ids else ()
        if sampling.logprobs is None:
            return Token(token_id, scored=scored, cached_prompt_tokens=cached_prompt_tokens)
        logprob, top = _logprobs(logits, token_id, sampling.logprobs)
        return Token(token_id, logprob, top, scored, cached_prompt_tokens)

    def _shaped(self, logits: np.ndarray) -> np.ndarray:
        """Penalties, bias and the mask, applied to a copy (the input is the backend's buffer)."""
        sampling, penalty = self.sampling, self.defaults.repeat_penalty
        repeat = penalty != 1.0 and bool(self._recent)
        openai = bool(sampling.presence_penalty or sampling.frequency_penalty) and bool(
            self._counts
        )
        if not (repeat or openai or sampling.logit_bias or self.mask is not None):
            return logits
        out = logits.astype(np.float32, copy=True)
        if repeat:
            ids = np.fromiter(set(self._recent), dtype=np.int64)
            values = out[ids]
            out[ids] = np.where(values > 0, values / penalty, values * penalty)
        if openai:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            out[ids] -= counts * sampling.frequency_penalty + sampling.presence_penalty
        if sampling.logit_bias:
            inside = self._bias_ids < len(out)
            out[self._bias_ids[inside]] += self._bias[inside]
        if self.mask is not None:
            out[~self.mask.allowed()] = -np.inf
        return out

    def _draw(self, logits: np.ndarray) -> int:
        """top-k, min-p and top-p on the shaped distribution, then temperature, then a draw."""
        top = float(logits.max())
        candidates = np.flatnonzero(logits > -np.inf)
        if (
            self.defaults.min_p > 0.0
        ):  # cheapest cut: p >= min_p * p_max <=> logit >= max + ln(min_p)
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
            kept = max(
                1, int(np.searchsorted(np.cumsum(probs) - probs, self.sampling.top_p, side="left"))
            )
            candidates, values = candidates[:kept], values[:kept]
        weights = np.exp((values - values[0]) / self.sampling.temperature)
        cumulative = np.cumsum(weights)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


def _log_total(logits: np.ndarray) -> float:
    """log(sum(exp(logits))), in float64."""
    top = float(logits.max())
    return top + math.log(float(np.exp(logits.astype(np.float64) - top).sum()))


def log_softmax_at(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, ...]:
    """The log-probabilities of ``ids`` under ``logits``."""
    log_total = _log_total(logits)
    return tuple(float(logits[i]) - log_total for i in ids)


def _logprobs(
    logits: np.ndarray, token_id: int, k: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The chosen token's log-probability and the ``k`` most likely tokens', best first."""
    log_total = _log_total(logits)
    chosen = float(logits[token_id]) - log_total
    if k == 0:
        return chosen, ()
    k = min(k, len(logits))
    ids = np.argpartition(logits, -k)[-k:]
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    ids = ids[logits[ids] > -np.inf]  # a grammar's or a bias's excluded tokens are no alternative
    return chosen, tuple((int(i), float(logits[i]) - log_total) for i in ids)
