"""Engine + ModelCache with tiny torch experts (real checkpoints, real generation)."""
import shutil

import time

import pytest

from coe.cache import ModelCache
from coe.cache.tiers import Budgets
from coe.config import CacheConfig, CoEConfig, ExpertConfig, RouterConfig, SchedulerConfig
from coe.engine import Engine
from coe.engine.health import ExpertHealth
from coe.errors import CacheFull, ExpertUnavailable, ModelNotAvailable, Overloaded, UnknownExpert
from coe.models import ModelStore
from coe.server.shapes import state_word
from coe.types import ChatMessage, Request, RouteDecision, SamplingParams


@pytest.fixture(scope="module")
def two_checkpoints(tiny_checkpoint, tmp_path_factory):
    second = tmp_path_factory.mktemp("second") / "ckpt"
    shutil.copytree(tiny_checkpoint, second)
    return tiny_checkpoint, second


def checkpoint_bytes(path) -> int:
    return (path / "model.safetensors").stat().st_size


def value(engine, name, **labels) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def make_engine(tmp_path, experts, budgets=None, **sections) -> Engine:
    config = CoEConfig(experts=tuple(experts), **sections)
    return Engine(config, ModelCache(config, ModelStore(tmp_path / "home"), budgets=budgets))


def torch_expert(name, path, **params) -> ExpertConfig:
    return ExpertConfig(name, str(path), backend="torch_hf", params=params)


def run(engine, expert, prompt="Hello", **sampling):
    sampling.setdefault("max_tokens", 4)
    sampling.setdefault("temperature", 0.0)
    return list(engine.stream(Request(expert=expert, sampling=SamplingParams(**sampling), prompt=prompt)))


def test_stream_ends_with_a_completion(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    events = run(engine, "tiny", max_tokens=6)
    final = events[-1]
    assert final.completion is not None and final.error is None
    assert all(e.completion is None and e.error is None for e in events[:-1])
    assert "".join(e.delta for e in events) == final.completion.text
    assert final.completion.finish_reason in ("length", "stop")
    assert len({e.request_id for e in events}) == 1
    assert engine.num_served == 1
    assert engine.cache.is_resident("tiny")


def test_chat_request(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    request = Request("tiny", SamplingParams(max_tokens=3, temperature=0.0), messages=(ChatMessage("user", "hi"),))
    events = list(engine.stream(request))
    assert events[-1].completion.prompt_tokens == len("User: hi\nAssistant:") + 1


def test_engine_thread_serves_and_stops(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    engine.start()
    try:
        first = run(engine, "tiny", max_tokens=5)
        second = run(engine, "tiny", max_tokens=5)
    finally:
        engine.stop()
    assert first[-1].completion.text == second[-1].completion.text  # greedy
    assert not engine.cache.is_resident("tiny")  # stop() unloads
    assert engine._thread is None


def test_unknown_model(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    with pytest.raises(UnknownExpert, match="available: coe, tiny") as info:
        engine.routing.resolve("gpt-4")
    assert info.value.http_status == 404
    with pytest.raises(UnknownExpert):
        engine.submit(Request("gpt-4", prompt="x"))
    assert engine.queue_depth() == 0


def test_resolve(tmp_path, two_checkpoints):
    a, b = two_checkpoints
    engine = make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)],
                         router=RouterConfig(default_expert="b"))
    assert engine.routing.resolve("a") == ("a", None)
    expert, route = engine.routing.resolve("coe")
    assert expert == "b"
    assert isinstance(route, RouteDecision)
    assert route.fallback and route.expert == "b"
    assert make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)]).routing.resolve("coe")[0] == "a"


def test_cache_evicts_the_least_recently_used_expert(tmp_path, two_checkpoints):
    a, b = two_checkpoints
    budget = checkpoint_bytes(a) + checkpoint_bytes(b) - 1  # one fits in the host tier, not both
    engine = make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)],
                         cache=CacheConfig(host_bytes=budget, device_bytes=2**30, policy="lru"))
    cache = engine.cache
    assert run(engine, "a")[-1].completion is not None
    runner_a = cache.activate("a")
    assert cache.is_resident("a") and not cache.is_resident("b")

    assert run(engine, "b")[-1].completion is not None
    assert cache.is_resident("b") and not cache.is_resident("a")
    assert runner_a.model is None  # the evicted runner was closed

    states = {s.name: state_word(s) for s in cache.states()}
    assert states == {"a": "ready", "b": "hot"}
    assert {s.name: s.tier for s in cache.states()} == {"a": "disk", "b": "device"}
    assert run(engine, "a")[-1].completion is not None
    assert {s.name: state_word(s) for s in cache.states()} == {"a": "hot", "b": "ready"}
    assert cache.stats.evictions["host"] == 2
    assert cache.tiers["host"].used_bytes <= budget


def test_a_tight_device_tier_keeps_the_other_expert_warm(tmp_path, two_checkpoints):
    a, b = two_checkpoints
    both = checkpoint_bytes(a) + checkpoint_bytes(b)
    engine = make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)],
                         budgets=Budgets(device_bytes=2**30, host_bytes=both, device_kind="cpu"))
    cache = engine.cache
    run(engine, "a")
    run(engine, "b")
    cache.evict("a", "device")
    assert {s.name: state_word(s) for s in cache.states()} == {"a": "warm", "b": "hot"}
    before = cache.stats.bytes_moved["disk->host"]
    assert run(engine, "a")[-1].completion is not None  # warm -> hot: no read from disk
    assert cache.stats.bytes_moved["disk->host"] == before
    assert cache.stats.warm_hits >= 1


def test_both_fit_when_the_budget_allows(tmp_path, two_checkpoints):
    a, b = two_checkpoints
    engine = make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)],
                         budgets=Budgets(device_bytes=2**30, host_bytes=checkpoint_bytes(a) + checkpoint_bytes(b),
                                         device_kind="cpu"))
    run(engine, "a")
    run(engine, "b")
    assert engine.cache.is_resident("a") and engine.cache.is_resident("b")
    assert engine.cache.stats.evictions == {"device": 0, "host": 0}


def test_expert_bigger_than_the_budget_is_cache_full(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)],
                         cache=CacheConfig(host_bytes=checkpoint_bytes(tiny_checkpoint) - 1, device_bytes=2**30))
    (event,) = run(engine, "tiny")
    assert isinstance(event.error, CacheFull)
    assert "cache.host_bytes" in event.error.message
    assert not engine.cache.is_resident("tiny")
    assert engine.cache.tier_of("tiny") == "disk"


def test_a_failing_expert_does_not_stop_the_engine(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("broken", tmp_path / "does-not-exist"),
                                    torch_expert("tiny", tiny_checkpoint)])
    engine.start()
    try:
        (event,) = run(engine, "broken")
        assert isinstance(event.error, ModelNotAvailable)
        assert "does-not-exist" in event.error.message
        assert run(engine, "tiny")[-1].completion is not None
        (again,) = run(engine, "broken")  # backing off: refused at once, with when to retry
        assert isinstance(again.error, ExpertUnavailable) and again.error.retry_after_s > 0
        assert "does-not-exist" in again.error.message
    finally:
        engine.stop()
    assert engine.num_served == 3


def test_a_crashing_runner_becomes_an_error_event(tmp_path, tiny_checkpoint, monkeypatch):
    config = CoEConfig(experts=(torch_expert("tiny", tiny_checkpoint),))
    engine = Engine(config, ModelCache(config, ModelStore(tmp_path / "home")), health=ExpertHealth(base_backoff_s=0.2))

    def explode(name):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine.cache, "activate", explode)
    (event,) = run(engine, "tiny")
    assert event.error.http_status == 503 and event.error.retry_after_s == pytest.approx(0.2)
    assert "disk on fire" in event.error.message
    monkeypatch.undo()
    (refused,) = run(engine, "tiny")  # backing off: not tried again yet
    assert isinstance(refused.error, ExpertUnavailable) and "disk on fire" in refused.error.message
    time.sleep(0.25)
    assert run(engine, "tiny")[-1].completion is not None  # tried again after the backoff, healthy again
    assert engine.health.is_healthy("tiny", time.monotonic())


def test_requests_for_one_expert_are_batched(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    seen = []
    requests = [Request("tiny", SamplingParams(max_tokens=2, temperature=0.0), prompt=f"p{i}", sink=seen.append)
                for i in range(3)]
    for request in requests:
        engine.submit(request)
    assert engine.queue_depth() == 3
    steps = 0
    while engine.step():  # one step per token of the batch: the three decode together
        steps += 1
    assert steps <= 3 and engine.queue_depth() == 0
    assert value(engine, "coe_batch_size_count") == 1 and value(engine, "coe_batch_size_sum") == 3
    finals = [e for e in seen if e.is_final]
    assert [e.request_id for e in finals] == [r.id for r in requests]
    assert all(e.completion is not None for e in finals)


def test_full_queue_is_overloaded(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)],
                         scheduler=SchedulerConfig(max_queue=1))
    engine.submit(Request("tiny", prompt="a"))
    with pytest.raises(Overloaded):
        engine.submit(Request("tiny", prompt="b"))


def test_states_of_missing_and_unreadable_sources(tmp_path, tiny_checkpoint):
    unreadable = tmp_path / "junk.gguf"
    unreadable.write_bytes(b"not gguf")
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint),
                                    ExpertConfig("gone", str(tmp_path / "gone.gguf")),
                                    ExpertConfig("junk", str(unreadable))])
    states = {s.name: s for s in engine.cache.states()}
    assert state_word(states["tiny"]) == "ready" and states["tiny"].backend == "torch_hf"
    assert states["tiny"].num_bytes == checkpoint_bytes(tiny_checkpoint)
    assert states["tiny"].num_params > 0 and states["tiny"].load_s is None
    assert state_word(states["gone"]) == "missing" and states["gone"].num_bytes is None
    assert state_word(states["junk"]) == "unreadable" and states["junk"].num_params is None


def test_stop_fails_queued_requests_instead_of_dropping_them(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    events = []
    request = Request(expert="tiny", prompt="queued", sink=events.append)
    engine.submit(request)
    engine.stop()
    assert len(events) == 1 and isinstance(events[0].error, Overloaded)
    assert engine.queue_depth() == 0


def test_stopped_engine_takes_no_new_batch(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)])
    engine.stop()
    engine.submit(Request(expert="tiny", prompt="late"))
    assert engine.step() is False


def test_submit_prefetches_the_expert_while_it_queues(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)], cache=CacheConfig(prefetch="host"))
    engine.submit(Request("tiny", SamplingParams(max_tokens=2), prompt="queued"))
    assert engine.cache.stats.prefetches == 1
    engine.cache.prefetch("tiny", "host").result(timeout=60)  # the same move, or a no-op after it
    assert engine.cache.tier_of("tiny") == "host"
    assert serve_batch(engine) is True
    assert engine.cache.tier_of("tiny") == "device"
    assert engine.cache.stats.warm_hits == 1 and engine.cache.stats.misses == 0
    engine.stop()


def test_a_queued_expert_is_moved_up_early_only_if_it_fits_with_those_waiting_ahead(tmp_path, two_checkpoints):
    a, b = two_checkpoints
    one = checkpoint_bytes(a)
    engine = make_engine(tmp_path, [torch_expert("a", a), torch_expert("b", b)], cache=CacheConfig(prefetch="host"),
                         budgets=Budgets(device_bytes=2**30, host_bytes=one + one // 2, device_kind="cpu"))
    engine.submit(Request("a", SamplingParams(max_tokens=2), prompt="first"))
    assert engine.cache.stats.prefetches == 1  # a alone fits
    engine.submit(Request("b", SamplingParams(max_tokens=2), prompt="behind a"))
    assert engine.cache.stats.prefetches == 1  # a and b do not: loading b now would evict a
    engine.cache.prefetch("a", "host").result(timeout=60)
    assert engine.cache.tier_of("a") == "host" and engine.cache.tier_of("b") == "disk"
    assert engine.cache.host_bytes_needed(["a", "b", "a"]) == one + checkpoint_bytes(b)
    assert serve_batch(engine) and serve_batch(engine)  # both served; b loaded when its turn came
    assert engine.cache.tier_of("b") == "device"
    hints = engine.cache.stats.prefetches
    engine.submit(Request("b", SamplingParams(max_tokens=2), prompt="nothing ahead"))
    assert engine.cache.stats.prefetches == hints  # b is hot already: no hint needed
    assert serve_batch(engine)
    engine.stop()


def test_prefetch_none_leaves_the_expert_on_disk_until_it_runs(tmp_path, tiny_checkpoint):
    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)], cache=CacheConfig(prefetch="none"))
    engine.submit(Request("tiny", SamplingParams(max_tokens=2), prompt="queued"))
    assert engine.cache.stats.prefetches == 0
    assert engine.cache.tier_of("tiny") == "disk"
    assert serve_batch(engine) is True
    assert engine.cache.stats.misses == 1
    engine.stop()


def test_config_pins_are_made_hot_and_pinned_at_start(tmp_path, tiny_checkpoint):
    import time

    engine = make_engine(tmp_path, [torch_expert("tiny", tiny_checkpoint)], cache=CacheConfig(pins=("tiny",)))
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while not engine.cache.states()[0].pinned and time.monotonic() < deadline:
            time.sleep(0.02)
        (state,) = engine.cache.states()
        assert state.pinned and state_word(state) == "hot"
        with pytest.raises(CacheFull, match="pinned"):
            engine.cache.evict("tiny")
        assert run(engine, "tiny")[-1].completion is not None
    finally:
        engine.stop()
    assert engine.cache.tier_of("tiny") == "disk"  # stop() unloads pins too


def serve_batch(engine) -> bool:
    """Step until the batch the first step took has ended (a step is one token); False when idle."""
    if not engine.step():
        return False
    while engine.running_expert is not None:
        engine.step()
    return True
