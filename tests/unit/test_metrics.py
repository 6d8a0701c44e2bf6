"""EngineMetrics through an engine on fake backends: what GET /metrics exposes, parsed back with
prometheus_client's own text parser."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes import fake_engine

from coe.config import CacheConfig, SchedulerConfig
from coe.engine.metrics import EngineMetrics
from coe.types import Request, SamplingParams


@pytest.fixture
def engine(tmp_path):
    engine = fake_engine(tmp_path, cache=CacheConfig(prefetch="none"), scheduler=SchedulerConfig(lookahead="none"))
    yield engine
    engine.stop()


def scrape(engine) -> dict:
    """{(sample name, frozenset of label items): value} from the exposition text."""
    text = engine.metrics.exposition().decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def serve(engine, expert="a", prompt="hey", max_tokens=3, cancel_after=None):
    """One request, served on this thread; its events. ``cancel_after``: cancel it after that many events."""
    events = []

    def sink(event):
        events.append(event)
        if len(events) == cancel_after:
            request.cancel()

    request = Request(expert, SamplingParams(max_tokens=max_tokens, temperature=0.0), prompt=prompt, sink=sink)
    engine.submit(request)
    while engine.step():
        pass
    assert events and events[-1].is_final
    return events


def test_completed_requests_tokens_and_latencies(engine):
    max_tokens = [1, 2, 3, 5]
    for n in max_tokens:
        assert serve(engine, max_tokens=n)[-1].completion.finish_reason == "length"
    samples = scrape(engine)
    assert get(samples, "coe_requests_total", expert="a", outcome="completed") == len(max_tokens)
    assert get(samples, "coe_requests_total", expert="a", outcome="error") is None
    assert get(samples, "coe_tokens_total", expert="a", kind="completion") == sum(max_tokens)
    assert get(samples, "coe_tokens_total", expert="a", kind="prompt") == len("hey") * len(max_tokens)
    assert get(samples, "coe_time_to_first_token_seconds_count", expert="a") == len(max_tokens)
    assert get(samples, "coe_request_latency_seconds_count", expert="a") == len(max_tokens)
    assert get(samples, "coe_time_to_first_token_seconds_bucket", expert="a", le="+Inf") == len(max_tokens)
    assert get(samples, "coe_requests_in_flight") == 0
    assert get(samples, "coe_requests_running") == 0
    assert get(samples, "coe_batch_size_count") == len(max_tokens)  # stream() serves one request per batch
    assert get(samples, "coe_batches_total", tier="disk") == 1
    assert get(samples, "coe_batches_total", tier="device") == len(max_tokens) - 1
    # the cache's counters, read at scrape time
    assert get(samples, "coe_cache_lookups_total", tier="disk") == 1
    assert get(samples, "coe_cache_lookups_total", tier="device") == len(max_tokens) - 1
    assert get(samples, "coe_cache_moved_bytes_total", move="disk->host") > 0
    assert get(samples, "coe_expert_tier", expert="a", tier="device") == 1
    assert get(samples, "coe_expert_tier", expert="b", tier="disk") == 1
    assert get(samples, "coe_cache_used_bytes", tier="host") > 0


def test_a_request_cancelled_mid_generation_counts_as_cancelled(engine):
    events = serve(engine, max_tokens=50, cancel_after=2)
    assert events[-1].completion.finish_reason == "cancelled"
    samples = scrape(engine)
    assert get(samples, "coe_requests_total", expert="a", outcome="cancelled") == 1
    assert get(samples, "coe_requests_total", expert="a", outcome="completed") is None
    assert get(samples, "coe_tokens_total", expert="a", kind="completion") == events[-1].completion.completion_tokens
    assert get(samples, "coe_requests_in_flight") == 0


def test_queue_depth_per_expert_while_requests_wait(engine):
    for expert in ("a", "a", "b"):
        engine.submit(Request(expert, SamplingParams(max_tokens=1), prompt="x"))
    samples = scrape(engine)
    assert get(samples, "coe_queue_depth", expert="a") == 2
    assert get(samples, "coe_queue_depth", expert="b") == 1
    assert get(samples, "coe_requests_in_flight") == 3
    assert get(samples, "coe_time_to_first_token_seconds_count", expert="a") is None  # nothing ran yet
    while engine.step():
        pass
    samples = scrape(engine)
    assert not [key for key in samples if key[0] == "coe_queue_depth"]
    assert get(samples, "coe_requests_in_flight") == 0
    assert get(samples, "coe_requests_total", expert="a", outcome="completed") == 2
    assert get(samples, "coe_requests_total", expert="b", outcome="completed") == 1


def test_every_engine_has_its_own_registry(engine, tmp_path):
    serve(engine)
    other = fake_engine(tmp_path / "other")
    try:
        assert get(scrape(other), "coe_requests_total", expert="a", outcome="completed") is None
        assert get(scrape(engine), "coe_requests_total", expert="a", outcome="completed") == 1
    finally:
        other.stop()


def test_observe_counts_the_first_token_and_the_end_once():
    from coe.types import Completion, StreamEvent

    metrics = EngineMetrics()
    seen = []
    request = Request("a", prompt="x")
    sink = metrics.observe(request, seen.append)
    assert metrics.registry.get_sample_value("coe_requests_in_flight") == 1
    sink(StreamEvent(request.id, delta="a"))
    sink(StreamEvent(request.id, delta="b"))
    sink(StreamEvent(request.id, completion=Completion("ab", "length", 1, 2)))
    assert [e.delta for e in seen] == ["a", "b", ""]  # every event passes through
    assert metrics.registry.get_sample_value("coe_requests_in_flight") == 0
    assert metrics.registry.get_sample_value("coe_time_to_first_token_seconds_count", {"expert": "a"}) == 1
    assert metrics.registry.get_sample_value("coe_request_latency_seconds_count", {"expert": "a"}) == 1
    assert metrics.registry.get_sample_value("coe_requests_total", {"expert": "a", "outcome": "completed"}) == 1
    assert metrics.registry.get_sample_value("coe_tokens_total", {"expert": "a", "kind": "completion"}) == 2
