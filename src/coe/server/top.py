"""`coe top`: a terminal view of a running server's GET /metrics (what Prometheus would scrape).

Pure functions over the exposition text, so the view is tested without a terminal:
``read_samples(text)`` -> {(name, labels): value}; ``render(now, before, interval_s)`` -> str.
"""

from __future__ import annotations

import math

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    """Sum of ``name`` over every label set that agrees with ``match``."""
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == name and all(dict(labels).get(k) == v for k, v in match.items())
    )


def label_values(samples: Samples, name: str, label: str) -> list[str]:
    return sorted(
        {
            dict(labels)[label]
            for sample, labels in samples
            if sample == name and label in dict(labels)
        }
    )


def histogram_quantile(samples: Samples, name: str, q: float, **match: str) -> float | None:
    """The q-quantile from cumulative buckets (upper bound of the bucket it falls in), None if empty."""
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in samples.items()
        if sample == name + "_bucket" and all(dict(labels).get(k) == v for k, v in match.items())
    )
    merged: dict[float, float] = {}
    for bound, value in buckets:
        merged[bound] = merged.get(bound, 0.0) + value
    count = merged.get(math.inf, 0.0)
    if count <= 0:
        return None
    for bound in sorted(merged):
        if merged[bound] >= q * count:
            return bound
    return None


def render(now: Samples, before: Samples | None, interval_s: float) -> str:
    """One screen: totals, then one row per expert."""

    def rate(name: str, **match: str) -> float:
        if before is None or interval_s <= 0:
            return 0.0
        return max(0.0, total(now, name, **match) - total(before, name, **match)) / interval_s

    lines = [
        f"in flight {total(now, 'coe_requests_in_flight'):.0f}   running {total(now, 'coe_requests_running'):.0f}"
        f"   waiting {total(now, 'coe_queue_depth'):.0f}   switches {total(now, 'coe_cache_switches_total'):.0f}"
        f"   lookups device/host/disk {total(now, 'coe_cache_lookups_total', tier='device'):.0f}/"
        f"{total(now, 'coe_cache_lookups_total', tier='host'):.0f}/"
        f"{total(now, 'coe_cache_lookups_total', tier='disk'):.0f}"
        f"   {rate('coe_tokens_total', kind='completion'):.1f} tok/s",
        "",
    ]
    header = f"{'expert':28}{'tier':>8}{'queue':>7}{'done':>7}{'errors':>8}{'429':>6}{'tok/s':>8}{'ttft p50':>10}"
    lines.append(header)
    experts = sorted(
        set(label_values(now, "coe_expert_tier", "expert"))
        | set(label_values(now, "coe_requests_total", "expert"))
    )
    for expert in experts:
        tier = next(
            (
                dict(labels)["tier"]
                for (name, labels), value in now.items()
                if name == "coe_expert_tier" and dict(labels).get("expert") == expert and value
            ),
            "-",
        )
        p50 = histogram_quantile(now, "coe_time_to_first_token_seconds", 0.5, expert=expert)
        lines.append(
            f"{expert[:27]:28}{tier:>8}{total(now, 'coe_queue_depth', expert=expert):>7.0f}"
            f"{total(now, 'coe_requests_total', expert=expert, outcome='completed'):>7.0f}"
            f"{total(now, 'coe_requests_total', expert=expert, outcome='error'):>8.0f}"
            f"{total(now, 'coe_requests_total', expert=expert, outcome='rejected'):>6.0f}"
            f"{rate('coe_tokens_total', expert=expert, kind='completion'):>8.1f}"
            f"{'-' if p50 is None else f'<={p50:g}s':>10}"
        )
    return "\n".join(lines)
