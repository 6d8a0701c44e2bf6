"""Prefix caching for one llama.cpp context, as pure bookkeeping (no llama.cpp here).

A context has ``num_slots`` sequence ids ("slots"); a slot's KV cells hold the tokens at positions
0..n-1 of the last sequence decoded in it. A finished sequence's cells stay (the slot is idle), so
a later prompt that starts the same way (the chat template's system prompt, a conversation's
earlier turns, few-shot examples) starts from them: from its own slot, or copied into another.
The decoder asks for a ``SlotPlan``, applies it to the context (copy cells, drop the rest) and
reports what it decoded with ``record``; when the context needs room it drops ``victim`` slots.

Contract: not thread-safe (the engine thread alone uses a context); a busy slot is never planned
for a new sequence nor chosen as a victim; victims are the least recently used idle slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotPlan:
    """Where a new sequence decodes: in ``slot``, with its first ``reused`` prompt tokens taken
    from the cells of ``source`` (the same slot, or another one to copy from; None: nothing)."""

    slot: int
    source: int | None
    reused: int


class PrefixSlots:
    def __init__(self, num_slots: int, enabled: bool = True):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots, self.enabled = num_slots, enabled
        self._held: dict[int, list[int]] = {}  # slot -> tokens its cells hold, from position 0
        self._busy: set[int] = set()
        self._used_at: dict[int, int] = {}  # slot -> logical time of its last use
        self._clock = 0

    # -- reading ---------------------------------------------------------------------------------
    def held(self, slot: int) -> tuple[int, ...]:
        return tuple(self._held.get(slot, ()))

    @property
    def busy(self) -> frozenset[int]:
        return frozenset(self._busy)

    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if s not in self._busy]

    # -- a new sequence --------------------------------------------------------------------------
    def plan(
        self, prompt_ids: Sequence[int], usable: Callable[[int, int], bool] = lambda slot, n: True
    ) -> SlotPlan:
        """The slot for a new sequence and the longest cached prefix of its prompt it can reuse:
        never the whole prompt (its last token is evaluated for the first token's logits), and
        only where ``usable(slot, tokens)`` (a sliding-window cache may have dropped cells the rest
        of the prompt attends to). The prefix's own slot if it is free and the prompt continues
        all it holds (or no other slot is free); else an empty free slot, else the least recently
        used free one. Raises ValueError when every slot is busy."""
        free = self.free_slots()
        if not free:
            raise ValueError("every slot is busy")
        source, reused = self._longest_prefix(prompt_ids, usable)
        others = [s for s in free if s != source]
        extends = source is not None and reused == len(self._held[source])
        if source in free and (extends or not others):
            slot = source
        else:
            slot = min(others, key=lambda s: (s in self._held, self._used_at.get(s, 0)))
        return SlotPlan(slot, source if reused else None, reused)

    def start(self, plan: SlotPlan, prompt_ids: Sequence[int]) -> None:
        """The decoder applied ``plan``: its slot is busy and holds the reused prefix."""
        if plan.slot in self._busy:
            raise ValueError(f"slot {plan.slot} is busy")
        if plan.source is not None and plan.source != plan.slot:
            self._touch(plan.source)
        self._busy.add(plan.slot)
        self._held[plan.slot] = list(prompt_ids[: plan.reused])
        self._touch(plan.slot)

    def record(self, slot: int, position: int, tokens: Sequence[int]) -> None:
        """``tokens`` were decoded into ``slot`` from ``position`` on (what followed is gone)."""
        held = self._held.setdefault(slot, [])
        if position > len(held):
            raise ValueError(
                f"slot {slot} holds {len(held)} tokens; cannot record from position {position}"
            )
        del held[position:]
        held.extend(tokens)

    def finish(self, slot: int) -> None:
        """The sequence in ``slot`` ended; its cells stay for later prompts."""
        self._busy.discard(slot)

    # -- room ------------------------------------------------------------------------------------
    def victim(self, keep: frozenset[int] | set[int] = frozenset()) -> int | None:
        """The least recently used idle slot holding cells (not in ``keep``); None if none."""
        idle = [s for s in self._held if s not in self._busy and s not in keep]
        return min(idle, key=lambda s: self._used_at.get(s, 0)) if idle else None

    def drop(self, slot: int) -> bool:
        """Forget what ``slot`` holds; True if it held anything (the decoder frees its cells)."""
        return self._held.pop(slot, None) is not None

    def clear(self) -> None:
        """Every slot empty and idle (the context's cells were cleared)."""
        self._held.clear()
        self._busy.clear()

    # -- inside ----------------------------------------------------------------------------------
    def _longest_prefix(
        self, prompt_ids: Sequence[int], usable: Callable[[int, int], bool]
    ) -> tuple[int | None, int]:
        best, best_len = None, 0
        limit = len(prompt_ids) - 1
        for slot, held in self._held.items() if self.enabled else ():
            n = common_prefix(held, prompt_ids, limit)
            if n > best_len and usable(slot, n):
                best, best_len = slot, n
        return best, best_len

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._used_at[slot] = self._clock


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b[:limit]``."""
    n = 0
    for x, y in zip(a, b[: max(limit, 0)]):
        if x != y:
            break
        n += 1
    return n
