"""ModelCache: the only code that moves expert weights between disk, host (warm) and device (hot).

Tiers are inclusive: a hot expert is also warm (its runner may share the host memory: torch on
CPU assigns the host tensors, llama.cpp maps the page cache), so demoting hot -> warm only frees
the runtime and a warm expert evicted to disk is demoted from the device first.
Footprints are what the backends measure after a move; before a move the cache reserves an
estimate (the last measurement, else the file size) and settles on the measurement after it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from coe.backends import Adapter, Backend, HostWeights, Runner, get_backend
from coe.backends.memory import HostBufferPool
from coe.cache import policy
from coe.cache.tiers import Budgets, TierRoom, resolve_budgets
from coe.config import CoEConfig, ExpertConfig
from coe.errors import CacheFull, CoEError, ConfigError, UnknownExpert
from coe.models import ModelStore, backend_of, disk_info, path_of
from coe.types import CachePolicy, Tier

TIERS = (Tier.DEVICE, Tier.HOST)  # the tiers the cache holds bytes in (disk is where everything is)
POOL_KEY = "(reusable buffers)"
# Reload-cost estimates before an expert's own moves have been measured.
DEFAULT_DISK_GBPS = 1.0
DEFAULT_MATERIALIZE_S = 0.05


@dataclass(frozen=True)
class ExpertState:
    """One expert as the cache (or, for remote experts, the engine) sees it."""

    name: str
    backend: str
    tier: Tier
    availability: (
        str  # of the source on disk: ready | not assembled | not installed | missing | unreadable
    )
    num_bytes: int | None
    num_params: int | None
    read_s: float | None = None  # last disk -> host move, seconds
    materialize_s: float | None = None  # last host -> device move, seconds
    host_bytes: int = 0  # measured footprint in the host tier
    device_bytes: int = 0  # measured footprint in the device tier
    pinned: bool = False
    requests: int = 0
    # of read_s, the time spent reading the file itself (0: it was cached)
    file_read_s: float | None = None
    replicas: tuple[tuple[str, str], ...] = ()  # Ray Serve: (replica, its state of this expert)
    base: str | None = None  # a profile: the expert whose weights (and tiers) it shares
    adapter_bytes: int = 0  # a profile's LoRA adapter, measured once loaded (0: none or not yet)
    crashes: int = 0  # isolated experts: worker processes that died
    restarts: int = 0  # isolated experts: workers started again after a crash
    worker_pid: int | None = None  # isolated experts, while hot: the worker process

    @property
    def load_s(self) -> float | None:
        return None if self.read_s is None else self.read_s + (self.materialize_s or 0.0)


@dataclass(frozen=True)
class TierUsage:
    budget_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class CacheSnapshot:
    """Everything `GET /v1/experts` shows of the tiers (the server shapes the JSON)."""

    policy: str
    frequency_half_life: int | None
    device_kind: str
    tiers: dict[Tier, TierUsage]
    reusable_buffer_bytes: int
    stats: CacheStats
    experts: list[ExpertState]
    replicas: tuple[str, ...] = ()  # Ray Serve: the replicas whose caches are merged here


@dataclass
class _Slot:
    expert: ExpertConfig
    host: HostWeights | None = None
    backend: Backend | None = None  # the one that read the host weights
    runner: Runner | None = None
    pinned: bool = False
    leases: int = 0
    requests: int = 0
    last_used: int = 0  # request sequence number of its last use
    moved_up_at: int = 0  # request sequence number when it last entered or was used in a tier
    priority: dict = field(default_factory=lambda: {tier: 0.0 for tier in TIERS})
    read_s: float | None = None  # last measured disk -> host move
    file_read_s: float | None = None  # of which reading the file (the backend's HostWeights.read_s)
    materialize_s: float | None = None  # last measured host -> device move
    host_bytes_seen: int | None = None
    device_bytes_seen: int | None = None
    idle_since_s: float = 0.0  # clock time of its last use, or of its last idle move down
    keep_s: float | None = None  # the last request's keep_alive (None: cache.idle_unload_s)
    adapters: dict[str, Adapter] = field(default_factory=dict)  # profiles' LoRAs read onto host
    crashes: int = 0  # runtimes that died under it (isolated experts' workers)
    restarts: int = 0  # runtimes started again after a crash

    @property
    def busy(self) -> bool:
        return self.pinned or self.leases > 0


@dataclass
class CacheStats:
    activations: int = 0
    hits: int = 0  # already hot
    warm_hits: int = 0  # warm -> hot
    misses: int = 0  # cold -> hot
    switches: int = 0  # activation of another expert than the previous one
    prefetches: int = 0
    idle_unloads: int = 0  # moves down a tier of an expert unused for its keep time
    evictions: dict = field(default_factory=lambda: {tier: 0 for tier in TIERS})
    bytes_moved: dict = field(default_factory=lambda: {"disk->host": 0, "host->device": 0})
    seconds_moving: dict = field(default_factory=lambda: {"disk->host": 0.0, "host->device": 0.0})


class ModelCache:
    """Contract: every method is safe from any thread. Moves are serialised (one at a time);
    activating an already hot expert never waits for a move. Pinned experts and experts held by
    a ``lease`` are never evicted; anything else may be, when another expert needs its bytes.
    """

    def __init__(
        self,
        config: CoEConfig,
        store: ModelStore,
        *,
        backends: dict[str, Backend] | None = None,
        budgets: Budgets | None = None,
        timer: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.store = store
        self._backends = dict(backends or {})
        if budgets is None:
            uses_cuda = any(e.uses_cuda for e in self._local(config))
            budgets = resolve_budgets(config.cache.device_bytes, config.cache.host_bytes, uses_cuda)
        self.budgets = budgets
        self.policy = config.cache.policy
        self.tiers = {
            Tier.DEVICE: TierRoom(Tier.DEVICE, budgets.device_bytes),
            Tier.HOST: TierRoom(Tier.HOST, budgets.host_bytes),
        }
        self._clock = {tier: 0.0 for tier in TIERS}
        half_life = config.cache.frequency_half_life
        half_lives = (
            policy.AUTO_HALF_LIVES if isinstance(half_life, str) else (half_life,)
        )  # str: auto
        self.popularity = policy.Popularity(half_lives, len(config.experts))
        self.pool = HostBufferPool(pin=budgets.device_kind == "cuda")
        self.stats = CacheStats()
        self._timer = timer
        self._now_s = clock  # idle times
        # one slot per set of weights: a profile's name leads to its base's slot
        self._slots = {e.name: _Slot(e) for e in self._local(config) if e.base is None}
        self._runs_on = {e.name: e.base or e.name for e in self._local(config)}
        self._activations: dict[str, int] = {}  # per expert name, profiles included
        self._adapter_params: dict[str, int] = {}  # profiles' adapters, from their headers
        self._state = threading.RLock()  # slots, tiers, stats: held briefly
        self._moving = threading.RLock()  # one move at a time; held for the duration of a load
        self._previous: str | None = None
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="coe-prefetch")
        self._pending: dict[tuple[str, str], Future] = {}

    # -- sources -----------------------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[self._runs_on[name]]
        except KeyError:
            raise UnknownExpert(f"no expert named {name!r}") from None

    def _backend(self, expert: ExpertConfig, path: Path) -> Backend:
        """The expert's backend; an isolated expert's (``params.isolate``) runs its hot tier in
        worker processes."""
        name = backend_of(expert, path)
        if name not in self._backends:
            self._backends[name] = get_backend(name)
        if not expert.params.get("isolate", False):
            return self._backends[name]
        isolated = f"{name}+worker"
        if isolated not in self._backends:
            from coe.backends.worker import IsolatedBackend

            self._backends[isolated] = IsolatedBackend(self._backends[name])
        return self._backends[isolated]

    def check_adapters(self) -> None:
        """Every profile's adapter against its base, from the headers (start-up): ConfigError
        naming ``experts[i].adapter`` and the file. A base not on disk yet is checked at load."""
        for i, expert in enumerate(self.config.experts):
            profile = expert.profile
            if profile is None or profile.adapter is None:
                continue
            info, _ = disk_info(self.store, expert)
            if info is None:
                continue
            try:
                self._adapter_params[expert.name] = self._backend(expert, info.path).check_adapter(
                    info.path, profile
                )
            except ConfigError as exc:
                raise exc.within(f"experts[{i}]") from None

    # -- the public moves --------------------------------------------------------------------------
    def activate(self, name: str) -> Runner:
        """A ready Runner for the expert, moving it up from wherever it is. The runner stays valid
        until a later move needs its room; hold a ``lease`` to keep it."""
        slot = self._slot(name)
        with self._state:
            self._reap(slot)
            self._count_request(slot)
            self._activations[name] = self._activations.get(name, 0) + 1
            slot.idle_since_s = self._now_s()  # also when it is already hot (no move, no _touch)
            if slot.runner is not None:
                self.stats.hits += 1
                self._touch(slot, Tier.DEVICE)
                return slot.runner
        with self._moving:
            with self._state:
                if slot.runner is not None:  # a concurrent activation or prefetch loaded it
                    self.stats.hits += 1
                    return slot.runner
                if slot.host is None:
                    self.stats.misses += 1
                else:
                    self.stats.warm_hits += 1
            self._to_host(slot)
            return self._to_device(slot)

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Runner]:
        """Activate and keep the expert hot (not evictable) until the block ends."""
        slot = self._slot(name)
        with self._state:
            slot.leases += 1
        try:
            yield self.activate(name)
        finally:
            with self._state:
                slot.leases -= 1
                slot.idle_since_s = self._now_s()  # idle from the end of its work

    def adapter(self, name: str) -> Adapter:
        """A profile's LoRA adapter on its base's host weights, read on first use (disk -> host,
        its measured bytes held in the host tier under the profile's name); it leaves memory with
        the base's host weights. Call while holding the base's ``lease``."""
        slot = self._slot(name)
        with self._state:
            loaded = slot.adapters.get(name)
            host, backend = slot.host, slot.backend
        if loaded is not None:
            return loaded
        profile = self.config.expert(name).profile
        if host is None or backend is None or profile is None or profile.adapter is None:
            raise CoEError(f"{name}: no adapter to read (its base {slot.expert.name} is not warm)")
        adapter = backend.read_adapter(host, profile)
        with self._state:
            try:
                self.tiers[Tier.HOST].hold(name, adapter.num_bytes)
            except CacheFull:
                adapter.release()
                raise
            slot.adapters[name] = adapter
        return adapter

    def keep_alive(self, name: str, seconds: float) -> None:
        """How long the expert stays where it is once unused (a request's ``keep_alive``; math.inf:
        until another expert needs the room), in place of ``cache.idle_unload_s``."""
        slot = self._slot(name)
        with self._state:
            slot.keep_s = seconds

    def unload_idle(self) -> list[tuple[str, Tier]]:
        """Move every expert unused for its keep time one tier down; returns (expert, tier left).
        Skipped while another move runs (the next call catches up)."""
        default_s = self.config.cache.idle_unload_s
        with self._state:
            now_s = self._now_s()
            idle = [
                policy.Idle(
                    slot.expert.name,
                    Tier.DEVICE if slot.runner is not None else Tier.HOST,
                    slot.idle_since_s,
                    None if math.isinf(keep_s) else keep_s,
                    slot.busy,
                )
                for slot in self._slots.values()
                if slot.host is not None
                and (keep_s := slot.keep_s if slot.keep_s is not None else default_s) is not None
            ]
            moves = policy.idle_moves(idle, now_s)
        if not moves or not self._moving.acquire(blocking=False):
            return []
        try:
            with self._state:
                done = []
                for name, tier in moves:
                    slot = self._slots[name]
                    if slot.busy:  # leased since we looked
                        continue
                    self._demote(slot, tier)
                    slot.idle_since_s = now_s
                    self.stats.idle_unloads += 1
                    done.append((name, tier))
                return done
        finally:
            self._moving.release()

    def prefetch(self, name: str, tier: Tier = Tier.HOST) -> Future:
        """Start moving the expert up to ``tier`` in the background; returns at once. Repeated
        hints for a move already queued share it."""
        self._slot(name)
        _check_tier(tier)
        key = (name, tier)
        with self._state:
            pending = self._pending.get(key)
            if pending is not None and not pending.done():
                return pending
            self.stats.prefetches += 1
            future = self._prefetcher.submit(self._prefetch_now, name, tier)
            self._pending[key] = future
            return future

    def _prefetch_now(self, name: str, tier: Tier) -> None:
        slot = self._slot(name)
        with self._moving:
            self._to_host(slot)
            if tier == Tier.DEVICE:
                self._to_device(slot)

    def pin(self, name: str, tier: Tier = Tier.DEVICE) -> None:
        """Bring the expert up to ``tier`` and keep it there until ``unpin``."""
        _check_tier(tier)
        slot = self._slot(name)
        with self._moving:
            self._to_host(slot)
            if tier == Tier.DEVICE:
                self._to_device(slot)
            with self._state:
                slot.pinned = True

    def unpin(self, name: str) -> None:
        slot = self._slot(name)
        with self._state:
            slot.pinned = False

    def evict(self, name: str, tier: Tier = Tier.HOST) -> None:
        """Demote the expert out of ``tier``: out of "device" leaves it warm, out of "host" sends it
        back to disk. Pinned or leased experts raise CacheFull (unpin first)."""
        _check_tier(tier)
        slot = self._slot(name)
        with self._moving, self._state:
            if slot.busy:
                raise CacheFull(f"expert {name} is pinned or in use and cannot be evicted")
            self._demote(slot, tier)

    def close(self) -> None:
        """Unload everything (pins included)."""
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="coe-prefetch")
        with self._moving, self._state:
            for slot in self._slots.values():
                slot.pinned = False
                self._demote(slot, Tier.HOST)
            self.pool.trim(0)
            self._sync_pool()
            for backend in self._backends.values():
                backend.close()

    # -- moves (callers hold self._moving) ---------------------------------------------------------
    def _to_host(self, slot: _Slot) -> None:
        if slot.host is not None:
            return
        expert = slot.expert
        path = path_of(self.store, expert)
        backend = self._backend(expert, path)
        weight_bytes = backend.weight_bytes(path)
        estimate = slot.host_bytes_seen or weight_bytes
        with self._state:
            reuse_bytes = self.pool.fitting_bytes(weight_bytes) if backend.reads_into_pool else 0
            self._make_room(Tier.HOST, slot, 0 if reuse_bytes else estimate, reuse_bytes)
        host, elapsed = self._timed_move(
            Tier.HOST,
            slot,
            lambda: backend.read(expert, path, self.pool),
            undo=lambda host: self._release(host),
        )
        with self._state:
            slot.host, slot.backend, slot.read_s, slot.host_bytes_seen = (
                host,
                backend,
                elapsed,
                host.footprint_bytes,
            )
            slot.file_read_s = host.read_s
            self._sync_pool()
            self._touch(slot, Tier.HOST)
            self.stats.bytes_moved["disk->host"] += weight_bytes
            self.stats.seconds_moving["disk->host"] += elapsed

    def _release(self, host: HostWeights) -> None:
        host.release()
        self._sync_pool()

    def _to_device(self, slot: _Slot) -> Runner:
        if slot.runner is not None:
            return slot.runner
        host, backend = slot.host, slot.backend
        assert host is not None and backend is not None  # _to_host ran first
        estimate = slot.device_bytes_seen
        if estimate is None:  # first time: on CUDA the weights, on CPU the runtime is small
            estimate = host.footprint_bytes if self.budgets.device_kind == "cuda" else 0
        with self._state:
            self._make_room(Tier.DEVICE, slot, estimate)
        runner, elapsed = self._timed_move(
            Tier.DEVICE,
            slot,
            lambda: backend.materialize(host),
            undo=lambda runner: runner.close(),
        )
        with self._state:
            slot.restarts = slot.crashes
            slot.runner, slot.materialize_s, slot.device_bytes_seen = (
                runner,
                elapsed,
                runner.footprint_bytes,
            )
            self._touch(slot, Tier.DEVICE)
            self.stats.bytes_moved["host->device"] += host.num_bytes
            self.stats.seconds_moving["host->device"] += elapsed
            return runner

    def _timed_move(self, tier: Tier, slot: _Slot, move: Callable, undo: Callable):
        """Run one move into ``tier`` (its room already reserved) and settle on the measured
        footprint of what it returns. A failed move gives the reservation back; a result that
        cannot fit is undone. Returns (result, seconds)."""
        started = self._timer()
        try:
            result = move()
        except BaseException:
            self._unreserve(tier, slot)
            raise
        elapsed = self._timer() - started
        with self._state:
            try:
                self._settle(tier, slot, result.footprint_bytes)
            except CacheFull:
                undo(result)
                raise
        return result, elapsed

    def _make_room(
        self, tier: Tier, slot: _Slot, incoming_bytes: int, reuse_bytes: int = 0
    ) -> None:
        """Evict by policy until ``incoming_bytes`` fit in ``tier`` and reserve them for ``slot``.
        In the host tier, unused pooled buffers go before any expert (except one of ``reuse_bytes``,
        which the coming read will take)."""
        room = self.tiers[tier]
        if tier == Tier.HOST:
            self._trim_pool(incoming_bytes, reuse_bytes)
        candidates = [
            self._candidate(other, tier)
            for other in self._slots.values()
            if other is not slot and other.expert.name in room
        ]
        reclaimable = self.pool.free_bytes - reuse_bytes if tier == Tier.HOST else 0
        try:
            max_others = self.config.cache.max_hot_experts - 1 if tier == Tier.DEVICE else None
            eviction = policy.choose_victims(
                candidates,
                incoming_bytes,
                room.free_bytes + reclaimable,
                self._clock[tier],
                max_others,
            )
        except ValueError:
            raise CacheFull(
                f"expert {slot.expert.name} needs {incoming_bytes} bytes in the {tier} tier "
                f"(budget cache.{tier}_bytes = {room.budget_bytes}); {room.used_bytes} bytes are "
                f"held and only pinned or in-use experts are left to evict (cache.max_hot_experts = "
                f"{self.config.cache.max_hot_experts}). Raise cache.{tier}_bytes or unpin experts."
            ) from None
        self._clock[tier] = eviction.clock
        for victim in eviction.victims:
            self._demote(self._slots[victim], tier)
            self.stats.evictions[tier] += 1
        if tier == Tier.HOST:
            self._trim_pool(incoming_bytes, reuse_bytes)
        room.hold(slot.expert.name, room.held(slot.expert.name) + incoming_bytes)

    def _unreserve(self, tier: Tier, slot: _Slot) -> None:
        """A move failed: drop the reservation ``_make_room`` made for it, or it would stay held
        (and grow with every retry) with nothing in the tier."""
        with self._state:
            self.tiers[tier].drop(slot.expert.name)
            if tier == Tier.HOST:
                self._sync_pool()

    def _trim_pool(self, incoming_bytes: int, reuse_bytes: int) -> None:
        room = self.tiers[Tier.HOST]
        shortfall = incoming_bytes - room.free_bytes
        if shortfall > 0:
            self.pool.trim(max(0, self.pool.free_bytes - shortfall), protect_bytes=reuse_bytes)
            self._sync_pool()

    def _settle(self, tier: Tier, slot: _Slot, measured_bytes: int) -> None:
        """Replace the reservation with the measured footprint, evicting more if it grew."""
        room = self.tiers[tier]
        name = slot.expert.name
        reserved = room.held(name)
        if tier == Tier.HOST:
            self._sync_pool()
        if measured_bytes > reserved + room.free_bytes:
            room.drop(name)
            try:
                self._make_room(tier, slot, measured_bytes)
            except CacheFull:
                raise CacheFull(
                    f"expert {name} measured {measured_bytes} bytes in the {tier} tier after "
                    f"loading, more than fits in cache.{tier}_bytes = {room.budget_bytes}"
                ) from None
        room.hold(name, measured_bytes)

    def _demote(self, slot: _Slot, tier: Tier) -> None:
        """Out of the device tier (close the runner); out of host also releases the host weights.
        Without a warm tier (cache.keep_warm: false) leaving the device is leaving host memory too."""
        name = slot.expert.name
        if not self.config.cache.keep_warm:
            tier = Tier.HOST
        if slot.runner is not None:
            slot.runner.close()
            slot.runner = None
        self.tiers[Tier.DEVICE].drop(name)
        if tier == Tier.HOST:
            for profile, adapter in slot.adapters.items():
                adapter.release()
                self.tiers[Tier.HOST].drop(profile)
            slot.adapters.clear()
            if slot.host is not None:
                slot.host.release()
                slot.host = None
            self.tiers[Tier.HOST].drop(name)
            self._sync_pool()

    def _sync_pool(self) -> None:
        host = self.tiers[Tier.HOST]
        host.drop(POOL_KEY)
        free = self.pool.free_bytes
        if free:
            host.hold(POOL_KEY, free)

    # -- popularity and priorities -----------------------------------------------------------------
    def _count_request(self, slot: _Slot) -> None:
        self.stats.activations += 1
        name = slot.expert.name
        if self._previous is not None and self._previous != name:
            self.stats.switches += 1
        self._previous = name
        slot.requests += 1
        slot.last_used = self.stats.activations
        self.popularity.observe(name)

    def _touch(self, slot: _Slot, tier: Tier) -> None:
        """Refresh the expert's priority in ``tier`` (and in host, since hot implies warm).
        lrfu's is computed when it is compared (``_priority``): the half-life in use may change.
        Its idle time starts again: an expert just moved up (a prefetch) is not idle yet."""
        slot.moved_up_at = self.stats.activations
        slot.idle_since_s = self._now_s()
        if self.policy == CachePolicy.LRFU:
            return
        for level in (Tier.DEVICE, Tier.HOST) if tier == Tier.DEVICE else (Tier.HOST,):
            slot.priority[level] = policy.priority(
                self.policy,
                clock=self._clock[level],
                recency=slot.last_used,
                frequency=max(slot.requests, 1),
                reload_s=self._reload_s(slot, level),
                num_bytes=slot.host.num_bytes if slot.host else 1,
            )

    def _priority(self, slot: _Slot, tier: Tier) -> float:
        if self.policy != CachePolicy.LRFU:
            return slot.priority[tier]
        decayed, last_request = self.popularity.last_request(slot.expert.name)
        return policy.priority(
            CachePolicy.LRFU,
            clock=0.0,
            recency=last_request,
            frequency=0.0,
            reload_s=self._reload_s(slot, tier),
            num_bytes=slot.host.num_bytes if slot.host else 1,
            decayed=decayed,
            now=slot.moved_up_at,
            half_life=self.popularity.half_life,
        )

    def _reload_s(self, slot: _Slot, tier: Tier) -> float:
        """What evicting the expert from ``tier`` would cost to undo."""
        materialize_s = (
            slot.materialize_s if slot.materialize_s is not None else DEFAULT_MATERIALIZE_S
        )
        if tier == Tier.DEVICE:
            return materialize_s
        read_s = slot.read_s
        if read_s is None or read_s <= 0:
            weight_bytes = slot.host.num_bytes if slot.host else 0
            read_s = weight_bytes / (DEFAULT_DISK_GBPS * 1e9)
        return read_s + materialize_s

    def _candidate(self, slot: _Slot, tier: Tier) -> policy.Candidate:
        name = slot.expert.name
        return policy.Candidate(
            name, self.tiers[tier].held(name), self._priority(slot, tier), pinned=slot.busy
        )

    # -- visibility --------------------------------------------------------------------------------
    def host_bytes_needed(self, names: Iterable[str]) -> int:
        """What the host tier needs to hold these experts at once (a base shared by profiles
        counts once): each as measured when it was last there, else its weights' size on disk."""
        total = 0
        for base in {self._runs_on[name] for name in names if name in self._runs_on}:
            slot = self._slots[base]
            if slot.host_bytes_seen:
                total += slot.host_bytes_seen
            else:
                info, _ = disk_info(self.store, slot.expert)
                total += info.num_bytes if info is not None else 0
        return total

    def budget_bytes(self, tier: Tier) -> int:
        return self.tiers[tier].budget_bytes

    def is_resident(self, name: str) -> bool:
        """Hot: activating it costs nothing."""
        return self.tier_of(name) == Tier.DEVICE

    def hot_experts(self) -> list[str]:
        """Experts ready to generate now (a profile is, when its base is)."""
        with self._state:
            for slot in self._slots.values():
                self._reap(slot)
        return [
            name for name, base in self._runs_on.items() if self._slots[base].runner is not None
        ]

    def _reap(self, slot: _Slot) -> None:
        """A runner whose runtime died (an isolated expert's worker) leaves the device tier; the
        next activation starts a new one. Holds ``_state``."""
        if slot.runner is not None and not slot.runner.alive:
            slot.crashes += 1
            self._demote(slot, Tier.DEVICE)

    def tier_of(self, name: str) -> Tier:
        slot = self._slot(name)
        with self._state:
            self._reap(slot)
        return (
            Tier.DEVICE
            if slot.runner is not None
            else Tier.HOST
            if slot.host is not None
            else Tier.DISK
        )

    def snapshot(self) -> CacheSnapshot:
        """Everything `GET /v1/experts` shows."""
        states = self.states()
        with self._state:
            return CacheSnapshot(
                policy=str(self.policy),
                frequency_half_life=self.popularity.half_life,
                device_kind=self.budgets.device_kind,
                tiers={
                    tier: TierUsage(room.budget_bytes, room.used_bytes)
                    for tier, room in self.tiers.items()
                },
                reusable_buffer_bytes=self.pool.free_bytes,
                stats=replace(self.stats),
                experts=states,
            )

    def states(self) -> list[ExpertState]:
        """The local experts (a remote expert holds no weights here; the engine reports it)."""
        return [self._state_of(name) for name in self._runs_on]

    @staticmethod
    def _local(config: CoEConfig) -> list[ExpertConfig]:
        return [e for e in config.experts if not e.is_remote]

    def _state_of(self, name: str) -> ExpertState:
        """An expert's state; a profile shows its base's tier and holds no bytes of its own in
        the tiers (its base does) except its adapter's."""
        slot = self._slot(name)
        expert = slot.expert
        info, availability = disk_info(self.store, expert)
        with self._state:
            tier = self.tier_of(expert.name)
            own = name == expert.name
            host_bytes = self.tiers[Tier.HOST].held(expert.name) if own else 0
            device_bytes = self.tiers[Tier.DEVICE].held(expert.name) if own else 0
            adapter = slot.adapters.get(name)
            requests = self._activations.get(name, 0)
            worker_pid = slot.runner.pid if slot.runner is not None and own else None
        backend = backend_of(expert, info.path) if info is not None else expert.backend
        num_params = info.num_params if info else None
        if num_params is not None and not own:  # active parameters: the base's and the adapter's
            num_params += self._adapter_params.get(name, 0)
        return ExpertState(
            name,
            backend,
            tier,
            availability,
            info.num_bytes if info else None,
            num_params,
            slot.read_s,
            slot.materialize_s,
            host_bytes,
            device_bytes,
            slot.pinned,
            requests,
            slot.file_read_s,
            base=None if own else expert.name,
            adapter_bytes=adapter.num_bytes if adapter is not None else 0,
            crashes=slot.crashes if own else 0,
            restarts=slot.restarts if own else 0,
            worker_pid=worker_pid,
        )

    def state_of(self, name: str) -> ExpertState:
        self._slot(name)  # UnknownExpert
        return self._state_of(name)


def _check_tier(tier: Tier) -> None:
    if tier not in TIERS:
        raise CoEError(f"unknown tier {tier!r} (expected device or host)")
