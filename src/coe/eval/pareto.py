"""From item results to the claim of a CoE: quality per active parameter.

Every policy (a single expert, a baseline, the learned router with a map) is scored on the same
items. A policy's score is the category-weighted mean of its per-item scores, with each category
weighted by ``frequencies`` (uniform by default); its cost is the same weighted mean of the active
parameters of the experts it chose, plus the router's own parameters for routed policies.

Maps come from ``router.mapping`` over the measured table. Fitted on the items they are then
scored on, the in-sample CoE rows are optimistic by construction; the cross-fitted rows are not:
the items are dealt into ``FOLDS`` folds (per category, by a stable hash), and each fold is routed
by the map fitted on the other folds' table (k-fold cross-fitting). The single experts and the
per-item oracle fit nothing. ``paired_difference`` gives a paired bootstrap interval for one
policy minus another on the same items.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from coe.config import RouterConfig
from coe.errors import ConfigError
from coe.eval.harness import ItemResult
from coe.router.data import unit_hash
from coe.router.mapping import ExpertMap, ScoreTable, best_map, format_params, pareto_frontier
from coe.router.service import MapProblem, map_problem

Z95 = 1.96
FOLDS = 5
BOOTSTRAP_DRAWS = 2000
FALLBACK_THRESHOLDS = (0.5, 0.7)  # hard fallbacks to the generalist, measured beside the others
CLUSTERS = 3  # per category, for the per-cluster refinement
MIN_CLUSTER_ITEMS = 8  # a category splits only when each cluster could hold this many items
SHRINK_ITEMS = 8.0  # a cluster's score is its category's, moved toward its own items' mean as if
# the category's mean were this many more items of the cluster


@dataclass(frozen=True)
class Routed:
    """The learned router on one item: its category (after the low-confidence fallback) and the
    category probabilities it came from."""

    category: str
    probabilities: Mapping[str, float] = field(default_factory=dict)
    embedding: Sequence[float] = ()  # the router's sentence embedding of the item


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # single | baseline | coe
    score: float
    avg_active_params: float
    ci95: float = 0.0
    detail: dict = field(default_factory=dict)
    crossfit: bool = False  # fitted on other items than it is scored on

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "score": round(self.score, 4),
            "ci95": round(self.ci95, 4),
            "avg_active_params": round(self.avg_active_params),
            "crossfit": self.crossfit,
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

    def only(self, items: set[str]) -> Grid:
        return Grid(
            {i: row for i, row in self.scores.items() if i in items},
            {i: c for i, c in self.category.items() if i in items},
            self.experts,
        )

    def folds(self, k: int = FOLDS) -> dict[str, int]:
        """Each item's fold: a category's items in stable hash order, dealt round-robin, so every
        fold holds about 1/k of each category."""
        fold: dict[str, int] = {}
        for cat in self.categories():
            ordered = sorted(self.items_of(cat), key=lambda i: unit_hash("fold:" + i))
            fold.update({item: n % k for n, item in enumerate(ordered)})
        return fold


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
    assignment: Mapping[str, str], routed: Mapping[str, Routed], default_expert: str
) -> Chooser:
    return lambda item: assignment.get(routed[item].category, default_expert)


def expected_choice(
    probabilities: Mapping[str, float],
    assignment: Mapping[str, str],
    table: ScoreTable,
    default_expert: str,
    generalist: str | None = None,
    alternatives: int = 2,
) -> str:
    """Of the experts the map gives the ``alternatives`` most likely categories (and the
    ``generalist`` it gives the fallback category), the one with the highest expected score over
    the router's probabilities: an expected-score choice instead of a hard fallback. Only the
    map's own experts are candidates, so the choice stays near the map's budget."""
    ranked = sorted(probabilities, key=lambda c: -probabilities[c])[:alternatives]
    mapped = [assignment.get(c, default_expert) for c in ranked]
    candidates = list(dict.fromkeys(mapped + ([generalist] if generalist else [])))
    if not candidates:
        return default_expert

    return max(candidates, key=lambda e: expected_score(probabilities, table, e))


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
    comparison: dict = field(default_factory=dict)  # cross-fitted CoE minus the best single
    notes: tuple[str, ...] = ()  # what the analysis changed from the configuration, and why


@dataclass(frozen=True)
class Fitting:
    """What a map is fitted with: the router's settings and the items' categories."""

    params: Mapping[str, float]
    categories: Sequence[str]
    source: str
    router: RouterConfig
    default_expert: str

    def problem(self, grid: Grid) -> tuple[dict[str, dict[str, dict]], ScoreTable, MapProblem]:
        """The measured table on ``grid`` and the map problem the server would solve with it
        (``router.service.map_problem``: pins, the fallback category's generalist, frequencies)."""
        table = score_table(grid)
        scores = map_table(table, grid.experts, self.categories, self.source)
        problem = map_problem(
            self.router, self.categories, dict(self.params), scores, self.default_expert
        )
        if problem is None:
            raise ConfigError(
                "no evaluated expert has a known parameter count; nothing to map", param="experts"
            )
        return table, scores, problem

    def best(self, problem: MapProblem, budget_params: float | None) -> ExpertMap:
        return best_map(
            problem.table, problem.params, problem.frequencies, budget_params, problem.pins
        )


def analyse(
    grid: Grid,
    params: Mapping[str, float],
    routed: Mapping[str, Routed],
    router_params: float,
    categories: Sequence[str],
    source: str,
    router: RouterConfig,
    default_expert: str,
) -> Analysis:
    """``routed``: the learned router on each item; ``categories``: every category the router can
    answer. In-sample points first (the map fitted on every item), then the cross-fitted ones."""
    fitting = Fitting(params, categories, source, router, default_expert)
    table, scores, problem = fitting.problem(grid)
    frontier = pareto_frontier(problem.table, problem.params, problem.frequencies, problem.pins)
    notes: tuple[str, ...] = ()
    cheapest = frontier[0].avg_active_params
    if router.budget_params is not None and router.budget_params < cheapest * (1 - 1e-9):
        notes = (
            f"router.budget_params ({format_params(router.budget_params)}) is below the cheapest "
            f"map of these experts ({format_params(cheapest)}): the maps are fitted without a "
            "budget",
        )
        router = replace(router, budget_params=None)
        fitting = replace(fitting, router=router)
    chosen = fitting.best(problem, router.budget_params)
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
    budgets = [m.avg_active_params for m in frontier]
    fitted, choose = crossfit_points(grid, routed, router_params, fitting, scorer, budgets)
    best_single = max(points[: len(grid.experts)], key=lambda p: p.score)
    chosen_fit = fitted[0]
    comparison = {
        "coe": chosen_fit.name,
        "best_single": best_single.name,
        **paired_difference(scorer, choose, _always(best_single.name)),
        "params_share": round(chosen_fit.avg_active_params / params[best_single.name], 4)
        if params.get(best_single.name)
        else None,
    }
    return Analysis(table, scores, frontier, points + fitted, chosen, comparison, notes)


@dataclass(frozen=True)
class FoldFits:
    """Maps fitted per fold on the other folds' items, and the ways of choosing an expert for an
    item with its own fold's fits (so never with a fit that saw the item)."""

    fold: Mapping[str, int]
    plans: Sequence[Mapping[float | None, ExpertMap]]  # per fold: budget -> best map
    problems: Sequence[MapProblem]  # per fold: the map problem fitted on the other folds
    rates: Sequence[float]  # per fold: the price per active parameter that meets the budget
    routed: Mapping[str, Routed]
    fitting: Fitting

    @classmethod
    def fit(
        cls,
        grid: Grid,
        routed: Mapping[str, Routed],
        fitting: Fitting,
        weights: Mapping[str, float],
        budgets: Sequence[float],
        k: int,
    ) -> FoldFits:
        fold = grid.folds(k)
        wanted = [fitting.router.budget_params, *budgets]
        plans, problems, rates = [], [], []
        for f in range(k):
            train = grid.only({i for i, g in fold.items() if g != f})
            _, _, problem = fitting.problem(train)
            plans.append({b: fitting.best(problem, b) for b in wanted})
            problems.append(problem)
            items = sorted(train.scores)
            share = Counter(train.category[i] for i in items)
            rates.append(
                budget_rate(
                    [routed[i].probabilities for i in items],
                    [weights.get(train.category[i], 0.0) / share[train.category[i]] for i in items],
                    problem.table,
                    problem.params,
                    fitting.router.budget_params,
                )
            )
        return cls(fold, plans, problems, rates, routed, fitting)

    def _plan(self, item: str, budget: float | None) -> ExpertMap:
        return self.plans[self.fold[item]][budget]

    def top(self, budget: float | None) -> Chooser:
        """The router's category (after its own fallback) through the fold's map."""
        default = self.fitting.default_expert
        return lambda i: self._plan(i, budget).assignment.get(self.routed[i].category, default)

    def fallback_below(self, threshold: float) -> Chooser:
        """A hard fallback to the generalist below ``threshold`` confidence."""
        budget, generalist = (
            self.fitting.router.budget_params,
            self.fitting.router.fallback_category,
        )

        def choose(i: str) -> str:
            probabilities = self.routed[i].probabilities
            unsure = bool(probabilities) and max(probabilities.values()) < threshold
            category = generalist if unsure else self.routed[i].category
            return self._plan(i, budget).assignment.get(category, self.fitting.default_expert)

        return choose

    def expected(self, item: str) -> str:
        plan = self._plan(item, self.fitting.router.budget_params)
        return expected_choice(
            self.routed[item].probabilities,
            plan.assignment,
            self.problems[self.fold[item]].table,
            self.fitting.default_expert,
            plan.assignment.get(self.fitting.router.fallback_category),
        )

    def priced(self, item: str) -> str:
        f = self.fold[item]
        return priced_choice(
            self.routed[item].probabilities,
            self.problems[f].table,
            self.fitting.params,
            self.rates[f],
        )


def crossfit_points(
    grid: Grid,
    routed: Mapping[str, Routed],
    router_params: float,
    fitting: Fitting,
    scorer: Scorer,
    budgets: Sequence[float],
    k: int = FOLDS,
) -> tuple[list[Point], Chooser]:
    """CoE points scored on items their maps were not fitted on (``FoldFits``): the router's
    decision under the configured budget (the ``chosen`` point) and under each in-sample frontier
    point's cost; under the configured budget also the expected-score choice, the expected score
    less a price per parameter, hard fallbacks below ``FALLBACK_THRESHOLDS`` and the per-cluster
    refinement (with its paired difference from the category map). Returns the points (the
    configured budget's first) and that first one's chooser."""
    fits = FoldFits.fit(grid, routed, fitting, scorer.weights, budgets, k)
    budget = fitting.router.budget_params
    label = "no budget" if budget is None else f"budget {budget / 1e9:.2f}B"

    def point(name: str, choose: Chooser, **detail) -> Point:
        return scorer.point(name, "coe", choose, router_params, folds=k, **detail)

    points = [
        point(f"coe crossfit ({label})", fits.top(budget), chosen=True),
        point(f"coe crossfit, expected-score choice ({label})", fits.expected),
        point(
            f"coe crossfit, expected score less cost ({label})",
            fits.priced,
            score_per_billion_params=[round(r * 1e9, 4) for r in fits.rates],
        ),
        *(
            point(
                f"coe crossfit, fallback below {t:.1f} ({label})",
                fits.fallback_below(t),
                fallback_below=t,
            )
            for t in FALLBACK_THRESHOLDS
        ),
    ]
    refined = _refined(grid, fits, k)
    if refined is not None:
        points.append(
            point(
                f"coe crossfit, per-cluster map ({label})",
                refined[0],
                clusters=CLUSTERS,
                changed_items=refined[1],
                minus_category_map=paired_difference(scorer, refined[0], fits.top(budget)),
            )
        )
    points += [
        point(f"coe crossfit {n}/{len(budgets)}", fits.top(b), budget=round(b))
        for n, b in enumerate(budgets, 1)
    ]
    return [replace(p, crossfit=True) for p in points], fits.top(budget)


def budget_rate(
    probabilities: Sequence[Mapping[str, float]],
    weights: Sequence[float],
    table: ScoreTable,
    params: Mapping[str, float],
    budget_params: float | None,
    steps: int = 40,
) -> float:
    """The smallest price per active parameter at which ``priced_choice`` over these requests
    (the fitting folds' items, each with its weight in the average) keeps their weighted mean
    active parameters within the budget (0 without one; bisection)."""
    total = sum(weights) or 1.0

    def mean_params(rate: float) -> float:
        picks = [priced_choice(p, table, params, rate) for p in probabilities]
        return sum(w * params.get(e, 0.0) for w, e in zip(weights, picks)) / total

    if budget_params is None or mean_params(0.0) <= budget_params:
        return 0.0
    low, high = 0.0, 1.0 / max(min(v for v in params.values() if v > 0), 1.0)
    while mean_params(high) > budget_params and high < 1.0:
        high *= 2
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_params(middle) > budget_params else (low, middle)
    return high


def priced_choice(
    probabilities: Mapping[str, float],
    table: ScoreTable,
    params: Mapping[str, float],
    rate: float,
) -> str:
    """The expert with the highest expected score over the router's probabilities less ``rate``
    per active parameter: the map's trade-off (its Lagrangian form) made per request, so a sure
    request goes to the best deal for its category and an unsure one weighs every expert over the
    likely categories."""

    return max(
        table.experts,
        key=lambda e: expected_score(probabilities, table, e) - rate * params.get(e, 0.0),
    )


def expected_score(probabilities: Mapping[str, float], table: ScoreTable, expert: str) -> float:
    """``expert``'s score in ``table`` averaged over the router's category probabilities."""
    return sum(
        p * table.scores[c].get(expert, 0.0) for c, p in probabilities.items() if c in table.scores
    )


def _refined(grid: Grid, fits: FoldFits, k: int) -> tuple[Chooser, int] | None:
    """The per-cluster refinement under the configured budget, cross-fitted like the category
    map: each fold's categories split into clusters of the other folds' items (k-means over the
    router's embeddings), each cluster a category of its own for the same optimiser. Returns the
    chooser and how many items it sends to another expert than the category map; None without
    embeddings."""
    routed, fitting = fits.routed, fits.fitting
    if not all(routed[i].embedding for i in grid.scores):
        return None
    budget = fitting.router.budget_params
    chosen: dict[str, str] = {}
    for f in range(k):
        train = grid.only({i for i, g in fits.fold.items() if g != f})
        fine, centroids = split_by_cluster(fits.problems[f], train, routed)
        plan = fitting.best(fine, budget)
        for item in (i for i, g in fits.fold.items() if g == f):
            cat = routed[item].category
            if cat in centroids:
                vector = torch.tensor(routed[item].embedding).unsqueeze(0)
                cat = f"{cat}#{int(torch.cdist(vector, centroids[cat]).argmin())}"
            chosen[item] = plan.assignment.get(cat, fitting.default_expert)
    by_category = fits.top(budget)
    changed = sum(chosen[i] != by_category(i) for i in chosen)
    return chosen.__getitem__, changed


def split_by_cluster(
    problem: MapProblem, train: Grid, routed: Mapping[str, Routed]
) -> tuple[MapProblem, dict[str, torch.Tensor]]:
    """``problem`` with each measured category that has enough items split into ``CLUSTERS``
    clusters (``"math#0"``...): scores shrunk toward the category's, frequencies shared by item
    count, pins kept. Also returns each split category's centroids."""
    scores: dict[str, dict[str, float]] = {}
    frequencies: dict[str, float] = {}
    pins: dict[str, str] = {}
    centroids: dict[str, torch.Tensor] = {}
    experts = problem.table.experts
    for cat in problem.table.categories:
        items = train.items_of(cat)
        row = problem.table.scores[cat]
        if len(items) < CLUSTERS * MIN_CLUSTER_ITEMS:
            scores[cat], frequencies[cat] = dict(row), problem.frequencies[cat]
            pins.update({cat: problem.pins[cat]} if cat in problem.pins else {})
            continue
        x = torch.tensor([list(routed[i].embedding) for i in items])
        centroids[cat] = kmeans(x, CLUSTERS)
        member = torch.cdist(x, centroids[cat]).argmin(1).tolist()
        for j in range(len(centroids[cat])):
            inside = [i for i, m in zip(items, member) if m == j]
            name = f"{cat}#{j}"
            scores[name] = {
                e: (sum(train.scores[i][e] for i in inside) + SHRINK_ITEMS * row[e])
                / (len(inside) + SHRINK_ITEMS)
                for e in experts
            }
            frequencies[name] = problem.frequencies[cat] * len(inside) / len(items)
            pins.update({name: problem.pins[cat]} if cat in problem.pins else {})
    table = ScoreTable(tuple(scores), experts, scores, problem.table.source)
    return MapProblem(table, problem.params, frequencies, pins), centroids


def kmeans(x: torch.Tensor, k: int, rounds: int = 30) -> torch.Tensor:
    """Lloyd's k-means with farthest-point initialisation from the first row (deterministic);
    returns the centroids (fewer than ``k`` when there are fewer distinct rows)."""
    centroids = x[:1]
    while len(centroids) < k:
        far = torch.cdist(x, centroids).min(1).values
        if float(far.max()) == 0.0:
            break
        centroids = torch.cat([centroids, x[int(far.argmax())].unsqueeze(0)])
    for _ in range(rounds):
        member = torch.cdist(x, centroids).argmin(1)
        moved = torch.stack(
            [
                x[member == j].mean(0) if bool((member == j).any()) else centroids[j]
                for j in range(len(centroids))
            ]
        )
        if torch.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def paired_difference(
    scorer: Scorer, a: Chooser, b: Chooser, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> dict:
    """Policy ``a`` minus policy ``b`` on the same items (category-weighted), with a 95% paired
    bootstrap interval: items are resampled within each category, both policies scored on each
    resample."""
    diffs = {
        cat: [
            scorer.grid.scores[i][a(i)] - scorer.grid.scores[i][b(i)]
            for i in scorer.grid.items_of(cat)
        ]
        for cat in scorer.weights
    }
    point = sum(w * sum(diffs[c]) / len(diffs[c]) for c, w in scorer.weights.items())
    rng = random.Random(seed)
    totals = sorted(
        sum(
            w * sum(rng.choices(diffs[c], k=len(diffs[c]))) / len(diffs[c])
            for c, w in scorer.weights.items()
        )
        for _ in range(draws)
    )
    return {
        "difference": round(point, 4),
        "paired_ci95": [
            round(totals[int(0.025 * draws)], 4),
            round(totals[min(draws - 1, int(0.975 * draws))], 4),
        ],
    }


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
