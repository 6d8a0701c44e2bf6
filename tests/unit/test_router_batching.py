"""BatchingRouter: concurrent calls share inner calls and get exactly their own rows back."""
from __future__ import annotations

import threading
import time

import pytest

from coe.router.base import Router
from coe.router.batching import BatchingRouter


class SlowRouter(Router):
    """Probability rows derived from the text; each call takes a little while, like an encoder."""

    def __init__(self, fail_on: str | None = None):
        super().__init__(("a", "b"), 0.0, "chat")
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def probabilities(self, texts):
        self.calls.append(list(texts))
        time.sleep(0.01)
        if self.fail_on in texts:
            raise RuntimeError("encoder broke")
        return [[len(t) / 100, 1 - len(t) / 100] for t in texts]


def test_lone_call_is_passed_through():
    inner = SlowRouter()
    router = BatchingRouter(inner)
    assert router.probabilities(["abc", "de"]) == [[0.03, 0.97], [0.02, 0.98]]
    assert inner.calls == [["abc", "de"]]


def test_concurrent_calls_are_batched_and_answered_in_order():
    inner = SlowRouter()
    router = BatchingRouter(inner, max_texts=64)
    texts = ["x" * n for n in range(1, 41)]
    results: dict[str, list[float]] = {}

    def client(text: str) -> None:
        results[text] = router.classify([text])[0].probabilities["a"]

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t: pytest.approx(len(t) / 100) for t in texts}
    assert len(inner.calls) < len(texts)  # some calls carried several prompts
    assert sorted(t for call in inner.calls for t in call) == sorted(texts)
    assert max(len(call) for call in inner.calls) <= 64


def test_a_failing_inner_call_fails_its_waiters_and_the_batcher_lives_on():
    router = BatchingRouter(SlowRouter(fail_on="boom"))
    with pytest.raises(RuntimeError, match="encoder broke"):
        router.probabilities(["boom"])
    assert router.probabilities(["fine"]) == [[0.04, 0.96]]


def test_decisions_keep_the_inner_threshold_and_fallback():
    inner = SlowRouter()
    inner.threshold = 0.9
    router = BatchingRouter(inner)
    decision = router.classify(["hello"])[0]
    assert router.threshold == 0.9 and router.fallback_category == "chat"
    assert decision.category == "b" and not decision.fallback  # 0.95 >= 0.9
