"""coe.router.base: the Router ABC, the threshold/fallback decision and prompt checks."""
import threading

import pytest

from coe.errors import InvalidRequest, RoutingError
from coe.router.base import MAX_PROMPT_CHARS, CategoryDecision, Router, check_prompt

CATS = ("math", "code", "writing")


class FixedRouter(Router):
    """Probability rows keyed by the exact text; an unknown text is a test bug (KeyError)."""

    def __init__(self, rows: dict[str, list[float]], threshold: float = 0.5,
                 fallback: str = "chat", categories: tuple[str, ...] = CATS):
        super().__init__(categories, threshold, fallback)
        self.rows = rows
        self.calls: list[list[str]] = []

    def probabilities(self, texts):
        self.calls.append(list(texts))
        return [self.rows[t] for t in texts]


def test_router_is_abstract():
    with pytest.raises(TypeError):
        Router(CATS, 0.5, "chat")  # type: ignore[abstract]


def test_router_needs_a_category():
    with pytest.raises(RoutingError):
        FixedRouter({}, categories=())


def test_decide_above_threshold_picks_the_top_category():
    router = FixedRouter({}, threshold=0.5)
    decision = router.decide([0.125, 0.75, 0.125])
    assert decision == CategoryDecision("code", 0.75, {"math": 0.125, "code": 0.75, "writing": 0.125})
    assert decision.fallback is False
    assert decision.reason == ""


def test_decide_at_exactly_the_threshold_is_not_a_fallback():
    decision = FixedRouter({}, threshold=0.5).decide([0.5, 0.25, 0.25])
    assert (decision.category, decision.fallback) == ("math", False)


def test_decide_below_threshold_goes_to_a_fallback_outside_the_trained_categories():
    router = FixedRouter({}, threshold=0.5, fallback="chat")
    decision = router.decide([0.375, 0.25, 0.375])
    assert decision.category == "chat"
    assert "chat" not in router.categories
    assert decision.fallback is True
    assert decision.confidence == 0.375  # the top category's probability, not the fallback's
    assert decision.probabilities == {"math": 0.375, "code": 0.25, "writing": 0.375}
    assert decision.reason == "confidence 0.38 in 'math' is below the threshold 0.50"


def test_decide_below_threshold_when_the_top_is_the_fallback_keeps_it_without_a_fallback_flag():
    router = FixedRouter({}, threshold=0.9, fallback="writing")
    decision = router.decide([0.25, 0.25, 0.5])
    assert decision == CategoryDecision("writing", 0.5, {"math": 0.25, "code": 0.25, "writing": 0.5})


def test_decide_threshold_zero_never_falls_back():
    decision = FixedRouter({}, threshold=0.0).decide([0.34, 0.33, 0.33])
    assert (decision.category, decision.fallback) == ("math", False)


def test_decide_converts_values_to_python_floats():
    import torch

    decision = FixedRouter({}).decide(torch.tensor([0.25, 0.5, 0.25]))
    assert all(type(p) is float for p in decision.probabilities.values())
    assert decision.probabilities["code"] == 0.5


def test_ranked_sorts_by_probability_descending():
    decision = CategoryDecision("code", 0.5, {"math": 0.125, "code": 0.5, "writing": 0.375})
    assert decision.ranked() == [("code", 0.5), ("writing", 0.375), ("math", 0.125)]


def test_classify_returns_one_decision_per_text_in_order():
    router = FixedRouter({"a": [0.75, 0.125, 0.125], "b": [0.125, 0.125, 0.75],
                          "c": [0.375, 0.375, 0.25]})
    decisions = router.classify(["b", "a", "c"])
    assert [d.category for d in decisions] == ["writing", "math", "chat"]
    assert [d.fallback for d in decisions] == [False, False, True]
    assert router.calls == [["b", "a", "c"]]  # one batched call


def test_classify_checks_every_prompt_before_computing_anything():
    router = FixedRouter({"a": [1.0, 0.0, 0.0]})
    with pytest.raises(InvalidRequest):
        router.classify(["a", "   "])
    assert router.calls == []


@pytest.mark.parametrize("bad", ["", "   \n\t", None, 42, b"bytes", ["a list"]])
def test_check_prompt_rejects_empty_and_non_strings(bad):
    with pytest.raises(InvalidRequest) as info:
        check_prompt(bad)
    assert info.value.param == "prompt"
    assert info.value.http_status == 400


def test_check_prompt_rejects_more_than_the_limit_and_says_so():
    with pytest.raises(InvalidRequest) as info:
        check_prompt("x" * (MAX_PROMPT_CHARS + 1))
    assert f"{MAX_PROMPT_CHARS + 1} characters" in info.value.message
    assert str(MAX_PROMPT_CHARS) in info.value.message


def test_check_prompt_accepts_exactly_the_limit_and_a_100k_prompt():
    assert MAX_PROMPT_CHARS == 200_000
    at_limit = "y" * MAX_PROMPT_CHARS
    assert check_prompt(at_limit) is at_limit
    long = "word " * 20_000
    assert len(long) == 100_000
    assert check_prompt(long) is long


def test_check_prompt_returns_the_text_unchanged():
    assert check_prompt("  hi  ") == "  hi  "


def test_classify_is_usable_from_several_threads():
    router = FixedRouter({f"t{i}": [0.75, 0.125, 0.125] if i % 2 else [0.125, 0.75, 0.125]
                          for i in range(8)})
    results: dict[int, str] = {}

    def work(i):
        results[i] = router.classify([f"t{i}"])[0].category

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: "math" if i % 2 else "code" for i in range(8)}
