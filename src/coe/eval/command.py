"""``coe eval``: suites -> every expert's results (cached) -> routed decisions -> analysis -> report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coe.config import CoEConfig
from coe.engine.engine import Engine
from coe.errors import ConfigError, RouterUnavailable
from coe.eval import harness, pareto, report, suites
from coe.eval.suites import EvalItem
from coe.router.text import conversation_text, with_tools


@dataclass(frozen=True)
class EvalSettings:
    out: Path
    cache_dir: Path
    suite: str = "quick"
    experts: tuple[str, ...] = ()  # default: every configured expert
    limit: int | None = None  # items per suite; quick has its own defaults
    url: str | None = None  # a running OpenAI-compatible server instead of this process
    api_key: str | None = None
    judge_url: str | None = None
    judge_model: str = "coe"
    judge_api_key: str | None = None
    choice_mode: str = "logprob"  # logprob | letter
    cached_only: bool = False  # analyse cached results only; run no expert

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}", param="limit")
        if self.choice_mode not in ("logprob", "letter"):
            raise ConfigError(
                f"--choice-mode must be logprob or letter, got {self.choice_mode!r}",
                param="choice_mode",
            )


def load_suite_items(settings: EvalSettings) -> tuple[list[EvalItem], dict[str, int]]:
    chosen, limits = suites.resolve(settings.suite)
    items: list[EvalItem] = []
    counts: dict[str, int] = {}
    for suite in chosen:
        limit = settings.limit or limits.get(suite.kind)
        found = suites.load_items(suite, limit)
        counts[suite.name] = len(found)
        items += found
    return items, counts


def evaluate(
    config: CoEConfig,
    home: Path,
    settings: EvalSettings,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict, list[Path]]:
    """Run, analyse and write the report; returns the report and the files written."""
    items, counts = load_suite_items(settings)
    engine = Engine.from_config(config, home)
    try:
        experts = _experts(config, settings)
        if engine.routing.router is None:
            raise RouterUnavailable(
                f"the evaluation compares the learned router; {engine.routing.router_error}"
            )
        params = {
            s.name: float(s.num_params or 0)
            for s in engine.views.expert_states()
            if s.name in experts
        }
        target = (
            harness.ServerTarget(settings.url, settings.api_key, params=params)
            if settings.url
            else harness.EngineTarget(engine)
        )
        judge = None
        if settings.judge_url:
            from coe.eval.judge import http_judge

            judge = http_judge(settings.judge_url, settings.judge_model, settings.judge_api_key)
        log = harness.run(
            target,
            experts,
            items,
            harness.ResultCache(settings.cache_dir),
            judge,
            settings.choice_mode,
            progress,
            settings.cached_only,
        )
        routed = route_items(engine, [i for i in items if i.suite not in log.skipped])
        categories = list(
            dict.fromkeys(
                [*engine.routing.router.router.categories, config.router.fallback_category]
            )
        )
    finally:
        engine.stop()
    return _write(config, home, settings, experts, params, log, routed, categories, counts)


def _experts(config: CoEConfig, settings: EvalSettings) -> list[str]:
    names = [e.name for e in config.experts]
    unknown = [e for e in settings.experts if e not in names]
    if unknown:
        raise ConfigError(
            f"--experts: no expert named {unknown[0]!r}; configured: {', '.join(names)}",
            param="experts",
        )
    return list(settings.experts) or names


def route_items(engine: Engine, items: list[EvalItem]) -> dict[str, pareto.Routed]:
    """The learned router's category for each item (after its low-confidence fallback), the
    category probabilities it came from, and the item's sentence embedding (for the per-cluster
    refinement)."""
    router = engine.routing.router
    assert router is not None  # run() refuses to evaluate without one
    texts = [with_tools(conversation_text(i.messages), i.tools or None) for i in items]
    embedded = router.router.embeddings(texts) or [[] for _ in items]
    routed = {}
    for item, embedding in zip(items, embedded):
        decision, category = router.explain_messages(item.messages, item.tools or None)
        routed[item.id] = pareto.Routed(decision.category, category.probabilities, embedding)
    return routed


def _write(
    config: CoEConfig,
    home: Path,
    settings: EvalSettings,
    experts: list[str],
    params: dict[str, float],
    log: harness.RunLog,
    routed: dict[str, pareto.Routed],
    categories: list[str],
    counts: dict[str, int],
) -> tuple[dict, list[Path]]:
    from coe.router.service import router_num_params

    grid = pareto.Grid.of(log.results, experts)
    if not grid.scores:
        raise ConfigError("no item has results for every expert; nothing to analyse", param="suite")
    router_params = float(router_num_params(config.router, home))
    source = (
        f"measured by `coe eval --suite {settings.suite}` on {time.strftime('%Y-%m-%d')} "
        f"({len(grid.scores)} items from {', '.join(s for s in counts if s not in log.skipped)})"
    )
    analysis = pareto.analyse(
        grid,
        params,
        routed,
        router_params,
        categories,
        source,
        config.router,
        config.default_expert,
    )
    run = {
        "target": settings.url or "engine",
        "choice_mode": settings.choice_mode,
        "experts": experts,
        "items": len(grid.scores),
        "results_cached": log.cached,
        "results_computed": log.computed,
        "results_missing": log.missing,
        "seconds": round(log.seconds, 1),
        "limit": settings.limit,
        "suite": settings.suite,
    }
    data = report.report_dict(
        analysis, params, router_params, run, counts, log.skipped, config.router.budget_params
    )
    return data, report.write(settings.out, data)
