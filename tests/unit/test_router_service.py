"""coe.router.service: ExpertRouter (prompt, batch, conversation stay rule), the category-to-expert
map built from the config, the packaged score table and the pin checks. Uses a fake Router."""
import json

import pytest

from coe.config import RouterConfig
from coe.errors import ConfigError, InvalidRequest, RouterUnavailable
from coe.router.base import CategoryDecision, Router
from coe.router.data import CATEGORIES
from coe.router.mapping import ExpertMap, ScoreTable
from coe.router.service import (ExpertRouter, build_map, check_categories, default_artifact_dir,
                                load_expert_router, load_score_table, map_problem)
from coe.types import ChatMessage, RouteDecision

CATS = ("math", "code", "writing")
# math and writing share expert X; code has its own; the fallback goes to the generalist G
ASSIGNMENT = {"math": "X", "code": "Y", "writing": "X", "chat": "G"}


class FixedRouter(Router):
    def __init__(self, rows, threshold=0.25, fallback="chat", categories=CATS):
        super().__init__(categories, threshold, fallback)
        self.rows = rows
        self.calls = []

    def probabilities(self, texts):
        self.calls.append(list(texts))
        return [self.rows[t] for t in texts]


def expert_router(rows, margin=0.2, assignment=ASSIGNMENT, **kw) -> ExpertRouter:
    return ExpertRouter(FixedRouter(rows, **kw), dict(assignment), stay_margin=margin)


def user(text):
    return ChatMessage("user", text)


# -- single prompts ---------------------------------------------------------------------------------
def test_route_prompt_maps_the_category_to_its_expert_with_alternatives():
    router = expert_router({"solve x": [0.75, 0.125, 0.125]})
    decision = router.route_prompt("solve x")
    assert decision == RouteDecision(category="math", confidence=0.75, expert="X",
                                     alternatives=(("code", "Y", 0.125), ("writing", "X", 0.125)),
                                     fallback=False, reason="")


def test_alternatives_are_the_top_three_others_by_probability_rounded():
    cats = ("a", "b", "c", "d", "e")
    assignment = {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E", "chat": "G"}
    router = expert_router({"p": [0.1, 0.123456, 0.4, 0.3, 0.076544]}, assignment=assignment,
                           categories=cats)
    decision = router.route_prompt("p")
    assert decision.category == "c"
    assert decision.alternatives == (("d", "D", 0.3), ("b", "B", 0.1235), ("a", "A", 0.1))


def test_fallback_decision_goes_to_the_fallback_expert_and_lists_all_categories_as_alternatives():
    router = expert_router({"hm": [0.375, 0.375, 0.25]}, threshold=0.5)
    decision = router.route_prompt("hm")
    assert decision.category == "chat"
    assert decision.expert == "G"
    assert decision.fallback is True
    assert decision.confidence == 0.375
    assert decision.alternatives == (("math", "X", 0.375), ("code", "Y", 0.375),
                                     ("writing", "X", 0.25))
    assert "below the threshold 0.50" in decision.reason


def test_route_prompt_appends_the_tools_listing_to_the_text_it_routes():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {}, "unit": {}}}}}]
    text = "what's it like outside?\n\nAvailable functions:\n- get_weather(city, unit): Weather now"
    router = expert_router({text: [0.125, 0.75, 0.125]})
    assert router.route_prompt("what's it like outside?", tools).expert == "Y"
    assert router.router.calls == [[text]]


@pytest.mark.parametrize("bad", ["", "  ", None, "x" * 200_001])
def test_route_prompt_rejects_bad_prompts(bad):
    with pytest.raises(InvalidRequest):
        expert_router({}).route_prompt(bad)


def test_route_prompts_routes_a_batch_in_one_call():
    router = expert_router({"a": [0.75, 0.125, 0.125], "b": [0.125, 0.75, 0.125]})
    decisions = router.route_prompts(["b", "a", "b"])
    assert [(d.category, d.expert) for d in decisions] == [("code", "Y"), ("math", "X"), ("code", "Y")]
    assert router.router.calls == [["b", "a", "b"]]


def test_route_prompts_rejects_a_bad_prompt_in_the_batch():
    with pytest.raises(InvalidRequest):
        expert_router({"a": [1.0, 0.0, 0.0]}).route_prompts(["a", ""])


# -- conversations ------------------------------------------------------------------------------------
FIRST, LAST = "integrate x squared", "now write it as a program"
WHOLE, BEFORE = f"{FIRST}\n\n{LAST}", FIRST


def conversation(last_row, whole_row=None, before_row=(0.75, 0.125, 0.125), **kw):
    """Earlier turn: math (expert X). Rows are exact binary fractions so gains are exact."""
    rows = {LAST: list(last_row), WHOLE: list(whole_row or last_row), BEFORE: list(before_row)}
    return expert_router(rows, **kw)


MESSAGES = [ChatMessage("system", "be brief"), user(FIRST), ChatMessage("assistant", "x^3/3"),
            user(LAST)]


def test_small_gain_keeps_the_conversation_on_its_category_and_expert():
    router = conversation([0.375, 0.5, 0.125], margin=0.2)  # code beats math by only 0.125
    decision = router.route_messages(MESSAGES)
    assert (decision.category, decision.expert) == ("math", "X")
    assert decision.confidence == 0.375  # math's probability now
    assert decision.fallback is False
    assert "kept" in decision.reason
    assert "'math'" in decision.reason and "'code'" in decision.reason
    assert "0.12 more likely (margin 0.20)" in decision.reason
    assert decision.alternatives == (("code", "Y", 0.5), ("writing", "X", 0.125))
    assert router.router.calls == [[LAST, WHOLE, BEFORE]]


def test_large_gain_moves_the_conversation_to_the_new_expert():
    router = conversation([0.125, 0.75, 0.125], margin=0.2)
    decision = router.route_messages(MESSAGES)
    assert (decision.category, decision.expert, decision.confidence) == ("code", "Y", 0.75)
    assert "kept" not in decision.reason


def test_gain_equal_to_the_margin_moves():
    router = conversation([0.375, 0.5, 0.125], margin=0.125)
    assert router.route_messages(MESSAGES).category == "code"


def test_zero_margin_always_follows_the_new_category():
    router = conversation([0.4375, 0.5, 0.0625], margin=0.0)
    assert router.route_messages(MESSAGES).expert == "Y"


def test_same_expert_uses_the_new_decision_even_with_a_small_gain():
    # earlier turn: writing (X); now: math (X) by a hair -> no need to keep anything
    router = conversation([0.5, 0.125, 0.375], before_row=(0.125, 0.125, 0.75), margin=0.5)
    decision = router.route_messages(MESSAGES)
    assert (decision.category, decision.expert, decision.confidence) == ("math", "X", 0.5)
    assert decision.reason == ""


def test_the_new_decision_averages_the_last_turn_and_the_whole_conversation():
    # the last turn alone says code by 0.625, the whole conversation says math: average gain 0.125
    router = conversation([0.125, 0.75, 0.125], whole_row=[0.625, 0.25, 0.125], margin=0.2)
    decision = router.route_messages(MESSAGES)
    assert decision.category == "math"
    assert decision.confidence == 0.375
    assert "kept" in decision.reason


def test_conversation_moves_off_an_earlier_fallback_when_the_new_category_is_confident():
    # the earlier turn was unsure (fallback to chat -> G); now code at 0.5: gain 0.5 - 0 moves
    router = conversation([0.25, 0.5, 0.25], before_row=(0.375, 0.375, 0.25), threshold=0.45,
                          margin=0.2)
    decision = router.route_messages(MESSAGES)
    assert (decision.category, decision.expert, decision.fallback) == ("code", "Y", False)


def test_kept_decision_carries_the_previous_fallback_flag():
    # same, with a margin above the new confidence: the conversation stays on the generalist
    router = conversation([0.25, 0.5, 0.25], before_row=(0.375, 0.375, 0.25), threshold=0.45,
                          margin=0.6)
    decision = router.route_messages(MESSAGES)
    assert (decision.category, decision.expert, decision.fallback) == ("chat", "G", True)
    assert decision.confidence == 0.0  # the fallback category has no probability of its own
    assert "kept" in decision.reason


def test_conversation_with_one_user_turn_is_routed_like_a_prompt():
    router = expert_router({FIRST: [0.125, 0.75, 0.125]})
    decision = router.route_messages([ChatMessage("system", "hi"), user(FIRST),
                                      ChatMessage("assistant", "ok"), user("   ")])
    assert (decision.category, decision.expert) == ("code", "Y")
    assert router.router.calls == [[FIRST]]


def test_conversation_tools_go_with_the_last_turn_and_the_whole_but_not_the_earlier_turns():
    tools = [{"name": "calc", "description": "adds", "parameters": {"properties": {"a": {}}}}]
    listing = "\n\nAvailable functions:\n- calc(a): adds"
    rows = {LAST + listing: [0.125, 0.75, 0.125], WHOLE + listing: [0.125, 0.75, 0.125],
            BEFORE: [0.75, 0.125, 0.125]}
    router = expert_router(rows)
    assert router.route_messages(MESSAGES, tools).expert == "Y"
    assert router.router.calls == [[LAST + listing, WHOLE + listing, BEFORE]]


@pytest.mark.parametrize("messages", [[], [ChatMessage("system", "x"), ChatMessage("assistant", "y")],
                                      [user(""), user("  \n")]])
def test_conversation_without_user_text_is_an_invalid_request(messages):
    with pytest.raises(InvalidRequest) as info:
        expert_router({}).route_messages(messages)
    assert info.value.param == "messages"


def test_conversation_whose_last_turn_is_too_long_is_rejected():
    with pytest.raises(InvalidRequest):
        expert_router({}).route_messages([user("hi"), user("x" * 200_001)])


def test_stay_directly_on_decisions():
    router = expert_router({}, margin=0.25)
    probs = {"math": 0.3, "code": 0.5, "writing": 0.2}
    new = CategoryDecision("code", 0.5, probs)
    old = CategoryDecision("math", 0.9, {"math": 0.9, "code": 0.05, "writing": 0.05})
    kept = router._stay(new, old)
    assert (kept.category, kept.confidence, kept.fallback) == ("math", 0.3, False)
    assert kept.probabilities == probs
    router.stay_margin = 0.2
    assert router._stay(new, old) is new


# -- the map ---------------------------------------------------------------------------------------
def small_table() -> ScoreTable:
    return ScoreTable.from_dict({"source": "test table", "scores": {
        "math": {"small": 0.1, "big": 0.5},
        "code": {"small": 0.2, "big": 0.7},
        "chat": {"small": 0.4, "big": 0.3}}})


PARAMS = {"small": 1e8, "big": 1e9}


def test_build_map_without_budget_takes_the_best_expert_and_pins_the_fallback_to_the_generalist():
    assignment, plan = build_map(RouterConfig(), ("math", "code"), PARAMS, "small", small_table())
    assert assignment == {"math": "big", "code": "big", "chat": "small"}
    assert isinstance(plan, ExpertMap)
    assert plan.assignment == assignment
    assert plan.avg_active_params == pytest.approx(7e8)


def test_build_map_respects_the_budget():
    assignment, plan = build_map(RouterConfig(budget_params=5e8), ("math", "code"), PARAMS,
                                 "small", small_table())
    assert assignment == {"math": "small", "code": "big", "chat": "small"}
    assert plan.avg_active_params == pytest.approx(4e8)
    assert plan.expected_score == pytest.approx((0.1 + 0.7 + 0.4) / 3)


def test_build_map_budget_below_the_cheapest_map_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_map(RouterConfig(budget_params=1e6), ("math", "code"), PARAMS, "small", small_table())
    assert info.value.param == "budget_params"


def test_build_map_pins_are_honoured_by_the_optimiser():
    assignment, _ = build_map(RouterConfig(budget_params=5e8, pins={"math": "big"}),
                              ("math", "code"), PARAMS, "small", small_table())
    assert assignment == {"math": "big", "code": "small", "chat": "small"}


def test_build_map_pin_on_the_fallback_category_overrides_the_generalist():
    assignment, _ = build_map(RouterConfig(pins={"chat": "big"}), ("math", "code"), PARAMS, "small",
                              small_table())
    assert assignment["chat"] == "big"


def test_build_map_custom_fallback_category_gets_the_default_expert():
    assignment, _ = build_map(RouterConfig(fallback_category="unsure"), ("math", "code"), PARAMS,
                              "small", small_table())
    assert assignment == {"math": "big", "code": "big", "unsure": "small"}


def test_build_map_pin_to_an_expert_outside_the_table_is_applied():
    assignment, _ = build_map(RouterConfig(pins={"code": "custom"}), ("math", "code"),
                              {**PARAMS, "custom": None}, "small", small_table())
    assert assignment == {"math": "big", "code": "custom", "chat": "small"}


def test_build_map_fallback_goes_to_an_unscored_default_expert():
    # the generalist has no known size, so the optimiser cannot pin it; the map still does
    assignment, _ = build_map(RouterConfig(default_expert="custom"), ("math", "code"),
                              {**PARAMS, "custom": None}, "custom", small_table())
    assert assignment == {"math": "big", "code": "big", "chat": "custom"}


def test_the_fallback_is_mapped_unless_default_expert_pins_it():
    table = ScoreTable.from_dict({"source": "test table", "scores": {
        "math": {"small": 0.1, "big": 0.5}, "code": {"small": 0.2, "big": 0.7},
        "chat": {"small": 0.2, "big": 0.6}}})
    # unsure requests get the expert that does best across categories, within the budget
    mapped, plan = build_map(RouterConfig(budget_params=7e8), ("math", "code"), PARAMS, "small", table)
    assert mapped["chat"] == "big" and plan.avg_active_params <= 7e8
    assert mapped["math"] == "small"  # the budget is met by a confident category instead
    pinned, _ = build_map(RouterConfig(default_expert="small", budget_params=7e8), ("math", "code"),
                          PARAMS, "small", table)
    assert pinned["chat"] == "small"


def test_build_map_categories_the_table_does_not_cover_go_to_the_default_expert():
    assignment, plan = build_map(RouterConfig(), ("math", "tool_use"), PARAMS, "small", small_table())
    assert assignment == {"math": "big", "tool_use": "small", "chat": "small"}
    assert set(plan.assignment) == {"math", "chat"}


def test_build_map_experts_without_a_known_size_are_not_chosen():
    assignment, _ = build_map(RouterConfig(), ("math", "code"), {"small": 1e8, "big": None},
                              "small", small_table())
    assert assignment == {"math": "small", "code": "small", "chat": "small"}


def test_build_map_with_no_scored_expert_sends_everything_to_the_default():
    assignment, plan = build_map(RouterConfig(), ("math", "code"), {}, "small", small_table())
    assert assignment == {"math": "small", "code": "small", "chat": "small"}
    assert plan is None


def test_build_map_frequencies_from_the_config_weight_the_budget():
    # all traffic is code: a budget of 1e9 affords big for code; math and chat get no traffic
    config = RouterConfig(budget_params=1e9, frequencies={"code": 1.0})
    assignment, plan = build_map(config, ("math", "code"), PARAMS, "small", small_table())
    assert assignment["code"] == "big"
    assert assignment["math"] == "small"  # no traffic -> the cheapest expert
    assert plan.avg_active_params == pytest.approx(1e9)


def test_build_map_pin_to_an_unscored_expert_does_not_use_up_the_budget():
    assignment, plan = build_map(RouterConfig(budget_params=6e8, pins={"code": "custom"}),
                                 ("math", "code"), {**PARAMS, "custom": None}, "small", small_table())
    assert assignment["code"] == "custom"
    assert all(assignment[c] == e for c, e in plan.assignment.items())
    assert assignment["math"] == "big"


def test_map_problem_pins_the_fallback_to_a_named_default_and_uses_uniform_frequencies():
    problem = map_problem(RouterConfig(pins={"code": "big"}, default_expert="small"), ("math", "code"),
                          {**PARAMS, "custom": 5}, small_table(), "small")
    assert problem.table.categories == ("math", "code", "chat")
    assert problem.table.experts == ("small", "big")  # custom is not in the table
    assert problem.params == {"small": 1e8, "big": 1e9}
    assert problem.frequencies == pytest.approx({"math": 1 / 3, "code": 1 / 3, "chat": 1 / 3})
    assert problem.pins == {"chat": "small", "code": "big"}
    unnamed = map_problem(RouterConfig(pins={"code": "big"}), ("math", "code"), PARAMS, small_table(), "small")
    assert unnamed.pins == {"code": "big"}  # the fallback is optimised with the rest


def test_map_problem_is_none_when_nothing_can_be_optimised():
    assert map_problem(RouterConfig(), ("math",), {"other": 1e9}, small_table(), "small") is None
    assert map_problem(RouterConfig(fallback_category="x"), ("y",), PARAMS, small_table(),
                       "small") is None


# -- score tables and checks ----------------------------------------------------------------------
def test_load_score_table_default_is_the_packaged_measured_table():
    table = load_score_table(None)
    assert set(table.categories) == set(CATEGORIES)
    assert table.experts == ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    assert table.source.startswith("measured by `coe eval --suite standard`")
    code = table.scores["code"]
    assert max(code, key=code.get) == "qwen2.5-coder-1.5b"  # the coder experts write the code


def test_load_score_table_reads_a_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(small_table().to_dict()))
    assert load_score_table(str(path)) == small_table()


def test_load_score_table_bad_file_names_the_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_score_table(str(path))
    assert str(path) in info.value.message


def test_check_categories_accepts_known_categories_and_the_fallback():
    check_categories(RouterConfig(pins={"math": "a", "chat": "b"}), ("math", "code"))


def test_check_categories_rejects_a_pin_on_an_unknown_category():
    with pytest.raises(ConfigError) as info:
        check_categories(RouterConfig(pins={"math": "a", "poetry": "b", "astrology": "c"}),
                         ("math", "code"))
    assert info.value.param == "router.pins.astrology"  # the first in sorted order
    assert info.value.message.startswith("router.pins.astrology: the router has no category 'astrology'")
    assert "chat, code, math" in info.value.message


def test_default_artifact_dir(tmp_path):
    assert default_artifact_dir(tmp_path) == tmp_path / "router" / "default"
    assert default_artifact_dir(str(tmp_path)) == tmp_path / "router" / "default"


def test_load_expert_router_without_an_artifact_is_router_unavailable(tmp_path):
    with pytest.raises(RouterUnavailable) as info:
        load_expert_router(RouterConfig(), tmp_path, {}, "small")
    assert str(tmp_path / "router" / "default") in info.value.message


class FakeEncoder:
    max_tokens, precision, dim = 16, "float32", 4

    def __init__(self, *args, **kwargs):
        pass

    def encode(self, texts):
        import torch

        return torch.zeros(len(texts), self.dim)


def saved_head(folder, categories=("math", "code")):
    from coe.router.encoder import ENCODER_DIST, ENCODER_IMPL, ENCODER_VERSION
    from coe.router.head import Head, HeadMeta, HeadNet

    meta = HeadMeta(tuple(categories), 4, 0, 1.0, 0.25,
                    {"dist": ENCODER_DIST, "version": ENCODER_VERSION, "max_tokens": 16,
                     "impl": ENCODER_IMPL})
    return Head(HeadNet(4, 0, len(categories)), meta).save(folder)


def test_load_expert_router_wires_router_map_and_margin(tmp_path, monkeypatch):
    import coe.router.learned as learned

    monkeypatch.setattr(learned, "SentenceEncoder", FakeEncoder)
    saved_head(default_artifact_dir(tmp_path))
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(small_table().to_dict()))
    config = RouterConfig(scores=str(scores), stay_margin=0.5, threshold=0.75)
    router = load_expert_router(config, tmp_path, PARAMS, "small")
    assert router.assignment == {"math": "big", "code": "big", "chat": "small"}
    assert router.stay_margin == 0.5
    assert router.score_source == "test table"
    assert router.plan.assignment == router.assignment
    assert router.router.categories == ("math", "code")
    assert router.router.threshold == 0.75
    decision = router.route_prompt("anything")
    assert decision.expert in {"big", "small"}


def test_load_expert_router_from_an_explicit_artifact_checks_the_pins(tmp_path, monkeypatch):
    import coe.router.learned as learned

    monkeypatch.setattr(learned, "SentenceEncoder", FakeEncoder)
    folder = saved_head(tmp_path / "mine")
    config = RouterConfig(artifact=str(folder), pins={"poetry": "small"})
    with pytest.raises(ConfigError) as info:
        load_expert_router(config, tmp_path / "unused-home", PARAMS, "small")
    assert info.value.param == "router.pins.poetry"
    ok = load_expert_router(RouterConfig(artifact=str(folder)), tmp_path / "unused-home",
                            PARAMS, "small")
    assert ok.score_source.startswith("measured by")  # no scores file: the packaged table
    assert ok.assignment == {"math": "small", "code": "small", "chat": "small"}  # small/big unknown


# -- residency-aware routing (prefer_resident) -------------------------------------------------------
def scored_router() -> ExpertRouter:
    table = ScoreTable.from_dict({"source": "test", "scores": {
        "math": {"X": 0.80, "Y": 0.74, "G": 0.60},
        "code": {"X": 0.30, "Y": 0.90, "G": 0.20},
        "writing": {"X": 0.70, "Y": 0.65, "G": 0.69}}})
    return ExpertRouter(FixedRouter({}), dict(ASSIGNMENT), table=table)


def planned(category="math", expert="X", **kw) -> RouteDecision:
    return RouteDecision(category=category, confidence=0.9, expert=expert, **kw)


def test_prefer_resident_with_zero_tolerance_changes_nothing():
    decision = planned()
    assert scored_router().prefer_resident(decision, ["Y", "G"], 0.0) is decision


def test_prefer_resident_serves_a_hot_expert_within_the_tolerance():
    decision = scored_router().prefer_resident(planned(reason="why"), ["Y"], 0.1)
    assert decision.expert == "Y" and decision.planned_expert == "X"
    assert decision.score_given_up == pytest.approx(0.06)
    assert decision.category == "math" and decision.confidence == 0.9
    assert decision.reason.startswith("why; ")
    assert "served by hot Y" in decision.reason and "cold X" in decision.reason
    assert "switch_tolerance 0.1" in decision.reason


def test_prefer_resident_takes_the_best_hot_expert_within_the_tolerance():
    decision = scored_router().prefer_resident(planned(category="writing"), ["Y", "G"], 0.1)
    assert decision.expert == "G" and decision.score_given_up == pytest.approx(0.01)


def test_prefer_resident_keeps_the_plan_when_no_hot_expert_is_close_enough():
    decision = planned()
    assert scored_router().prefer_resident(decision, ["Y", "G"], 0.05) is decision  # Y is 0.06 below
    assert scored_router().prefer_resident(decision, [], 1.0) is decision


def test_prefer_resident_keeps_a_planned_expert_that_is_already_hot():
    decision = planned()
    assert scored_router().prefer_resident(decision, ["Y", "X"], 1.0) is decision


def test_prefer_resident_keeps_categories_the_table_does_not_score():
    decision = planned(category="chat", expert="G", fallback=True)
    assert scored_router().prefer_resident(decision, ["X", "Y"], 1.0) is decision


def test_prefer_resident_without_a_table_changes_nothing():
    decision = planned()
    assert ExpertRouter(FixedRouter({}), dict(ASSIGNMENT)).prefer_resident(decision, ["Y"], 1.0) is decision


def test_prefer_resident_keeps_a_planned_expert_the_table_does_not_score():
    router = scored_router()
    decision = planned(expert="Z")
    assert router.prefer_resident(decision, ["Y"], 1.0) is decision


def test_route_decision_to_dict_names_the_planned_expert_only_when_one_was_given_up():
    plain = planned().to_dict()
    assert "planned_expert" not in plain and "score_given_up" not in plain
    shape = scored_router().prefer_resident(planned(), ["Y"], 0.1).to_dict()
    assert shape["expert"] == "Y" and shape["planned_expert"] == "X"
    assert shape["score_given_up"] == 0.06
    json.dumps(shape)
