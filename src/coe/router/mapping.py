"""The category-to-expert map: pick one expert per category for the best expected score.

Given a score table (category x expert -> quality), each expert's active parameter count and how
often each category occurs, the expected score of a map is ``sum_c f_c * score[c][map[c]]`` and
its cost is the average active parameters ``sum_c f_c * params[map[c]]``. ``pareto_frontier``
lists every non-dominated map exactly (dynamic programming over categories that keeps only the
non-dominated partial states); ``best_map`` picks the best one under a parameter budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from coe.config import is_number
from coe.errors import ConfigError

EPS = 1e-12


@dataclass(frozen=True)
class ScoreTable:
    categories: tuple[str, ...]
    experts: tuple[str, ...]
    scores: dict[str, dict[str, float]]  # category -> expert -> score
    source: str = ""  # where the numbers came from, e.g. "placeholder" or a report path

    def __post_init__(self) -> None:
        for kind, names in (("categories", self.categories), ("experts", self.experts)):
            if not names:
                raise ConfigError(f"score table has no {kind}", param=kind)
            if len(set(names)) != len(names):
                raise ConfigError(
                    f"score table repeats one of its {kind}: {list(names)}", param=kind
                )
        for cat in self.categories:
            row = self.scores.get(cat, {})
            for expert in self.experts:
                value = row.get(expert)
                if not is_number(value) or not math.isfinite(value):
                    raise ConfigError(
                        f"score table: no valid score for category {cat!r}, "
                        f"expert {expert!r} (got {value!r})",
                        param="scores",
                    )

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "scores") -> ScoreTable:
        """Build from ``{"source": str, "scores": {category: {expert: float}}}``; ``where`` names it."""
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("scores"), dict)
            or not data["scores"]
        ):
            raise ConfigError(
                f"{where}: expected an object with a non-empty 'scores' object", param="scores"
            )
        source = data.get("source", "")
        if not isinstance(source, str):
            raise ConfigError(f"{where}: 'source' must be a string", param="source")
        experts: list[str] = []
        for cat, row in data["scores"].items():
            if not isinstance(row, dict) or not row:
                raise ConfigError(
                    f"{where}: scores for category {cat!r} must be a non-empty object",
                    param="scores",
                )
            experts += [e for e in row if e not in experts]
        try:
            return cls(
                tuple(data["scores"]),
                tuple(experts),
                {c: dict(r) for c, r in data["scores"].items()},
                source,
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", param=exc.param) from None

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        """Read a JSON score file; every error names the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read score file: {exc.strerror or exc}", param="scores"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}", param="scores") from None
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "scores": {c: {e: self.scores[c][e] for e in self.experts} for c in self.categories},
        }

    def restricted(self, experts) -> ScoreTable:
        """The same table with only ``experts`` (kept in table order)."""
        wanted = set(experts)
        _check_known(wanted, self.experts, "expert", "experts")
        kept = tuple(e for e in self.experts if e in wanted)
        scores = {c: {e: self.scores[c][e] for e in kept} for c in self.categories}
        return ScoreTable(self.categories, kept, scores, self.source)


@dataclass(frozen=True)
class ExpertMap:
    assignment: dict[str, str]  # category -> expert
    expected_score: float
    avg_active_params: float


def uniform_frequencies(categories) -> dict[str, float]:
    names = list(categories)
    return {c: 1.0 / len(names) for c in names}


def evaluate_map(assignment, table: ScoreTable, params, frequencies) -> ExpertMap:
    """Expected score and average active params of a total ``assignment`` (category -> expert)."""
    _check_known(set(assignment), table.categories, "category", "assignment")
    missing = [c for c in table.categories if c not in assignment]
    if missing:
        raise ConfigError(f"map leaves categories without an expert: {missing}", param="assignment")
    _check_known(set(assignment.values()), table.experts, "expert", "assignment")
    freqs = _normalised(frequencies, table)
    cost = _checked_params(params, table)
    ordered = {c: assignment[c] for c in table.categories}
    return ExpertMap(
        ordered,
        sum(freqs[c] * table.scores[c][e] for c, e in ordered.items()),
        sum(freqs[c] * cost[e] for c, e in ordered.items()),
    )


def pareto_frontier(
    table: ScoreTable,
    params: dict[str, float],
    frequencies: dict[str, float],
    pins: dict[str, str] | None = None,
) -> list[ExpertMap]:
    """Every non-dominated map, by avg active params ascending with strictly rising score."""
    freqs = _normalised(frequencies, table)
    cost = _checked_params(params, table)
    pins = _checked_pins(pins or {}, table)
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for cat in table.categories:
        options = _options(cat, table, cost, freqs[cat], pins)
        states = _prune([(p + op, s + os, a + (i,)) for p, s, a in states for op, os, i in options])
    return [
        ExpertMap({c: table.experts[i] for c, i in zip(table.categories, a)}, score, cost_params)
        for cost_params, score, a in states
    ]


def best_map(
    table: ScoreTable,
    params: dict[str, float],
    frequencies: dict[str, float],
    budget_params: float | None,
    pins: dict[str, str] | None = None,
) -> ExpertMap:
    """The best-scoring map whose avg active params fit ``budget_params`` (None: no limit)."""
    frontier = pareto_frontier(table, params, frequencies, pins)
    if budget_params is None:
        return frontier[-1]
    if not is_number(budget_params) or math.isnan(budget_params):
        raise ConfigError(
            f"budget must be a number of params, got {budget_params!r}", param="budget_params"
        )
    fitting = [m for m in frontier if m.avg_active_params <= budget_params * (1 + 1e-9) + EPS]
    if not fitting:
        cheapest = frontier[0].avg_active_params
        raise ConfigError(
            f"budget of {format_params(budget_params)} avg active params is below the "
            f"cheapest possible map; the minimum feasible budget is {format_params(cheapest)} "
            f"({cheapest:.0f} params)",
            param="budget_params",
        )
    return fitting[-1]


def format_params(count: float) -> str:
    """135M, 1.54B, 12K: a parameter count a person can read."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            value = count / scale
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return f"{count:.0f}"


def format_frontier(frontier: list[ExpertMap]) -> str:
    """A plain-text table of the frontier: avg active params, expected score, the map."""
    rows = [("avg params", "score", "map (expert: categories)")]
    rows += [
        (format_params(m.avg_active_params), f"{m.expected_score:.3f}", _grouped(m.assignment))
        for m in frontier
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}".rstrip() for r in rows)


def _grouped(assignment: dict[str, str]) -> str:
    by_expert: dict[str, list[str]] = {}
    for category, expert in assignment.items():
        by_expert.setdefault(expert, []).append(category)
    return " | ".join(f"{e}: {','.join(cats)}" for e, cats in by_expert.items())


def _options(
    cat: str, table: ScoreTable, cost: dict[str, float], freq: float, pins: dict[str, str]
) -> list[tuple[float, float, int]]:
    """The (params, score, expert index) choices for one category, already weighted by frequency."""
    if cat in pins:
        indices = [table.experts.index(pins[cat])]
    elif freq == 0:  # no traffic: the cheapest expert (first in table order) keeps the map total
        indices = [min(range(len(table.experts)), key=lambda i: (cost[table.experts[i]], i))]
    else:
        indices = list(range(len(table.experts)))
    return [
        (freq * cost[table.experts[i]], freq * table.scores[cat][table.experts[i]], i)
        for i in indices
    ]


def _prune(
    states: list[tuple[float, float, tuple[int, ...]]],
) -> list[tuple[float, float, tuple[int, ...]]]:
    """Keep the states whose score beats every state at lower-or-equal params (ties: table order)."""
    kept: list[tuple[float, float, tuple[int, ...]]] = []
    for state in sorted(states, key=lambda s: (s[0], -s[1], s[2])):
        if kept and state[1] <= kept[-1][1] + EPS:
            continue
        while kept and state[0] <= kept[-1][0] + EPS:  # same cost up to rounding, better score
            kept.pop()
        kept.append(state)
    return kept


def _normalised(frequencies: dict[str, float], table: ScoreTable) -> dict[str, float]:
    _check_known(set(frequencies), table.categories, "category", "frequencies")
    for cat, freq in frequencies.items():
        if not is_number(freq) or not math.isfinite(freq) or freq < 0:
            raise ConfigError(
                f"frequency of category {cat!r} must be a number >= 0, got {freq!r}",
                param="frequencies",
            )
    total = sum(frequencies.get(c, 0.0) for c in table.categories)
    if total <= 0:
        raise ConfigError("category frequencies sum to 0", param="frequencies")
    return {c: frequencies.get(c, 0.0) / total for c in table.categories}


def _checked_params(params: dict[str, float], table: ScoreTable) -> dict[str, float]:
    for expert in table.experts:
        value = params.get(expert)
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"active params of expert {expert!r} must be a number >= 0, got {value!r}",
                param="params",
            )
    return params


def _checked_pins(pins: dict[str, str], table: ScoreTable) -> dict[str, str]:
    _check_known(set(pins), table.categories, "category", "pins")
    _check_known(set(pins.values()), table.experts, "expert", "pins")
    return pins


def _check_known(names: set, known: tuple[str, ...], kind: str, param: str) -> None:
    unknown = sorted(str(n) for n in names if n not in known)
    if unknown:
        raise ConfigError(
            f"{param}: unknown {kind} {', '.join(map(repr, unknown))} (known: {', '.join(known)})",
            param=param,
        )
