"""The engine: requests in, one token per step for every running sequence, events out.

    step():  schedule (the running expert's batch, or the next one: lease its expert)
             -> run (one decoder step: one forward pass over the batch)
             -> postprocess (detokenise, stop, deliver) -> let waiting requests of the expert join

Routing and health are ``routing.Routing``; experts served elsewhere are ``offloaded.OffloadedLane``;
read-only views are ``views.FleetViews``; the token loop's state is ``batch.RunningBatch``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from coe.backends.chat import supports_tools
from coe.backends.offload import OffloadedExpert
from coe.backends.remote import RemoteExpert
from coe.cache import ModelCache
from coe.config import ROUTED_MODEL, CoEConfig
from coe.engine.batch import RunningBatch
from coe.engine.health import ExpertHealth
from coe.engine.metrics import EngineMetrics
from coe.engine.offloaded import OffloadedLane
from coe.engine.routing import Routing
from coe.engine.scheduler import Batch, Scheduler
from coe.engine.views import FleetViews
from coe.errors import (
    CacheFull,
    CoEError,
    ExpertCrashed,
    ExpertUnavailable,
    GenerationError,
    Overloaded,
    RequestTimeout,
    RouterUnavailable,
    UnknownExpert,
)
from coe.models import ModelStore, check_params, disk_info, parse_fleet_headers
from coe.router.service import ExpertRouter, load_expert_router
from coe.types import Completion, Request, StreamEvent, Tier

log = logging.getLogger("coe.engine")

_IDLE_WAIT_S = 0.5


class Engine:
    """Owns the request loop. Contract: ``submit`` and ``stream`` are safe from any thread; ``step``
    runs on the loop thread (``start``), or on the caller's when no loop runs."""

    def __init__(
        self,
        config: CoEConfig,
        cache: ModelCache,
        scheduler: Scheduler | None = None,
        router: ExpertRouter | None = None,
        router_error: str | None = None,
        remotes: dict[str, OffloadedExpert] | None = None,
        health: ExpertHealth | None = None,
    ):
        self.config, self.cache = config, cache
        self.scheduler = scheduler or scheduler_from(config)
        self.metrics = EngineMetrics()
        self.health = health or ExpertHealth()
        # experts served outside this process (other servers, Ray replicas): on their own workers
        self.remotes = remotes if remotes is not None else remote_experts(config)
        self.routing = Routing(
            config,
            router,
            router_error,
            self.health,
            self.metrics,
            self.ready_experts,
            tool_callers=self._tool_callers(),
        )
        self.offloaded = OffloadedLane(
            self.remotes,
            self.scheduler.max_queue_per_expert,
            self.health,
            self.metrics,
            self.routing,
            self._resubmit,
            lambda: self._stopping,
        )
        self.views = FleetViews(config, cache, self.remotes)
        self.metrics.watch(self.queued_by_expert, self.views.snapshot)
        self._names = {e.name for e in config.experts}
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch: RunningBatch | None = None  # the running expert's sequences (engine thread)
        self._lease = contextlib.ExitStack()  # keeps that expert hot while it runs
        self._running: dict[str, Request] = {}  # its requests by id (guarded by _work)
        self._batch_started_s = 0.0
        self._current: str | None = None  # the expert of the last batch
        self.num_served = 0

    @classmethod
    def from_config(
        cls,
        config: CoEConfig,
        home: str | Path,
        offloaded: Mapping[str, OffloadedExpert] | None = None,
    ) -> Engine:
        """An engine with a model cache whose packaged weights live under ``home`` (COE_HOME).
        ``offloaded`` serves some local experts elsewhere (Ray Serve replicas)."""
        check_params(config)
        store = ModelStore(home)
        parse_fleet_headers(store, config)
        cache = ModelCache(config, store)
        cache.check_adapters()
        remotes = {**remote_experts(config), **(offloaded or {})}
        router: ExpertRouter | None = None
        error: str | None = "router disabled in the config (router.enabled: false)"
        if config.router.enabled:
            params = {s.name: s.num_params for s in cache.states()}
            params.update(
                {name: remote.num_params for name, remote in remotes.items() if remote.num_params}
            )
            try:
                router, error = (
                    load_expert_router(config.router, home, params, config.default_expert),
                    None,
                )
            except RouterUnavailable as exc:
                error = f"router unavailable: {exc.message}"
                log.warning(
                    "model %r falls back to %s: %s", ROUTED_MODEL, config.default_expert, error
                )
        return cls(config, cache, router=router, router_error=error, remotes=remotes)

    def _tool_callers(self) -> set[str]:
        """Experts whose chat template has a tool-call format (from the headers), and every remote
        one (an OpenAI-compatible server handles tools itself)."""
        callers = set(self.remotes)
        for expert in self.config.experts:
            if expert.name in self.remotes:
                continue
            info, _ = disk_info(self.cache.store, expert)
            if info is not None and supports_tools(info.chat_template):
                callers.add(expert.name)
        return callers

    # -- submission ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue the request (or raise Overloaded: 429) and hint the cache to start moving its
        expert up while it waits. A remote expert's request goes straight to its workers."""
        if request.expert not in self._names:
            raise UnknownExpert(f"no expert named {request.expert!r}", param="model")
        self.routing.place(request)
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
        if request.expert in self.offloaded:
            self.offloaded.admit(request)
        else:
            self.scheduler.add(request)

    def _start(self, request: Request) -> None:
        """After admission: a remote request starts on its expert's workers; a local one hints
        the cache to move its expert up while it waits."""
        if request.expert in self.offloaded:
            self.offloaded.start(request)
            return
        if request.keep_alive_s is not None:  # the latest request's keep_alive holds
            self.cache.keep_alive(request.expert, request.keep_alive_s)
        if (
            self.config.cache.prefetch != "none"
            and not self.cache.is_resident(request.expert)
            and self.health.is_healthy(request.queue, time.monotonic())
            and self._fits_with_those_ahead(request.expert)
        ):
            self.cache.prefetch(request.expert, Tier(self.config.cache.prefetch))

    def _fits_with_those_ahead(self, name: str) -> bool:
        """A queued request's expert is moved up early only if the host tier holds it together
        with every expert that has requests waiting: past that, the early load evicts an expert
        needed sooner, or is evicted before its turn. (104 experts, a backlog over 60 of them:
        a hint per admission read 51.8 GiB from disk for 29 GB of distinct experts.)"""
        with self._work:
            waiting = set(self.scheduler.queued_by_expert())
        needed_bytes = self.cache.host_bytes_needed(waiting | {name})
        return needed_bytes <= self.cache.budget_bytes(Tier.HOST)

    def _resubmit(self, request: Request) -> None:
        """A request moved to another expert (its own failed): queue it there, or end it."""
        self.routing.place(request)
        try:
            with self._work:
                self._admit(request)
                self._work.notify()
        except Overloaded as full:
            request.sink(StreamEvent(request.id, error=full))
            return
        self._start(request)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """Submit and yield the request's events on the calling thread (CLI, benchmarks).

        Without a running loop thread, the calling thread serves the queue itself.
        """
        events: queue.Queue[StreamEvent] = queue.Queue()
        request.sink = events.put
        self.submit(request)
        if self._thread is None and request.expert not in self.offloaded:
            while self.step():
                pass
            if events.empty() or not events.queue[-1].is_final:
                request.sink(
                    StreamEvent(
                        request.id, error=GenerationError("the request was cancelled before it ran")
                    )
                )
        while True:
            event = events.get()
            yield event
            if event.is_final:
                return

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One token for every running sequence: schedule -> run -> postprocess. False when idle."""
        self._tidy_queue()
        if self._batch is None:
            batch = self._next_batch()
            if batch is None:
                return False
            if not self._open(batch):  # its expert could not be made ready: moved on or failed
                return True
        else:
            self._join()
        assert self._batch is not None
        self.metrics.step_sequences.observe(self._batch.width)
        self._deliver(self._run_step(self._batch))
        if self._batch is not None and self._batch.done:
            self._close(crash=None)
        return True

    def _next_batch(self) -> Batch | None:
        with self._work:
            if self._stopping:
                return None
            batch = self.scheduler.next_batch(
                time.monotonic(), self.cache.hot_experts(), self._current
            )
            if batch is not None:
                self._running, self._current = {r.id: r for r in batch.requests}, batch.expert
        if batch is not None:
            self.metrics.running.set(len(batch.requests))
            self.metrics.batch_size.observe(len(batch.requests))
        return batch

    def _open(self, batch: Batch) -> bool:
        """Lease the batch's expert (the switch) and start decoding its requests."""
        self._batch_started_s = time.perf_counter()
        if not self.health.is_healthy(batch.expert, time.monotonic()):
            return self._unavailable(batch, None)  # backing off: no new load attempt yet
        tier = self.cache.tier_of(batch.expert)
        try:
            runner = self._lease.enter_context(self.cache.lease(batch.expert))
            self._batch = RunningBatch(runner, self.cache.adapter)
        except Exception as exc:  # load error, out of memory, missing or corrupt weights
            self._lease.close()
            return self._unavailable(batch, exc)
        self._record_switch(batch, tier, time.perf_counter() - self._batch_started_s)
        self._look_ahead(batch.expert)  # after our own load: it must not queue behind the next one
        self._deliver(self._batch.admit(batch.requests))
        return True

    def _run_step(self, batch: RunningBatch) -> list[StreamEvent]:
        """One decoder step; a failure ends the batch's requests and backs its expert off."""
        try:
            return batch.step()
        except CoEError as exc:
            return self._close(crash=exc)
        except Exception as exc:  # the runner crashed: the expert backs off, its requests end
            return self._close(crash=GenerationError(f"{batch.expert}: generation failed: {exc}"))

    def _close(self, crash: CoEError | None) -> list[StreamEvent]:
        """The batch ended (or crashed: its unfinished requests get ``crash``); its expert may be evicted again."""
        batch, self._batch = self._batch, None
        assert batch is not None
        events = batch.fail(crash) if crash is not None else []
        try:
            batch.close()
        finally:
            self._lease.close()
        if crash is None:
            self.health.succeeded(batch.expert)
        elif isinstance(crash, GenerationError):
            backoff_s = self.health.failed(batch.expert, time.monotonic(), crash.message)
            if isinstance(crash, ExpertCrashed):  # its clients may retry once it is back
                crash.retry_after_s = backoff_s
                log.warning(
                    "expert %s crashed, backing off %.0f s: %s",
                    batch.expert,
                    backoff_s,
                    crash.message,
                )
        self.scheduler.record_service(time.perf_counter() - self._batch_started_s)
        self.metrics.running.set(0)
        return events

    def _join(self) -> None:
        """Requests that arrived for the running expert join its batch (continuous batching):
        served from the device with no switch paid; the scheduler decides who may."""
        batch = self._batch
        assert batch is not None
        if not self.config.scheduler.join_running or batch.free_slots == 0:
            return
        with self._work:
            if self._stopping:
                return
            joined = self.scheduler.join(batch.expert, batch.free_slots, time.monotonic())
            self._running.update((r.id, r) for r in joined)
            running = len(self._running)
        if joined:
            for request in joined:
                request.served_tier, request.switch_s = Tier.DEVICE, 0.0
            self.metrics.running.set(running)
            self.metrics.joined.labels(batch.expert).inc(len(joined))
            self._deliver(batch.admit(joined))

    def _deliver(self, events: list[StreamEvent]) -> None:
        for event in events:
            with self._work:
                request = (
                    self._running.pop(event.request_id, None)
                    if event.is_final
                    else self._running.get(event.request_id)
                )
            if request is not None:
                request.sink(event)
                self.num_served += event.is_final

    def _tidy_queue(self) -> None:
        """End the queued requests that waited past the timeout or were cancelled while queued."""
        timeout_s = self.config.server.request_timeout_s
        with self._work:
            expired = self.scheduler.expired(time.monotonic(), timeout_s)
            cancelled = self.scheduler.take_cancelled()
        for request in expired:
            request.sink(
                StreamEvent(
                    request.id,
                    error=RequestTimeout(
                        f"the request waited longer than server.request_timeout_s = {timeout_s} s"
                    ),
                )
            )
        for request in cancelled:  # its slot is freed and it is counted
            request.sink(StreamEvent(request.id, completion=Completion("", "cancelled", 0, 0)))

    def _unavailable(self, batch: Batch, exc: Exception | None) -> bool:
        """The batch's expert could not be made ready (``exc``; None: it is still backing off from
        an earlier failure). Routed requests move to the next-best healthy expert (nothing was sent
        to their clients yet), the others get 503 with Retry-After. A full cache is not the
        expert's fault: its requests get CacheFull and it stays healthy."""
        with self._work:
            self._running = {}
        self.metrics.running.set(0)
        if isinstance(exc, CacheFull):
            error: CoEError = exc
        elif exc is None:
            error = self.routing.backing_off(batch.expert)
        else:
            message = (
                exc.message
                if isinstance(exc, CoEError)
                else f"{batch.expert}: {type(exc).__name__}: {exc}"
            )
            backoff_s = self.health.failed(batch.expert, time.monotonic(), message)
            log.warning("expert %s is unavailable for %.0f s: %s", batch.expert, backoff_s, message)
            error = exc if isinstance(exc, CoEError) else ExpertUnavailable(message)
            error.retry_after_s = backoff_s
        for request in batch.requests:
            if not isinstance(exc, CacheFull) and self.routing.move_elsewhere(
                request, batch.expert
            ):
                self._resubmit(request)
            else:
                request.sink(StreamEvent(request.id, error=error))
                self.num_served += 1
        return False

    def _look_ahead(self, current: str) -> None:
        """Start loading the expert that will run after this batch while this one generates."""
        if self.config.scheduler.lookahead == "none":
            return
        with self._work:
            upcoming = self.scheduler.peek_expert(
                time.monotonic(), self.cache.hot_experts(), current
            )
        if upcoming is not None and upcoming != current and not self.cache.is_resident(upcoming):
            self.cache.prefetch(upcoming, Tier(self.config.scheduler.lookahead))

    def _record_switch(self, batch: Batch, tier: Tier, switch_s: float) -> None:
        for request in batch.requests:
            request.served_tier, request.switch_s = tier, switch_s
        self.metrics.served_from.labels(tier).inc()
        if tier != Tier.DEVICE:
            self.metrics.switch.labels(tier).observe(switch_s)

    def _run(self) -> None:
        idle_checked_s = time.monotonic()
        while True:
            with self._work:
                if self._stopping and self._batch is None:
                    return
            if not self.step():
                with self._work:
                    if not self._stopping and len(self.scheduler) == 0:
                        self._work.wait(_IDLE_WAIT_S)
            if time.monotonic() - idle_checked_s >= _IDLE_WAIT_S:
                idle_checked_s = time.monotonic()
                for name, tier in self.cache.unload_idle():
                    log.info("%s unused for its keep time: moved out of %s", name, tier)

    def start(self) -> None:
        """Start the loop thread; experts pinned in the config start moving to the device."""
        for name in self.config.cache.pins:
            self.cache.prefetch(name, Tier.DEVICE).add_done_callback(
                functools.partial(self._pin_when_loaded, name)
            )
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="coe-engine", daemon=True)
            self._thread.start()

    def _pin_when_loaded(self, name: str, _: object) -> None:
        try:
            self.cache.pin(name)
        except CoEError as exc:
            log.warning("cache.pins: could not pin %s: %s", name, exc.message)

    def stop(self) -> None:
        """Stop the loop: the batch in flight is cancelled at its next token, queued requests get an error."""
        with self._work:
            self._stopping = True
            for request in self._running.values():
                request.cancel()
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._batch is not None:  # no loop thread: finish the cancelled batch here
            self.step()
        with self._work:
            leftover = self.scheduler.drain()
        for request in leftover:
            request.sink(StreamEvent(request.id, error=Overloaded("the server is shutting down")))
        self.offloaded.close()
        self.cache.close()

    # -- queues ----------------------------------------------------------------------------------
    @property
    def running_expert(self) -> str | None:
        """The expert whose batch is decoding now (None between batches)."""
        batch = self._batch
        return batch.expert if batch is not None else None

    def ready_experts(self) -> list[str]:
        """Experts that serve without a switch: the hot local ones and every remote one."""
        return [*self.cache.hot_experts(), *self.remotes]

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
    return Scheduler(
        s.max_batch_size, s.max_queue, s.max_queue_per_expert, s.max_wait_ms / 1000, s.policy
    )
