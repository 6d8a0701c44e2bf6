"""The Ray Serve pieces that need no Ray: the wire format between ingress and replicas, the
ingress-side RayExpert over a scripted handle, the replica's config, and the `ray` config section.
The real counterpart is tests/integration/test_ray_real.py (a local Ray cluster, 2 replicas)."""
from __future__ import annotations

import pytest

from coe.config import CoEConfig, ExpertConfig, RayConfig, RouterConfig, from_dict
from coe.distributed import ray_serve
from coe.errors import ConfigError, ContextLengthExceeded, ExpertUnavailable, GenerationError, Overloaded
from coe.types import ChatMessage, Completion, Request, SamplingParams, StreamEvent


def test_a_request_crosses_the_wire_intact():
    request = Request(expert="x", messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
                      sampling=SamplingParams(max_tokens=9, temperature=0.2, top_p=0.9, stop=("\n",), seed=4))
    back = ray_serve.request_from_wire("x", ray_serve.request_to_wire(request))
    assert (back.id, back.messages, back.sampling, back.prompt) == (request.id, request.messages,
                                                                      request.sampling, None)
    prompt = Request(expert="x", prompt="1+1=")
    assert ray_serve.request_from_wire("x", ray_serve.request_to_wire(prompt)).prompt == "1+1="


def test_events_and_errors_keep_their_class_status_and_retry_after():
    served = Request(expert="x", prompt="p", served_tier="host", switch_s=0.25, served_by="replica-1")
    ingress_side = Request(expert="x", prompt="p", id=served.id)
    wire = ray_serve.event_to_wire(StreamEvent(served.id, completion=Completion("hi", "stop", 3, 1)), served)
    event = ray_serve.event_from_wire(ingress_side, wire)
    assert event.completion == Completion("hi", "stop", 3, 1)
    assert (ingress_side.served_tier, ingress_side.switch_s, ingress_side.served_by) == ("host", 0.25, "replica-1")
    for error in (ContextLengthExceeded("too long", param="max_tokens"), Overloaded("full", retry_after_s=7.0),
                  ExpertUnavailable("down", retry_after_s=5.0)):
        back = ray_serve.event_from_wire(ingress_side, ray_serve.event_to_wire(StreamEvent(served.id, error=error),
                                                                                served)).error
        assert type(back) is type(error) and back.message == error.message
        assert (back.http_status, back.code, back.param, back.retry_after_s) == (
            error.http_status, error.code, error.param, error.retry_after_s)
    stranger = ray_serve.error_from_wire({"class": "KeyError", "message": "boom"})
    assert isinstance(stranger, GenerationError)


class ScriptedResponses:
    def __init__(self, items):
        self.items, self.cancelled = items, False

    def __iter__(self):
        for item in self.items:
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self):
        self.cancelled = True


class ScriptedHandle:
    """Stands in for a Serve DeploymentHandle: answers generate.remote with the next script."""

    def __init__(self, *scripts):
        self.scripts, self.options_seen, self.sent, self.responses = list(scripts), {}, [], []
        self.generate = self

    def options(self, **options):
        self.options_seen = options
        return self

    def remote(self, wire):
        self.sent.append(wire)
        self.responses.append(ScriptedResponses(self.scripts.pop(0)))
        return self.responses[-1]


def wire_of(request, *events):
    return [ray_serve.event_to_wire(e, request) for e in events]


def test_ray_expert_streams_with_the_expert_as_multiplexed_model_id():
    served = Request(expert="a", prompt="Hi", served_tier="device", served_by="r1")
    handle = ScriptedHandle(wire_of(served, StreamEvent(served.id, delta="He"), StreamEvent(served.id, delta="y"),
                                    StreamEvent(served.id, completion=Completion("Hey", "stop", 2, 2))))
    expert = ray_serve.RayExpert("a", handle, 135_000_000, 8)
    request = Request(expert="a", prompt="Hi", id=served.id)
    events = list(expert.stream(request))
    assert [e.delta for e in events[:2]] == ["He", "y"] and events[-1].completion.text == "Hey"
    assert handle.options_seen == {"multiplexed_model_id": "a", "stream": True}
    assert request.served_by == "r1" and handle.sent[0]["prompt"] == "Hi"


def test_ray_expert_failures_before_and_after_the_first_token():
    request = Request(expert="a", prompt="Hi")
    dead = ScriptedHandle([RuntimeError("ActorDiedError: the replica died")])
    with pytest.raises(ExpertUnavailable, match="Ray Serve replica failed"):
        list(ray_serve.RayExpert("a", dead, None, 8).stream(request))
    unavailable = ScriptedHandle(wire_of(request, StreamEvent(request.id, error=ExpertUnavailable("a: corrupt"))))
    with pytest.raises(ExpertUnavailable, match="corrupt"):  # raised, so the ingress can reroute
        list(ray_serve.RayExpert("a", unavailable, None, 8).stream(request))
    midway = ScriptedHandle(wire_of(request, StreamEvent(request.id, delta="x")) + [RuntimeError("lost")])
    events = list(ray_serve.RayExpert("a", midway, None, 8).stream(request))
    assert events[0].delta == "x" and "mid-stream" in events[-1].error.message
    assert midway.responses[0].cancelled


def test_a_cancelled_request_stops_the_replica_stream():
    request = Request(expert="a", prompt="Hi")
    handle = ScriptedHandle(wire_of(request, *[StreamEvent(request.id, delta="t")] * 5))
    events = []
    for event in ray_serve.RayExpert("a", handle, None, 8).stream(request):
        events.append(event)
        request.cancel()
    assert len(events) == 2 and events[-1].completion.finish_reason == "cancelled"
    assert handle.responses[0].cancelled


def test_a_replica_serves_the_local_experts_without_a_router():
    config = CoEConfig(experts=(ExpertConfig("a", "/a.gguf"),
                                ExpertConfig("far", "http://h:1", backend="remote", params={"num_params": "7B"})),
                       router=RouterConfig(default_expert="a", pins={"code": "far"}))
    replica = ray_serve.replica_config(config)
    assert [e.name for e in replica.experts] == ["a"] and replica.router.enabled is False


def test_the_ray_section_is_validated():
    assert RayConfig().replicas == 2
    with pytest.raises(ConfigError, match="ray.replicas: expected an integer > 0"):
        from_dict({"experts": [{"name": "a", "source": "/a"}], "ray": {"replicas": 0}})
    with pytest.raises(ConfigError, match="ray.autoscaling.max_replica: unknown field"):
        from_dict({"experts": [{"name": "a", "source": "/a"}], "ray": {"autoscaling": {"max_replica": 3}}})
    scaled = from_dict({"experts": [{"name": "a", "source": "/a"}],
                        "ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    assert ray_serve._max_replicas(scaled) == 4


def snapshot_of(states: dict[str, tuple[str, int, int]], switches: int) -> dict:
    """A replica's cache snapshot: expert -> (state, host_bytes, device_bytes)."""
    tiers = {"device": "hot", "host": "warm"}
    return {"policy": "lrfu", "device_kind": "cpu", "reusable_buffer_bytes": 5,
            "tiers": {"device": {"budget_bytes": 100, "used_bytes": sum(d for _, _, d in states.values())},
                      "host": {"budget_bytes": 200, "used_bytes": sum(h for _, h, _ in states.values())}},
            "stats": {"switches": switches, "hits": 1, "warm_hits": 0, "misses": 1,
                      "evictions": {"device": 1, "host": 0}, "bytes_moved": {"disk->host": 10}},
            "experts": [{"name": n, "backend": "llama_cpp", "state": st, "tier": {v: k for k, v in tiers.items()}.get(st, "disk"),
                         "weight_bytes": 10, "num_params": 7, "host_bytes": h, "device_bytes": d, "pinned": False,
                         "requests": 2, "read_s": None, "materialize_s": None} for n, (st, h, d) in states.items()]}


def test_the_replicas_caches_merge_into_one_snapshot():
    merged = ray_serve.merge_snapshots({
        "r1": snapshot_of({"a": ("hot", 10, 3), "b": ("ready", 0, 0)}, switches=4),
        "r2": snapshot_of({"a": ("warm", 10, 0), "b": ("hot", 10, 4)}, switches=1)})
    assert merged["replicas"] == ["r1", "r2"] and merged["policy"] == "lrfu"
    assert merged["tiers"]["device"] == {"budget_bytes": 200, "used_bytes": 7}
    assert merged["stats"] == {"switches": 5, "hits": 2, "warm_hits": 0, "misses": 2,
                               "evictions": {"device": 2, "host": 0}, "bytes_moved": {"disk->host": 20}}
    experts = {e["name"]: e for e in merged["experts"]}
    assert experts["a"]["state"] == "hot" and experts["a"]["tier"] == "device" and experts["a"]["host_bytes"] == 20
    assert experts["a"]["replicas"] == {"r1": "hot", "r2": "warm"} and experts["b"]["replicas"]["r2"] == "hot"
    assert experts["b"]["requests"] == 4 and merged["reusable_buffer_bytes"] == 10


def test_an_engine_shows_the_tiers_of_its_cache_view_with_offloaded_experts(tmp_path):
    import httpx

    from fakes import fake_engine

    from coe.server.shapes import snapshot_from_json, snapshot_json

    engine = fake_engine(tmp_path, names=("a", "b"), remote={"far": lambda request: httpx.Response(500)})
    assert [e.tier for e in engine.views.snapshot().experts] == ["disk", "disk", "remote"]
    engine.views.cache_view = lambda: snapshot_from_json(snapshot_of({"a": ("hot", 10, 3)}, switches=2))
    snapshot = snapshot_json(engine.views.snapshot())
    assert [e["name"] for e in snapshot["experts"]] == ["a", "b", "far"]
    assert [e["tier"] for e in snapshot["experts"]] == ["device", "disk", "remote"]
    assert snapshot["stats"]["switches"] == 2
    assert "coe_cache_switches_total 2.0" in engine.metrics.exposition().decode()


def test_an_address_with_no_ray_head_fails_fast_with_a_clear_message():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from coe.errors import CoEError

    with pytest.raises(CoEError, match=f"--address 127.0.0.1:{port}: no Ray head answers there"):
        ray_serve.check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    ray_serve.check_reachable("auto")  # left to Ray


def test_joining_a_cluster_attaches_the_token_when_one_is_there(tmp_path):
    token = tmp_path / "auth_token"
    environ = {"RAY_AUTH_TOKEN_PATH": str(token)}
    ray_serve.attach_auth_token(environ)
    assert "RAY_AUTH_MODE" not in environ  # no token: nothing to send
    token.write_text("secret")
    ray_serve.attach_auth_token(environ)
    assert environ["RAY_AUTH_MODE"] == "token"
    chosen = {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}
    ray_serve.attach_auth_token(chosen)
    assert chosen["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands


def test_checking_for_ray_does_not_import_it():
    """Ray reads RAY_AUTH_MODE once, at import: coe must not import it before setting the mode."""
    import subprocess
    import sys

    code = ("import sys; from coe.distributed.ray_serve import require_ray\n"
            "try:\n    require_ray()\nexcept Exception:\n    pass\nprint('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
