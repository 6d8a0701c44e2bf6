"""Pure eviction decisions: no I/O, no torch, no clocks of their own.

Every resident expert has a priority per tier; eviction takes the lowest priorities first,
skipping pinned and in-use experts, until the incoming bytes fit.

- ``lru``: priority is the sequence number of the last use (the baseline).
- ``gdsf``: GreedyDual-Size-Frequency. Priority = clock + frequency x reload_s / size, where
  reload_s is what bringing the expert back would cost from the tier it would fall to (host ->
  device for a device victim, disk -> host -> device for a host victim). The tier's clock rises
  to the priority of each victim, so experts that stop being used age out.
- ``lrfu`` (the default): cost-aware LRFU. The value of keeping an expert is its request count
  decayed by half every ``half_life`` requests (to everyone), times reload_s / size. Since every
  expert decays at the same rate, comparing values now is comparing the time-invariant key
  log(decayed count at its last request x reload_s / size) + last request x ln 2 / half_life.
  Unlike GDSF's clock, which ages every expert at each eviction, the decay ages by requests: a
  steadily popular expert keeps its lead, one whose popularity moved on loses it within a few
  half-lives.

Which half-life is right depends on how fast popularity moves: a long one counts more requests
when the mix is steady, a short one follows a mix that shifts. ``Popularity`` keeps the counts
at several half-lives and uses the one whose counts have been predicting the next request best
(the log-probability each gave the expert actually requested, summed with a decay of its own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from coe.types import CachePolicy, Tier

DEFAULT_HALF_LIFE = 100  # requests
AUTO_HALF_LIVES: tuple[int, ...] = (
    50,
    200,
    1000,
)  # requests: the candidates of ``frequency_half_life: auto``
SCORE_HALF_LIFE = 300  # requests: how far back a half-life's predictions count
SMOOTHING = 0.5  # requests every expert is credited with when predicting (none is ever certain)
_GB = 1e9


@dataclass(frozen=True)
class Candidate:
    name: str
    num_bytes: int
    priority: float
    pinned: bool = False  # pinned by the user, in use by a runner, or being moved


@dataclass(frozen=True)
class Eviction:
    victims: tuple[str, ...]
    clock: float  # the tier's clock after these evictions (gdsf)


def priority(
    policy: CachePolicy,
    *,
    clock: float,
    recency: float,
    frequency: float,
    reload_s: float,
    num_bytes: int,
    decayed: float = 0.0,
    now: float = 0.0,
    half_life: float = DEFAULT_HALF_LIFE,
) -> float:
    """The priority an expert gets when it is used (or arrives) in a tier. ``recency``: the
    sequence number of its last request; ``decayed``: its decayed count as of that request
    (``decay``); ``now``: the current sequence number (an expert moved up before any request,
    by a prefetch, counts as one request now)."""
    if policy == CachePolicy.LRU:
        return recency
    density = reload_s / max(num_bytes / _GB, 1e-9)
    if policy == CachePolicy.GDSF:
        return clock + frequency * density
    if policy == CachePolicy.LRFU:

        def key(count: float, at: float) -> float:
            return math.log(max(count * density, 1e-12)) + at * math.log(2) / half_life

        if now > recency or decayed <= 0:  # moved up ahead of its request
            return max(key(decayed, recency), key(1.0, now))
        return key(decayed, recency)
    raise ValueError(f"unknown cache policy {policy!r} (expected {CachePolicy.names()})")


@dataclass(frozen=True)
class Idle:
    """An expert resident in ``tier`` (device or host), unused since ``since_s``."""

    name: str
    tier: Tier
    since_s: float
    keep_s: float | None  # how long it may stay unused; None: no limit
    busy: bool = False  # pinned or serving: never moved


def idle_moves(experts: Iterable[Idle], now_s: float) -> list[tuple[str, Tier]]:
    """(expert, the tier it leaves) for every expert unused for its keep time: one tier down per
    keep time (device -> host, then host -> disk), never a busy one."""
    return [
        (e.name, e.tier)
        for e in experts
        if not e.busy and e.keep_s is not None and now_s - e.since_s >= e.keep_s
    ]


def decay(count: float, elapsed: float, half_life: float = DEFAULT_HALF_LIFE) -> float:
    """A request count ``elapsed`` requests later: halved every ``half_life``."""
    return count * 0.5 ** (elapsed / half_life)


class Popularity:
    """Request counts of every expert decayed at each of ``half_lives``, and the half-life whose
    counts predict requests best. Not thread-safe: the cache calls it under its lock."""

    def __init__(self, half_lives: tuple[int, ...], num_experts: int):
        self.half_lives, self.num_experts = tuple(half_lives), max(num_experts, 1)
        self.now = 0  # requests observed
        # name -> (counts at its last request, that request)
        self._counts: dict[str, tuple[list[float], int]] = {}
        self._totals = [0.0] * len(
            self.half_lives
        )  # every expert's decayed counts summed, as of now
        self._scores = [0.0] * len(self.half_lives)

    def observe(self, name: str) -> None:
        """One request for ``name``: score each half-life on it, then count it."""
        self.now += 1
        counts = self.counts(name)
        for i, half_life in enumerate(self.half_lives):
            self._totals[i] = decay(self._totals[i], 1, half_life)
            if len(self.half_lives) > 1:
                predicted = (counts[i] + SMOOTHING) / (
                    self._totals[i] + SMOOTHING * self.num_experts
                )
                self._scores[i] = decay(self._scores[i], 1, SCORE_HALF_LIFE) + math.log(predicted)
            self._totals[i] += 1.0
        self._counts[name] = ([count + 1.0 for count in counts], self.now)

    def counts(self, name: str) -> list[float]:
        """``name``'s decayed counts as of now, one per half-life."""
        counts, at = self._counts.get(name, ([0.0] * len(self.half_lives), self.now))
        return [decay(c, self.now - at, h) for c, h in zip(counts, self.half_lives)]

    @property
    def best(self) -> int:
        """Index of the half-life in use: the best predictor so far (the first one on a tie)."""
        return max(range(len(self.half_lives)), key=lambda i: (self._scores[i], -i))

    @property
    def half_life(self) -> int:
        return self.half_lives[self.best]

    def last_request(self, name: str) -> tuple[float, int]:
        """``name``'s count at the half-life in use, as of its last request, and that request's
        number (0, 0 when it was never requested)."""
        counts, at = self._counts.get(name, ([0.0] * len(self.half_lives), 0))
        return counts[self.best], at


def choose_victims(
    candidates: list[Candidate],
    incoming_bytes: int,
    free_bytes: int,
    clock: float = 0.0,
    max_others: int | None = None,
) -> Eviction:
    """Lowest priority first, skipping pinned candidates, until ``incoming_bytes`` fit in
    ``free_bytes`` plus what the victims free and at most ``max_others`` candidates stay.
    Raises ValueError when they cannot fit at all."""

    def fits(victims: list[str]) -> bool:
        return incoming_bytes <= free_bytes and (
            max_others is None or len(candidates) - len(victims) <= max_others
        )

    victims: list[str] = []
    if fits(victims):
        return Eviction((), clock)
    for candidate in sorted(
        (c for c in candidates if not c.pinned), key=lambda c: (c.priority, c.name)
    ):
        victims.append(candidate.name)
        free_bytes += candidate.num_bytes
        clock = max(clock, candidate.priority)
        if fits(victims):
            return Eviction(tuple(victims), clock)
    raise ValueError(
        f"{incoming_bytes} bytes do not fit: {free_bytes} bytes free after evicting "
        f"every expert that is not pinned or in use"
    )
