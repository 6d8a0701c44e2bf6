"""ModelCache with real weights: the packaged GGUF experts through llama.cpp (warm = the model over
the page cache, hot = a context) and a real tiny torch checkpoint (warm = a pooled host buffer).

Footprints here are what the operating system reports, so the checks are about signs and order,
not exact byte counts.
"""
from __future__ import annotations

import shutil

import pytest

from coe.backends.memory import resident_file_bytes
from coe.cache import ModelCache
from coe.cache.tiers import Budgets
from coe.config import CacheConfig, CoEConfig, ExpertConfig
from coe.engine.batch import generate
from coe.errors import CacheFull
from coe.models import ModelStore, describe
from coe.types import ChatMessage, Request, SamplingParams

pytestmark = pytest.mark.integration

SMALL, LARGER = "smollm2-135m", "qwen2.5-coder-0.5b"
GIB = 2**30


@pytest.fixture(scope="module")
def store(coe_home) -> ModelStore:
    pytest.importorskip("llama_cpp")
    store = ModelStore(coe_home)
    for model_id in (SMALL, LARGER):
        if store.status(model_id) == "not installed":
            pytest.skip(f"packaged model {model_id} is not installed (make setup)")
    return store


@pytest.fixture(scope="module")
def paths(store) -> dict:
    return {model_id: store.ensure(model_id) for model_id in (SMALL, LARGER)}


def gguf_cache(store, **cache) -> ModelCache:
    experts = tuple(ExpertConfig(m, m, params={"n_ctx": 512}) for m in (SMALL, LARGER))
    return ModelCache(CoEConfig(experts=experts, cache=CacheConfig(**cache)), store)


def answer(runner, max_tokens: int = 8) -> str:
    request = Request(runner.expert.name, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                      messages=(ChatMessage("user", "What is 2 + 2? Answer briefly."),))
    events = list(generate(runner, [request]))
    final = events[-1]
    assert final.error is None, final.error
    assert final.completion.completion_tokens >= 1
    return final.completion.text


def states(cache) -> dict:
    return {s.name: s for s in cache.states()}


def within_budgets(cache) -> None:
    for tier in cache.tiers.values():
        assert tier.used_bytes <= tier.budget_bytes, (tier.name, tier.used_bytes, tier.budget_bytes)


def test_gguf_expert_through_the_tiers(store, paths):
    cache = gguf_cache(store, host_bytes=4 * GIB, device_bytes=2 * GIB)
    try:
        runner = cache.activate(SMALL)
        assert cache.tier_of(SMALL) == "device" and cache.tier_of(LARGER) == "disk"
        assert answer(runner).strip()
        state = states(cache)[SMALL]
        assert state.tier == "device"
        size = describe(paths[SMALL]).num_bytes
        # warm: the file's pages in the page cache, measured with mincore (plus what llama.cpp owns)
        assert state.host_bytes >= 0.9 * size
        assert resident_file_bytes(paths[SMALL]) >= 0.9 * size
        assert state.device_bytes > 0  # the context: KV cache and compute buffers
        assert state.read_s is not None and state.materialize_s > 0
        within_budgets(cache)

        cache.evict(SMALL, "device")
        assert cache.tier_of(SMALL) == "host" and runner.ctx is None  # the context was freed
        assert states(cache)[SMALL].device_bytes == 0 and states(cache)[SMALL].host_bytes > 0
        again = cache.activate(SMALL)  # warm -> hot: a new context on the loaded model
        assert answer(again).strip()
        assert cache.stats.warm_hits == 1 and cache.stats.misses == 1
        assert cache.stats.bytes_moved["disk->host"] == size  # read once

        cache.evict(SMALL, "host")
        assert cache.tier_of(SMALL) == "disk"
        assert states(cache)[SMALL].host_bytes == 0
        assert cache.tiers["host"].used_bytes == 0 and cache.tiers["device"].used_bytes == 0
    finally:
        cache.close()


def test_a_host_budget_for_one_expert_evicts_the_other(store, paths):
    # Either footprint is its file (mapped, resident) plus a little llama.cpp owns; together they
    # are at least both files, which this budget does not reach.
    sizes = {name: describe(path).num_bytes for name, path in paths.items()}
    budget = sizes[SMALL] + sizes[LARGER] - 2**20
    cache = gguf_cache(store, host_bytes=budget, device_bytes=2 * GIB)
    try:
        first = cache.activate(SMALL)
        assert answer(first).strip()
        second = cache.activate(LARGER)
        assert {n: s.tier for n, s in states(cache).items()} == {SMALL: "disk", LARGER: "device"}
        assert first.ctx is None  # the evicted expert's runner was closed
        assert answer(second).strip()
        assert cache.stats.evictions["host"] == 1
        within_budgets(cache)
        assert answer(cache.activate(SMALL)).strip()  # and back
        assert {n: s.tier for n, s in states(cache).items()} == {SMALL: "device", LARGER: "disk"}
        within_budgets(cache)
    finally:
        cache.close()


def test_a_pinned_expert_keeps_the_other_out(store):
    cache = gguf_cache(store, host_bytes=4 * GIB, device_bytes=2 * GIB)
    try:
        cache.pin(SMALL)
        host = states(cache)[SMALL].host_bytes
        cache.close()
        cache = gguf_cache(store, host_bytes=host + host // 2, device_bytes=2 * GIB)
        cache.pin(SMALL)
        with pytest.raises(CacheFull, match="cache.host_bytes"):
            cache.activate(LARGER)
        assert cache.tier_of(SMALL) == "device"
        assert answer(cache.activate(SMALL)).strip()
    finally:
        cache.close()


def test_prefetch_to_the_host_makes_the_expert_warm(store):
    cache = gguf_cache(store, host_bytes=4 * GIB, device_bytes=2 * GIB)
    try:
        assert cache.prefetch(LARGER, "host").result(timeout=300) is None
        assert cache.tier_of(LARGER) == "host"
        state = states(cache)[LARGER]
        assert state.tier == "host" and state.host_bytes > 0 and state.device_bytes == 0
        assert answer(cache.activate(LARGER)).strip()
        assert cache.stats.warm_hits == 1 and cache.stats.misses == 0
        cache.prefetch(SMALL, "device").result(timeout=300)
        assert cache.tier_of(SMALL) == "device"
    finally:
        cache.close()


# ---- torch: the pooled host buffer -------------------------------------------------------------

def greedy(runner) -> str:
    request = Request(runner.expert.name, SamplingParams(max_tokens=12, temperature=0.0), prompt="Once upon")
    final = list(generate(runner, [request]))[-1]
    assert final.error is None, final.error
    return final.completion.text


def test_torch_expert_reuses_the_pooled_buffer_of_an_evicted_one(make_checkpoint, tmp_path):
    pytest.importorskip("torch")
    a = make_checkpoint("pool-a", seed=1)
    b = make_checkpoint("pool-b", seed=2)  # the same shape: the same file size
    size = (a / "model.safetensors").stat().st_size
    assert (b / "model.safetensors").stat().st_size == size
    experts = (ExpertConfig("a", str(a), backend="torch_hf"), ExpertConfig("b", str(b), backend="torch_hf"))
    config = CoEConfig(experts=experts)

    reference = ModelCache(config, ModelStore(tmp_path / "home"),
                           budgets=Budgets(device_bytes=GIB, host_bytes=GIB, device_kind="cpu"))
    try:
        expected_b = greedy(reference.activate("b"))  # b read into a buffer of its own
    finally:
        reference.close()

    cache = ModelCache(config, ModelStore(tmp_path / "home"),
                       budgets=Budgets(device_bytes=GIB, host_bytes=GIB, device_kind="cpu"))
    try:
        text_a = greedy(cache.activate("a"))
        assert cache.pool.num_allocated == 1 and cache.pool.num_reused == 0
        cache.evict("a")
        assert cache.tier_of("a") == "disk"
        assert cache.pool.free_bytes == size  # kept for the next expert, and counted in the host tier
        assert cache.tiers["host"].used_bytes == size
        assert cache.snapshot().reusable_buffer_bytes == size

        text_b = greedy(cache.activate("b"))
        assert cache.pool.num_reused == 1 and cache.pool.num_allocated == 1
        assert cache.pool.free_bytes == 0
        assert text_b == expected_b  # the reused buffer holds b's weights, nothing of a's
        assert text_b != text_a
        assert states(cache)["b"].host_bytes == size
        assert cache.tiers["host"].used_bytes == size
        within_budgets(cache)
    finally:
        cache.close()
    assert cache.pool.free_bytes == 0 and cache.tiers["host"].used_bytes == 0


def test_torch_copy_of_a_checkpoint_in_a_full_host_tier(make_checkpoint, tmp_path):
    """With room for one expert only, activating the second evicts the first and still generates
    the same text as a fresh load."""
    pytest.importorskip("torch")
    a = make_checkpoint("full-a", seed=3)
    b = tmp_path / "full-b"
    shutil.copytree(a, b)
    size = (a / "model.safetensors").stat().st_size
    experts = (ExpertConfig("a", str(a), backend="torch_hf"), ExpertConfig("b", str(b), backend="torch_hf"))
    cache = ModelCache(CoEConfig(experts=experts), ModelStore(tmp_path / "home"),
                       budgets=Budgets(device_bytes=GIB, host_bytes=size + size // 2, device_kind="cpu"))
    try:
        text_a = greedy(cache.activate("a"))
        text_b = greedy(cache.activate("b"))
        assert text_a == text_b  # the same weights
        assert {n: s.tier for n, s in states(cache).items()} == {"a": "disk", "b": "device"}
        within_budgets(cache)
    finally:
        cache.close()
