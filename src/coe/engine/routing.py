"""Which expert serves a request: the model name, or for "coe" the router's decision, checked
against the experts' health (a backing-off expert's requests go to the next-best healthy one)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from coe.backends import PER_SEQUENCE_ADAPTERS
from coe.config import ROUTED_MODEL, CoEConfig, ExpertConfig
from coe.engine.health import ExpertHealth
from coe.engine.metrics import EngineMetrics
from coe.errors import ExpertUnavailable, UnknownExpert
from coe.models import backend_of
from coe.router.service import ExpertRouter
from coe.types import ChatMessage, Profile, Request, RouteDecision, Tools

MAX_RECENT_DECISIONS = 10_000  # routing decisions kept for the console's routing panel


class Routing:
    """Contract: safe from any thread (the server resolves on worker threads)."""

    def __init__(
        self,
        config: CoEConfig,
        router: ExpertRouter | None,
        router_error: str | None,
        health: ExpertHealth,
        metrics: EngineMetrics,
        ready_experts: Callable[[], list[str]],
        tool_callers: Collection[str] = (),
    ):
        self.config, self.router, self.health, self.metrics = config, router, health, metrics
        self.tool_callers = frozenset(tool_callers)  # experts with a tool-call format of their own
        # why model "coe" falls back to the default expert
        self.router_error = router_error or (None if router else "no router configured")
        self._ready_experts = ready_experts
        self._names = [e.name for e in config.experts]
        self._queues = {e.name: _queue_of(e) for e in config.experts}
        self._profiles = {e.name: e.profile for e in config.experts}
        self._decisions: deque[tuple[float, str, str]] = deque(maxlen=MAX_RECENT_DECISIONS)

    def resolve(
        self,
        model: str,
        messages: Sequence[ChatMessage] | None = None,
        prompt: str | None = None,
        tools: Tools | None = None,
    ) -> tuple[str, RouteDecision | None]:
        """The expert for a requested model name. "coe" is routed on the conversation (or the
        prompt); without a router it goes to the default expert and says why. A request that
        offers tools goes to an expert that can call them."""
        if model == ROUTED_MODEL:
            return self._route(messages, prompt, tools)
        if model in self._names:
            self.check_healthy(model)
            return model, None
        raise UnknownExpert(
            f"the model {model!r} does not exist; available: "
            f"{', '.join([ROUTED_MODEL, *self._names])}",
            param="model",
        )

    def _route(self, messages, prompt, tools: Tools | None) -> tuple[str, RouteDecision]:
        if self.router is None:
            expert = self.config.default_expert
            return expert, RouteDecision(
                category=self.config.router.fallback_category,
                confidence=0.0,
                expert=expert,
                fallback=True,
                reason=self.router_error or "",
            )
        functions = tools.functions if tools is not None else None
        if messages:
            decision = self.router.route_messages(messages, functions)
        else:
            decision = self.router.route_prompt(prompt or "", functions)
        decision = self.router.prefer_resident(
            decision, self._ready_experts(), self.config.scheduler.switch_tolerance
        )
        if not self.usable(decision.expert):
            decision = self._healthy_instead(decision, decision.expert)
        if (
            tools is not None
            and tools.choice != "none"
            and decision.expert not in self.tool_callers
        ):
            decision = self._tool_caller_instead(decision)
        self.metrics.decisions.labels(decision.category, decision.expert).inc()
        self._decisions.append((time.monotonic(), decision.category, decision.expert))
        return decision.expert, decision

    def place(self, request: Request) -> None:
        """Set what the request's expert adds (its profile) and the queue it waits in: the base's
        for a profile, so profiles of one base share its batches, except where the backend
        applies an adapter to a whole batch (llama.cpp): then the profile's own queue."""
        request.profile = self._profiles.get(request.expert)
        request.runs_on = self._queue(request.expert)

    def _queue(self, expert: str) -> str:
        return self._queues.get(expert, expert)

    def profile(self, expert: str) -> Profile | None:
        return self._profiles.get(expert)

    # -- health (of the queue an expert's requests run in: a profile fails with its base) ------
    def usable(self, expert: str) -> bool:
        return expert in self._names and self.health.is_healthy(
            self._queue(expert), time.monotonic()
        )

    def check_healthy(self, expert: str) -> None:
        if not self.health.is_healthy(self._queue(expert), time.monotonic()):
            raise self.backing_off(expert)

    def backing_off(self, expert: str) -> ExpertUnavailable:
        queue = self._queue(expert)
        wait_s = self.health.retry_after_s(queue, time.monotonic())
        return ExpertUnavailable(
            f"{expert} failed recently ({self.health.reason(queue)}); it is tried again "
            f"in {wait_s:.0f} s",
            retry_after_s=wait_s,
        )

    def _healthy_instead(self, decision: RouteDecision, failed: str) -> RouteDecision:
        """The next-best healthy expert for the decision's category (by the score table); the
        decision says which expert was planned and why it was not used."""
        assert self.router is not None
        alternative = self.router.next_best(decision.category, self.usable)
        if alternative is None:
            self.check_healthy(failed)  # nothing healthy: 503 with the failed expert's backoff
            return decision
        return self._served_by(decision, failed, alternative)

    def _tool_caller_instead(self, decision: RouteDecision) -> RouteDecision:
        """The best expert for the category that has a tool-call format (by the score table)."""
        assert self.router is not None
        alternative = self.router.next_best(
            decision.category, lambda e: self.usable(e) and e in self.tool_callers
        )
        if alternative is None:
            note = f"no expert has a tool-call format of its own; {decision.expert} gets coe's tool prompt"
            return replace(
                decision, reason=(decision.reason + "; " if decision.reason else "") + note
            )
        note = f"the request offers tools and {decision.expert} cannot call them; served by {alternative}"
        return replace(
            decision,
            expert=alternative,
            planned_expert=decision.planned_expert or decision.expert,
            reason=(decision.reason + "; " if decision.reason else "") + note,
        )

    def _served_by(self, decision: RouteDecision, failed: str, alternative: str) -> RouteDecision:
        reason = self.health.reason(self._queue(failed))
        note = f"{failed} is unavailable ({reason}); served by the next-best healthy expert {alternative}"
        return replace(
            decision,
            expert=alternative,
            planned_expert=decision.planned_expert or failed,
            reason=(decision.reason + "; " if decision.reason else "") + note,
        )

    def move_elsewhere(self, request: Request, failed: str) -> bool:
        """Point a routed request at the next-best healthy expert (its decision says why); False
        when it is not routed, was cancelled, or no healthy expert is left."""
        if request.route is None or self.router is None or request.cancelled:
            return False
        alternative = self.router.next_best(request.route.category, self.usable)
        if alternative is None:
            return False
        request.expert, request.route = (
            alternative,
            self._served_by(request.route, failed, alternative),
        )
        return True

    # -- the console's routing panel -------------------------------------------------------------
    def recent_decisions(self, window_s: float) -> dict[str, dict[str, int]]:
        """How many "coe" requests went to each category and expert in the last ``window_s``."""
        cutoff_s = time.monotonic() - window_s
        counts: dict[str, dict[str, int]] = {}
        for at_s, category, expert in list(self._decisions):
            if at_s >= cutoff_s:
                row = counts.setdefault(category, {})
                row[expert] = row.get(expert, 0) + 1
        return counts


def _queue_of(expert: ExpertConfig) -> str:
    """The scheduler queue of an expert's requests (``Request.runs_on``)."""
    if expert.base is None:
        return expert.name
    if expert.adapter is not None and backend_of(expert) not in PER_SEQUENCE_ADAPTERS:
        return expert.name  # its adapter applies to a whole batch: batched with its own requests
    return expert.base
