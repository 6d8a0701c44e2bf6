"""The JSON shapes of coe's own views (`GET /v1/experts`, `/health`, the console, the Ray Serve
replicas' reports): written and read here only."""

from __future__ import annotations

from dataclasses import asdict

from coe.cache import CacheSnapshot, CacheStats, ExpertState, TierUsage
from coe.engine.health import HealthState
from coe.types import Tier

_STATE_WORDS = {Tier.DEVICE: "hot", Tier.HOST: "warm", Tier.REMOTE: "remote"}


def state_word(state: ExpertState) -> str:
    """The `state` field clients read: hot, warm or remote, else the source's availability on disk."""
    return _STATE_WORDS.get(state.tier, state.availability)


def expert_json(state: ExpertState) -> dict:
    shape: dict[str, object] = {
        "name": state.name,
        "backend": state.backend,
        "tier": str(state.tier),
        "state": state_word(state),
        "weight_bytes": state.num_bytes,
        "num_params": state.num_params,
        "host_bytes": state.host_bytes,
        "device_bytes": state.device_bytes,
        "pinned": state.pinned,
        "requests": state.requests,
        "read_s": state.read_s,
        "file_read_s": state.file_read_s,
        "materialize_s": state.materialize_s,
        "crashes": state.crashes,
        "restarts": state.restarts,
        "worker_pid": state.worker_pid,
    }
    if state.base is not None:  # a profile: its base holds the weights in the tiers
        shape["base"] = state.base
        shape["adapter_bytes"] = state.adapter_bytes
    if state.replicas:
        shape["replicas"] = dict(state.replicas)
    return shape


def expert_from_json(row: dict) -> ExpertState:
    tier = Tier(row["tier"])
    return ExpertState(
        row["name"],
        row["backend"],
        tier,
        row["state"] if tier == Tier.DISK else "ready",
        row.get("weight_bytes"),
        row.get("num_params"),
        row.get("read_s"),
        row.get("materialize_s"),
        row.get("host_bytes", 0),
        row.get("device_bytes", 0),
        row.get("pinned", False),
        row.get("requests", 0),
        row.get("file_read_s"),
        tuple(row.get("replicas", {}).items()),
        row.get("base"),
        row.get("adapter_bytes", 0),
        row.get("crashes", 0),
        row.get("restarts", 0),
        row.get("worker_pid"),
    )


def stats_json(stats: CacheStats) -> dict:
    return {
        "activations": stats.activations,
        "hits": stats.hits,
        "warm_hits": stats.warm_hits,
        "misses": stats.misses,
        "switches": stats.switches,
        "prefetches": stats.prefetches,
        "idle_unloads": stats.idle_unloads,
        "evictions": {str(tier): count for tier, count in stats.evictions.items()},
        "bytes_moved": dict(stats.bytes_moved),
        "seconds_moving": {k: round(v, 6) for k, v in stats.seconds_moving.items()},
    }


def stats_from_json(row: dict) -> CacheStats:
    return CacheStats(
        activations=row.get("activations", 0),
        hits=row.get("hits", 0),
        warm_hits=row.get("warm_hits", 0),
        misses=row.get("misses", 0),
        switches=row.get("switches", 0),
        prefetches=row.get("prefetches", 0),
        idle_unloads=row.get("idle_unloads", 0),
        evictions={Tier(t): n for t, n in row.get("evictions", {}).items()},
        bytes_moved=dict(row.get("bytes_moved", {})),
        seconds_moving=dict(row.get("seconds_moving", {})),
    )


def snapshot_json(snapshot: CacheSnapshot) -> dict:
    shape: dict[str, object] = {
        "policy": snapshot.policy,
        "frequency_half_life": snapshot.frequency_half_life,
        "device_kind": snapshot.device_kind,
        "tiers": {
            str(tier): {"budget_bytes": room.budget_bytes, "used_bytes": room.used_bytes}
            for tier, room in snapshot.tiers.items()
        },
        "reusable_buffer_bytes": snapshot.reusable_buffer_bytes,
        "stats": stats_json(snapshot.stats),
        "experts": [expert_json(state) for state in snapshot.experts],
    }
    if snapshot.replicas:
        shape["replicas"] = list(snapshot.replicas)
    return shape


def snapshot_from_json(shape: dict) -> CacheSnapshot:
    return CacheSnapshot(
        policy=shape.get("policy") or "",
        frequency_half_life=shape.get("frequency_half_life"),
        device_kind=shape.get("device_kind") or "",
        tiers={
            Tier(t): TierUsage(r["budget_bytes"], r["used_bytes"])
            for t, r in shape.get("tiers", {}).items()
        },
        reusable_buffer_bytes=shape.get("reusable_buffer_bytes", 0),
        stats=stats_from_json(shape.get("stats", {})),
        experts=[expert_from_json(row) for row in shape.get("experts", [])],
        replicas=tuple(shape.get("replicas", ())),
    )


def health_json(state: HealthState) -> dict:
    return {**asdict(state), "retry_after_s": round(state.retry_after_s, 1)}
