"""The engine loop on fake backends (real ModelCache, Scheduler and EngineMetrics; letter runners):
tiers and switch times, request deadlines, lookahead loads, admission, failures, shutdown and
residency-aware routing."""
from __future__ import annotations

import threading
import time

import pytest

from fakes import LetterBackend, fake_engine

from coe.config import CacheConfig, RouterConfig, SchedulerConfig, ServerConfig
from coe.engine import Engine
from coe.errors import ExpertUnavailable, GenerationError, LoadError, Overloaded, RequestTimeout
from coe.router.base import Router
from coe.router.mapping import ScoreTable
from coe.router.service import ExpertRouter
from coe.types import Request, SamplingParams

COLD = CacheConfig(prefetch="none")  # experts stay on disk until a batch needs them


@pytest.fixture
def make(tmp_path):
    """fake_engine(...) in a folder of its own; every engine is stopped at the end."""
    engines = []

    def build(*args, **kwargs) -> Engine:
        engine = fake_engine(tmp_path / f"engine{len(engines)}", *args, **kwargs)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.stop()


def submit(engine, expert, prompt="hi", max_tokens=3, **fields):
    """Submit a request whose events land in the returned list."""
    events = []
    request = Request(expert, SamplingParams(max_tokens=max_tokens, temperature=0.0), prompt=prompt,
                      sink=events.append, **fields)
    engine.submit(request)
    return request, events


def finals(events):
    return [e for e in events if e.is_final]


def value(engine, name, **labels) -> float:
    found = engine.metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def spy_prefetch(engine) -> list:
    """Record engine.cache.prefetch calls as (expert, tier, future), still doing them."""
    calls, real = [], engine.cache.prefetch

    def prefetch(name, tier="host"):
        future = real(name, tier)
        calls.append((name, tier, future))
        return future

    engine.cache.prefetch = prefetch
    return calls


# ---- tiers and switch times --------------------------------------------------------------------

def test_a_batch_records_the_tier_its_expert_was_found_in_and_the_switch_time(make):
    engine = make(backend=LetterBackend(read_delay_s=0.05), cache=COLD, scheduler=SchedulerConfig(lookahead="none"))
    cold = [submit(engine, "a") for _ in range(2)]
    assert serve_batch(engine) is True
    for request, events in cold:
        (final,) = finals(events)
        assert final.completion.text == "abc"
        assert request.served_tier == "disk"
        assert request.switch_s >= 0.05  # the read of a's weights
    assert cold[0][0].switch_s == cold[1][0].switch_s  # one switch for the whole batch

    hot, _ = submit(engine, "a")
    assert serve_batch(engine) is True
    assert hot.served_tier == "device" and hot.switch_s < 0.05

    engine.cache.prefetch("b", "host").result(timeout=10)
    warm, _ = submit(engine, "b")
    assert serve_batch(engine) is True
    assert warm.served_tier == "host" and warm.switch_s < 0.05

    assert {tier: value(engine, "coe_batches_total", tier=tier) for tier in ("disk", "host", "device")} == \
        {"disk": 1, "host": 1, "device": 1}
    assert value(engine, "coe_switch_seconds_count", tier="disk") == 1
    assert value(engine, "coe_switch_seconds_sum", tier="disk") >= 0.05
    assert value(engine, "coe_switch_seconds_count", tier="host") == 1
    assert value(engine, "coe_switch_seconds_count", tier="device") == 0  # no switch, no observation


def test_a_request_that_never_ran_has_no_tier(make):
    engine = make(cache=COLD)
    request, _ = submit(engine, "a")
    assert request.served_tier is None and request.switch_s == 0.0


# ---- deadlines ---------------------------------------------------------------------------------

def test_requests_queued_past_the_timeout_end_with_408_and_never_run(make):
    engine = make(cache=COLD, server=ServerConfig(request_timeout_s=0.5))
    stale, stale_events = submit(engine, "a", arrival_s=time.monotonic() - 1.0)  # queued for 1 s already
    assert engine.step() is False  # nothing left to run
    (event,) = stale_events
    assert isinstance(event.error, RequestTimeout)
    assert event.error.http_status == 408 and event.error.code == "request_timeout"
    assert "server.request_timeout_s = 0.5" in event.error.message
    assert stale.served_tier is None
    assert engine.fake.reads["a"] == 0 and engine.fake.generated("a") == 0  # never loaded, never ran
    assert engine.queue_depth() == 0
    assert value(engine, "coe_requests_total", expert="a", outcome="timeout") == 1
    assert value(engine, "coe_requests_in_flight") == 0


def test_only_the_overdue_requests_time_out(make):
    engine = make(cache=COLD, server=ServerConfig(request_timeout_s=0.5))
    old, old_events = submit(engine, "a", arrival_s=time.monotonic() - 1.0)
    new_a, new_a_events = submit(engine, "a")
    new_b, new_b_events = submit(engine, "b")
    while engine.step():
        pass
    assert isinstance(finals(old_events)[0].error, RequestTimeout) and len(old_events) == 1
    assert finals(new_a_events)[0].completion.text == "abc"
    assert finals(new_b_events)[0].completion.text == "abc"
    assert engine.fake.generated("a") == 1 and engine.fake.generated("b") == 1
    assert value(engine, "coe_requests_total", expert="a", outcome="timeout") == 1
    assert value(engine, "coe_requests_total", expert="a", outcome="completed") == 1


# ---- lookahead ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lookahead", ["host", "device"])
def test_lookahead_loads_the_next_scheduled_expert_while_this_batch_runs(make, lookahead):
    engine = make(cache=COLD, scheduler=SchedulerConfig(lookahead=lookahead))
    calls = spy_prefetch(engine)
    submit(engine, "a")
    later, _ = submit(engine, "b")
    assert calls == []  # cache.prefetch none: submitting hints nothing
    assert serve_batch(engine) is True  # serves a; b is scheduled next
    assert [(name, tier) for name, tier, _ in calls] == [("b", lookahead)]
    calls[0][2].result(timeout=10)
    assert engine.cache.tier_of("b") == lookahead
    assert serve_batch(engine) is True
    assert later.served_tier == lookahead
    assert len(calls) == 1  # nothing after b


def test_lookahead_none_loads_nothing_ahead(make):
    engine = make(cache=COLD, scheduler=SchedulerConfig(lookahead="none"))
    calls = spy_prefetch(engine)
    submit(engine, "a")
    later, _ = submit(engine, "b")
    assert serve_batch(engine) is True
    assert calls == [] and engine.cache.tier_of("b") == "disk"
    assert serve_batch(engine) is True
    assert later.served_tier == "disk"


def test_lookahead_skips_a_resident_next_expert_and_the_current_one(make):
    engine = make(cache=COLD, scheduler=SchedulerConfig(lookahead="device", max_batch_size=1))
    engine.cache.activate("a")
    engine.cache.activate("b")
    calls = spy_prefetch(engine)
    submit(engine, "a")
    submit(engine, "b")
    assert serve_batch(engine) is True
    assert calls == []  # b is next, and already hot

    engine = make(cache=COLD, scheduler=SchedulerConfig(lookahead="device", max_batch_size=1))
    calls = spy_prefetch(engine)
    submit(engine, "a")
    submit(engine, "a")
    assert serve_batch(engine) is True
    assert calls == []  # the next batch is a again


def test_lookahead_does_not_hold_up_the_current_batch(make):
    backend = LetterBackend()
    engine = make(backend=backend, cache=COLD, scheduler=SchedulerConfig(lookahead="host"))
    gate = threading.Event()
    real_read, real_tier_of = backend.read, engine.cache.tier_of

    def read(expert, path, pool):
        if expert.name == "b":
            assert gate.wait(10)  # b's weights take "forever" to read
        return real_read(expert, path, pool)

    def tier_of(name):
        time.sleep(0.1)  # give a prefetch already started the time to begin
        return real_tier_of(name)

    backend.read, engine.cache.tier_of = read, tier_of
    _, events = submit(engine, "a")
    submit(engine, "b")
    stepping = threading.Thread(target=serve_batch, args=(engine,))
    stepping.start()
    try:
        deadline = time.monotonic() + 2
        while not finals(events) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finals(events), "a's batch waited for b's load"
    finally:
        gate.set()
        stepping.join(10)


# ---- admission ---------------------------------------------------------------------------------

def test_a_full_queue_rejects_counts_and_never_delivers_to_the_refused_request(make):
    engine = make(scheduler=SchedulerConfig(max_queue=1))
    kept, kept_events = submit(engine, "a")
    refused_events = []
    refused = Request("b", SamplingParams(max_tokens=2), prompt="hi", sink=refused_events.append)
    with pytest.raises(Overloaded) as info:
        engine.submit(refused)
    assert info.value.http_status == 429 and info.value.retry_after_s >= 1
    assert "scheduler.max_queue" in info.value.message
    assert value(engine, "coe_requests_total", expert="b", outcome="rejected") == 1
    assert value(engine, "coe_requests_in_flight") == 1  # only the admitted one holds a slot
    assert engine.queue_depth() == 1
    while engine.step():
        pass
    engine.stop()
    assert refused_events == []
    assert finals(kept_events)[0].completion is not None
    assert value(engine, "coe_requests_in_flight") == 0
    assert value(engine, "coe_requests_total", expert="b", outcome="completed") == 0
    assert engine.fake.generated("b") == 0


def test_a_full_expert_queue_rejects_only_that_expert(make):
    engine = make(scheduler=SchedulerConfig(max_queue_per_expert=1))
    submit(engine, "a")
    with pytest.raises(Overloaded, match="max_queue_per_expert"):
        submit(engine, "a")
    submit(engine, "b")
    assert engine.queue_depth() == 2
    assert value(engine, "coe_requests_total", expert="a", outcome="rejected") == 1
    assert value(engine, "coe_requests_total", expert="b", outcome="rejected") == 0


# ---- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["mid-generation", "load error", "crash"])
def test_a_failing_batch_ends_every_request_once_and_frees_its_slots(make, failure):
    backend = LetterBackend()
    if failure == "mid-generation":
        backend.runner_options["a"] = {"fail_after": 1}
    elif failure == "load error":
        backend.fail_read["a"] = LoadError("expert a: fake read failed")
    else:
        backend.fail_read["a"] = RuntimeError("disk on fire")
    engine = make(backend=backend, cache=COLD)
    batch = [submit(engine, "a", max_tokens=5) for _ in range(3)]
    assert value(engine, "coe_requests_in_flight") == 3
    assert serve_batch(engine) is True
    for _, events in batch:
        (final,) = finals(events)
        assert final is events[-1]
        assert final.error is not None
    error = batch[0][1][-1].error
    if failure == "mid-generation":
        assert isinstance(error, GenerationError) and "device lost" in error.message
        assert "".join(e.delta for e in batch[0][1]) == "a"
    elif failure == "load error":
        assert isinstance(error, LoadError) and "fake read failed" in error.message
    else:  # a crash while loading is a load failure too: the expert backs off
        assert isinstance(error, ExpertUnavailable) and "RuntimeError: disk on fire" in error.message
        assert error.retry_after_s > 0
    assert value(engine, "coe_requests_in_flight") == 0
    assert value(engine, "coe_requests_running") == 0
    assert value(engine, "coe_requests_total", expert="a", outcome="error") == 3
    _, events = submit(engine, "b")  # the engine keeps serving
    assert serve_batch(engine) is True
    assert finals(events)[0].completion.text == "abc"
    assert value(engine, "coe_requests_in_flight") == 0


# ---- shutdown ----------------------------------------------------------------------------------

def test_stop_fails_queued_requests_and_frees_every_slot(make):
    engine = make(cache=COLD)
    queued = [submit(engine, name) for name in ("a", "a", "b")]
    assert value(engine, "coe_requests_in_flight") == 3
    engine.stop()
    for _, events in queued:
        (event,) = events
        assert isinstance(event.error, Overloaded) and "shutting down" in event.error.message
    assert engine.queue_depth() == 0
    assert value(engine, "coe_requests_in_flight") == 0
    assert engine.fake.reads == {}  # nothing was loaded for them


def test_stop_cancels_the_running_batch_and_fails_the_queued_ones(make):
    engine = make(backend=LetterBackend(runner_options={"a": {"delay_s": 0.02}}), cache=COLD)
    engine.start()
    started = threading.Event()
    running_events = []

    def sink(event):
        running_events.append(event)
        started.set()

    running = Request("a", SamplingParams(max_tokens=500), prompt="hi", sink=sink)
    engine.submit(running)
    assert started.wait(10)
    queued = [submit(engine, "b") for _ in range(2)]
    engine.stop()
    assert engine._thread is None
    (final,) = finals(running_events)
    assert final is running_events[-1]
    assert final.completion.finish_reason == "cancelled"
    assert final.completion.completion_tokens < 500
    for _, events in queued:
        (event,) = events
        assert isinstance(event.error, Overloaded)
    assert value(engine, "coe_requests_in_flight") == 0
    assert value(engine, "coe_requests_running") == 0
    assert value(engine, "coe_requests_total", expert="a", outcome="cancelled") == 1
    assert engine.fake.generated("b") == 0


def test_a_request_cancelled_while_queued_frees_its_slot(make):
    engine = make(cache=COLD)
    request, events = submit(engine, "a")
    request.cancel()  # e.g. the HTTP client went away while it waited
    assert engine.step() is False
    assert engine.fake.generated("a") == 0
    assert value(engine, "coe_requests_in_flight") == 0


# ---- residency-aware routing in resolve --------------------------------------------------------

class OneCategory(Router):
    """Every prompt is 'math' with probability 0.9."""

    def __init__(self):
        super().__init__(("math", "code"), 0.25, "chat")

    def probabilities(self, texts):
        return [[0.9, 0.1] for _ in texts]


def routed_engine(make, tolerance: float) -> Engine:
    engine = make(cache=COLD, scheduler=SchedulerConfig(switch_tolerance=tolerance),
                  router=RouterConfig(default_expert="b"))
    table = ScoreTable.from_dict({"source": "test", "scores": {"math": {"a": 0.80, "b": 0.75},
                                                                "code": {"a": 0.5, "b": 0.6}}})
    engine.routing.router = ExpertRouter(OneCategory(), {"math": "a", "code": "b", "chat": "b"}, table=table)
    return engine


def test_resolve_serves_coe_from_a_hot_expert_within_the_switch_tolerance(make):
    engine = routed_engine(make, tolerance=0.1)
    assert engine.routing.resolve("coe", prompt="2+2")[0] == "a"  # nothing hot: the planned expert
    engine.cache.activate("b")
    expert, decision = engine.routing.resolve("coe", prompt="2+2")
    assert expert == "b" == decision.expert
    assert decision.planned_expert == "a" and decision.score_given_up == pytest.approx(0.05)
    assert value(engine, "coe_router_decisions_total", category="math", expert="b") == 1
    assert value(engine, "coe_router_decisions_total", category="math", expert="a") == 1


def test_resolve_with_zero_tolerance_keeps_the_planned_expert(make):
    engine = routed_engine(make, tolerance=0.0)
    engine.cache.activate("b")
    expert, decision = engine.routing.resolve("coe", prompt="2+2")
    assert expert == "a" and decision.planned_expert is None


# ---- continuous batching: joining the running batch --------------------------------------------

def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_a_request_for_the_running_expert_joins_its_batch_at_the_next_token(make):
    engine = make(backend=LetterBackend(runner_options={"a": {"delay_s": 0.01, "sequences": 4}}), cache=COLD)
    engine.start()
    first, first_events = submit(engine, "a", max_tokens=60)
    assert _wait_for(lambda: len(first_events) >= 3)  # a's batch is generating
    late, late_events = submit(engine, "a", max_tokens=3)
    assert _wait_for(lambda: finals(late_events))
    assert finals(late_events)[0].completion.text == "abc"
    assert not finals(first_events), "the late request waited for the running batch to finish"
    (runner,) = engine.fake.runners["a"]
    (decoder,) = runner.decoders  # one batch: the late request joined it
    assert decoder.added_at[0] == 0 and decoder.added_at[1] >= 3
    assert late.served_tier == "device" and late.switch_s == 0.0
    assert value(engine, "coe_requests_joined_total", expert="a") == 1
    assert _wait_for(lambda: finals(first_events))
    assert finals(first_events)[0].completion.completion_tokens == 60
    assert _wait_for(lambda: value(engine, "coe_requests_in_flight") == 0)
    assert value(engine, "coe_requests_running") == 0


def test_no_one_joins_while_another_experts_request_is_overdue(make):
    engine = make(backend=LetterBackend(runner_options={"a": {"delay_s": 0.01, "sequences": 4}}), cache=COLD,
                  scheduler=SchedulerConfig(max_wait_ms=0))
    engine.start()
    _, first_events = submit(engine, "a", max_tokens=40)
    assert _wait_for(lambda: len(first_events) >= 3)
    submit(engine, "b")  # overdue at once (max_wait 0)
    late, late_events = submit(engine, "a", max_tokens=3)
    assert _wait_for(lambda: finals(late_events))
    (runner, *_) = engine.fake.runners["a"]
    assert all(d.added_at[1:] == [] for d in runner.decoders)  # nobody joined a running batch
    assert value(engine, "coe_requests_joined_total", expert="a") == 0
    assert finals(first_events)  # a's first batch drained before the late request ran


@pytest.mark.parametrize("scheduler", [SchedulerConfig(join_running=False), SchedulerConfig(policy="fifo")])
def test_join_running_off_or_fifo_waits_for_the_batch(make, scheduler):
    engine = make(backend=LetterBackend(runner_options={"a": {"delay_s": 0.01, "sequences": 4}}), cache=COLD,
                  scheduler=scheduler)
    engine.start()
    _, first_events = submit(engine, "a", max_tokens=30)
    assert _wait_for(lambda: len(first_events) >= 3)
    late, late_events = submit(engine, "a", max_tokens=3)
    assert _wait_for(lambda: finals(late_events))
    assert finals(first_events)  # finished first: the late request ran in a batch of its own
    assert all(d.added_at[1:] == [] for d in engine.fake.runners["a"][0].decoders)


def test_a_joined_request_that_cannot_run_ends_with_its_error_and_the_batch_goes_on(make):
    engine = make(backend=LetterBackend(runner_options={"a": {"delay_s": 0.01, "sequences": 4}}), cache=COLD)
    engine.start()
    _, first_events = submit(engine, "a", max_tokens=40)
    assert _wait_for(lambda: len(first_events) >= 3)
    _, bad_events = submit(engine, "a", prompt="x" * 990, max_tokens=20)  # over the 1000-token context
    assert _wait_for(lambda: bad_events)
    assert bad_events[0].error is not None and bad_events[0].error.code == "context_length_exceeded"
    assert not finals(first_events)  # refused when it joined, while the batch ran on
    assert _wait_for(lambda: finals(first_events))
    assert finals(first_events)[0].completion.completion_tokens == 40


def serve_batch(engine) -> bool:
    """Step until the batch the first step took has ended (a step is one token); False when idle."""
    if not engine.step():
        return False
    while engine.running_expert is not None:
        engine.step()
    return True


# ---- tools: a routed request goes to an expert that can call them ---------------------------------


def test_a_routed_request_with_tools_goes_to_the_best_expert_that_can_call_them(make):
    from coe.types import Tools

    engine = routed_engine(make, tolerance=0.0)  # math -> a (0.80), b scores 0.75
    tools = Tools(({"name": "f", "parameters": {"type": "object"}},))
    engine.routing.tool_callers = frozenset({"b"})
    expert, decision = engine.routing.resolve("coe", prompt="2+2", tools=tools)
    assert expert == "b" == decision.expert and decision.planned_expert == "a"
    assert "offers tools and a cannot call them" in decision.reason
    assert engine.routing.resolve("coe", prompt="2+2", tools=Tools(tools.functions, "none"))[0] == "a"
    engine.routing.tool_callers = frozenset()
    expert, decision = engine.routing.resolve("coe", prompt="2+2", tools=tools)
    assert expert == "a" and "gets coe's tool prompt" in decision.reason
