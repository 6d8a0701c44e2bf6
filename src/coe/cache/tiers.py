"""Byte budgets of the host and device tiers, and who holds how much of each.

A TierRoom is plain bookkeeping: ``hold`` refuses any change that would take it over budget, so the
invariant "no tier exceeds its budget" is checked at every move, not assumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coe.errors import CacheFull
from coe.types import Tier

# Defaults when the config leaves a budget out, as shares of memory available at start-up.
HOST_SHARE = 0.5  # host tier: warm experts (and, on CPU, the hot ones' weights as well)
DEVICE_SHARE_CPU = 0.25  # device tier on CPU: runtimes (llama.cpp contexts, torch buffers)
DEVICE_SHARE_CUDA = 0.9  # device tier on CUDA: free device memory


class TierRoom:
    """The bytes of one tier and who holds them. Contract: not thread-safe on its own; the cache
    calls it under its state lock."""

    def __init__(self, name: Tier, budget_bytes: int):
        self.name = name
        self.budget_bytes = budget_bytes
        self._held: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._held.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def __contains__(self, key: str) -> bool:
        return key in self._held

    def keys(self) -> list[str]:
        return list(self._held)

    def hold(self, key: str, num_bytes: int) -> None:
        """Set what ``key`` holds; raises CacheFull (and changes nothing) if that breaks the budget."""
        after = self.used_bytes - self.held(key) + num_bytes
        if after > self.budget_bytes:
            raise CacheFull(
                f"{key} needs {num_bytes} bytes of the {self.name} tier; {self.used_bytes - self.held(key)} "
                f"of {self.budget_bytes} bytes are held by others (cache.{self.name}_bytes)"
            )
        self._held[key] = num_bytes

    def drop(self, key: str) -> int:
        return self._held.pop(key, 0)


@dataclass(frozen=True)
class Budgets:
    device_bytes: int
    host_bytes: int
    device_kind: str  # cpu | cuda


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo; physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def cuda_free_bytes() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def resolve_budgets(device_bytes: int | None, host_bytes: int | None, uses_cuda: bool) -> Budgets:
    """The configured budgets, with defaults derived from this machine's free memory."""
    cuda_free = cuda_free_bytes() if uses_cuda else None
    available = available_memory_bytes() if device_bytes is None or host_bytes is None else 0
    if device_bytes is None:
        device_bytes = (
            int(cuda_free * DEVICE_SHARE_CUDA) if cuda_free else int(available * DEVICE_SHARE_CPU)
        )
    if host_bytes is None:
        host_bytes = int(available * HOST_SHARE)
    return Budgets(device_bytes, host_bytes, "cuda" if cuda_free else "cpu")
