"""The router interface: one abstract method; the confidence threshold and fallback live here.

Contract: ``probabilities`` is safe to call from several threads at once and returns one row per
text, each row summing to 1 over ``categories``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from coe.errors import InvalidRequest, RoutingError

MAX_PROMPT_CHARS = 200_000


@dataclass(frozen=True)
class CategoryDecision:
    category: str
    confidence: float  # calibrated probability of the top category
    probabilities: dict[str, float]
    fallback: bool = False
    reason: str = ""

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])


class Router(ABC):
    def __init__(self, categories: tuple[str, ...], threshold: float, fallback_category: str):
        """``fallback_category`` need not be one the head predicts: it is where doubt goes."""
        if not categories:
            raise RoutingError("a router needs at least one category")
        self.categories = categories
        self.threshold = threshold
        self.fallback_category = fallback_category

    @abstractmethod
    def probabilities(self, texts: list[str]) -> list[list[float]]:
        """Calibrated category probabilities, one row per text, in ``self.categories`` order."""

    def embeddings(self, texts: list[str]) -> list[list[float]] | None:
        """The sentence embeddings the probabilities come from (None: this router has none)."""
        return None

    def classify(self, texts: list[str]) -> list[CategoryDecision]:
        for text in texts:
            check_prompt(text)
        return [self.decide(row) for row in self.probabilities(texts)]

    def decide(self, row: list[float]) -> CategoryDecision:
        probs = dict(zip(self.categories, (float(p) for p in row)))
        top = max(probs, key=probs.__getitem__)
        if probs[top] < self.threshold and top != self.fallback_category:
            return CategoryDecision(
                self.fallback_category,
                probs[top],
                probs,
                fallback=True,
                reason=f"confidence {probs[top]:.2f} in {top!r} is below the "
                f"threshold {self.threshold:.2f}",
            )
        return CategoryDecision(top, probs[top], probs)


def check_prompt(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidRequest("the prompt must be a string", param="prompt")
    if not text.strip():
        raise InvalidRequest("the prompt is empty: nothing to route", param="prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"the prompt has {len(text)} characters; the router reads at most {MAX_PROMPT_CHARS}",
            param="prompt",
        )
    return text
