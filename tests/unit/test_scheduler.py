"""The scheduler on scripted arrival sequences: no model, no clock (arrival times are given)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from coe.engine.scheduler import Batch, Scheduler
from coe.errors import Overloaded
from coe.types import Request


def req(expert: str, tag: str = "", at_s: float = 0.0) -> Request:
    return Request(expert=expert, prompt=tag or expert, arrival_s=at_s)


def fill(scheduler: Scheduler, script) -> list[Request]:
    requests = [req(expert, tag, float(i)) for i, (expert, tag) in enumerate(script)]
    for r in requests:
        scheduler.add(r)
    return requests


def drain_batches(scheduler: Scheduler, now_s: float = 0.0, resident=(), current=None) -> list[Batch]:
    """Every batch in order, each chosen with the previous batch's expert as the current one."""
    batches = []
    while (batch := scheduler.next_batch(now_s, resident, current)) is not None:
        batches.append(batch)
        current = batch.expert
    return batches


def drain(scheduler: Scheduler, now_s: float = 0.0, resident=(), current=None):
    return [(b.expert, [r.prompt for r in b.requests]) for b in drain_batches(scheduler, now_s, resident, current)]


SCRIPT = [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3"), ("b", "b2"), ("b", "b3")]


# -- fifo: the baseline --------------------------------------------------------------------------

def test_idle_scheduler_returns_none():
    scheduler = Scheduler()
    assert scheduler.next_batch(0.0) is None
    assert scheduler.peek_expert(0.0) is None
    assert len(scheduler) == 0


def test_fifo_order_with_contiguous_same_expert_batching():
    scheduler = Scheduler(max_batch_size=8, policy="fifo")
    fill(scheduler, SCRIPT)
    assert len(scheduler) == 6
    assert scheduler.queued_by_expert() == {"a": 3, "b": 3}
    assert drain(scheduler, 10.0) == [("a", ["a1", "a2"]), ("b", ["b1"]), ("a", ["a3"]), ("b", ["b2", "b3"])]
    assert len(scheduler) == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        Scheduler(policy="random")


# -- expert: fewer switches ----------------------------------------------------------------------

def test_expert_policy_serves_each_expert_once_when_nothing_is_overdue():
    scheduler = Scheduler(max_batch_size=8, max_wait_s=100.0)
    fill(scheduler, SCRIPT)
    assert drain(scheduler, 6.0) == [("a", ["a1", "a2", "a3"]), ("b", ["b1", "b2", "b3"])]


def test_expert_policy_stays_on_the_current_expert():
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, SCRIPT)
    batch = scheduler.next_batch(6.0, current="b")
    assert (batch.expert, batch.reason) == ("b", "current")


def test_expert_policy_prefers_a_resident_expert_over_a_longer_cold_queue():
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")])
    batch = scheduler.next_batch(4.0, resident=["b"])
    assert (batch.expert, batch.reason) == ("b", "resident")


def test_expert_policy_picks_the_longest_queue_when_nothing_is_resident():
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, [("b", "b1"), ("a", "a1"), ("a", "a2")])
    batch = scheduler.next_batch(3.0)
    assert (batch.expert, batch.reason) == ("a", "largest")


def test_an_overdue_request_goes_next_whatever_the_switch_costs():
    scheduler = Scheduler(max_wait_s=2.0)
    fill(scheduler, [("b", "b1"), ("a", "a1"), ("a", "a2")])  # b1 arrived at 0
    assert scheduler.next_batch(1.0, resident=["a"], current="a").expert == "a"  # b1 waited 1 s
    scheduler.add(req("a", "a3", 1.5))
    batch = scheduler.next_batch(2.5, resident=["a"], current="a")  # b1 waited 2.5 s
    assert (batch.expert, batch.reason) == ("b", "overdue")


def test_batches_are_capped_at_max_batch_size():
    scheduler = Scheduler(max_batch_size=2)
    fill(scheduler, [("a", f"a{i}") for i in range(5)])
    assert drain(scheduler) == [("a", ["a0", "a1"]), ("a", ["a2", "a3"]), ("a", ["a4"])]


def test_batch_is_a_plain_value():
    scheduler = Scheduler(policy="fifo")
    first = req("a")
    scheduler.add(first)
    assert scheduler.next_batch(0.0) == Batch("a", (first,), "fifo")


def test_peek_does_not_remove():
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, SCRIPT)
    assert scheduler.peek_expert(6.0, current="b") == "b"
    assert len(scheduler) == 6


# -- cancellation, admission, expiry -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fifo", "expert"])
def test_cancelled_requests_are_dropped_and_do_not_count(policy):
    scheduler = Scheduler(max_batch_size=2, policy=policy, max_wait_s=100.0)
    requests = fill(scheduler, [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2")])
    for i in (0, 2, 3):
        requests[i].cancel()
    assert drain(scheduler, 5.0) == [("a", ["a2"]), ("b", ["b2"])]
    assert len(scheduler) == 0


def test_all_cancelled_means_idle():
    scheduler = Scheduler()
    r = req("a")
    scheduler.add(r)
    r.cancel()
    assert scheduler.next_batch(0.0) is None
    assert len(scheduler) == 0


def test_max_queue_refuses_with_overloaded_and_a_retry_after():
    scheduler = Scheduler(max_queue=2, max_batch_size=1)
    fill(scheduler, [("a", "a1"), ("b", "b1")])
    scheduler.record_service(3.0)
    with pytest.raises(Overloaded, match="max_queue") as error:
        scheduler.add(req("c"))
    assert error.value.http_status == 429
    assert error.value.retry_after_s >= 2
    assert len(scheduler) == 2  # nothing lost, nothing added


def test_max_queue_per_expert_refuses_only_that_expert():
    scheduler = Scheduler(max_queue=10, max_queue_per_expert=2)
    fill(scheduler, [("a", "a1"), ("a", "a2")])
    with pytest.raises(Overloaded, match="for a"):
        scheduler.add(req("a", "a3"))
    scheduler.add(req("b", "b1"))
    assert scheduler.queued_by_expert() == {"a": 2, "b": 1}


def test_expired_removes_requests_waiting_past_the_timeout():
    scheduler = Scheduler()
    fill(scheduler, [("a", "a0"), ("b", "b1"), ("a", "a2")])
    gone = scheduler.expired(now_s=11.5, timeout_s=10.0)
    assert [r.prompt for r in gone] == ["a0", "b1"]
    assert len(scheduler) == 1


def test_drain_returns_everything():
    scheduler = Scheduler()
    fill(scheduler, SCRIPT)
    assert sorted(r.prompt for r in scheduler.drain()) == sorted(tag for _, tag in SCRIPT)
    assert len(scheduler) == 0 and scheduler.next_batch(0.0) is None


# -- the maximum-wait bound ----------------------------------------------------------------------

def simulate(arrivals, max_wait_s, switch_s, token_s, max_batch_size=4, policy="expert", join=False):
    """Serve scripted (time, expert) arrivals on a virtual clock: a batch costs a switch when its
    expert is not the one loaded, plus token_s per request. With ``join``, requests arriving while
    a batch runs may join it while fewer than max_batch_size are unfinished (each adds token_s,
    served one after another). Returns ({arrival index: wait}, the longest
    batch before any joins)."""
    scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=10_000, max_queue_per_expert=10_000,
                          max_wait_s=max_wait_s, policy=policy)
    pending = sorted(arrivals)
    now_s, loaded, waits, longest_s, i = 0.0, None, {}, 0.0, 0

    def arrive():
        nonlocal i
        scheduler.add(Request(expert=pending[i][1], prompt=str(i), arrival_s=pending[i][0]))
        i += 1

    def served(requests):
        waits.update((int(r.prompt), now_s - r.arrival_s) for r in requests)

    while i < len(pending) or len(scheduler):
        while i < len(pending) and pending[i][0] <= now_s:
            arrive()
        batch = scheduler.next_batch(now_s, resident=[loaded] if loaded else [], current=loaded)
        if batch is None:
            now_s = pending[i][0]
            continue
        service_s = (switch_s if batch.expert != loaded else 0.0) + token_s * len(batch.requests)
        served(batch.requests)
        end_s = now_s + service_s
        while join and i < len(pending) and pending[i][0] <= end_s:  # each arrival during the batch
            now_s = pending[i][0]
            arrive()
            in_flight = math.ceil((end_s - now_s) / token_s - 1e-9)  # requests not finished yet
            joined = scheduler.join(batch.expert, max_batch_size - in_flight, now_s)
            served(joined)
            end_s += token_s * len(joined)
        longest_s = max(longest_s, service_s)
        now_s = end_s
        loaded = batch.expert
    return waits, longest_s


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0.3, 3.0), min_size=1, max_size=60),
       experts=st.lists(st.sampled_from("abcdefgh"), min_size=60, max_size=60),
       max_wait_s=st.floats(0.0, 5.0))
def test_no_request_waits_longer_than_max_wait_plus_one_batch(gaps, experts, max_wait_s):
    """With capacity to spare (a batch takes at most 0.25 s; requests come >= 0.3 s apart), no
    request waits longer than max_wait plus the one batch in service when it became overdue."""
    times = [sum(gaps[:k + 1]) for k in range(len(gaps))]
    waits, longest_s = simulate(list(zip(times, experts)), max_wait_s, switch_s=0.2, token_s=0.05,
                                max_batch_size=1)
    assert max(waits.values()) <= max_wait_s + longest_s + 1e-9


@pytest.mark.parametrize("max_wait_s", [0.0, 0.5, 2.0])
def test_a_stream_joining_one_batch_cannot_starve_another_expert(max_wait_s):
    """Requests for a arrive every 0.04 s and each adds 0.05 s to a's running batch, so without
    the overdue rule that batch would run until the stream ends (after 12 s). b's one request
    waits at most max_wait plus a's batch as it was when it started (and the one join at the
    moment b became overdue)."""
    arrivals = [(0.04 * k, "a") for k in range(300)] + [(0.1, "b")]
    waits, _ = simulate(arrivals, max_wait_s, switch_s=0.2, token_s=0.05, max_batch_size=4, join=True)
    assert len(waits) == len(arrivals)
    b = sorted(arrivals).index((0.1, "b"))
    assert waits[b] <= max_wait_s + 0.2 + 4 * 0.05 + 0.05 + 1e-9


@settings(max_examples=200, deadline=None)
@given(script=st.lists(st.tuples(st.floats(0.0, 20.0), st.sampled_from("abcd")), min_size=1, max_size=40),
       now_s=st.floats(0.0, 30.0), resident=st.lists(st.sampled_from("abcd"), max_size=2),
       current=st.none() | st.sampled_from("abcd"))
def test_an_overdue_request_is_never_passed_over(script, now_s, resident, current):
    """Whenever some request has waited max_wait, the chosen batch holds the oldest request."""
    scheduler = Scheduler(max_wait_s=5.0, max_queue=1000, max_queue_per_expert=1000)
    requests = [Request(expert=e, prompt="p", arrival_s=t) for t, e in sorted(script)]
    for r in requests:
        scheduler.add(r)
    oldest = min(requests, key=lambda r: r.arrival_s)
    batch = scheduler.next_batch(now_s, resident, current)
    if now_s - oldest.arrival_s >= 5.0:
        assert oldest.arrival_s in [r.arrival_s for r in batch.requests]
        assert batch.reason == "overdue"


def test_expert_policy_switches_less_than_fifo_on_a_mixed_trace():
    arrivals = [(i * 0.01, "abcdefgh"[(i * 5) % 8]) for i in range(200)]
    def switches(policy):
        scheduler = Scheduler(max_batch_size=8, max_queue=1000, max_queue_per_expert=1000,
                              max_wait_s=10.0, policy=policy)
        for t, e in arrivals:
            scheduler.add(Request(expert=e, prompt="p", arrival_s=t))
        experts = [b.expert for b in drain_batches(scheduler, 2.0)]
        return sum(1 for x, y in zip(experts, experts[1:]) if x != y)
    assert switches("expert") <= 7 < switches("fifo")


# -- continuous batching: joining the running batch ----------------------------------------------

def test_join_takes_the_running_experts_waiting_requests_oldest_first():
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")])
    assert [r.prompt for r in scheduler.join("a", 2, now_s=5.0)] == ["a1", "a2"]
    assert len(scheduler) == 2
    assert [r.prompt for r in scheduler.join("a", 5, now_s=5.0)] == ["a3"]
    assert scheduler.join("a", 5, now_s=5.0) == () and scheduler.join("c", 1, now_s=5.0) == ()
    assert drain(scheduler) == [("b", ["b1"])]


def test_join_stops_while_another_expert_is_overdue_so_the_batch_drains():
    scheduler = Scheduler(max_wait_s=2.0)
    fill(scheduler, [("b", "b1"), ("a", "a1")])  # b1 arrived at 0 s, a1 at 1 s
    assert [r.prompt for r in scheduler.join("a", 1, now_s=1.5)] == ["a1"]
    scheduler.add(req("a", "a2", 1.8))
    assert scheduler.join("a", 1, now_s=2.0) == ()  # b1 has waited 2 s: a's batch takes no one younger
    assert drain(scheduler, now_s=2.0, current="a")[0] == ("b", ["b1"])


def test_under_overload_requests_older_than_the_overdue_one_still_join():
    """A backlog: a's queue holds requests from before and after b's overdue one. The older ones
    keep the running batch full; the younger wait until b has been served."""
    scheduler = Scheduler(max_wait_s=2.0)
    for tag, arrival_s in [("a1", 0.0), ("a2", 1.0), ("a3", 3.0)]:
        scheduler.add(req("a", tag, arrival_s))
    scheduler.add(req("b", "b1", 2.0))
    assert [r.prompt for r in scheduler.join("a", 4, now_s=10.0)] == ["a1", "a2"]
    assert scheduler.join("a", 4, now_s=10.0) == ()
    assert drain(scheduler, now_s=10.0, current="a") == [("b", ["b1"]), ("a", ["a3"])]


@pytest.mark.parametrize("count", [0, -1])
def test_join_with_no_room_or_under_fifo_takes_nothing(count):
    scheduler = Scheduler(max_wait_s=100.0)
    fill(scheduler, [("a", "a1")])
    assert scheduler.join("a", count, now_s=0.0) == ()
    fifo = Scheduler(policy="fifo")
    fill(fifo, [("a", "a1")])
    assert fifo.join("a", 4, now_s=0.0) == ()


def test_join_drops_cancelled_requests_for_the_caller_to_end():
    scheduler = Scheduler(max_wait_s=100.0)
    first, second = fill(scheduler, [("a", "a1"), ("a", "a2")])
    first.cancel()
    assert scheduler.join("a", 4, now_s=0.0) == (second,)
    assert scheduler.take_cancelled() == [first] and len(scheduler) == 0


def test_only_waiting_queues_are_kept_so_a_large_fleet_costs_what_is_waiting():
    scheduler = Scheduler(max_batch_size=8, max_queue=1000)
    for k in range(150):
        scheduler.add(Request(f"e{k}", prompt="x", arrival_s=float(k)))
    while scheduler.next_batch(1000.0) is not None:
        pass
    assert len(scheduler) == 0 and scheduler._queues == {}  # the walk per choice is over nothing
    scheduler.add(Request("e7", prompt="x", arrival_s=2000.0))
    scheduler.add(Request("e8", prompt="x", arrival_s=2000.0))
    scheduler.add(Request("e9", prompt="x", arrival_s=2000.0))
    scheduler.take_cancelled()
    assert sorted(r.expert for r in scheduler.drain()) == ["e7", "e8", "e9"]
    assert scheduler._queues == {}
    scheduler.add(Request("e1", prompt="x", arrival_s=0.0))
    assert [r.expert for r in scheduler.expired(100.0, 10.0)] == ["e1"] and scheduler._queues == {}
