"""The engine loop: schedule -> activate -> run -> deliver, on one background thread."""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

from coe.cache import ModelCache
from coe.config import ROUTED_MODEL, CoEConfig
from coe.engine.scheduler import FifoScheduler
from coe.errors import CoEError, GenerationError, Overloaded, RouterUnavailable, UnknownExpert
from coe.models.catalog import ModelStore
from coe.router.service import ExpertRouter, load_expert_router
from coe.types import ChatMessage, Request, RouteDecision, StreamEvent

log = logging.getLogger("coe.engine")

_IDLE_WAIT_S = 0.5


class Engine:
    """Owns the request loop. ``submit`` and ``stream`` are safe from any thread."""

    def __init__(self, config: CoEConfig, cache: ModelCache, scheduler: FifoScheduler | None = None,
                 router: ExpertRouter | None = None, router_error: str | None = None):
        self.config = config
        self.cache = cache
        self.router = router
        # why model "coe" falls back to the default expert
        self.router_error = router_error or (None if router else "no router configured")
        self.scheduler = scheduler or FifoScheduler(config.scheduler.max_batch_size, config.scheduler.max_queue)
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: tuple[Request, ...] = ()
        self.num_served = 0

    @classmethod
    def from_config(cls, config: CoEConfig, home: str | Path) -> "Engine":
        """An engine with a model cache whose packaged weights live under ``home`` (COE_HOME)."""
        cache = ModelCache(config, ModelStore(home))
        router, error = None, "router disabled in the config (router.enabled: false)"
        if config.router.enabled:
            params = {s.name: s.num_params for s in cache.states()}
            try:
                router, error = load_expert_router(config.router, home, params,
                                                   config.default_expert), None
            except RouterUnavailable as exc:
                error = f"router unavailable: {exc.message}"
                log.warning("model %r falls back to %s: %s", ROUTED_MODEL, config.default_expert, error)
        return cls(config, cache, router=router, router_error=error)

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
            return decision.expert, decision
        if model in self.expert_names():
            return model, None
        raise UnknownExpert(f"the model {model!r} does not exist; available: "
                            f"{', '.join([ROUTED_MODEL, *self.expert_names()])}", param="model")

    # -- submission ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue the request and hint the cache to start moving its expert up while it waits."""
        if request.expert not in self.expert_names():
            raise UnknownExpert(f"no expert named {request.expert!r}", param="model")
        with self._work:
            self.scheduler.add(request)
            self._work.notify()
        if self.config.cache.prefetch != "none" and not self.cache.is_resident(request.expert):
            self.cache.prefetch(request.expert, self.config.cache.prefetch)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """Submit and yield the request's events on the calling thread (CLI, benchmarks).

        Without a running loop thread, the calling thread serves the queue itself.
        """
        events: queue.Queue[StreamEvent] = queue.Queue()
        request.sink = events.put
        self.submit(request)
        if self._thread is None:
            while self.step():
                pass
            if events.empty() or not events.queue[-1].is_final:
                events.put(StreamEvent(request.id, error=GenerationError("the request was cancelled before it ran")))
        while True:
            event = events.get()
            yield event
            if event.is_final:
                return

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> bool:
        """Serve one batch. Returns False when there was nothing to do."""
        with self._work:
            batch = None if self._stopping else self.scheduler.next_batch()
            if batch is None:
                return False
            self._running = batch.requests
        try:
            with self.cache.lease(batch.expert) as runner:
                for event in runner.generate(batch.requests):
                    self._deliver(batch.requests, event)
        except CoEError as exc:
            self._fail(batch.requests, exc)
        except Exception as exc:  # keep serving: one failed batch must not kill the loop
            self._fail(batch.requests, GenerationError(f"{batch.expert}: {type(exc).__name__}: {exc}"))
        finally:
            self._running = ()
        self.num_served += len(batch.requests)
        return True

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
            leftover = []
            while (batch := self.scheduler.next_batch()) is not None:
                leftover.extend(batch.requests)
        self._fail(leftover, Overloaded("the server is shutting down"))
        self.cache.close()

    def queue_depth(self) -> int:
        return len(self.scheduler)
