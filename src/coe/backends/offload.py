"""Experts whose requests run outside this process: another OpenAI-compatible server
(``remote.RemoteExpert``) or Ray Serve replicas (``coe.distributed.ray_serve.RayExpert``).

They hold no weights here, so they never enter the model cache. The engine hands their requests
to ``submit``: each runs on one of the expert's worker threads (``max_concurrency`` at once),
because the other side batches on its own.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from coe.types import Request, StreamEvent


class OffloadedExpert(ABC):
    """Contract: ``stream`` yields a request's events, ending with a completion or an error
    event, and raises ExpertUnavailable when the other side failed before the first token (the
    engine may then reroute the request); ``close`` cancels what is in flight and may be called twice."""

    kind = "offloaded"  # what `GET /v1/experts` shows as the expert's backend and tier

    def __init__(self, name: str, num_params: int | None, max_concurrency: int):
        self.name, self.num_params, self.max_concurrency = name, num_params, max_concurrency
        self._workers = ThreadPoolExecutor(
            max_concurrency, thread_name_prefix=f"coe-{self.kind}-{name}"
        )
        self._lock = threading.Lock()
        self._active: set[Request] = set()
        self._closed = False
        self.requests = 0  # submitted since start

    @abstractmethod
    def stream(self, request: Request) -> Iterator[StreamEvent]: ...

    def submit(self, request: Request, run: Callable[[Request], None]) -> None:
        """Run ``run(request)`` on one of this expert's workers (it calls ``stream``)."""
        with self._lock:
            self._active.add(request)
            self.requests += 1
            if self._closed:
                request.cancel()

        def work():
            try:
                run(request)
            finally:
                with self._lock:
                    self._active.discard(request)

        self._workers.submit(work)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (waiting for a worker or streaming)."""
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        """Cancel what is in flight (each request still ends with an event) and stop the workers."""
        with self._lock:
            self._closed = True
            active = list(self._active)
        for request in active:
            request.cancel()
        self._workers.shutdown(wait=False)
