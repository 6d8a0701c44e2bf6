"""`coe top`: reading a /metrics exposition (from a real EngineMetrics on fake backends), quantiles
from histogram buckets, the rendered screen, and the CLI against a server that is (not) there."""
from __future__ import annotations

import math

import pytest

from fakes import fake_engine, serve_text

from coe.cli import main
from coe.config import CacheConfig, SchedulerConfig
from coe.server.top import histogram_quantile, label_values, read_samples, render, total
from coe.types import Request, SamplingParams


@pytest.fixture
def engine(tmp_path):
    engine = fake_engine(tmp_path, cache=CacheConfig(prefetch="none"), scheduler=SchedulerConfig(lookahead="none"))
    yield engine
    engine.stop()


def serve(engine, expert, max_tokens):
    engine.submit(Request(expert, SamplingParams(max_tokens=max_tokens), prompt="hi"))
    while engine.step():
        pass


def exposition(engine) -> str:
    return engine.metrics.exposition().decode("utf-8")


def busy(engine) -> str:
    """a: two completed (2 + 3 tokens); b: one completed (4 tokens) and one still queued."""
    serve(engine, "a", 2)
    serve(engine, "a", 3)
    serve(engine, "b", 4)
    engine.submit(Request("b", SamplingParams(max_tokens=1), prompt="later"))
    return exposition(engine)


def test_read_samples_keys_by_name_and_sorted_labels(engine):
    samples = read_samples(busy(engine))
    assert samples[("coe_requests_total", (("expert", "a"), ("outcome", "completed")))] == 2
    assert samples[("coe_requests_in_flight", ())] == 1
    assert samples[("coe_queue_depth", (("expert", "b"),))] == 1
    assert samples[("coe_time_to_first_token_seconds_bucket", (("expert", "a"), ("le", "+Inf")))] == 2
    assert total(samples, "coe_tokens_total", kind="completion") == 9
    assert total(samples, "coe_tokens_total", expert="a", kind="completion") == 5
    assert total(samples, "coe_tokens_total", expert="nobody") == 0
    assert label_values(samples, "coe_requests_total", "expert") == ["a", "b"]


def test_render_shows_totals_and_one_row_per_expert(engine):
    screen = render(read_samples(busy(engine)), None, 0.0)
    lines = screen.splitlines()
    assert lines[0].startswith("in flight 1   running 0   waiting 1   switches 1")
    assert "lookups device/host/disk 1/0/2" in lines[0]
    assert lines[0].endswith("0.0 tok/s")  # no earlier screen: no rate yet
    assert lines[2].split() == ["expert", "tier", "queue", "done", "errors", "429", "tok/s", "ttft", "p50"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"a", "b"}
    assert rows["a"][1:6] == ["device", "0", "2", "0", "0"]
    assert rows["b"][1:6] == ["device", "1", "1", "0", "0"]
    assert rows["a"][7].startswith("<=") and rows["a"][7].endswith("s")


def test_render_rates_come_from_the_previous_screen(engine):
    before = read_samples(busy(engine))
    serve(engine, "a", 6)  # also serves the queued b request (1 token)
    screen = render(read_samples(exposition(engine)), before, 2.0)
    lines = screen.splitlines()
    assert lines[0].endswith("3.5 tok/s")  # 7 tokens in 2 s
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["a"][6] == "3.0" and rows["b"][6] == "0.5"
    assert rows["b"][2] == "0"  # the queue is empty now


def test_render_of_an_idle_server_has_no_rows():
    lines = render({}, None, 0.0).splitlines()
    assert lines[0].startswith("in flight 0   running 0   waiting 0")
    assert len(lines) == 3


def buckets(expert: str, cumulative: dict[str, float]) -> dict:
    return {("h_bucket", (("expert", expert), ("le", le))): count for le, count in cumulative.items()}


KNOWN = buckets("a", {"0.1": 2, "0.5": 5, "1.0": 9, "+Inf": 10})


@pytest.mark.parametrize("q, expected", [(0.1, 0.1), (0.2, 0.1), (0.21, 0.5), (0.5, 0.5), (0.9, 1.0),
                                         (0.95, math.inf), (1.0, math.inf)])
def test_histogram_quantile_is_the_upper_bound_of_the_bucket_it_falls_in(q, expected):
    assert histogram_quantile(KNOWN, "h", q) == expected


def test_histogram_quantile_filters_and_merges_label_sets():
    samples = {**KNOWN, **buckets("b", {"0.1": 10, "0.5": 10, "1.0": 10, "+Inf": 10})}
    assert histogram_quantile(samples, "h", 0.5, expert="a") == 0.5
    assert histogram_quantile(samples, "h", 0.5, expert="b") == 0.1
    assert histogram_quantile(samples, "h", 0.6) == 0.1  # 12 of 20 at <= 0.1
    assert histogram_quantile(samples, "h", 0.7) == 0.5  # 15 of 20 at <= 0.5
    assert histogram_quantile(samples, "h", 0.5, expert="c") is None
    assert histogram_quantile(buckets("a", {"0.1": 0, "+Inf": 0}), "h", 0.5) is None
    assert histogram_quantile({}, "h", 0.5) is None


def test_histogram_quantile_of_a_real_exposition(engine):
    samples = read_samples(busy(engine))
    p50 = histogram_quantile(samples, "coe_time_to_first_token_seconds", 0.5, expert="a")
    bounds = {float(dict(labels)["le"]) for name, labels in samples if name == "coe_time_to_first_token_seconds_bucket"}
    assert p50 in bounds


# ---- the command ---------------------------------------------------------------------------------



def test_top_once_without_a_server_is_a_clear_error(capsys):
    assert main(["top", "--once", "--url", "http://127.0.0.1:1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("coe: error: --url: cannot read http://127.0.0.1:1/metrics")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_top_once_prints_one_screen(engine, capsys):
    server = serve_text("/metrics", busy(engine), "text/plain; version=0.0.4")
    try:
        for url in (f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{server.server_port}/v1"):
            assert main(["top", "--once", "--url", url]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].startswith("in flight 1")
            assert [line.split()[0] for line in lines[3:]] == ["a", "b"]
    finally:
        server.shutdown()
