"""Prometheus metrics of one engine: requests, tokens, queues, latencies, switches, cache tiers
and router decisions. The engine records; the server renders ``exposition()`` at GET /metrics.

Each engine has its own registry, so several engines (tests, benches) never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from coe.cache import CacheSnapshot
from coe.types import Request, StreamEvent, Tier

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "coe_requests",
            "Requests that ended, by expert and outcome "
            "(completed, cancelled, error, timeout, rejected)",
            ["expert", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "coe_tokens",
            "Tokens processed, by expert and kind (prompt, completion; prompt_cached: prompt tokens "
            "served from cached KV cells)",
            ["expert", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "coe_requests_in_flight",
            "Requests admitted and not yet ended (queued or generating): the server's slots in use",
            registry=r,
        )
        self.running = Gauge(
            "coe_requests_running", "Requests in the batch generating now", registry=r
        )
        self.ttft = Histogram(
            "coe_time_to_first_token_seconds",
            "Arrival to first token",
            ["expert"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.latency = Histogram(
            "coe_request_latency_seconds",
            "Arrival to last event",
            ["expert"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.switch = Histogram(
            "coe_switch_seconds",
            "Time to make a batch's expert ready, by the tier it was found in",
            ["tier"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "coe_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.step_sequences = Histogram(
            "coe_step_sequences",
            "Sequences decoded together in one forward pass (profiles of one base share it)",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.joined = Counter(
            "coe_requests_joined",
            "Requests that joined a batch already generating (continuous batching)",
            ["expert"],
            registry=r,
        )
        self.decisions = Counter(
            "coe_router_decisions",
            "Model 'coe' routing decisions",
            ["category", "expert"],
            registry=r,
        )
        self.served_from = Counter(
            "coe_batches",
            "Batches served, by the tier their expert was found in (device = no switch)",
            ["tier"],
            registry=r,
        )

    def watch(
        self, read_queues: Callable[[], dict[str, int]], read_cache: Callable[[], CacheSnapshot]
    ) -> None:
        """Queue depths and cache counters are read when scraped, from their owners."""
        self.registry.register(_ScrapeTime(read_queues, read_cache))

    def observe(
        self, request: Request, sink: Callable[[StreamEvent], None]
    ) -> Callable[[StreamEvent], None]:
        """Wrap a request's sink so its first token, end, outcome and tokens are counted once."""
        self.in_flight.inc()
        first = [True]

        def observed(event: StreamEvent) -> None:
            now_s = time.monotonic()
            if first[0] and (event.delta or event.completion is not None):
                first[0] = False
                self.ttft.labels(request.expert).observe(now_s - request.arrival_s)
            if event.is_final:
                self._end(request, event, now_s)
            sink(event)

        return observed

    def _end(self, request: Request, event: StreamEvent, now_s: float) -> None:
        self.in_flight.dec()
        self.latency.labels(request.expert).observe(now_s - request.arrival_s)
        if event.completion is not None:
            cancelled = event.completion.finish_reason == "cancelled"
            outcome = (request.cancel_reason or "cancelled") if cancelled else "completed"
            self.tokens.labels(request.expert, "prompt").inc(event.completion.prompt_tokens)
            self.tokens.labels(request.expert, "completion").inc(event.completion.completion_tokens)
            self.tokens.labels(request.expert, "prompt_cached").inc(event.completion.cached_tokens)
        else:
            outcome = (
                "timeout" if getattr(event.error, "code", None) == "request_timeout" else "error"
            )
        self.requests.labels(request.expert, outcome).inc()

    def rejected(self, expert: str) -> None:
        self.requests.labels(expert, "rejected").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeTime:
    """Gauges and counters owned elsewhere (scheduler queues, the cache's counters)."""

    def __init__(
        self, read_queues: Callable[[], dict[str, int]], read_cache: Callable[[], CacheSnapshot]
    ):
        self.read_queues, self.read_cache = read_queues, read_cache

    def collect(self):
        waiting = GaugeMetricFamily(
            "coe_queue_depth", "Requests waiting, by expert", labels=["expert"]
        )
        for expert, depth in self.read_queues().items():
            waiting.add_metric([expert], depth)
        yield waiting
        snapshot = self.read_cache()
        stats = snapshot.stats
        yield _counter(
            "coe_cache_switches", "Activations of a different expert than the last", stats.switches
        )
        lookups = CounterMetricFamily(
            "coe_cache_lookups",
            "Activations by where the expert was found (device hit, host = warm hit, disk = miss)",
            labels=["tier"],
        )
        for tier, count in (
            (Tier.DEVICE, stats.hits),
            (Tier.HOST, stats.warm_hits),
            (Tier.DISK, stats.misses),
        ):
            lookups.add_metric([tier], count)
        yield lookups
        moved = CounterMetricFamily(
            "coe_cache_moved_bytes", "Bytes moved between tiers", labels=["move"]
        )
        for move, num_bytes in stats.bytes_moved.items():
            moved.add_metric([move], num_bytes)
        yield moved
        evictions = CounterMetricFamily(
            "coe_cache_evictions", "Experts evicted, by tier", labels=["tier"]
        )
        for tier, count in stats.evictions.items():
            evictions.add_metric([tier], count)
        yield evictions
        used = GaugeMetricFamily("coe_cache_used_bytes", "Bytes held per tier", labels=["tier"])
        budget = GaugeMetricFamily("coe_cache_budget_bytes", "Budget per tier", labels=["tier"])
        for tier, room in snapshot.tiers.items():
            used.add_metric([tier], room.used_bytes)
            budget.add_metric([tier], room.budget_bytes)
        yield used
        yield budget
        tiers = GaugeMetricFamily(
            "coe_expert_tier", "1 for the tier each expert is in now", labels=["expert", "tier"]
        )
        for expert in snapshot.experts:
            tiers.add_metric([expert.name, expert.tier], 1)
        yield tiers
        crashes = CounterMetricFamily(
            "coe_expert_crashes",
            "Worker processes of isolated experts that died (params.isolate)",
            labels=["expert"],
        )
        restarts = CounterMetricFamily(
            "coe_expert_restarts",
            "Worker processes of isolated experts started again after a crash",
            labels=["expert"],
        )
        for expert in snapshot.experts:
            crashes.add_metric([expert.name], expert.crashes)
            restarts.add_metric([expert.name], expert.restarts)
        yield crashes
        yield restarts


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
