"""The llama.cpp prefix-slot bookkeeping (coe.backends.prefix_cache), property-tested against a
plain model of what each slot's cells hold."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coe.backends.prefix_cache import PrefixSlots, SlotPlan, common_prefix

NUM_SLOTS = 3
prompts = st.lists(st.integers(0, 3), min_size=1, max_size=8)  # a small alphabet: prefixes are shared


def brute_longest(held: dict[int, list[int]], prompt: list[int]) -> int:
    return max((common_prefix(h, prompt, len(prompt) - 1) for h in held.values()), default=0)


class SlotMachine(RuleBasedStateMachine):
    """Drives PrefixSlots the way the llama.cpp decoder does and checks it against ``cells``:
    what the decoder really put in each slot's KV cells."""

    def __init__(self):
        super().__init__()
        self.slots = PrefixSlots(NUM_SLOTS)
        self.cells: dict[int, list[int]] = {}
        self.running: dict[int, list[int]] = {}  # busy slot -> its sequence's tokens so far
        self.last_use: dict[int, int] = {}
        self.clock = 0

    def _use(self, slot: int) -> None:
        self.clock += 1
        self.last_use[slot] = self.clock

    @precondition(lambda self: len(self.running) < NUM_SLOTS)
    @rule(prompt=prompts)
    def start(self, prompt):
        plan = self.slots.plan(prompt)
        assert plan.slot not in self.running, "a busy slot was handed out"
        assert plan.reused == brute_longest(self.cells, prompt), "the longest cached prefix did not win"
        assert plan.reused < len(prompt)
        if plan.reused:
            assert self.cells[plan.source][:plan.reused] == prompt[:plan.reused]
            self._use(plan.source)
        self.cells[plan.slot] = list(prompt[:plan.reused]) + list(prompt[plan.reused:])  # copy, then prefill
        self.slots.start(plan, prompt)
        self.slots.record(plan.slot, plan.reused, prompt[plan.reused:])
        self._use(plan.slot)
        self.running[plan.slot] = list(prompt)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 3))
    def decode(self, data, token):
        slot = data.draw(st.sampled_from(sorted(self.running)))
        position = len(self.running[slot])
        self.slots.record(slot, position, [token])
        self.cells[slot].append(token)
        self.running[slot].append(token)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        slot = data.draw(st.sampled_from(sorted(self.running)))
        self.slots.finish(slot)
        del self.running[slot]

    @rule()
    def evict(self):
        victim = self.slots.victim()
        idle = [s for s in self.cells if s not in self.running]
        if not idle:
            assert victim is None
            return
        assert victim not in self.running, "a busy slot was evicted"
        assert victim == min(idle, key=lambda s: self.last_use.get(s, 0)), "eviction is not LRU among idle slots"
        assert self.slots.drop(victim)
        del self.cells[victim]

    @invariant()
    def recorded_tokens_match_the_cells(self):
        for slot in range(NUM_SLOTS):
            assert list(self.slots.held(slot)) == self.cells.get(slot, [])
        assert self.slots.busy == frozenset(self.running)


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


@given(st.lists(prompts, min_size=1, max_size=NUM_SLOTS), prompts)
def test_a_window_that_dropped_cells_is_not_reused(earlier, prompt):
    slots = PrefixSlots(NUM_SLOTS)
    for i, tokens in enumerate(earlier):
        slots.start(SlotPlan(i, None, 0), tokens)
        slots.record(i, 0, tokens)
        slots.finish(i)
    plan = slots.plan(prompt, usable=lambda slot, n: False)
    assert plan.reused == 0 and plan.source is None


def test_a_prompt_that_continues_a_slot_stays_in_it_and_others_copy():
    slots = PrefixSlots(2)
    slots.start(slots.plan([1, 2, 3]), [1, 2, 3])
    slots.record(0, 0, [1, 2, 3])
    slots.finish(0)
    follow_up = slots.plan([1, 2, 3, 4, 5])
    assert follow_up == SlotPlan(0, 0, 3)  # extends all the slot holds: decode in place
    sibling = slots.plan([1, 2, 9])
    assert sibling == SlotPlan(1, 0, 2)  # shares a prefix only: copy into the empty slot


def test_every_slot_busy_is_refused_and_disabled_caching_reuses_nothing():
    slots = PrefixSlots(1, enabled=False)
    slots.start(slots.plan([1, 2]), [1, 2])
    with pytest.raises(ValueError):
        slots.plan([1, 2, 3])
    slots.record(0, 0, [1, 2])
    slots.finish(0)
    assert slots.plan([1, 2, 3]) == SlotPlan(0, None, 0)
