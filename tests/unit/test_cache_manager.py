"""ModelCache with fake backends: the three tiers, budgets, eviction policies, pins, leases, prefetch
and counters, without torch or llama.cpp.

Expert sources are real (tiny safetensors files in tmp folders), so ``describe`` and ``states`` work
as in production; a fake backend "reads" them into HostWeights whose footprint the test chooses and
"materialises" a runner that yields letters. Runners and host weights check that nobody uses them
after the cache let go of them.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fakes import LetterDecoder, LetterVocab, write_weights

from coe.backends.base import Backend, HostWeights, Runner
from coe.backends.memory import HostBufferPool
from coe.cache import ModelCache, TierUsage
from coe.cache.tiers import Budgets
from coe.config import CacheConfig, CoEConfig, ExpertConfig
from coe.engine.batch import generate
from coe.errors import CacheFull, CoEError, LoadError, UnknownExpert
from coe.models import ModelStore
from coe.models.info import describe
from coe.types import Request, SamplingParams

KB = 1000


# ---- fakes -------------------------------------------------------------------------------------

class FakeRunner(Runner):
    delay_s, fail_after = 0.0, None  # what LetterDecoder reads

    def __init__(self, host: HostWeights, footprint_bytes: int):
        super().__init__(host.expert, LetterVocab(), context_length=1000, num_bytes=host.num_bytes)
        self.host = host
        self.footprint_bytes = footprint_bytes
        self.closed = False
        self.dead = False  # a test's crash of its runtime

    @property
    def alive(self) -> bool:
        return not self.dead

    def open_decoder(self) -> LetterDecoder:
        assert not self.closed, f"runner of {self.expert.name} used after close()"
        assert self.host.payload is not None, f"runner of {self.expert.name} used after its host weights were released"
        return LetterDecoder(self)

    def close(self) -> None:
        self.closed = True


@dataclass
class Footprint:
    host: int | None = None  # None: the weights' size on disk
    device: int = 0


class FakeBackend(Backend):
    """Counts every move; ``gate`` (an Event) holds reads until set; ``fail`` names experts whose
    read raises LoadError."""

    name = "fake"

    def __init__(self, footprints: dict[str, Footprint] | None = None, read_delay_s: float = 0.0):
        self.footprints = footprints or {}
        self.read_delay_s = read_delay_s
        self.reads: Counter = Counter()
        self.materializes: Counter = Counter()
        self.releases: Counter = Counter()
        self.live: set[str] = set()  # experts whose host weights are not released
        self.runners: list[FakeRunner] = []
        self.fail: set[str] = set()
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        with self._lock:
            self.reads[expert.name] += 1
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.read_delay_s)
        if expert.name in self.fail:
            raise LoadError(f"expert {expert.name}: fake read failed")
        info = describe(path)
        footprint = self.footprints.get(expert.name, Footprint())
        with self._lock:
            assert expert.name not in self.live, f"{expert.name} read twice without a release"
            self.live.add(expert.name)
        return HostWeights(expert=expert, info=info, payload=object(),
                           footprint_bytes=info.num_bytes if footprint.host is None else footprint.host,
                           on_release=lambda: self._released(expert.name))

    def _released(self, name: str) -> None:
        with self._lock:
            self.releases[name] += 1
            self.live.discard(name)

    def materialize(self, host: HostWeights) -> Runner:
        assert host.payload is not None, "materialize of released host weights"
        with self._lock:
            self.materializes[host.expert.name] += 1
        runner = FakeRunner(host, self.footprints.get(host.expert.name, Footprint()).device)
        self.runners.append(runner)
        return runner


def generates(runner: Runner) -> str:
    events = list(generate(runner, [Request(runner.expert.name, SamplingParams(max_tokens=3), prompt="hi")]))
    final = events[-1]
    assert final.error is None, final.error
    assert final.completion.text == "abc"
    return final.completion.text


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Six checkpoints of different sizes on disk (their size is the cache's first estimate)."""
    root = tmp_path_factory.mktemp("fake-experts")
    sizes = {"a": 1000, "b": 1000, "c": 1000, "d": 2000, "e": 3000, "f": 500}
    return {name: write_weights(root / name, size) for name, size in sizes.items()}


def weight_bytes(folder: Path) -> int:
    return describe(folder).num_bytes


def make_cache(folders, names="abc", *, host, device=10**9, kind="cpu", policy="gdsf", footprints=None,
               backend=None, clock=None, now=None, pins=(), **cache_options) -> ModelCache:
    backend = backend or FakeBackend(footprints)
    experts = tuple(ExpertConfig(n, str(folders[n]), backend="torch_hf") for n in names)
    config = CoEConfig(experts=experts, cache=CacheConfig(policy=policy, pins=pins, **cache_options))
    ticks = itertools.count()
    cache = ModelCache(config, ModelStore("unused"), backends={"torch_hf": backend},
                       budgets=Budgets(device_bytes=device, host_bytes=host, device_kind=kind),
                       timer=clock or (lambda: float(next(ticks))), clock=now or time.monotonic)
    cache.fake = backend
    return cache


def tiers(cache) -> dict[str, str]:
    return {s.name: s.tier for s in cache.states()}


def check_budgets(cache) -> None:
    for tier in cache.tiers.values():
        assert 0 <= tier.used_bytes <= tier.budget_bytes, (tier.name, tier.used_bytes, tier.budget_bytes)


# ---- tiers -------------------------------------------------------------------------------------

def test_activate_makes_an_expert_hot_and_therefore_warm(folders):
    cache = make_cache(folders, host=10 * KB, footprints={"a": Footprint(host=1500, device=300)})
    assert tiers(cache) == {"a": "disk", "b": "disk", "c": "disk"}
    runner = cache.activate("a")
    generates(runner)
    (a, *_) = cache.states()
    assert (a.tier, a.availability, a.host_bytes, a.device_bytes) == ("device", "ready", 1500, 300)
    assert cache.tier_of("a") == "device" and cache.is_resident("a")
    assert cache.tiers["host"].used_bytes == 1500 and cache.tiers["device"].used_bytes == 300
    assert cache.activate("a") is runner
    assert cache.fake.reads["a"] == 1 and cache.fake.materializes["a"] == 1


def test_evict_from_the_device_leaves_the_expert_warm(folders):
    cache = make_cache(folders, host=10 * KB, footprints={"a": Footprint(host=1500, device=300)})
    runner = cache.activate("a")
    cache.evict("a", "device")
    assert runner.closed
    assert cache.tier_of("a") == "host" and not cache.is_resident("a")
    (a, *_) = cache.states()
    assert (a.tier, a.host_bytes, a.device_bytes) == ("host", 1500, 0)
    assert cache.tiers["device"].used_bytes == 0 and cache.tiers["host"].used_bytes == 1500
    assert cache.fake.releases["a"] == 0
    again = cache.activate("a")  # warm -> hot: no read
    generates(again)
    assert again is not runner
    assert cache.fake.reads["a"] == 1 and cache.fake.materializes["a"] == 2


def test_evict_from_the_host_sends_the_expert_to_disk(folders):
    cache = make_cache(folders, host=10 * KB)
    runner = cache.activate("a")
    cache.evict("a")  # default tier: host
    assert runner.closed and cache.fake.releases["a"] == 1 and cache.fake.live == set()
    assert cache.tier_of("a") == "disk"
    assert {t: cache.tiers[t].used_bytes for t in ("host", "device")} == {"host": 0, "device": 0}
    assert (cache.states()[0].tier, cache.states()[0].availability) == ("disk", "ready")
    cache.evict("a", "host")  # already on disk: nothing to do
    cache.evict("b", "device")
    generates(cache.activate("a"))
    assert cache.fake.reads["a"] == 2


def test_unknown_expert_and_unknown_tier(folders):
    cache = make_cache(folders, host=10 * KB)
    for call in (lambda: cache.activate("zz"), lambda: cache.evict("zz"), lambda: cache.prefetch("zz"),
                 lambda: cache.pin("zz"), lambda: cache.tier_of("zz")):
        with pytest.raises(UnknownExpert, match="'zz'"):
            call()
    for call in (lambda: cache.evict("a", "disk"), lambda: cache.prefetch("a", "gpu"), lambda: cache.pin("a", "ram")):
        with pytest.raises(CoEError, match="unknown tier"):
            call()


def test_close_unloads_everything_and_the_cache_still_works(folders):
    cache = make_cache(folders, host=10 * KB, footprints={"a": Footprint(device=10), "b": Footprint(device=10)})
    a = cache.activate("a")
    cache.pin("b")
    cache.prefetch("c").result(timeout=10)
    cache.close()
    assert a.closed and all(r.closed for r in cache.fake.runners)
    assert cache.fake.live == set()
    assert set(tiers(cache).values()) == {"disk"} and not any(s.pinned for s in cache.states())
    assert cache.tiers["host"].used_bytes == 0 and cache.tiers["device"].used_bytes == 0
    generates(cache.activate("a"))
    assert cache.prefetch("b").result(timeout=10) is None  # a fresh prefetch thread after close
    cache.close()


def test_a_failed_read_leaves_nothing_reserved(folders):
    cache = make_cache(folders, host=10 * KB)
    cache.fake.fail.add("a")
    with pytest.raises(LoadError, match="fake read failed"):
        cache.activate("a")
    assert cache.tier_of("a") == "disk"
    assert cache.tiers["host"].used_bytes == 0 and cache.tiers["host"].keys() == []
    cache.fake.fail.clear()
    generates(cache.activate("a"))
    assert cache.tiers["host"].used_bytes == weight_bytes(folders["a"])


def test_a_failed_materialize_leaves_nothing_reserved(folders):
    class Broken(FakeBackend):
        def materialize(self, host):
            raise LoadError("no device today")

    cache = make_cache(folders, host=10 * KB, kind="cuda", backend=Broken())  # cuda: reserves the weights first
    with pytest.raises(LoadError, match="no device today"):
        cache.activate("a")
    assert cache.tier_of("a") == "host"
    assert cache.tiers["device"].used_bytes == 0 and cache.tiers["device"].keys() == []


# ---- budgets -----------------------------------------------------------------------------------

def test_an_expert_that_cannot_fit_is_cache_full_with_the_numbers(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=size - 1)
    with pytest.raises(CacheFull) as info:
        cache.activate("a")
    message = info.value.message
    assert f"needs {size} bytes in the host tier" in message
    assert f"cache.host_bytes = {size - 1}" in message
    assert "0 bytes are held" in message
    assert info.value.http_status == 503 and info.value.code == "cache_full"
    assert cache.tier_of("a") == "disk" and cache.fake.reads["a"] == 0  # refused before reading


def test_device_budget_too_small_keeps_the_expert_warm(folders):
    cache = make_cache(folders, host=10 * KB, device=500, footprints={"a": Footprint(device=800)})
    with pytest.raises(CacheFull) as info:
        cache.activate("a")
    assert "measured 800 bytes in the device tier" in info.value.message
    assert "cache.device_bytes = 500" in info.value.message
    assert cache.tier_of("a") == "host" and cache.tiers["device"].used_bytes == 0
    assert cache.fake.runners[0].closed  # the runner that did not fit was closed
    with pytest.raises(CacheFull):
        cache.activate("a")
    assert cache.tier_of("a") == "host" and cache.tiers["device"].used_bytes == 0


def test_host_footprint_larger_than_the_estimate_evicts_more(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=3 * size, footprints={"c": Footprint(host=2 * size + 10)})
    cache.activate("a")
    cache.activate("b")
    assert cache.tiers["host"].used_bytes == 2 * size
    generates(cache.activate("c"))  # estimated at `size` (one eviction), measured at 2 x size + 10
    assert tiers(cache) == {"a": "disk", "b": "disk", "c": "device"}
    assert cache.tiers["host"].used_bytes == 2 * size + 10
    assert cache.stats.evictions["host"] == 2
    check_budgets(cache)


def test_host_footprint_larger_than_the_budget_is_cache_full_and_released(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=2 * size, footprints={"c": Footprint(host=2 * size + 1)})
    cache.activate("a")
    with pytest.raises(CacheFull, match=f"measured {2 * size + 1} bytes in the host tier"):
        cache.activate("c")
    assert cache.fake.releases["c"] == 1 and "c" not in cache.fake.live
    assert cache.tier_of("c") == "disk"
    assert cache.tiers["host"].keys() == ["a"] and cache.tier_of("a") == "device"  # nothing evicted in vain
    check_budgets(cache)


def test_device_footprint_larger_than_the_estimate_evicts_more(folders):
    cache = make_cache(folders, host=10 * KB, device=1000,
                       footprints={"a": Footprint(device=400), "b": Footprint(device=400),
                                   "c": Footprint(device=700)})
    a, b = cache.activate("a"), cache.activate("b")
    generates(cache.activate("c"))  # estimated at 0 on a CPU device tier, measured 700: both others go
    assert a.closed and b.closed
    assert tiers(cache) == {"a": "host", "b": "host", "c": "device"}
    assert cache.tiers["device"].used_bytes == 700
    assert cache.stats.evictions == {"device": 2, "host": 0}


@pytest.mark.parametrize("kind, a_after", [("cuda", "host"), ("cpu", "device")])
def test_on_cuda_the_first_device_estimate_is_the_host_footprint(folders, kind, a_after):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=10 * KB, device=size + size // 2, kind=kind,
                       footprints={"a": Footprint(device=size), "b": Footprint(device=10)})
    cache.activate("a")
    # b measures 10 bytes, but on CUDA the cache first reserves its weights (`size`): a must leave
    # the device; on CPU the first estimate is 0 and both fit
    generates(cache.activate("b"))
    assert tiers(cache) == {"a": a_after, "b": "device", "c": "disk"}
    assert cache.tiers["device"].used_bytes == 10 + (size if a_after == "device" else 0)


# ---- pins and leases ---------------------------------------------------------------------------

def test_pinned_experts_are_never_evicted(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=size + size // 2)  # room for one expert
    cache.pin("a")
    assert cache.tier_of("a") == "device" and cache.states()[0].pinned
    with pytest.raises(CacheFull, match="pinned or in use"):
        cache.evict("a")
    with pytest.raises(CacheFull, match="pinned or in use"):
        cache.evict("a", "device")
    with pytest.raises(CacheFull, match=r"needs \d+ bytes in the host tier.*unpin"):
        cache.activate("b")
    with pytest.raises(CacheFull):
        cache.prefetch("b", "host").result(timeout=10)
    assert cache.tier_of("a") == "device" and not cache.fake.runners[0].closed
    cache.unpin("a")
    generates(cache.activate("b"))
    assert tiers(cache) == {"a": "disk", "b": "device", "c": "disk"}


def test_pin_to_the_host_tier_keeps_the_expert_warm(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=2 * size + size // 2, device=1000, policy="lru",
                       footprints={n: Footprint(device=600) for n in "abc"})
    cache.pin("a", "host")
    assert cache.tier_of("a") == "host"
    cache.activate("b")
    cache.activate("c")  # b leaves the host tier; a stays
    assert tiers(cache) == {"a": "host", "b": "disk", "c": "device"}
    generates(cache.activate("a"))  # pinned and now hot: c leaves the device
    assert tiers(cache) == {"a": "device", "b": "disk", "c": "host"}
    with pytest.raises(CacheFull):
        cache.activate("b")  # the device has room only for a, which is pinned
    assert tiers(cache)["a"] == "device"


def test_a_lease_keeps_its_expert_hot_until_the_block_ends(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=size + size // 2)
    with cache.lease("a") as runner:
        with pytest.raises(CacheFull, match="only pinned or in-use experts are left"):
            cache.activate("b")
        with pytest.raises(CacheFull, match="in use"):
            cache.evict("a")
        generates(runner)  # not closed under our feet
        with cache.lease("a") as same:  # leases nest
            assert same is runner
        with pytest.raises(CacheFull):
            cache.activate("b")
    generates(cache.activate("b"))
    assert runner.closed and tiers(cache)["a"] == "disk"


def test_a_failed_lease_releases_its_hold(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=size + size // 2)
    cache.fake.fail.add("a")
    with pytest.raises(LoadError):
        with cache.lease("a"):
            pass
    cache.fake.fail.clear()
    cache.activate("a")
    cache.evict("a")  # not left "in use"


# ---- prefetch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tier, expected", [("host", "host"), ("device", "device")])
def test_prefetch_returns_a_future_and_moves_the_expert(folders, tier, expected):
    cache = make_cache(folders, host=10 * KB)
    future = cache.prefetch("a", tier)
    assert isinstance(future, Future)
    assert future.result(timeout=10) is None
    assert cache.tier_of("a") == expected
    assert cache.stats.prefetches == 1
    runner = cache.activate("a")
    generates(runner)
    assert cache.fake.reads["a"] == 1
    assert (cache.stats.warm_hits, cache.stats.hits, cache.stats.misses) == \
        ((1, 0, 0) if tier == "host" else (0, 1, 0))


def test_prefetch_returns_at_once_and_repeated_hints_share_the_move(folders):
    backend = FakeBackend()
    backend.gate = threading.Event()
    cache = make_cache(folders, host=10 * KB, backend=backend)
    first = cache.prefetch("a")
    assert not first.done()
    assert cache.prefetch("a") is first
    second = cache.prefetch("a", "device")
    assert second is not first  # another tier is another move
    assert cache.prefetch("a", "device") is second
    backend.gate.set()
    first.result(timeout=10)
    second.result(timeout=10)
    assert cache.tier_of("a") == "device"
    assert backend.reads["a"] == 1 and cache.stats.prefetches == 2
    cache.close()


def test_a_failed_prefetch_reports_through_its_future(folders):
    cache = make_cache(folders, host=10 * KB)
    cache.fake.fail.add("a")
    with pytest.raises(LoadError):
        cache.prefetch("a").result(timeout=10)
    assert cache.tier_of("a") == "disk"


# ---- concurrency -------------------------------------------------------------------------------

def test_concurrent_activations_of_one_expert_load_it_once(folders):
    backend = FakeBackend(read_delay_s=0.05)
    cache = make_cache(folders, host=10 * KB, backend=backend)
    barrier = threading.Barrier(8)
    runners, errors = [], []

    def activate():
        barrier.wait()
        try:
            runners.append(cache.activate("a"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=activate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(runners) == 8 and len({id(r) for r in runners}) == 1
    assert backend.reads["a"] == 1 and backend.materializes["a"] == 1
    stats = cache.stats
    assert (stats.activations, stats.misses, stats.hits, stats.warm_hits, stats.switches) == (8, 1, 7, 0, 0)


def test_activation_and_prefetch_of_one_expert_race_to_one_load(folders):
    backend = FakeBackend(read_delay_s=0.05)
    cache = make_cache(folders, host=10 * KB, backend=backend)
    future = cache.prefetch("a", "device")
    runner = cache.activate("a")
    future.result(timeout=10)
    assert cache.activate("a") is runner
    assert backend.reads["a"] == 1 and backend.materializes["a"] == 1


# ---- counters ----------------------------------------------------------------------------------

def test_stats_count_hits_misses_switches_evictions_and_bytes(folders):
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, host=2 * size, policy="lru")
    cache.activate("a")            # miss
    cache.activate("a")            # hit
    cache.evict("a", "device")     # explicit: not counted as a policy eviction
    cache.activate("a")            # warm hit
    cache.activate("b")            # miss, switch
    cache.activate("c")            # miss, switch, evicts a (least recently used) from the host
    cache.activate("b")            # hit, switch
    stats = cache.stats
    assert (stats.activations, stats.hits, stats.warm_hits, stats.misses, stats.switches) == (6, 2, 1, 3, 3)
    assert stats.evictions == {"device": 0, "host": 1}
    assert stats.bytes_moved == {"disk->host": 3 * size, "host->device": 4 * size}
    assert all(v > 0 for v in stats.seconds_moving.values())  # the fake clock ticks once per call
    assert tiers(cache) == {"a": "disk", "b": "device", "c": "device"}
    assert cache.snapshot().stats == stats
    assert {s.name: s.requests for s in cache.states()} == {"a": 3, "b": 2, "c": 1}


def test_snapshot(folders):
    cache = make_cache(folders, host=10 * KB, device=5 * KB, footprints={"a": Footprint(device=77)})
    cache.activate("a")
    cache.pin("b", "host")
    snapshot = cache.snapshot()
    assert snapshot.policy == "gdsf" and snapshot.device_kind == "cpu"
    assert snapshot.tiers == {"device": TierUsage(5 * KB, 77), "host": TierUsage(10 * KB, 2 * weight_bytes(folders["a"]))}
    assert snapshot.reusable_buffer_bytes == 0
    experts = {e.name: e for e in snapshot.experts}
    assert experts["a"].tier == "device" and experts["a"].device_bytes == 77
    assert experts["b"].tier == "host" and experts["b"].pinned is True
    assert experts["c"].tier == "disk" and experts["c"].num_bytes == weight_bytes(folders["c"])
    assert snapshot.stats.activations == 1 and snapshot.stats is not cache.stats  # a copy


# ---- policies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, victim", [("lru", "popular"), ("gdsf", "recent"), ("lrfu", "recent")])
def test_cost_aware_policies_keep_a_popular_older_expert_that_lru_evicts(tmp_path, policy, victim):
    names = ("popular", "recent", "new")
    folders = {n: write_weights(tmp_path / n, 1000) for n in names}
    size = weight_bytes(folders["popular"])
    backend = FakeBackend()
    experts = tuple(ExpertConfig(n, str(folders[n]), backend="torch_hf") for n in names)
    ticks = itertools.count()
    cache = ModelCache(CoEConfig(experts=experts, cache=CacheConfig(policy=policy)), ModelStore("unused"),
                       backends={"torch_hf": backend}, timer=lambda: float(next(ticks)),
                       budgets=Budgets(device_bytes=10**9, host_bytes=2 * size, device_kind="cpu"))
    for _ in range(5):
        cache.activate("popular")
    cache.activate("recent")  # used last, but once
    cache.activate("new")     # one of the two must leave the host tier
    assert {s.name: s.tier for s in cache.states()} == {
        "popular": "disk" if victim == "popular" else "device",
        "recent": "disk" if victim == "recent" else "device",
        "new": "device"}
    assert cache.stats.evictions["host"] == 1


def test_gdsf_ages_out_an_expert_that_stopped_being_used(folders):
    """The tier's clock rises with each eviction, so newcomers eventually outrank old popularity."""
    size = weight_bytes(folders["a"])
    cache = make_cache(folders, names="abc", host=2 * size)
    for _ in range(3):
        cache.activate("a")
    for _ in range(6):  # b and c take turns; a is never used again
        cache.activate("b")
        cache.activate("c")
    assert tiers(cache)["a"] == "disk"


def test_lrfu_ages_out_an_expert_that_stopped_being_used(folders, monkeypatch):
    """Its decayed count halves every frequency_half_life requests, while the others keep coming.
    Reload costs are made equal: measured read times (a's cold first read is the slowest) would
    rightly weigh in, and make the outcome depend on the machine."""
    monkeypatch.setattr(ModelCache, "_reload_s", lambda self, slot, tier: 1.0)
    size = weight_bytes(folders["a"])
    backend = FakeBackend()
    experts = tuple(ExpertConfig(n, str(folders[n]), backend="torch_hf") for n in "abc")
    cache = ModelCache(CoEConfig(experts=experts, cache=CacheConfig(policy="lrfu", frequency_half_life=4)),
                       ModelStore("unused"), backends={"torch_hf": backend},
                       budgets=Budgets(device_bytes=10**9, host_bytes=2 * size, device_kind="cpu"))
    for _ in range(8):
        cache.activate("a")
    cache.activate("b")
    cache.activate("c")
    assert tiers(cache)["a"] != "disk" and tiers(cache)["b"] == "disk"  # 8 recent uses beat 1
    for _ in range(6):  # b and c take turns; a is never used again
        cache.activate("b")
        cache.activate("c")
    assert tiers(cache)["a"] == "disk"


# ---- property: random moves never break a budget -----------------------------------------------

NAMES = "abcdef"
MOVES = st.one_of(
    st.tuples(st.just("activate"), st.sampled_from(NAMES)),
    st.tuples(st.just("prefetch"), st.sampled_from(NAMES), st.sampled_from(("host", "device"))),
    st.tuples(st.just("evict"), st.sampled_from(NAMES), st.sampled_from(("host", "device"))),
    st.tuples(st.just("pin"), st.sampled_from(NAMES), st.sampled_from(("host", "device"))),
    st.tuples(st.just("unpin"), st.sampled_from(NAMES)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host_footprints=st.lists(st.one_of(st.none(), st.integers(0, 6 * KB)), min_size=6, max_size=6),
       device_footprints=st.lists(st.integers(0, 3 * KB), min_size=6, max_size=6),
       host_budget=st.one_of(st.integers(0, 2 * KB), st.integers(2 * KB, 16 * KB)),
       device_budget=st.one_of(st.integers(0, KB), st.integers(KB, 8 * KB)),
       kind=st.sampled_from(("cpu", "cuda")), policy=st.sampled_from(("lrfu", "gdsf", "lru")),
       broken=st.sets(st.sampled_from(NAMES), max_size=1),
       moves=st.lists(MOVES, min_size=8, max_size=40))
def test_random_moves_keep_every_tier_within_budget(folders, host_footprints, device_footprints, host_budget,
                                                     device_budget, kind, policy, broken, moves):
    """Footprints None are the weights' size on disk; a ``broken`` expert's read fails."""
    footprints = {n: Footprint(h, d) for n, h, d in zip(NAMES, host_footprints, device_footprints)}
    cache = make_cache(folders, names=NAMES, host=host_budget, device=device_budget, kind=kind, policy=policy,
                       footprints=footprints)
    cache.fake.fail.update(broken)
    model = CacheModel(cache, folders, footprints, kind)
    try:
        for move in moves:
            model.apply(move)
            model.check()
    finally:
        cache.close()
    assert cache.fake.live == set()
    assert all(r.closed for r in cache.fake.runners)


class CacheModel:
    """What a move must do, predicted from the public state before it, and the invariants after it."""

    def __init__(self, cache: ModelCache, folders, footprints: dict[str, Footprint], kind: str):
        self.cache, self.footprints, self.kind = cache, footprints, kind
        self.weight_bytes = {n: weight_bytes(folders[n]) for n in NAMES}
        self.host_seen: dict[str, int] = {}    # the last measured footprint: the next estimate
        self.device_seen: dict[str, int] = {}
        self.pinned: dict[str, str] = {}       # name -> the tier it was pinned to
        self.runners: dict[str, Runner] = {}   # the last runner handed out per expert

    def _room(self, name: str) -> tuple[int, int]:
        """Bytes of each tier that ``name`` could have after evicting every expert not pinned."""
        others = [s for s in self.cache.states() if s.pinned and s.name != name]
        return (self.cache.tiers["host"].budget_bytes - sum(s.host_bytes for s in others),
                self.cache.tiers["device"].budget_bytes - sum(s.device_bytes for s in others))

    def _fits(self, name: str, tier: str) -> bool:
        """Whether moving ``name`` up to ``tier`` must succeed: every reservation (the estimate,
        then the measurement) fits next to the pinned experts."""
        host_room, device_room = self._room(name)
        current = self.cache.tier_of(name)
        footprint = self.footprints[name]
        host_bytes = footprint.host if footprint.host is not None else self.weight_bytes[name]
        if current == "disk":
            estimate = self.host_seen.get(name) or self.weight_bytes[name]
            if max(estimate, host_bytes) > host_room:
                return False
        if tier == "device" and current != "device":
            pinned_hot = [s for s in self.cache.states()
                          if s.pinned and s.name != name and self.cache.tier_of(s.name) == "device"]
            if len(pinned_hot) > self.cache.config.cache.max_hot_experts - 1:  # none of them can go
                return False
            estimate = self.device_seen.get(name)
            if estimate is None:
                estimate = host_bytes if self.kind == "cuda" else 0
            if max(estimate, footprint.device) > device_room:
                return False
        return True

    def _record(self, name: str) -> None:
        tier = self.cache.tier_of(name)
        if tier in ("host", "device"):
            footprint = self.footprints[name]
            self.host_seen[name] = footprint.host if footprint.host is not None else self.weight_bytes[name]
        if tier == "device":
            self.device_seen[name] = self.footprints[name].device

    def _move(self, name: str, tier: str, call) -> tuple[bool, object]:
        """(whether it moved, what ``call`` returned)."""
        fits = self._fits(name, tier)
        before = self.cache.tier_of(name)
        broken = name in self.cache.fake.fail and before == "disk"
        if broken:  # the read fails once its estimate is reserved; nothing is measured
            fits = (self.host_seen.get(name) or self.weight_bytes[name]) <= self._room(name)[0]
        try:
            result = call()
        except LoadError:
            assert broken and fits, f"LoadError moving {name} to {tier}"
            event("LoadError")
            assert self.cache.tier_of(name) == "disk"
            return False, None
        except CacheFull:
            event("CacheFull")
            assert not fits, f"CacheFull moving {name} to {tier} though it fits"
            after = self.cache.tier_of(name)
            if tier == "device" and before == "disk":
                assert after in ("disk", "host")  # the host move may have succeeded
            else:
                assert after == before
            self._record(name)
            return False, None
        assert fits and not broken, f"{name} moved to {tier} though it cannot fit"
        event(f"moved to {tier} from {before}")
        expected = ("device", "host") if tier == "host" and before == "device" else (tier,)
        assert self.cache.tier_of(name) in expected
        self._record(name)
        return True, result

    def apply(self, move) -> None:
        op, name, *rest = move
        cache = self.cache
        if op == "activate":
            moved, runner = self._move(name, "device", lambda: cache.activate(name))
            if moved:
                generates(runner)
                self.runners[name] = runner
        elif op == "prefetch":
            self._move(name, rest[0], lambda: cache.prefetch(name, rest[0]).result(timeout=30))
        elif op == "pin":
            tier = rest[0]
            moved, _ = self._move(name, tier, lambda: cache.pin(name, tier))
            if moved:
                # a pin keeps the highest tier asked for
                self.pinned[name] = "device" if "device" in (tier, self.pinned.get(name)) else "host"
        elif op == "unpin":
            cache.unpin(name)
            self.pinned.pop(name, None)
        elif op == "evict":
            tier = rest[0]
            before = cache.tier_of(name)
            if name in self.pinned:
                with pytest.raises(CacheFull):
                    cache.evict(name, tier)
                assert cache.tier_of(name) == before
            else:
                cache.evict(name, tier)
                assert cache.tier_of(name) == ("disk" if tier == "host" else "host" if before != "disk" else "disk")

    def check(self) -> None:
        cache = self.cache
        check_budgets(cache)
        states = {s.name: s for s in cache.states()}
        for name, state in states.items():
            footprint = self.footprints[name]
            host_bytes = footprint.host if footprint.host is not None else self.weight_bytes[name]
            assert state.pinned == (name in self.pinned)
            if state.tier == "device":  # inclusive: hot experts are warm too
                assert (state.host_bytes, state.device_bytes) == (host_bytes, footprint.device)
                assert name in cache.fake.live
            elif state.tier == "host":
                assert (state.host_bytes, state.device_bytes) == (host_bytes, 0)
                assert name in cache.fake.live
            else:
                assert state.tier == "disk" and (state.host_bytes, state.device_bytes) == (0, 0)
                assert name not in cache.fake.live
            if name in self.pinned:
                assert state.tier in (("device",) if self.pinned[name] == "device" else ("host", "device"))
            runner = self.runners.get(name)
            if runner is not None and state.tier != "device":
                assert runner.closed
        # nothing is held but the experts' measured footprints: no stray reservation
        assert cache.tiers["host"].used_bytes == sum(s.host_bytes for s in states.values())
        assert cache.tiers["device"].used_bytes == sum(s.device_bytes for s in states.values())
        assert sum(not r.closed for r in cache.fake.runners) == sum(s.tier == "device" for s in states.values())


# ---- how many experts are hot, and whether leaving the device keeps them warm --------------------

def test_max_hot_experts_one_keeps_a_single_runner_hot(folders):
    cache = make_cache(folders, host=10 * KB, max_hot_experts=1)
    a = cache.activate("a")
    b = cache.activate("b")
    assert a.closed and not b.closed
    assert cache.hot_experts() == ["b"]
    assert tiers(cache) == {"a": "host", "b": "device", "c": "disk"}  # a stays warm
    assert cache.stats.evictions["device"] == 1 and cache.stats.evictions["host"] == 0
    cache.prefetch("c", "device").result(timeout=10)
    assert cache.hot_experts() == ["c"] and b.closed
    generates(cache.activate("a"))
    assert cache.hot_experts() == ["a"]
    assert sum(not r.closed for r in cache.fake.runners) == 1
    check_budgets(cache)


def test_max_hot_experts_evicts_by_policy_even_when_the_bytes_fit(folders):
    cache = make_cache(folders, host=10 * KB, policy="lru", max_hot_experts=2)
    for name in "abc":
        cache.activate(name)
    assert sorted(cache.hot_experts()) == ["b", "c"]  # a was used least recently
    assert cache.tiers["device"].free_bytes > 0
    cache.activate("a")
    assert sorted(cache.hot_experts()) == ["a", "c"]


def test_max_hot_experts_counts_leased_experts_and_names_the_setting(folders):
    cache = make_cache(folders, host=10 * KB, max_hot_experts=1)
    with cache.lease("a") as runner:
        with pytest.raises(CacheFull, match=r"cache.max_hot_experts = 1"):
            cache.activate("b")
        assert not runner.closed and cache.hot_experts() == ["a"]
        assert cache.tier_of("b") == "host"  # the read went through; only the device was full
    generates(cache.activate("b"))
    assert cache.hot_experts() == ["b"]


def test_keep_warm_false_sends_an_expert_leaving_the_device_back_to_disk(folders):
    cache = make_cache(folders, host=10 * KB, max_hot_experts=1, keep_warm=False)
    a = cache.activate("a")
    cache.activate("b")
    assert a.closed and cache.fake.releases["a"] == 1 and "a" not in cache.fake.live
    assert tiers(cache) == {"a": "disk", "b": "device", "c": "disk"}
    assert "a" not in cache.tiers["host"] and "a" not in cache.tiers["device"]
    assert cache.tiers["host"].used_bytes == cache.tiers["host"].held("b")
    cache.evict("b", "device")  # an explicit demotion too
    assert tiers(cache)["b"] == "disk" and cache.fake.releases["b"] == 1
    assert cache.fake.live == set()
    generates(cache.activate("a"))
    assert cache.fake.reads["a"] == 2  # back from disk: there was no warm copy
    cache.prefetch("c", "host").result(timeout=10)  # a warm prefetch still works
    assert tiers(cache)["c"] == "host"
    check_budgets(cache)


def test_keep_warm_true_keeps_the_host_weights(folders):
    cache = make_cache(folders, host=10 * KB, max_hot_experts=1, keep_warm=True)
    cache.activate("a")
    cache.activate("b")
    assert cache.fake.releases["a"] == 0 and tiers(cache)["a"] == "host"
    generates(cache.activate("a"))
    assert cache.fake.reads["a"] == 1


# ---- idle unload (cache.idle_unload_s, a request's keep_alive), on a virtual clock ---------------


class VirtualClock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_idle_moves_are_one_tier_down_after_the_keep_time_and_never_for_a_busy_expert():
    from coe.cache.policy import Idle, idle_moves
    from coe.types import Tier

    experts = [Idle("hot", Tier.DEVICE, since_s=0.0, keep_s=10.0),
               Idle("warm", Tier.HOST, since_s=5.0, keep_s=10.0),
               Idle("leased", Tier.DEVICE, since_s=0.0, keep_s=10.0, busy=True),
               Idle("forever", Tier.DEVICE, since_s=0.0, keep_s=None),
               Idle("at_once", Tier.HOST, since_s=10.0, keep_s=0.0)]
    assert idle_moves(experts, 9.9) == []
    assert idle_moves(experts, 10.0) == [("hot", Tier.DEVICE), ("at_once", Tier.HOST)]
    assert idle_moves(experts, 15.0) == [("hot", Tier.DEVICE), ("warm", Tier.HOST), ("at_once", Tier.HOST)]


def test_an_unused_expert_goes_host_then_disk_one_keep_time_apart(folders):
    clock = VirtualClock()
    cache = make_cache(folders, "ab", host=10**9, now=clock, idle_unload_s=60)
    cache.activate("a")
    cache.activate("b")
    clock.now_s += 30
    cache.activate("b")  # b is used again: its idle time starts over
    clock.now_s += 30
    assert cache.unload_idle() == [("a", "device")]
    assert tiers(cache) == {"a": "host", "b": "device"}
    clock.now_s += 30
    assert cache.unload_idle() == [("b", "device")]
    clock.now_s += 30
    assert cache.unload_idle() == [("a", "host")]
    assert tiers(cache) == {"a": "disk", "b": "host"}
    assert cache.stats.idle_unloads == 3
    assert cache.activate("a") is not None and tiers(cache)["a"] == "device"  # it comes back


def test_keep_alive_overrides_the_default_and_pinned_or_leased_experts_stay(folders):
    import math

    clock = VirtualClock()
    cache = make_cache(folders, "abc", host=10**9, now=clock)  # no idle_unload_s: never by time
    for name in "abc":
        cache.activate(name)
    cache.keep_alive("a", 0.0)  # Ollama's keep_alive: 0, unload once done
    cache.keep_alive("b", math.inf)  # negative keep_alive: until the room is needed
    cache.pin("c")
    clock.now_s += 10**6
    assert cache.unload_idle() == [("a", "device")]
    with cache.lease("a"):
        assert cache.unload_idle() == []  # in use
    assert cache.unload_idle() == [("a", "device")]
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}


def test_a_prefetched_expert_is_idle_from_its_arrival_not_from_its_last_use(folders):
    clock = VirtualClock()
    cache = make_cache(folders, "ab", host=10**9, now=clock, idle_unload_s=60)
    clock.now_s += 3600  # long after start-up (and after any earlier use)
    cache.prefetch("a").result()  # a queued request's expert moved up to host
    assert cache.unload_idle() == []
    clock.now_s += 60
    assert cache.unload_idle() == [("a", "host")]


# ---- runtimes that die (isolated experts' workers) -----------------------------------------------

def test_a_runner_whose_runtime_died_leaves_the_device_tier_and_is_started_again(folders):
    cache = make_cache(folders, host=10 * KB, footprints={"a": Footprint(host=1500, device=300)})
    runner = cache.activate("a")
    runner.dead = True  # its worker process died
    assert cache.hot_experts() == []  # seen at once: nothing routes to it as hot
    assert runner.closed and cache.tier_of("a") == "host"
    assert cache.tiers["device"].used_bytes == 0 and cache.tiers["host"].used_bytes == 1500
    (a, *_) = cache.states()
    assert (a.crashes, a.restarts) == (1, 0)
    again = cache.activate("a")  # warm -> hot again: no read
    generates(again)
    assert again is not runner and cache.fake.reads["a"] == 1 and cache.fake.materializes["a"] == 2
    (a, *_) = cache.states()
    assert (a.tier, a.crashes, a.restarts) == ("device", 1, 1)
    cache.evict("a", "device")  # an eviction is not a crash
    assert cache.states()[0].crashes == 1
