"""From item results to the claim of a CoE: quality per active parameter.

Every policy (a single expert, a baseline, the learned router with a map) is scored on the same
items. A policy's score is the category-weighted mean of its per-item scores, with each category
weighted by ``frequencies`` (uniform by default); its cost is the same weighted mean of the active
parameters of the experts it chose, plus the router's own parameters for routed policies.

Maps come from ``router.mapping`` over the measured table. The table and the maps are fitted on
the items they are then scored on, so the CoE rows are optimistic by construction; the single
experts and the per-item oracle are not affected.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from coe.config import RouterConfig
from coe.errors import ConfigError
from coe.eval.harness import ItemResult
from coe.router.mapping import ExpertMap, ScoreTable, best_map, pareto_frontier
from coe.router.service import map_problem

Z95 = 1.96


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # single | baseline | coe
    score: float
    avg_active_params: float
    ci95: float = 0.0
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "score": round(self.score, 4),
            "ci95": round(self.ci95, 4),
            "avg_active_params": round(self.avg_active_params),
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass(frozen=True)
class Grid:
    """Item scores per expert: ``scores[item][expert]``, with each item's true category."""

    scores: dict[str, dict[str, float]]
    category: dict[str, str]
    experts: tuple[str, ...]

    @classmethod
    def of(cls, results: Sequence[ItemResult], experts: Sequence[str]) -> Grid:
        scores: dict[str, dict[str, float]] = {}
        category: dict[str, str] = {}
        for r in results:
            scores.setdefault(r.item, {})[r.expert] = r.score
            category[r.item] = r.category
        complete = {i: row for i, row in scores.items() if all(e in row for e in experts)}
        return cls(complete, {i: category[i] for i in complete}, tuple(experts))

    def categories(self) -> list[str]:
        return sorted(set(self.category.values()))

    def items_of(self, cat: str) -> list[str]:
        return [i for i, c in self.category.items() if c == cat]


def score_table(grid: Grid) -> dict[str, dict[str, dict]]:
    """category -> expert -> {score, n, ci95} (normal approximation of the binomial interval)."""
    table = {}
    for cat in grid.categories():
        items = grid.items_of(cat)
        table[cat] = {e: _mean_ci([grid.scores[i][e] for i in items]) for e in grid.experts}
    return table


def _mean_ci(values: Sequence[float]) -> dict:
    n = len(values)
    mean = sum(values) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {
        "score": round(mean, 4),
        "n": n,
        "ci95": round(Z95 * math.sqrt(var / n), 4) if n else 0.0,
    }


def map_table(
    table: Mapping[str, Mapping[str, dict]],
    experts: Sequence[str],
    categories: Sequence[str],
    source: str,
) -> ScoreTable:
    """The measured table as the map optimiser's input, over all the router's ``categories``. A
    category without a measured suite (the generalist 'chat' without a judge) gets each expert's
    mean over the measured categories, and ``source`` says which."""
    scores = {c: {e: row[e]["score"] for e in experts} for c, row in table.items()}
    proxied = [c for c in categories if c not in scores]
    for cat in proxied:
        scores[cat] = {e: round(sum(scores[c][e] for c in table) / len(table), 4) for e in experts}
    if proxied:
        source += f"; not measured, set to each expert's mean over the measured categories: {', '.join(proxied)}"
    ordered = [c for c in categories if c in scores] + [c for c in scores if c not in categories]
    return ScoreTable(tuple(ordered), tuple(experts), {c: scores[c] for c in ordered}, source)


Chooser = Callable[[str], str]  # item -> expert


def _always(expert: str) -> Chooser:
    return lambda item: expert


def _by_category(
    assignment: Mapping[str, str], routed: Mapping[str, str], default_expert: str
) -> Chooser:
    return lambda item: assignment.get(routed[item], default_expert)


class Scorer:
    """Scores policies on the grid with category weights and active-parameter costs."""

    def __init__(
        self,
        grid: Grid,
        params: Mapping[str, float],
        frequencies: Mapping[str, float] | None = None,
    ):
        self.grid, self.params = grid, params
        cats = grid.categories()
        weights = {c: float((frequencies or {}).get(c, 1.0)) for c in cats}
        total = sum(weights.values())
        self.weights = {c: w / total for c, w in weights.items()}

    def evaluate(self, choose: Chooser, extra_params: float = 0.0) -> tuple[float, float, float]:
        """(score, ci95, avg active params) of a policy."""
        score = cost = var = 0.0
        for cat, weight in self.weights.items():
            items = self.grid.items_of(cat)
            picks = [choose(i) for i in items]
            values = [self.grid.scores[i][e] for i, e in zip(items, picks)]
            stats = _mean_ci(values)
            score += weight * stats["score"]
            var += (weight * stats["ci95"] / Z95) ** 2
            cost += weight * sum(self.params[e] for e in picks) / len(picks)
        return score, Z95 * math.sqrt(var), cost + extra_params

    def point(
        self, name: str, kind: str, choose: Chooser, extra_params: float = 0.0, **detail
    ) -> Point:
        score, ci, cost = self.evaluate(choose, extra_params)
        return Point(name, kind, score, cost, ci, detail)

    def expected_point(
        self, name: str, kind: str, pick_weights: Callable[[str], dict[str, float]]
    ) -> Point:
        """A stochastic policy, scored in expectation (e.g. a uniformly random router)."""
        score = cost = 0.0
        for cat, weight in self.weights.items():
            items = self.grid.items_of(cat)
            for i in items:
                for e, p in pick_weights(i).items():
                    score += weight * p * self.grid.scores[i][e] / len(items)
                    cost += weight * p * self.params[e] / len(items)
        return Point(name, kind, score, cost)


@dataclass(frozen=True)
class Analysis:
    table: dict[str, dict[str, dict]]
    map_scores: ScoreTable
    frontier: list[ExpertMap]
    points: list[Point]
    chosen: ExpertMap


def analyse(
    grid: Grid,
    params: Mapping[str, float],
    routed: Mapping[str, str],
    router_params: float,
    categories: Sequence[str],
    source: str,
    router: RouterConfig,
    default_expert: str,
) -> Analysis:
    """``routed``: the learned router's category for each item (after its fallback rule);
    ``categories``: every category the router can answer. The maps are built exactly as the
    server builds its map (``router.service.map_problem``: pins, the fallback category's
    generalist, frequencies, ``router.budget_params``)."""
    table = score_table(grid)
    scores = map_table(table, grid.experts, categories, source)
    problem = map_problem(router, categories, dict(params), scores, default_expert)
    if problem is None:
        raise ConfigError(
            "no evaluated expert has a known parameter count; nothing to map", param="experts"
        )
    frontier = pareto_frontier(problem.table, problem.params, problem.frequencies, problem.pins)
    chosen = best_map(
        problem.table, problem.params, problem.frequencies, router.budget_params, problem.pins
    )
    scorer = Scorer(grid, params, router.frequencies or None)
    points = [scorer.point(e, "single", _always(e)) for e in grid.experts]
    points += _baselines(scorer, grid, params, chosen)
    for k, plan in enumerate(frontier, 1):
        points.append(
            scorer.point(
                f"coe map {k}/{len(frontier)}",
                "coe",
                _by_category(plan.assignment, routed, default_expert),
                router_params,
                map=plan.assignment,
                map_expected_score=round(plan.expected_score, 4),
                map_avg_params=round(plan.avg_active_params),
                chosen=plan == chosen,
            )
        )
    return Analysis(table, scores, frontier, points, chosen)


def _baselines(
    scorer: Scorer, grid: Grid, params: Mapping[str, float], chosen: ExpertMap
) -> list[Point]:
    experts = grid.experts
    uniform = {e: 1.0 / len(experts) for e in experts}

    def best_for_item(i: str) -> str:  # the cheapest expert among the best on this item
        row = grid.scores[i]
        top = max(row.values())
        return min((e for e in experts if row[e] == top), key=lambda e: params[e])

    rng = random.Random(0)
    drawn = {i: rng.choice(experts) for i in sorted(grid.scores)}
    return [
        scorer.expected_point("random router (expected)", "baseline", lambda i: uniform),
        scorer.point("random router (one draw)", "baseline", lambda i: drawn[i]),
        scorer.point(
            "category oracle + chosen map",
            "baseline",
            lambda i: chosen.assignment[grid.category[i]],
        ),
        scorer.point("per-item oracle", "baseline", best_for_item),
    ]
