"""coe on Ray Serve (`coe serve --ray`): one ingress and a set of expert replicas.

- The **ingress** (one replica, no CPU reserved) is the single-process server: the same FastAPI
  app, router, auth, validation, headers and metrics. Its engine serves no weights itself: every
  local expert is a ``RayExpert``, whose requests stream from the expert replicas through a Serve
  handle; remote experts (``backend: remote``) are called from the ingress as usual.
- Each **expert replica** is a coe engine with its own three-tier cache (router off). Requests
  carry their expert as Serve's multiplexed model id, so Serve sends them to a replica that
  already holds the expert when there is one; the replica starts moving the expert to its device
  tier when it first sees it. Replicas are fixed (``ray.replicas``) or autoscaled
  (``ray.autoscaling``).

Events cross between the two as plain dicts (``to_wire`` / ``from_wire``), errors included, so a
replica's 4xx or 503 reaches the client exactly as the single-process server would answer it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from coe import errors
from coe.backends.offload import OffloadedExpert
from coe.cache import CacheSnapshot
from coe.config import CoEConfig, RouterConfig
from coe.errors import CoEError, ExpertUnavailable, GenerationError, MissingExtra
from coe.server.shapes import snapshot_from_json, snapshot_json
from coe.types import ChatMessage, Completion, Request, SamplingParams, StreamEvent, Tier

log = logging.getLogger("coe.distributed")

INGRESS_NAME, REPLICA_NAME, APP_NAME = "coe-ingress", "coe-experts", "coe"


def require_ray() -> None:
    """Ray Serve is installed. Nothing is imported: Ray reads its settings once, at import."""
    spec = importlib.util.find_spec("ray")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not any((Path(folder) / "serve" / "__init__.py").is_file() for folder in locations):
        raise MissingExtra("ray[serve]", "ray")


# ---- the wire format between ingress and replicas ------------------------------------------------


def request_to_wire(request: Request) -> dict:
    s = request.sampling
    return {
        "id": request.id,
        "prompt": request.prompt,
        "messages": None
        if request.messages is None
        else [[m.role, m.content] for m in request.messages],
        "sampling": {
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stop": list(s.stop),
            "seed": s.seed,
        },
    }


def request_from_wire(expert: str, wire: dict) -> Request:
    messages = (
        None if wire["messages"] is None else tuple(ChatMessage(r, c) for r, c in wire["messages"])
    )
    sampling = dict(wire["sampling"], stop=tuple(wire["sampling"]["stop"]))
    return Request(
        expert=expert,
        messages=messages,
        prompt=wire["prompt"],
        sampling=SamplingParams(**sampling),
        id=wire["id"],
    )


def event_to_wire(event: StreamEvent, request: Request) -> dict:
    """One event; every one says which replica ran it and where it found the expert (tier, switch time)."""
    wire: dict = {
        "tier": request.served_tier,
        "switch_s": request.switch_s,
        "replica": request.served_by,
    }
    if event.delta:
        wire["delta"] = event.delta
    if event.completion is not None:
        wire["completion"] = dataclasses.asdict(event.completion)
    if event.error is not None:
        error = (
            event.error if isinstance(event.error, CoEError) else GenerationError(str(event.error))
        )
        wire["error"] = {
            "class": type(error).__name__,
            "message": error.message,
            "param": error.param,
            "code": error.code,
            "retry_after_s": error.retry_after_s,
        }
    return wire


def event_from_wire(request: Request, wire: dict) -> StreamEvent:
    if wire.get("tier"):
        request.served_tier, request.switch_s = Tier(wire["tier"]), wire.get("switch_s") or 0.0
    request.served_by = wire.get("replica") or request.served_by
    completion = Completion(**wire["completion"]) if "completion" in wire else None
    error = error_from_wire(wire["error"]) if "error" in wire else None
    return StreamEvent(request.id, delta=wire.get("delta", ""), completion=completion, error=error)


def error_from_wire(wire: dict) -> CoEError:
    cls = getattr(errors, wire["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, CoEError)):
        cls = GenerationError
    error = cls(wire["message"], param=wire.get("param"), retry_after_s=wire.get("retry_after_s"))
    if wire.get("code"):
        error.code = wire["code"]
    return error


# ---- what the replicas hold: reported to a registry, merged for the ingress ---------------------

REGISTRY_NAME, REGISTRY_NAMESPACE = "coe-replica-registry", "coe"
REPORT_EVERY_S = 2.0  # a replica sends its cache snapshot this often
REPORT_MAX_AGE_S = 10.0  # older reports (a replica gone) are left out
_STATE_RANK = {"hot": 3, "warm": 2, "ready": 1}


class ReplicaRegistry:
    """A Ray actor holding each expert replica's latest cache snapshot."""

    def __init__(self):
        self._reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, snapshot: dict) -> None:
        self._reports[replica_id] = (time.time(), snapshot)

    def snapshots(self, max_age_s: float = REPORT_MAX_AGE_S) -> dict[str, dict]:
        now = time.time()
        return {rid: snap for rid, (at, snap) in self._reports.items() if now - at <= max_age_s}


def merge_snapshots(snapshots: dict[str, dict]) -> dict:
    """The replicas' caches as one `GET /v1/experts` snapshot: budgets, bytes and counters summed;
    each expert in the best state any replica holds it in, with the state per replica."""
    merged: dict = {
        "policy": None,
        "device_kind": None,
        "replicas": sorted(snapshots),
        "tiers": {},
        "reusable_buffer_bytes": 0,
        "stats": {},
        "experts": [],
    }
    experts: dict[str, dict] = {}
    for replica_id, snap in sorted(snapshots.items()):
        merged["policy"], merged["device_kind"] = snap["policy"], snap["device_kind"]
        merged["reusable_buffer_bytes"] += snap.get("reusable_buffer_bytes", 0)
        for tier, room in snap["tiers"].items():
            total = merged["tiers"].setdefault(tier, {"budget_bytes": 0, "used_bytes": 0})
            total["budget_bytes"] += room["budget_bytes"]
            total["used_bytes"] += room["used_bytes"]
        _add_counts(merged["stats"], snap["stats"])
        for expert in snap["experts"]:
            row = experts.setdefault(
                expert["name"],
                {
                    **expert,
                    "host_bytes": 0,
                    "device_bytes": 0,
                    "requests": 0,
                    "pinned": False,
                    "replicas": {},
                },
            )
            if _STATE_RANK.get(expert["state"], 0) > _STATE_RANK.get(row["state"], 0):
                row.update(state=expert["state"], tier=expert["tier"])
            for key in ("host_bytes", "device_bytes", "requests"):
                row[key] += expert[key] or 0
            row["pinned"] = row["pinned"] or expert["pinned"]
            row["replicas"][replica_id] = expert["state"]
    merged["experts"] = list(experts.values())
    return merged


def _add_counts(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class ReplicaView:
    """The ingress's view of the replicas' caches, read from the registry at most once a second."""

    def __init__(self, fallback: Callable[[], CacheSnapshot], refresh_s: float = 1.0):
        self._fallback, self._refresh_s = fallback, refresh_s
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._snapshot: CacheSnapshot | None = None

    def __call__(self) -> CacheSnapshot:
        with self._lock:
            snapshot = self._snapshot
            if snapshot is None or time.monotonic() - self._read_at > self._refresh_s:
                snapshot = self._snapshot = self._read()
                self._read_at = time.monotonic()
            return snapshot

    def _read(self) -> CacheSnapshot:
        import ray

        snapshots: dict[str, dict] = {}
        try:
            registry = ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
            snapshots = dict(ray.get(registry.snapshots.remote(), timeout=5))
        except Exception as exc:  # noqa: BLE001 - no replica reported yet, or Ray is shutting down
            log.debug("no replica snapshots: %s", exc)
        return snapshot_from_json(merge_snapshots(snapshots)) if snapshots else self._fallback()


# ---- the expert replica --------------------------------------------------------------------------


def replica_config(config: CoEConfig) -> CoEConfig:
    """What one replica serves: the local experts, no router (the ingress routes)."""
    local = tuple(e for e in config.experts if not e.is_remote)
    return dataclasses.replace(config, experts=local, router=RouterConfig(enabled=False))


class ExpertReplica:
    """A coe engine with its own tier cache, serving any local expert it is asked for."""

    def __init__(self, config: CoEConfig, home: str):
        from coe.engine import Engine

        self.engine = Engine.from_config(replica_config(config), home)
        self.engine.start()
        self.replica_id = _replica_id()
        self._reporting = threading.Event()
        threading.Thread(target=self._report_loop, name="coe-replica-report", daemon=True).start()

    def _report_loop(self) -> None:
        """Send this replica's cache snapshot to the registry every REPORT_EVERY_S."""
        import ray

        registry = None
        while not self._reporting.wait(REPORT_EVERY_S):
            try:
                registry = registry or ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
                registry.report.remote(self.replica_id, snapshot_json(self.engine.views.snapshot()))
            except Exception as exc:  # noqa: BLE001 - the registry is not up (yet); try again later
                registry = None
                log.debug("replica report failed: %s", exc)

    async def hold(self, expert: str) -> str:
        """Serve calls this once per expert new to this replica (through ``serve.multiplexed``):
        start moving it to the device tier. A load failure is left to the engine, which answers
        the request with the right error."""
        try:
            await asyncio.wrap_future(self.engine.cache.prefetch(expert, Tier.DEVICE))
        except Exception as exc:  # noqa: BLE001 - reported by the request itself
            log.warning("replica could not preload %s: %s", expert, exc)
        return expert

    async def generate(self, wire: dict) -> AsyncIterator[dict]:
        from ray import serve

        expert = await self.hold_multiplexed(serve.get_multiplexed_model_id())  # type: ignore[attr-defined]
        request = request_from_wire(expert, wire)
        request.served_by = self.replica_id
        loop, events = asyncio.get_running_loop(), asyncio.Queue[StreamEvent]()

        def sink(event: StreamEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        request.sink = sink
        try:
            self.engine.submit(request)
        except CoEError as exc:
            yield event_to_wire(StreamEvent(request.id, error=exc), request)
            return
        try:
            while True:
                event = await events.get()
                yield event_to_wire(event, request)
                if event.is_final:
                    return
        finally:
            request.cancel("cancelled")  # the ingress went away: stop at the next token

    def __del__(self):
        reporting = getattr(self, "_reporting", None)
        if reporting is not None:
            reporting.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests): the process
        import os

        return f"pid-{os.getpid()}"


def replica_class(max_experts: int):
    """ExpertReplica with Serve's multiplexing for up to ``max_experts`` experts per replica."""
    from ray import serve

    class MultiplexedExpertReplica(ExpertReplica):
        @serve.multiplexed(max_num_models_per_replica=max_experts)
        async def hold_multiplexed(self, expert: str) -> str:
            return await self.hold(expert)

    MultiplexedExpertReplica.__name__ = MultiplexedExpertReplica.__qualname__ = "ExpertReplica"
    return MultiplexedExpertReplica


# ---- the ingress side ----------------------------------------------------------------------------


class RayExpert(OffloadedExpert):
    """A local expert served by the expert replicas, seen from the ingress."""

    kind = "ray"

    def __init__(self, name: str, handle, num_params: int | None, max_concurrency: int):
        super().__init__(name, num_params, max_concurrency)
        self._handle = handle.options(multiplexed_model_id=name, stream=True)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        responses = self._handle.generate.remote(request_to_wire(request))
        started = False
        try:
            for wire in responses:
                event = event_from_wire(request, wire)
                if not started and isinstance(event.error, ExpertUnavailable):
                    raise event.error  # nothing sent yet: the engine may reroute the request
                started = True
                yield event
                if event.is_final:
                    return
                if request.cancelled:
                    yield StreamEvent(request.id, completion=Completion("", "cancelled", 0, 0))
                    return
        except CoEError:
            raise
        except Exception as exc:  # the replica died or Ray failed
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if not started:
                raise ExpertUnavailable(
                    f"{self.name}: the Ray Serve replica failed ({reason})"
                ) from None
            yield StreamEvent(
                request.id,
                error=GenerationError(
                    f"{self.name}: the Ray Serve replica failed mid-stream ({reason})"
                ),
            )
        finally:
            responses.cancel()


class Ingress:
    """The OpenAI-compatible API (the single-process server's app) over the expert replicas."""

    def __init__(self, config: CoEConfig, home: str, replicas):
        from coe.engine import Engine

        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, pins=()))
        per_expert = config.ray.max_ongoing_requests * _max_replicas(config)
        offloaded = {
            e.name: RayExpert(e.name, replicas, None, per_expert)
            for e in config.experts
            if not e.is_remote
        }
        # the ingress's cache only reads the experts' headers (sizes for the map); it loads nothing
        self.engine = Engine.from_config(config, home, offloaded=offloaded)
        for state in self.engine.cache.states():
            offloaded[state.name].num_params = state.num_params
        self.engine.views.cache_view = ReplicaView(
            self.engine.cache.snapshot
        )  # tiers live in the replicas

    def __serve_build_asgi_app__(self):
        from coe.server import create_app

        return create_app(self.engine)


def _max_replicas(config: CoEConfig) -> int:
    scaling = config.ray.autoscaling or {}
    return int(scaling.get("max_replicas", config.ray.replicas))


def build_app(config: CoEConfig, home: str | Path):
    """The Serve application: the ingress bound to the expert replicas."""
    from ray import serve

    ray_config = config.ray
    scaling = None
    if ray_config.autoscaling is not None:
        scaling = {
            "min_replicas": ray_config.autoscaling.get("min_replicas", 1),
            "initial_replicas": ray_config.replicas,
            "max_replicas": _max_replicas(config),
            "target_ongoing_requests": ray_config.autoscaling.get("target_ongoing_requests", 2),
        }
    replicas = serve.deployment(
        replica_class(ray_config.max_experts_per_replica),
        name=REPLICA_NAME,
        num_replicas=None if scaling else ray_config.replicas,
        autoscaling_config=scaling,
        max_ongoing_requests=ray_config.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": ray_config.cpus_per_replica,
            "num_gpus": ray_config.gpus_per_replica,
        },
    ).bind(config, str(home))  # type: ignore[attr-defined]  # serve.deployment(cls) is a Deployment
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name=INGRESS_NAME,
        num_replicas=1,
        max_ongoing_requests=max(1000, config.scheduler.max_queue),
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(config, str(home), replicas)  # type: ignore[attr-defined]


def serve_on_ray(
    config: CoEConfig,
    home: str | Path,
    host: str,
    port: int,
    address: str | None,
    stop: threading.Event | None = None,
) -> None:
    """Deploy on a Ray cluster (``address``; None starts a local one) and block until SIGINT/SIGTERM
    (or ``stop``); then take the application down."""
    require_ray()
    if address:
        check_reachable(address)
        attach_auth_token()  # before Ray is imported: it reads the mode once
    import ray
    from ray import serve

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        ray.remote(ReplicaRegistry).options(  # detached: it outlives whichever process asked first
            name=REGISTRY_NAME,
            namespace=REGISTRY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
        ).remote()
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config, home), name=APP_NAME, route_prefix="/", blocking=False)
        stop = stop or threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(
            f"coe on Ray Serve: {_replica_summary(config)} on http://{host}:{port}/v1", flush=True
        )
        stop.wait()
    finally:
        try:
            if address:  # a cluster we joined keeps running without our application
                serve.delete(APP_NAME)
                ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE))
        finally:
            ray.shutdown()  # a local cluster goes with us


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when nothing listens at ``address`` (HOST:PORT or
    ray://HOST:PORT); Ray itself would retry for minutes. "auto" is left to Ray."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise CoEError(
            f"--address {address}: no Ray head answers there ({exc.strerror or exc}); start one "
            f"with `ray start --head --port {port}`, or leave --address out for a local cluster"
        ) from None


def attach_auth_token(environ=os.environ) -> None:
    """Send this machine's Ray token when joining a cluster. `ray start --head` turns token
    authentication on when ~/.ray/auth_token exists, but `ray.init(address=...)` attaches the token
    only with RAY_AUTH_MODE=token (Ray 2.59-2.60); a cluster without authentication ignores it."""
    if "RAY_AUTH_MODE" in environ:
        return
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        environ["RAY_AUTH_MODE"] = "token"


def _replica_summary(config: CoEConfig) -> str:
    ray_config = config.ray
    count = (
        f"{ray_config.autoscaling.get('min_replicas', 1)}-{_max_replicas(config)} autoscaled"
        if ray_config.autoscaling
        else str(ray_config.replicas)
    )
    return (
        f"{count} expert replicas of {len([e for e in config.experts if not e.is_remote])} experts"
    )
