"""Prompt or conversation -> RouteDecision: the category router, the category-to-expert map and
the rule that keeps a conversation on its expert.

Conversations are routed statelessly: the decision for the conversation so far (every user turn
but the last) is recomputed from the messages (the encoder caches embeddings, so this is cheap),
and the conversation moves to another expert only when the new category beats the old one by
``stay_margin``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from coe.config import RouterConfig
from coe.errors import ConfigError, InvalidRequest
from coe.router.base import MAX_PROMPT_CHARS, CategoryDecision, Router, check_prompt
from coe.router.mapping import ExpertMap, ScoreTable, best_map, uniform_frequencies
from coe.router.text import user_turns, with_tools
from coe.types import ChatMessage, RouteDecision


def default_artifact_dir(home: str | Path) -> Path:
    return Path(home) / "router" / "default"


def router_num_params(config: RouterConfig, home: str | Path) -> int:
    """The router's own parameters: the sentence encoder plus the trained head."""
    from coe.models.safetensors_info import file_params
    from coe.router.encoder import default_encoder_dir

    folder = Path(config.artifact) if config.artifact else default_artifact_dir(home)
    return file_params(default_encoder_dir() / "model.safetensors") + file_params(
        folder / "head.safetensors"
    )


def load_score_table(path: str | None) -> ScoreTable:
    if path:
        return ScoreTable.load(path)
    text = resources.files("coe.router").joinpath("default_scores.json").read_text()
    return ScoreTable.from_dict(json.loads(text), where="default_scores.json")


@dataclass(frozen=True)
class MapProblem:
    """The part of the map the optimiser decides: scored experts of known size, covered categories."""

    table: ScoreTable
    params: dict[str, float]
    frequencies: dict[str, float]
    pins: dict[str, str]


def map_problem(
    config: RouterConfig,
    categories: Sequence[str],
    params: Mapping[str, float | None],
    table: ScoreTable,
    default_expert: str,
) -> MapProblem | None:
    wanted = _wanted(config, categories)
    scored = [e for e in table.experts if params.get(e)]
    wanted_pins = _pins(config, default_expert)
    # a category pinned to an expert the optimiser cannot price is decided by its pin alone
    covered = [
        c
        for c in wanted
        if c in table.categories and (c not in wanted_pins or wanted_pins[c] in scored)
    ]
    if not scored or not covered:
        return None
    sub = ScoreTable(
        tuple(covered),
        tuple(scored),
        {c: {e: table.scores[c][e] for e in scored} for c in covered},
        table.source,
    )
    freqs = (
        {c: float(config.frequencies.get(c, 0.0)) for c in covered}
        if config.frequencies
        else uniform_frequencies(covered)
    )
    pins = {c: e for c, e in wanted_pins.items() if c in covered}
    return MapProblem(sub, {e: float(params[e] or 0) for e in scored}, freqs, pins)


def build_map(
    config: RouterConfig,
    categories: Sequence[str],
    params: dict[str, int | None],
    default_expert: str,
    table: ScoreTable,
) -> tuple[dict[str, str], ExpertMap | None]:
    """category -> expert for every category the router can emit (plus the fallback).

    Experts missing from the score table or without a known size take part only through pins;
    categories the table does not cover go to the default (generalist) expert.
    """
    problem = map_problem(config, categories, params, table, default_expert)
    chosen = None
    if problem:
        chosen = best_map(
            problem.table, problem.params, problem.frequencies, config.budget_params, problem.pins
        )
    assignment = {c: default_expert for c in _wanted(config, categories)}
    if chosen:
        assignment.update(chosen.assignment)
    assignment.update({c: e for c, e in _pins(config, default_expert).items() if c in assignment})
    return assignment, chosen


def _pins(config: RouterConfig, default_expert: str) -> dict[str, str]:
    """Categories fixed by hand: ``router.pins``, and the fallback category when the config names
    a ``router.default_expert``. Otherwise the fallback is mapped like any other category (its
    row of the score table: how each expert does across categories; its traffic share counted in
    the budget), so a request the router was unsure about gets a strong generalist, not the first
    expert."""
    pinned = dict(config.pins)
    if config.default_expert is not None:
        pinned.setdefault(config.fallback_category, default_expert)
    return pinned


def _wanted(config: RouterConfig, categories: Sequence[str]) -> list[str]:
    return [
        *categories,
        *([config.fallback_category] if config.fallback_category not in categories else []),
    ]


@dataclass
class ExpertRouter:
    router: Router
    assignment: dict[str, str]  # category -> expert
    stay_margin: float = 0.2
    plan: ExpertMap | None = None
    score_source: str = ""
    table: ScoreTable | None = None

    def prefer_resident(
        self, decision: RouteDecision, hot: Sequence[str], tolerance: float
    ) -> RouteDecision:
        """Serve from a hot expert instead of a cold planned one when its expected score for the
        category is within ``tolerance`` of the planned expert's (residency-aware routing)."""
        table, category = self.table, decision.category
        if (
            tolerance <= 0
            or decision.expert in hot
            or table is None
            or category not in table.scores
        ):
            return decision
        scores = table.scores[category]
        planned = scores.get(decision.expert)
        if planned is None:
            return decision
        near = [(scores[e], e) for e in hot if e in scores and scores[e] >= planned - tolerance]
        if not near:
            return decision
        score, expert = max(near)
        return replace(
            decision,
            expert=expert,
            planned_expert=decision.expert,
            score_given_up=max(0.0, planned - score),
            reason=(decision.reason + "; " if decision.reason else "")
            + f"served by hot {expert} (expected {score:.3f}) instead of cold {decision.expert} "
            f"({planned:.3f}), within switch_tolerance {tolerance}",
        )

    def next_best(self, category: str, usable) -> str | None:
        """The best-scoring expert for ``category`` that ``usable(expert)`` accepts: by the score
        table, then the other experts of the map; None when none is usable."""
        ranked: list[str] = []
        if self.table is not None and category in self.table.scores:
            row = self.table.scores[category]
            ranked = sorted(row, key=lambda e: -row[e])
        mapped = [self.assignment.get(category)] + list(self.assignment.values())
        ranked += [e for e in dict.fromkeys(mapped) if e and e not in ranked]
        return next((e for e in ranked if usable(e)), None)

    def route_prompt(self, prompt: str, tools: Sequence[dict] | None = None) -> RouteDecision:
        return self.explain_prompt(prompt, tools)[0]

    def explain_prompt(
        self, prompt: str, tools: Sequence[dict] | None = None
    ) -> tuple[RouteDecision, CategoryDecision]:
        """The decision and the category probabilities behind it."""
        decision = self.router.classify([with_tools(check_prompt(prompt), tools)])[0]
        return self._decision(decision), decision

    def route_prompts(self, prompts: list[str]) -> list[RouteDecision]:
        return [self._decision(d) for d in self.router.classify(prompts)]

    def route_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict] | None = None
    ) -> RouteDecision:
        return self.explain_messages(messages, tools)[0]

    def explain_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict] | None = None
    ) -> tuple[RouteDecision, CategoryDecision]:
        """The decision for a conversation and the category probabilities behind it."""
        turns = user_turns(messages)
        if not turns:
            raise InvalidRequest(
                "the conversation has no user message with text to route", param="messages"
            )
        last = with_tools(check_prompt(turns[-1]), tools)
        if len(turns) == 1:
            decision = self.router.classify([last])[0]
            return self._decision(decision), decision
        whole = with_tools("\n\n".join(turns)[-MAX_PROMPT_CHARS:], tools)
        before = "\n\n".join(turns[:-1])[-MAX_PROMPT_CHARS:]
        rows = self.router.probabilities([last, whole, before])
        now = [(a + b) / 2 for a, b in zip(rows[0], rows[1])]
        decision = self._stay(self.router.decide(now), self.router.decide(rows[2]))
        return self._decision(decision), decision

    def _stay(self, decision: CategoryDecision, previous: CategoryDecision) -> CategoryDecision:
        """Keep the conversation's category unless the new one is clearly more likely."""
        same_expert = self.assignment.get(decision.category) == self.assignment.get(
            previous.category
        )
        gain = decision.confidence - decision.probabilities.get(previous.category, 0.0)
        if same_expert or gain >= self.stay_margin:
            return decision
        return CategoryDecision(
            previous.category,
            decision.probabilities.get(previous.category, 0.0),
            decision.probabilities,
            previous.fallback,
            f"kept on the conversation's category {previous.category!r}: "
            f"{decision.category!r} is only {gain:.2f} more likely "
            f"(margin {self.stay_margin:.2f})",
        )

    def _decision(self, decision: CategoryDecision) -> RouteDecision:
        expert = self.assignment[decision.category]
        alternatives = tuple(
            (cat, self.assignment.get(cat, expert), round(p, 4))
            for cat, p in decision.ranked()
            if cat != decision.category
        )[:3]
        return RouteDecision(
            category=decision.category,
            confidence=decision.confidence,
            expert=expert,
            alternatives=alternatives,
            fallback=decision.fallback,
            reason=decision.reason,
        )


def check_categories(config: RouterConfig, categories: Sequence[str]) -> None:
    known = {*categories, config.fallback_category}
    unknown = sorted(set(config.pins) - known)
    if unknown:
        raise ConfigError(
            f"router.pins.{unknown[0]}: the router has no category {unknown[0]!r} "
            f"(categories: {', '.join(sorted(known))})",
            param=f"router.pins.{unknown[0]}",
        )


def load_expert_router(
    config: RouterConfig, home: str | Path, params: dict[str, int | None], default_expert: str
) -> ExpertRouter:
    """The trained router named by the config (or the default artifact under ``home``) with its
    category-to-expert map. Raises RouterUnavailable when the artifact is missing or corrupt."""
    from coe.router.batching import BatchingRouter
    from coe.router.learned import LearnedRouter

    folder = Path(config.artifact) if config.artifact else default_artifact_dir(home)
    router = BatchingRouter(LearnedRouter.load(folder, config.fallback_category, config.threshold))
    check_categories(config, router.categories)
    table = load_score_table(config.scores)
    assignment, plan = build_map(config, router.categories, params, default_expert, table)
    return ExpertRouter(router, assignment, config.stay_margin, plan, table.source, table)
