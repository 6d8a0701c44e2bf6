"""Read-only views of the fleet for the server, the console and the metrics: every expert's state
and the tiers' snapshot, local and offloaded experts together, in config order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from coe.backends.offload import OffloadedExpert
from coe.cache import CacheSnapshot, ExpertState, ModelCache
from coe.config import CoEConfig
from coe.types import Tier


class FleetViews:
    """Contract: safe from any thread. ``cache_view`` is where the tiers are read from: this
    process's cache, unless the weights live in other processes that report theirs (the Ray
    Serve ingress sets the replicas' merged view)."""

    def __init__(self, config: CoEConfig, cache: ModelCache, offloaded: dict[str, OffloadedExpert]):
        self.config, self.cache, self.offloaded = config, cache, offloaded
        self.cache_view: Callable[[], CacheSnapshot] = cache.snapshot

    def expert_states(self) -> list[ExpertState]:
        """Every expert: the cache's view of local ones, offloaded ones in tier remote."""
        return [self.state_of(e.name) for e in self.config.experts]

    def state_of(self, name: str) -> ExpertState:
        remote = self.offloaded.get(name)
        if remote is None:
            return self.cache.state_of(name)
        return ExpertState(
            name,
            remote.kind,
            Tier.REMOTE,
            "ready",
            None,
            remote.num_params,
            requests=remote.requests,
        )

    def snapshot(self) -> CacheSnapshot:
        """The tiers' snapshot (``cache_view``) listing every expert, offloaded ones included."""
        view = self.cache_view()
        held = {state.name: state for state in view.experts}
        return replace(
            view, experts=[held.get(e.name) or self.state_of(e.name) for e in self.config.experts]
        )
