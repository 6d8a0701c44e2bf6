"""The scheduler: pure Python over plain state. No torch, no I/O, no threads.

This first version is FIFO: the oldest request goes next, together with the requests right
behind it that want the same expert (up to max_batch_size).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from coe.errors import Overloaded
from coe.types import Request


@dataclass(frozen=True)
class Batch:
    expert: str
    requests: tuple[Request, ...]


class FifoScheduler:
    def __init__(self, max_batch_size: int = 8, max_queue: int = 256):
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, request: Request) -> None:
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are waiting (scheduler.max_queue); retry later")
        self._queue.append(request)

    def next_batch(self) -> Batch | None:
        """Remove and return the next batch, dropping cancelled requests; None when idle."""
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft()
        if not self._queue:
            return None
        expert = self._queue[0].expert
        taken = []
        while self._queue and len(taken) < self.max_batch_size and self._queue[0].expert == expert:
            request = self._queue.popleft()
            if not request.cancelled:
                taken.append(request)
        return Batch(expert, tuple(taken))

    def queued_by_expert(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for request in self._queue:
            counts[request.expert] = counts.get(request.expert, 0) + 1
        return counts
