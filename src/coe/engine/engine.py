"""The engine loop: route -> enqueue -> prefetch -> schedule -> activate -> run -> stream, on one
background thread."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from coe.backends.offload import OffloadedExpert
from coe.backends.remote import RemoteExpert
from coe.cache import ExpertState, ModelCache
from coe.config import ROUTED_MODEL, CoEConfig
from coe.engine.health import ExpertHealth
from coe.engine.metrics import EngineMetrics
from coe.engine.scheduler import Batch, Scheduler
from coe.errors import (CacheFull, CoEError, ExpertUnavailable, GenerationError, Overloaded, RequestTimeout,
                        RouterUnavailable, UnknownExpert)
from coe.models.catalog import ModelStore
from coe.router.service import ExpertRouter, load_expert_router
from coe.types import ChatMessage, Completion, Request, RouteDecision, StreamEvent

log = logging.getLogger("coe.engine")

_IDLE_WAIT_S = 0.5
MAX_RECENT_DECISIONS = 10_000  # routing decisions kept for the console's routing panel


class Engine:
    """Owns the request loop. ``submit`` and ``stream`` are safe from any thread."""

    def __init__(self, config: CoEConfig, cache: ModelCache, scheduler: Scheduler | None = None,
                 router: ExpertRouter | None = None, router_error: str | None = None,
                 remotes: dict[str, OffloadedExpert] | None = None):
        self.config = config
        self.cache = cache
        # experts served outside this process (other servers, Ray replicas): on their own workers
        self.remotes = remotes if remotes is not None else remote_experts(config)
        self.router = router
        # why model "coe" falls back to the default expert
        self.router_error = router_error or (None if router else "no router configured")
        self.scheduler = scheduler or scheduler_from(config)
        self.metrics = EngineMetrics()
        self.metrics.watch(self.queued_by_expert, self.snapshot)
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: tuple[Request, ...] = ()
        self._current: str | None = None  # the expert of the last batch
        self.num_served = 0
        self._decisions: deque[tuple[float, str, str]] = deque(maxlen=MAX_RECENT_DECISIONS)
        self.health = ExpertHealth()
        # where `snapshot` reads the tiers from: this process's cache, unless the weights live in
        # other processes that report theirs (the Ray Serve ingress sets the replicas' view)
        self.cache_view: Callable[[], dict] = cache.snapshot

    @classmethod
    def from_config(cls, config: CoEConfig, home: str | Path,
                    offloaded: dict[str, OffloadedExpert] | None = None) -> "Engine":
        """An engine with a model cache whose packaged weights live under ``home`` (COE_HOME).
        ``offloaded`` serves some local experts elsewhere (Ray Serve replicas)."""
        cache = ModelCache(config, ModelStore(home))
        remotes = {**remote_experts(config), **(offloaded or {})}
        router, error = None, "router disabled in the config (router.enabled: false)"
        if config.router.enabled:
            params = {s.name: s.num_params for s in cache.states()}
            params.update({name: remote.num_params for name, remote in remotes.items() if remote.num_params})
            try:
                router, error = load_expert_router(config.router, home, params,
                                                   config.default_expert), None
            except RouterUnavailable as exc:
                error = f"router unavailable: {exc.message}"
                log.warning("model %r falls back to %s: %s", ROUTED_MODEL, config.default_expert, error)
        return cls(config, cache, router=router, router_error=error, remotes=remotes)

    # -- routing ---------------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        return [e.name for e in self.config.experts]

    def resolve(self, model: str, messages: Sequence[ChatMessage] | None = None,
                prompt: str | None = None, tools: Sequence[dict] | None = None
                ) -> tuple[str, RouteDecision | None]:
        """The expert for a requested model name. 'coe' is routed on the conversation (or the
        prompt); without a router it goes to the default expert and says why."""
        if model == ROUTED_MODEL:
            if self.router is None:
                expert = self.config.default_expert
                return expert, RouteDecision(category=self.config.router.fallback_category,
                                             confidence=0.0, expert=expert, fallback=True,
                                             reason=self.router_error)
            if messages:
                decision = self.router.route_messages(messages, tools)
            else:
                decision = self.router.route_prompt(prompt or "", tools)
            decision = self.router.prefer_resident(decision, self.ready_experts(),
                                                   self.config.scheduler.switch_tolerance)
            if not self._usable(decision.expert):
                decision = self._healthy_instead(decision, decision.expert)
            self.metrics.decisions.labels(decision.category, decision.expert).inc()
            self._decisions.append((time.monotonic(), decision.category, decision.expert))
            return decision.expert, decision
        if model in self.expert_names():
            self._check_healthy(model)
            return model, None
        raise UnknownExpert(f"the model {model!r} does not exist; available: "
                            f"{', '.join([ROUTED_MODEL, *self.expert_names()])}", param="model")

    # -- health ----------------------------------------------------------------------------------
    def _usable(self, expert: str) -> bool:
        return expert in self.expert_names() and self.health.is_healthy(expert, time.monotonic())

    def _check_healthy(self, expert: str) -> None:
        if not self.health.is_healthy(expert, time.monotonic()):
            raise self._backing_off(expert)

    def _backing_off(self, expert: str) -> ExpertUnavailable:
        now_s = time.monotonic()
        wait_s = self.health.retry_after_s(expert, now_s)
        reason = self.health.snapshot(now_s).get(expert, {}).get("reason", "")
        return ExpertUnavailable(f"{expert} failed recently ({reason}); it is tried again in {wait_s:.0f} s",
                                 retry_after_s=wait_s)

    def _healthy_instead(self, decision: RouteDecision, failed: str) -> RouteDecision:
        """The next-best healthy expert for the decision's category (by the score table); the
        decision says which expert was planned and why it was not used."""
        alternative = self.router.next_best(decision.category, self._usable)
        if alternative is None:
            self._check_healthy(failed)  # nothing healthy: 503 with the failed expert's backoff
            return decision
        return self._served_by(decision, failed, alternative)

    def _served_by(self, decision: RouteDecision, failed: str, alternative: str) -> RouteDecision:
        reason = self.health.snapshot(time.monotonic()).get(failed, {}).get("reason", "")
        note = f"{failed} is unavailable ({reason}); served by the next-best healthy expert {alternative}"
        return replace(decision, expert=alternative, planned_expert=decision.planned_expert or failed,
                       reason=(decision.reason + "; " if decision.reason else "") + note)

    def ready_experts(self) -> list[str]:
        """Experts that serve without a switch: the hot local ones and every remote one."""
        return [*self.cache.hot_experts(), *self.remotes]

    # -- submission ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue the request (or raise Overloaded: 429) and hint the cache to start moving its
        expert up while it waits. A remote expert's request goes straight to its workers."""
        if request.expert not in self.expert_names():
            raise UnknownExpert(f"no expert named {request.expert!r}", param="model")
        with self._work:
            try:
                self._admit(request)
            except Overloaded:
                self.metrics.rejected(request.expert)
                raise
            request.sink = self.metrics.observe(request, request.sink)
            self._work.notify()
        self._start(request)

    def _admit(self, request: Request) -> None:
        """Queue a local expert's request; check a remote one against its capacity. Holds ``_work``."""
        remote = self.remotes.get(request.expert)
        if remote is None:
            self.scheduler.add(request)
            return
        capacity = remote.max_concurrency + self.scheduler.max_queue_per_expert
        if remote.in_flight >= capacity:
            raise Overloaded(f"{request.expert} has {remote.in_flight} requests in flight (at most "
                             f"{capacity}: its concurrency + scheduler.max_queue_per_expert)",
                             retry_after_s=1.0)

    def _start(self, request: Request) -> None:
        """After admission: a remote request starts on its expert's workers; a local one hints
        the cache to move its expert up while it waits."""
        remote = self.remotes.get(request.expert)
        if remote is not None:
            remote.submit(request, self._serve_remote)
        elif (self.config.cache.prefetch != "none" and not self.cache.is_resident(request.expert)
                and self.health.is_healthy(request.expert, time.monotonic())):
            self.cache.prefetch(request.expert, self.config.cache.prefetch)

    def _serve_remote(self, request: Request) -> None:
        """One remote request, on a worker of its expert: stream it, record the expert's health,
        move a routed request to the next-best expert when the remote failed before any token."""
        name = request.expert
        request.served_tier, request.switch_s = "remote", 0.0
        if request.cancelled or self._stopping:
            request.sink(StreamEvent(request.id, completion=Completion("", "cancelled", 0, 0)))
            return
        if not self.health.is_healthy(name, time.monotonic()):
            if not self._reroute(request, name):
                self._fail([request], self._backing_off(name))
            return
        self.metrics.served_from.labels("remote").inc()
        crash = None
        try:
            for event in self.remotes[name].stream(request):
                request.sink(event)
                if isinstance(event.error, GenerationError):
                    crash = event.error.message
        except ExpertUnavailable as exc:
            exc.retry_after_s = self.health.failed(name, time.monotonic(), exc.message)
            log.warning("remote expert %s is unavailable for %.0f s: %s", name, exc.retry_after_s, exc.message)
            if not self._reroute(request, name):
                self._fail([request], exc)
            return
        except CoEError as exc:  # the remote refused this request (4xx) or broke mid-stream
            crash = exc.message if isinstance(exc, GenerationError) else None
            self._fail([request], exc)
        except Exception as exc:  # a malformed stream: the request ends, the expert backs off
            crash = f"{type(exc).__name__}: {exc}"
            self._fail([request], GenerationError(f"{name} (remote): {crash}"))
        self._record_outcome(name, crash)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """Submit and yield the request's events on the calling thread (CLI, benchmarks).

        Without a running loop thread, the calling thread serves the queue itself.
        """
        events: queue.Queue[StreamEvent] = queue.Queue()
        request.sink = events.put
        self.submit(request)
        if self._thread is None and request.expert not in self.remotes:
            while self.step():
                pass
            if events.empty() or not events.queue[-1].is_final:
                request.sink(StreamEvent(request.id, error=GenerationError("the request was cancelled before it ran")))
        while True:
            event = events.get()
            yield event
            if event.is_final:
                return

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> bool:
        """Serve one batch. Returns False when there was nothing to do."""
        batch = self._next_batch()
        if batch is None:
            return False
        started_s, ended = time.perf_counter(), set()
        try:
            self._run_batch(batch, started_s, ended)
        except Exception as exc:  # keep serving: one failed batch must not kill the loop
            self._fail([r for r in self._running if r.id not in ended],
                       exc if isinstance(exc, CoEError) else GenerationError(f"{batch.expert}: {type(exc).__name__}: {exc}"))
        finally:
            with self._work:
                served, self._running = len(self._running), ()
        self.scheduler.record_service(time.perf_counter() - started_s)
        self.metrics.running.set(0)
        self.num_served += served
        return True

    def _run_batch(self, batch: Batch, started_s: float, ended: set[str]) -> None:
        """Make the batch's expert ready and generate; ``ended`` collects finished request ids."""
        if not self.health.is_healthy(batch.expert, time.monotonic()):
            return self._unavailable(batch, None)  # backing off: no new load attempt yet
        tier = self.cache.tier_of(batch.expert)
        with contextlib.ExitStack() as stack:
            try:
                runner = stack.enter_context(self.cache.lease(batch.expert))
            except Exception as exc:  # load error, out of memory, missing or corrupt weights
                return self._unavailable(batch, exc)
            self._record_switch(batch, tier, time.perf_counter() - started_s)
            self._look_ahead(batch.expert)  # after our own load: it must not queue behind the next one
            self._generate(batch, runner, ended)

    def _generate(self, batch: Batch, runner, ended: set[str]) -> None:
        crash = None  # a runner reports its own crash as GenerationError events
        join = (lambda count: self._join(batch.expert, count)) if self.config.scheduler.join_running else None
        try:
            for event in runner.generate(batch.requests, join):
                self._deliver(self._running, event)
                if event.is_final:
                    ended.add(event.request_id)
                if isinstance(event.error, GenerationError):
                    crash = event.error.message
            self._record_outcome(batch.expert, crash)
        except CoEError as exc:
            self._fail([r for r in self._running if r.id not in ended], exc)
        except Exception as exc:  # the runner crashed: the expert backs off, its requests end
            self.health.failed(batch.expert, time.monotonic(), f"{type(exc).__name__}: {exc}")
            self._fail([r for r in self._running if r.id not in ended],
                       GenerationError(f"{batch.expert}: {type(exc).__name__}: {exc}"))

    def _join(self, expert: str, count: int) -> tuple[Request, ...]:
        """Requests that arrived for ``expert`` while its batch runs, to join it (continuous
        batching): served from the device with no switch paid."""
        with self._work:
            if self._stopping:
                return ()
            joined = self.scheduler.join(expert, count, time.monotonic())
            self._running = (*self._running, *joined)
            running = len(self._running)
        for request in joined:
            request.served_tier, request.switch_s = "device", 0.0
        if joined:
            self.metrics.running.set(running)
            self.metrics.joined.labels(expert).inc(len(joined))
        return joined

    def _record_outcome(self, expert: str, crash: str | None) -> None:
        """A generation that ended without a crash clears the expert's backoff; a crash starts it."""
        if crash is None:
            self.health.succeeded(expert)
        else:
            self.health.failed(expert, time.monotonic(), crash)

    def _unavailable(self, batch: Batch, exc: Exception | None) -> None:
        """The batch's expert could not be made ready (``exc``; None: it is still backing off from
        an earlier failure). Routed requests move to the next-best healthy expert (nothing was sent
        to their clients yet), the others get 503 with Retry-After. A full cache is not the
        expert's fault: its requests get CacheFull and it stays healthy."""
        if isinstance(exc, CacheFull):
            self._fail(batch.requests, exc)
            return
        if exc is None:
            error: CoEError = self._backing_off(batch.expert)
        else:
            message = exc.message if isinstance(exc, CoEError) else f"{batch.expert}: {type(exc).__name__}: {exc}"
            backoff_s = self.health.failed(batch.expert, time.monotonic(), message)
            log.warning("expert %s is unavailable for %.0f s: %s", batch.expert, backoff_s, message)
            error = exc if isinstance(exc, CoEError) else ExpertUnavailable(message)
            error.retry_after_s = backoff_s
        for request in batch.requests:
            if not self._reroute(request, batch.expert):
                self._fail([request], error)

    def _reroute(self, request: Request, failed: str) -> bool:
        """Queue a routed request again for the next-best healthy expert; False when it is not
        routed, was cancelled, or no healthy expert is left."""
        if request.route is None or self.router is None or request.cancelled:
            return False
        alternative = self.router.next_best(request.route.category, self._usable)
        if alternative is None:
            return False
        request.expert, request.route = alternative, self._served_by(request.route, failed, alternative)
        try:
            with self._work:
                self._admit(request)
                self._work.notify()
        except Overloaded as full:
            self._fail([request], full)
            return True
        self._start(request)
        return True

    def _next_batch(self) -> Batch | None:
        """Expire requests queued past the timeout, then take the scheduler's choice."""
        with self._work:
            if self._stopping:
                return None
            now_s = time.monotonic()
            expired = self.scheduler.expired(now_s, self.config.server.request_timeout_s)
            batch = self.scheduler.next_batch(now_s, self.cache.hot_experts(), self._current)
            cancelled = self.scheduler.take_cancelled()
            if batch is not None:
                self._running, self._current = batch.requests, batch.expert
        self._fail(expired, RequestTimeout(f"the request waited longer than server.request_timeout_s = "
                                           f"{self.config.server.request_timeout_s} s"))
        for request in cancelled:  # cancelled while queued: end it, so its slot is freed and counted
            request.sink(StreamEvent(request.id, completion=Completion("", "cancelled", 0, 0)))
        if batch is not None:
            self.metrics.running.set(len(batch.requests))
            self.metrics.batch_size.observe(len(batch.requests))
        return batch

    def _look_ahead(self, current: str) -> None:
        """Start loading the expert that will run after this batch while this one generates."""
        tier = self.config.scheduler.lookahead
        if tier == "none":
            return
        with self._work:
            upcoming = self.scheduler.peek_expert(time.monotonic(), self.cache.hot_experts(), current)
        if upcoming is not None and upcoming != current and not self.cache.is_resident(upcoming):
            self.cache.prefetch(upcoming, tier)

    def _record_switch(self, batch: Batch, tier: str, switch_s: float) -> None:
        for request in batch.requests:
            request.served_tier, request.switch_s = tier, switch_s
        self.metrics.served_from.labels(tier).inc()
        if tier != "device":
            self.metrics.switch.labels(tier).observe(switch_s)

    def _deliver(self, requests, event: StreamEvent) -> None:
        for request in requests:
            if request.id == event.request_id:
                request.sink(event)
                return

    def _fail(self, requests, error: Exception) -> None:
        for request in requests:
            request.sink(StreamEvent(request.id, error=error))

    def _run(self) -> None:
        while not self._stopping:
            if not self.step():
                with self._work:
                    if not self._stopping and len(self.scheduler) == 0:
                        self._work.wait(_IDLE_WAIT_S)

    def start(self) -> None:
        """Start the loop thread; experts pinned in the config start moving to the device."""
        for name in self.config.cache.pins:
            self.cache.prefetch(name, "device").add_done_callback(lambda _, name=name: self._pin(name))
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="coe-engine", daemon=True)
            self._thread.start()

    def _pin(self, name: str) -> None:
        try:
            self.cache.pin(name)
        except CoEError as exc:
            log.warning("cache.pins: could not pin %s: %s", name, exc.message)

    def stop(self) -> None:
        """Stop the loop: the batch in flight is cancelled at its next token, queued requests get an error."""
        with self._work:
            self._stopping = True
            for request in self._running:
                request.cancel()
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._work:
            leftover = self.scheduler.drain()
        self._fail(leftover, Overloaded("the server is shutting down"))
        for remote in self.remotes.values():
            remote.close()
        self.cache.close()

    def recent_decisions(self, window_s: float) -> dict[str, dict[str, int]]:
        """How many "coe" requests went to each category and expert in the last ``window_s``."""
        cutoff_s = time.monotonic() - window_s
        counts: dict[str, dict[str, int]] = {}
        for at_s, category, expert in list(self._decisions):
            if at_s >= cutoff_s:
                row = counts.setdefault(category, {})
                row[expert] = row.get(expert, 0) + 1
        return counts

    def expert_states(self) -> list[ExpertState]:
        """Every expert in config order: the cache's view of local ones, the remote ones as tier "remote"."""
        return [self._state(e.name) for e in self.config.experts]

    def _remote_state(self, name: str) -> ExpertState:
        remote = self.remotes[name]
        return ExpertState(name, remote.kind, "remote", None, remote.num_params, None, None,
                           requests=remote.requests)

    def snapshot(self) -> dict:
        """Everything `GET /v1/experts` shows: the tiers' snapshot (``cache_view``) with every
        expert, offloaded ones included, in config order."""
        view = self.cache_view()
        held = {row["name"]: row for row in view["experts"]}
        return {**view, "experts": [held.get(e.name) or self._state(e.name).to_dict() for e in self.config.experts]}

    def _state(self, name: str) -> ExpertState:
        return self._remote_state(name) if name in self.remotes else self.cache.state_of(name)

    def queue_depth(self) -> int:
        with self._work:
            return len(self.scheduler)

    def queued_by_expert(self) -> dict[str, int]:
        with self._work:
            return self.scheduler.queued_by_expert()


def remote_experts(config: CoEConfig) -> dict[str, OffloadedExpert]:
    """The ``backend: remote`` experts of the config, ready to call."""
    return {e.name: RemoteExpert(e) for e in config.experts if e.is_remote}


def scheduler_from(config: CoEConfig) -> Scheduler:
    s = config.scheduler
    return Scheduler(s.max_batch_size, s.max_queue, s.max_queue_per_expert, s.max_wait_ms / 1000, s.policy)
