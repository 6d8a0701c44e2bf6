"""The evaluation harness with a scripted target: caching, scoring modes, analysis and report."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from coe.config import RouterConfig
from coe.eval import harness, pareto, report
from coe.eval.suites import EvalItem, choice_item
from coe.types import ChatMessage


def gsm_item(k: int, answer: int) -> EvalItem:
    return EvalItem("gsm8k", "math", f"gsm8k:{k}", "gsm8k", (ChatMessage("user", f"q{k}"),),
                    {"answer": f"work\n#### {answer}"}, max_tokens=32)


def mc_item(k: int, answer: int) -> EvalItem:
    return choice_item("mmlu_stem", "stem", f"mmlu:x:{k}", f"question {k}", ["w", "x", "y", "z"], answer)


class ScriptedTarget:
    """Expert 'good' always answers right, 'bad' always wrong; counts what it was asked."""

    name = "engine"

    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    def identity(self, expert: str) -> str:
        return expert

    def has_logprobs(self, expert: str) -> bool:
        return self.name == "engine"

    def letter_logprobs(self, expert, items, progress):
        rows = []
        for item in items:
            self.asked.append((expert, item.id))
            right = item.reference["answer"]
            pick = right if expert == "good" else (right + 1) % item.num_options
            rows.append([0.0 if i == pick else -5.0 for i in range(item.num_options)])
            progress()
        return rows

    def generate(self, expert, items, progress):
        out = []
        for item in items:
            self.asked.append((expert, item.id))
            gold = int(item.reference["answer"].split("####")[1])
            out.append(f"The answer is {gold if expert == 'good' else gold + 1}.")
            progress()
        return out


def test_results_are_cached_and_reruns_compute_nothing(tmp_path):
    items = [gsm_item(1, 5), gsm_item(2, 7), mc_item(3, 2)]
    target, cache_dir = ScriptedTarget(), tmp_path / "cache"
    first = harness.run(target, ["good", "bad"], items, harness.ResultCache(cache_dir))
    assert first.computed == 6 and first.cached == 0
    assert {(r.expert, r.score) for r in first.results} == {("good", 1.0), ("bad", 0.0)}
    assert {r.mode for r in first.results if r.suite == "mmlu_stem"} == {"logprob"}
    target.asked.clear()
    again = harness.run(target, ["good", "bad"], items, harness.ResultCache(cache_dir))
    assert again.computed == 0 and again.cached == 6 and target.asked == []
    more = harness.run(target, ["good", "bad"], items + [gsm_item(4, 1)], harness.ResultCache(cache_dir))
    assert more.computed == 2 and target.asked == [("good", "gsm8k:4"), ("bad", "gsm8k:4")]


def test_a_torn_cache_line_is_recomputed(tmp_path):
    items = [gsm_item(1, 5)]
    cache_dir = tmp_path / "cache"
    harness.run(ScriptedTarget(), ["good"], items, harness.ResultCache(cache_dir))
    path = next(cache_dir.glob("*.jsonl"))
    path.write_text(path.read_text()[:-20])  # an interrupted write
    log = harness.run(ScriptedTarget(), ["good"], items, harness.ResultCache(cache_dir))
    assert log.computed == 1 and log.results[0].score == 1.0


def test_letter_mode_and_servers_read_the_generated_letter(tmp_path):
    class LetterTarget(ScriptedTarget):
        name = "server"

        def generate(self, expert, items, progress):
            return ["The answer is " + "ABCD"[item.reference["answer"]] for item in items]

    log = harness.run(LetterTarget(), ["good"], [mc_item(1, 3)], harness.ResultCache(tmp_path))
    assert log.results[0].mode == "generate" and log.results[0].score == 1.0


def test_judged_items_are_skipped_without_a_judge(tmp_path):
    judged = EvalItem("mtbench", "writing", "mtbench:1", "judge", (ChatMessage("user", "Write"),), {})
    log = harness.run(ScriptedTarget(), ["good"], [judged, gsm_item(1, 2)], harness.ResultCache(tmp_path))
    assert "mtbench" in log.skipped and [r.suite for r in log.results] == ["gsm8k"]


def grid_of(rows: dict[str, tuple[str, dict[str, float]]]) -> pareto.Grid:
    results = [harness.ItemResult(e, "s", cat, item, score, "", "generate", 0.0)
               for item, (cat, scores) in rows.items() for e, score in scores.items()]
    return pareto.Grid.of(results, ["small", "big"])


ROWS = {  # small is right on math, big on code; big also on one math item
    "m1": ("math", {"small": 1.0, "big": 0.0}), "m2": ("math", {"small": 1.0, "big": 1.0}),
    "c1": ("code", {"small": 0.0, "big": 1.0}), "c2": ("code", {"small": 0.0, "big": 1.0}),
}
PARAMS = {"small": 100.0, "big": 1000.0}


def routed_as(categories: dict[str, str]) -> dict[str, pareto.Routed]:
    """A sure router: all probability on the category it routes to."""
    return {i: pareto.Routed(c, {c: 1.0}) for i, c in categories.items()}


def test_analysis_shows_the_routed_composition_beating_both_experts():
    grid = grid_of(ROWS)
    routed = routed_as({"m1": "math", "m2": "math", "c1": "code", "c2": "code"})
    analysis = pareto.analyse(grid, PARAMS, routed, 10.0, ["math", "code", "chat"], "test", RouterConfig(), "small")
    points = {p.name: p for p in analysis.points}
    assert points["small"].score == pytest.approx(0.5) and points["big"].score == pytest.approx(0.75)
    assert points["per-item oracle"].score == pytest.approx(1.0)
    assert points["per-item oracle"].avg_active_params == pytest.approx(0.5 * 100 + 0.5 * 1000)
    assert points["random router (expected)"].score == pytest.approx((0.5 + 0.75) / 2)
    assert analysis.chosen.assignment["math"] == "small" and analysis.chosen.assignment["code"] == "big"
    chosen = next(p for p in analysis.points if p.detail.get("chosen"))
    assert chosen.score == pytest.approx(1.0)
    assert chosen.avg_active_params == pytest.approx(550.0 + 10.0)  # the router's params count
    assert "chat" in analysis.map_scores.categories and "not measured" in analysis.map_scores.source


def test_a_misrouting_router_is_scored_on_what_it_chose():
    grid = grid_of(ROWS)
    routed = routed_as({"m1": "code", "m2": "code", "c1": "math", "c2": "math"})  # always wrong
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "code", "chat"], "test", RouterConfig(), "small")
    chosen = next(p for p in analysis.points if p.detail.get("chosen"))
    assert chosen.score == pytest.approx(0.25)  # big on math (0.5), small on code (0.0)
    oracle = next(p for p in analysis.points if p.name.startswith("category oracle"))
    assert oracle.score == pytest.approx(1.0)


def test_the_report_has_table_points_plot_and_a_score_file(tmp_path):
    grid = grid_of(ROWS)
    routed = routed_as({"m1": "math", "m2": "math", "c1": "code", "c2": "code"})
    analysis = pareto.analyse(grid, PARAMS, routed, 10.0, ["math", "code", "chat"], "test",
                              RouterConfig(budget_params=800.0), "small")
    data = report.report_dict(analysis, PARAMS, 10.0, {"seconds": 1}, {"s": 4}, {"mtbench": "needs a judge"}, 800.0)
    paths = report.write(tmp_path, data)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["table"]["math"]["small"] == {"score": 1.0, "n": 2, "ci95": 0.0}
    kinds = {p["kind"] for p in written["points"]}
    assert kinds == {"single", "baseline", "coe"}
    assert all({"name", "kind", "score", "avg_active_params"} <= set(p) for p in written["points"])
    markdown = (tmp_path / "report.md").read_text()
    assert "beats every single expert" in markdown and "mtbench" in markdown
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["scores"]) == {"math", "code", "chat"}
    png = tmp_path / report.PLOT_NAME
    if png in paths:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_item_the_expert_cannot_answer_scores_zero_and_the_run_goes_on(tmp_path):
    from coe.errors import ContextLengthExceeded

    class TooLong(ScriptedTarget):
        def generate(self, expert, items, progress):
            return [ContextLengthExceeded("the prompt is longer than the context") if item.id == "gsm8k:1"
                    else f"The answer is {item.reference['answer'].split('####')[1]}" for item in items]

    log = harness.run(TooLong(), ["good"], [gsm_item(1, 5), gsm_item(2, 7)], harness.ResultCache(tmp_path))
    scores = {r.item: (r.score, r.detail) for r in log.results}
    assert scores["gsm8k:1"][0] == 0.0 and "no answer" in scores["gsm8k:1"][1]
    assert scores["gsm8k:2"][0] == 1.0


# -- cross-fitting, paired intervals, expected-score choice ------------------------------------------
def test_folds_deal_each_category_evenly_and_stably():
    rows = {f"{cat}{n}": (cat, {"small": 1.0, "big": 0.0}) for cat in ("math", "code") for n in range(12)}
    grid = grid_of(rows)
    folds = grid.folds(5)
    assert folds == grid_of(dict(reversed(rows.items()))).folds(5)  # not the reading order
    for cat in ("math", "code"):
        sizes = Counter(folds[i] for i in grid.items_of(cat))
        assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 1


def test_crossfitting_removes_the_optimism_of_a_map_fitted_on_its_own_items():
    """One lucky item makes 'small' look best on math in-sample; routed by maps fitted on the other
    folds, every item goes to the expert that was wrong on it."""
    rows = {"m0": ("math", {"small": 1.0, "big": 0.0})}
    rows |= {f"m{n}": ("math", {"small": 0.0, "big": 0.2}) for n in range(1, 5)}
    grid = grid_of(rows)
    assert sorted(grid.folds(5).values()) == [0, 1, 2, 3, 4]
    routed = routed_as({i: "math" for i in rows})
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "chat"], "test", RouterConfig(), "small")
    in_sample = next(p for p in analysis.points if p.detail.get("chosen") and not p.crossfit)
    fitted = next(p for p in analysis.points if p.detail.get("chosen") and p.crossfit)
    assert in_sample.score == pytest.approx(0.2)
    assert fitted.score == pytest.approx(0.0)
    assert fitted.name.startswith("coe crossfit") and fitted.detail["folds"] == 5
    assert analysis.comparison["coe"] == fitted.name and analysis.comparison["best_single"] == "small"
    assert analysis.comparison["difference"] == pytest.approx(-0.2)


def test_paired_difference_and_its_interval():
    rows = {f"m{n}": ("math", {"small": float(n % 2), "big": 1.0}) for n in range(40)}
    scorer = pareto.Scorer(grid_of(rows), PARAMS)
    big, small = (lambda i: "big"), (lambda i: "small")
    same = pareto.paired_difference(scorer, big, big)
    assert same == {"difference": 0.0, "paired_ci95": [0.0, 0.0]}
    diff = pareto.paired_difference(scorer, big, small)
    low, high = diff["paired_ci95"]
    assert diff["difference"] == pytest.approx(0.5) and low < 0.5 < high
    assert 0.3 < low and high < 0.7  # 40 items: about +-0.16
    assert pareto.paired_difference(scorer, big, small) == diff  # seeded


def test_expected_choice_weighs_the_likely_categories_by_the_experts_scores():
    from coe.router.mapping import ScoreTable

    table = ScoreTable(("math", "code"), ("small", "big"),
                       {"math": {"small": 0.9, "big": 0.2}, "code": {"small": 0.1, "big": 0.3}}, "test")
    assignment = {"math": "small", "code": "big"}
    # code is (barely) the top category, but small's expected score is higher: 0.46 vs 0.255
    assert pareto.expected_choice({"math": 0.45, "code": 0.55}, assignment, table, "small") == "small"
    assert pareto.expected_choice({"math": 0.1, "code": 0.9}, assignment, table, "small") == "big"
    # only the two most likely categories' experts are candidates
    three = {"math": 0.5, "code": 0.3, "writing": 0.2}
    assert pareto.expected_choice(three, {**assignment, "writing": "huge"}, table, "small") == "small"


def test_the_report_marks_crossfit_points_and_gives_the_paired_comparison(tmp_path):
    rows = {f"m{n}": ("math", {"small": 1.0, "big": float(n % 2)}) for n in range(10)}
    rows |= {f"c{n}": ("code", {"small": 0.0, "big": 1.0}) for n in range(10)}
    grid = grid_of(rows)
    routed = routed_as({i: c for i, (c, _) in rows.items()})
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "code", "chat"], "test", RouterConfig(), "small")
    data = report.report_dict(analysis, PARAMS, 0.0, {"seconds": 1}, {"s": 20}, {}, None)
    report.write(tmp_path, data)
    written = json.loads((tmp_path / "report.json").read_text())
    assert all(isinstance(p["crossfit"], bool) for p in written["points"])
    assert {p["name"] for p in written["points"] if p["crossfit"]} >= {
        "coe crossfit (no budget)", "coe crossfit, expected-score choice (no budget)"}
    claim = written["summary"]
    assert claim["chosen_crossfit"] is True and claim["chosen_score"] == pytest.approx(1.0)
    paired = claim["coe_minus_best_single"]
    assert paired["best_single"] == "big" and paired["difference"] == pytest.approx(0.25)
    assert paired["paired_ci95"][0] > 0
    assert "paired bootstrap 95% interval" in (tmp_path / "report.md").read_text()


def test_kmeans_finds_separated_groups_deterministically():
    g = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(20, 4, generator=g) * 0.1 + 5, torch.randn(20, 4, generator=g) * 0.1 - 5])
    centroids = pareto.kmeans(blobs, 2)
    member = torch.cdist(blobs, centroids).argmin(1).tolist()
    assert len(set(member[:20])) == 1 and len(set(member[20:])) == 1 and member[0] != member[20]
    assert torch.equal(pareto.kmeans(blobs, 2), centroids)
    assert len(pareto.kmeans(torch.ones(5, 4), 3)) == 1  # no more centroids than distinct rows


def test_per_cluster_refinement_sends_each_kind_of_question_to_its_expert():
    """One category, two kinds of items far apart in embedding space: small is right on the first
    kind, big on the second (and on a third of the first). The category map sends all to big; the
    per-cluster map, fitted on other folds, sends each kind to its own expert."""
    g = torch.Generator().manual_seed(1)
    rows, routed = {}, {}
    for n in range(60):
        kind = n % 2
        rows[f"m{n}"] = ("math", {"small": float(kind == 0), "big": float(kind == 1 or n % 6 == 0)})
        centre = torch.tensor([1.0, 0.0] if kind == 0 else [0.0, 1.0])
        routed[f"m{n}"] = pareto.Routed("math", {"math": 1.0}, (centre + 0.05 * torch.randn(2, generator=g)).tolist())
    grid = grid_of(rows)
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "chat"], "test", RouterConfig(), "small")
    points = {p.name: p for p in analysis.points}
    category = points["coe crossfit (no budget)"]
    refined = points["coe crossfit, per-cluster map (no budget)"]
    assert category.score == pytest.approx(40 / 60, abs=1e-4)
    assert refined.score == pytest.approx(1.0) and refined.crossfit
    assert refined.detail["changed_items"] == 30  # the first kind moved from big to small
    against = refined.detail["minus_category_map"]  # paired: the same items under both maps
    assert against["difference"] == pytest.approx(20 / 60, abs=1e-4)
    low, high = against["paired_ci95"]
    assert 0 < low <= against["difference"] <= high
    data = report.report_dict(analysis, PARAMS, 0.0, {"seconds": 1}, {"s": 60}, {}, None)
    assert "per-cluster map minus the category map, both cross-fitted: +0.333" in report.markdown(data)


def test_no_refinement_point_without_embeddings():
    grid = grid_of(ROWS)
    analysis = pareto.analyse(grid, PARAMS, routed_as({i: c for i, (c, _) in ROWS.items()}), 0.0,
                              ["math", "code", "chat"], "test", RouterConfig(), "small")
    assert not any("per-cluster" in p.name for p in analysis.points)


def test_a_run_stopped_midway_keeps_the_results_of_the_chunks_it_finished(tmp_path, monkeypatch):
    """Results are cached chunk by chunk, so a long run that is stopped banks what it finished."""
    monkeypatch.setattr(harness, "CHUNK_ITEMS", 2)
    calls = []

    class StopsOnThirdCall(ScriptedTarget):
        def generate(self, expert, items, progress):
            calls.append(len(items))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return super().generate(expert, items, progress)

    items = [gsm_item(n, n + 1) for n in range(6)]
    with pytest.raises(KeyboardInterrupt):
        harness.run(StopsOnThirdCall(), ["good"], items, harness.ResultCache(tmp_path))
    assert calls == [2, 2, 2]
    log = harness.run(ScriptedTarget(), ["good"], items, harness.ResultCache(tmp_path))
    assert (log.cached, log.computed) == (4, 2)


def test_expected_choice_can_send_an_unsure_request_to_the_generalist():
    from coe.router.mapping import ScoreTable

    table = ScoreTable(("math", "code"), ("small", "big"),
                       {"math": {"small": 0.3, "big": 0.8}, "code": {"small": 0.2, "big": 0.9}}, "test")
    cheap = {"math": "small", "code": "small"}
    assert pareto.expected_choice({"math": 0.5, "code": 0.5}, cheap, table, "small") == "small"
    assert pareto.expected_choice({"math": 0.5, "code": 0.5}, cheap, table, "small", "big") == "big"


def test_hard_fallback_points_send_unsure_items_to_the_fallback_categorys_expert():
    rows = {f"m{n}": ("math", {"small": 0.0, "big": 1.0}) for n in range(10)}
    grid = grid_of(rows)
    routed = {i: pareto.Routed("math", {"math": 0.4 if n < 5 else 0.9, "code": 0.1})
              for n, i in enumerate(rows)}
    config = RouterConfig(pins={"math": "small", "chat": "big"})
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "code", "chat"], "test", config, "small")
    points = {p.name: p for p in analysis.points}
    assert points["coe crossfit (no budget)"].score == pytest.approx(0.0)  # math is pinned to small
    assert points["coe crossfit, fallback below 0.5 (no budget)"].score == pytest.approx(0.5)
    assert points["coe crossfit, fallback below 0.5 (no budget)"].detail["fallback_below"] == 0.5


def test_priced_choice_trades_expected_score_against_parameters_and_the_rate_meets_the_budget():
    from coe.router.mapping import ScoreTable

    table = ScoreTable(("math", "code"), ("small", "big"),
                       {"math": {"small": 0.7, "big": 0.8}, "code": {"small": 0.1, "big": 0.9}}, "test")
    sure_math, sure_code = {"math": 1.0, "code": 0.0}, {"math": 0.0, "code": 1.0}
    assert pareto.priced_choice(sure_math, table, PARAMS, 0.0) == "big"  # free parameters: the best
    rate = 0.1 / 900  # small's 0.1 less on math is worth its 900 fewer params at this price
    assert pareto.priced_choice(sure_math, table, PARAMS, rate * 1.01) == "small"
    assert pareto.priced_choice(sure_code, table, PARAMS, rate * 1.01) == "big"
    requests = [sure_math, sure_code]
    even = [1.0, 1.0]
    assert pareto.budget_rate(requests, even, table, PARAMS, None) == 0.0
    assert pareto.budget_rate(requests, even, table, PARAMS, 1000.0) == 0.0  # all big fits already
    found = pareto.budget_rate(requests, even, table, PARAMS, 550.0)  # room for big on one of two
    picks = [pareto.priced_choice(p, table, PARAMS, found) for p in requests]
    assert picks == ["small", "big"] and found == pytest.approx(rate, rel=1e-3)
    # weighted: math counts 3 times as much, so big on code alone averages 250 params
    assert pareto.budget_rate(requests, [3.0, 1.0], table, PARAMS, 330.0) == pytest.approx(rate, rel=1e-3)


def test_cached_only_analyses_what_the_cache_holds_and_counts_the_rest(tmp_path):
    items = [gsm_item(n, n + 1) for n in range(4)]
    harness.run(ScriptedTarget(), ["good"], items[:2], harness.ResultCache(tmp_path))
    target = ScriptedTarget()
    log = harness.run(target, ["good", "bad"], items, harness.ResultCache(tmp_path), cached_only=True)
    assert target.asked == []  # no expert ran
    assert (log.cached, log.computed, log.missing) == (2, 0, 6)
    assert sorted(r.item for r in log.results) == ["gsm8k:0", "gsm8k:1"]


def test_a_budget_below_every_map_is_analysed_without_one_and_the_report_says_so(tmp_path):
    grid = grid_of(ROWS)
    routed = routed_as({i: c for i, (c, _) in ROWS.items()})
    config = RouterConfig(budget_params=50.0)  # both experts are larger
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "code", "chat"], "test", config, "small")
    assert analysis.notes and "below the cheapest map" in analysis.notes[0]
    assert any(p.name == "coe crossfit (no budget)" for p in analysis.points)
    data = report.report_dict(analysis, PARAMS, 0.0, {"seconds": 1}, {"s": 4}, {}, 50.0)
    report.write(tmp_path, data)
    assert "below the cheapest map" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["notes"] == list(analysis.notes)
