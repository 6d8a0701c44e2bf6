"""Pure eviction decisions: no I/O, no torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    name: str
    num_bytes: int
    last_used_s: float
    pinned: bool = False


def choose_victims(resident: list[Resident], incoming_bytes: int, budget_bytes: int) -> list[str]:
    """Least recently used first, skipping pinned experts, until ``incoming_bytes`` fits.

    Returns the names to evict; raises ValueError if the incoming expert cannot fit at all.
    """
    used = sum(r.num_bytes for r in resident)
    if used + incoming_bytes <= budget_bytes:
        return []
    victims = []
    for candidate in sorted((r for r in resident if not r.pinned), key=lambda r: r.last_used_s):
        victims.append(candidate.name)
        used -= candidate.num_bytes
        if used + incoming_bytes <= budget_bytes:
            return victims
    raise ValueError(f"{incoming_bytes} bytes do not fit in a budget of {budget_bytes} bytes "
                     f"with {used} bytes pinned")
