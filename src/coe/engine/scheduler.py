"""The scheduler: which expert's requests run next. Pure Python over plain state: no torch, no
I/O, no threads, no clock of its own (the caller passes ``now_s``).

One queue per expert (``Request.queue``: experts that share a base share its queue and its
batches). Switching experts costs a load, so the ``expert`` policy keeps serving
the expert that is already resident and batches requests for the same expert, subject to one
bound: a request that has waited ``max_wait_s`` is served next (oldest first), whatever the
switch costs. Hence no request waits longer than ``max_wait_s`` plus the batches already ahead of
it once it became overdue; with capacity to spare that is one batch's service time.
The ``fifo`` policy is the baseline: the oldest request goes next, with the requests right behind
it that want the same expert.

Continuous batching (``join``): while a batch generates, requests that arrive for its expert join
it at the next token instead of waiting for the whole batch. Once another expert's request is
overdue, only requests older than it may still join; then the batch drains, so the bound above
still holds (what joins was ahead of the overdue request anyway).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from coe.errors import Overloaded
from coe.types import Request, SchedulerPolicy


@dataclass(frozen=True)
class Batch:
    expert: str
    requests: tuple[Request, ...]
    reason: str = ""  # why this expert: overdue | current | resident | largest | fifo


class Scheduler:
    def __init__(
        self,
        max_batch_size: int = 8,
        max_queue: int = 256,
        max_queue_per_expert: int = 128,
        max_wait_s: float = 2.0,
        policy: SchedulerPolicy | str = SchedulerPolicy.EXPERT,
    ):
        if policy not in tuple(SchedulerPolicy):
            raise ValueError(f"policy must be {SchedulerPolicy.names()}, got {policy!r}")
        policy = SchedulerPolicy(policy)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_queue_per_expert = max_queue_per_expert
        self.max_wait_s = max_wait_s
        self.policy = policy
        self._queues: dict[str, deque[Request]] = {}
        self._count = 0
        self._cancelled: list[Request] = []  # dropped from the queues, not yet handed back
        # set by a queued request's cancel() (from any thread): only then are the queues scanned,
        # so a choice costs the waiting queues, not every waiting request
        self._maybe_cancelled = False
        self._service_s = 1.0  # moving average of one batch's service time, for Retry-After

    def __len__(self) -> int:
        return self._count

    # -- admission -------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request, or refuse it with Overloaded (HTTP 429 with Retry-After)."""
        queue = self._queues.setdefault(request.queue, deque())
        if self._count >= self.max_queue:
            raise Overloaded(
                f"{self._count} requests are waiting (scheduler.max_queue); retry later",
                retry_after_s=self.retry_after_s(self._count),
            )
        if len(queue) >= self.max_queue_per_expert:
            raise Overloaded(
                f"{len(queue)} requests are waiting for {request.queue} "
                f"(scheduler.max_queue_per_expert); retry later",
                retry_after_s=self.retry_after_s(len(queue)),
            )
        queue.append(request)
        self._count += 1
        request.on_cancel = self._note_cancel
        if request.cancelled:
            self._maybe_cancelled = True

    def _note_cancel(self) -> None:
        self._maybe_cancelled = True

    def retry_after_s(self, waiting: int) -> float:
        """Seconds until about ``waiting`` requests have been served, at least 1."""
        return max(1.0, math.ceil(self._service_s * waiting / self.max_batch_size))

    def record_service(self, service_s: float) -> None:
        """The engine reports each batch's service time; Retry-After follows it."""
        self._service_s = 0.8 * self._service_s + 0.2 * service_s

    # -- choice ----------------------------------------------------------------------------------
    def next_batch(
        self, now_s: float, resident: Collection[str] = (), current: str | None = None
    ) -> Batch | None:
        """Remove and return the next batch; None when nothing is waiting.

        ``resident``: experts ready to generate (hot); ``current``: the expert that ran last.
        """
        self._drop_cancelled()
        expert, reason = self._choose(now_s, resident, current)
        if expert is None:
            return None
        limit = (
            self._fifo_run_length(expert)
            if self.policy == SchedulerPolicy.FIFO
            else self.max_batch_size
        )
        return Batch(expert, self._take(expert, limit), reason)

    def join(self, expert: str, count: int, now_s: float) -> tuple[Request, ...]:
        """Remove and return up to ``count`` of ``expert``'s waiting requests for the batch it is
        running: none under ``fifo`` (arrival order). While another expert's oldest request has
        waited ``max_wait_s``, only requests that arrived before it join: nobody overdue is
        overtaken by a younger request, and under overload the batch stays full while it serves
        the backlog in arrival order."""
        if self.policy == SchedulerPolicy.FIFO or count <= 0:
            return ()
        self._drop_cancelled()
        if not self._queues.get(expert):
            return ()
        overdue = [
            q[0].arrival_s
            for name, q in self._queues.items()
            if q and name != expert and now_s - q[0].arrival_s >= self.max_wait_s
        ]
        return self._take(expert, count, before_s=min(overdue, default=math.inf))

    def _take(self, expert: str, count: int, before_s: float = math.inf) -> tuple[Request, ...]:
        """Remove up to ``count`` of ``expert``'s oldest waiting requests (those that arrived
        before ``before_s``)."""
        queue = self._queues[expert]
        taken: list[Request] = []
        while queue and len(taken) < count and queue[0].arrival_s < before_s:
            taken.append(queue.popleft())
        self._count -= len(taken)
        if not queue:
            del self._queues[expert]  # only waiting queues are walked by every choice
        return tuple(taken)

    def _forget_empty(self) -> None:
        """Only queues with requests stay: every choice walks the waiting queues, not every
        expert ever asked for (a fleet of 150 experts has few waiting at a time)."""
        for name in [name for name, queue in self._queues.items() if not queue]:
            del self._queues[name]

    def peek_expert(
        self, now_s: float, resident: Collection[str] = (), current: str | None = None
    ) -> str | None:
        """The expert ``next_batch`` would choose now, without removing anything (for lookahead loads)."""
        self._drop_cancelled()
        return self._choose(now_s, resident, current)[0]

    def _choose(
        self, now_s: float, resident: Collection[str], current: str | None
    ) -> tuple[str | None, str]:
        heads = {name: q[0] for name, q in self._queues.items() if q}
        if not heads:
            return None, ""
        oldest = min(heads, key=lambda name: heads[name].arrival_s)
        if self.policy == SchedulerPolicy.FIFO:
            return oldest, "fifo"
        if now_s - heads[oldest].arrival_s >= self.max_wait_s:
            return oldest, "overdue"
        if current in heads:
            return current, "current"
        ready = [name for name in heads if name in resident]
        pool, reason = (ready, "resident") if ready else (list(heads), "largest")
        return max(pool, key=lambda name: (len(self._queues[name]), -heads[name].arrival_s)), reason

    def _fifo_run_length(self, expert: str) -> int:
        """How many of ``expert``'s requests arrived before any other expert's oldest one."""
        others = [q[0].arrival_s for name, q in self._queues.items() if q and name != expert]
        cutoff = min(others, default=math.inf)
        queue = self._queues[expert]
        run = 0
        while run < min(len(queue), self.max_batch_size) and queue[run].arrival_s <= cutoff:
            run += 1
        return max(run, 1)

    def _drop_cancelled(self) -> None:
        if not self._maybe_cancelled:
            return
        self._maybe_cancelled = False  # before the scan: a cancel during it sets it again
        for queue in self._queues.values():
            if any(r.cancelled for r in queue):
                self._cancelled.extend(r for r in queue if r.cancelled)
                kept = [r for r in queue if not r.cancelled]
                self._count -= len(queue) - len(kept)
                queue.clear()
                queue.extend(kept)
        self._forget_empty()

    def take_cancelled(self) -> list[Request]:
        """Requests cancelled while queued, dropped from the queues since the last call (and now):
        the caller ends them."""
        self._drop_cancelled()
        taken, self._cancelled = self._cancelled, []
        return taken

    # -- inspection and shutdown -----------------------------------------------------------------
    def expired(self, now_s: float, timeout_s: float) -> list[Request]:
        """Remove and return the requests that have waited longer than ``timeout_s``."""
        gone = []
        for queue in self._queues.values():
            while queue and now_s - queue[0].arrival_s > timeout_s:
                gone.append(queue.popleft())
        self._count -= len(gone)
        if gone:
            self._forget_empty()
        return gone

    def drain(self) -> list[Request]:
        """Remove and return everything still queued."""
        everything = [r for q in self._queues.values() for r in q]
        self._queues.clear()
        self._count = 0
        return everything

    def queued_by_expert(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._queues.items() if q}

    def oldest_wait_s(self, now_s: float) -> float:
        heads = [q[0].arrival_s for q in self._queues.values() if q]
        return now_s - min(heads) if heads else 0.0
