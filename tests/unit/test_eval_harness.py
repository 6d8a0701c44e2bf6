"""The evaluation harness with a scripted target: caching, scoring modes, analysis and report."""
from __future__ import annotations

import json

import pytest

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


def test_analysis_shows_the_routed_composition_beating_both_experts():
    grid = grid_of(ROWS)
    routed = {"m1": "math", "m2": "math", "c1": "code", "c2": "code"}
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
    routed = {"m1": "code", "m2": "code", "c1": "math", "c2": "math"}  # always wrong
    analysis = pareto.analyse(grid, PARAMS, routed, 0.0, ["math", "code", "chat"], "test", RouterConfig(), "small")
    chosen = next(p for p in analysis.points if p.detail.get("chosen"))
    assert chosen.score == pytest.approx(0.25)  # big on math (0.5), small on code (0.0)
    oracle = next(p for p in analysis.points if p.name.startswith("category oracle"))
    assert oracle.score == pytest.approx(1.0)


def test_the_report_has_table_points_plot_and_a_score_file(tmp_path):
    grid = grid_of(ROWS)
    routed = {"m1": "math", "m2": "math", "c1": "code", "c2": "code"}
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
