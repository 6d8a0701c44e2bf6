"""Requests for experts served outside this process (other servers, Ray Serve replicas): admitted
against their concurrency, streamed on their own worker threads, never in the scheduler or the
cache. A failure before the first token backs the expert off and moves a routed request on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from coe.backends.offload import OffloadedExpert
from coe.engine.health import ExpertHealth
from coe.engine.metrics import EngineMetrics
from coe.engine.routing import Routing
from coe.errors import CoEError, ExpertUnavailable, GenerationError, Overloaded
from coe.types import Completion, Request, StreamEvent, Tier

log = logging.getLogger("coe.engine")


class OffloadedLane:
    """Contract: ``admit`` and ``start`` are safe from any thread; ``resubmit(request)`` (the
    engine's) queues a moved request wherever its new expert runs, or ends it with its error."""

    def __init__(
        self,
        experts: dict[str, OffloadedExpert],
        max_queue_per_expert: int,
        health: ExpertHealth,
        metrics: EngineMetrics,
        routing: Routing,
        resubmit: Callable[[Request], None],
        stopping: Callable[[], bool],
    ):
        self.experts, self.max_queue_per_expert = experts, max_queue_per_expert
        self.health, self.metrics, self.routing = health, metrics, routing
        self._resubmit, self._stopping = resubmit, stopping

    def __contains__(self, name: object) -> bool:
        return name in self.experts

    def admit(self, request: Request) -> None:
        """Refuse with Overloaded (429) when the expert has its concurrency plus a queue in flight."""
        remote = self.experts[request.expert]
        capacity = remote.max_concurrency + self.max_queue_per_expert
        if remote.in_flight >= capacity:
            raise Overloaded(
                f"{request.expert} has {remote.in_flight} requests in flight (at most "
                f"{capacity}: its concurrency + scheduler.max_queue_per_expert)",
                retry_after_s=1.0,
            )

    def start(self, request: Request) -> None:
        self.experts[request.expert].submit(request, self._serve)

    def _serve(self, request: Request) -> None:
        """One request, on a worker of its expert: stream it, record the expert's health, move a
        routed request to the next-best expert when the remote failed before any token."""
        name = request.expert
        request.served_tier, request.switch_s = Tier.REMOTE, 0.0
        if request.cancelled or self._stopping():
            request.sink(StreamEvent(request.id, completion=Completion("", "cancelled", 0, 0)))
            return
        if not self.health.is_healthy(name, time.monotonic()):
            self._move_or_fail(request, name, self.routing.backing_off(name))
            return
        self.metrics.served_from.labels(Tier.REMOTE).inc()
        crash = None
        try:
            for event in self.experts[name].stream(request):
                request.sink(event)
                if isinstance(event.error, GenerationError):
                    crash = event.error.message
        except ExpertUnavailable as exc:
            exc.retry_after_s = self.health.failed(name, time.monotonic(), exc.message)
            log.warning(
                "remote expert %s is unavailable for %.0f s: %s",
                name,
                exc.retry_after_s,
                exc.message,
            )
            self._move_or_fail(request, name, exc)
            return
        except CoEError as exc:  # the remote refused this request (4xx) or broke mid-stream
            crash = exc.message if isinstance(exc, GenerationError) else None
            request.sink(StreamEvent(request.id, error=exc))
        except Exception as exc:  # a malformed stream: the request ends, the expert backs off
            crash = f"{type(exc).__name__}: {exc}"
            request.sink(
                StreamEvent(request.id, error=GenerationError(f"{name} (remote): {crash}"))
            )
        if crash is None:
            self.health.succeeded(name)
        else:
            self.health.failed(name, time.monotonic(), crash)

    def _move_or_fail(self, request: Request, failed: str, error: CoEError) -> None:
        if self.routing.move_elsewhere(request, failed):
            self._resubmit(request)
        else:
            request.sink(StreamEvent(request.id, error=error))

    def close(self) -> None:
        for remote in self.experts.values():
            remote.close()
