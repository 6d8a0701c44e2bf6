import pytest

from coe.engine.scheduler import Batch, FifoScheduler
from coe.errors import Overloaded
from coe.types import Request


def req(expert: str, tag: str = "") -> Request:
    return Request(expert=expert, prompt=tag or expert)


def drain(scheduler: FifoScheduler) -> list[tuple[str, list[str]]]:
    batches = []
    while (batch := scheduler.next_batch()) is not None:
        batches.append((batch.expert, [r.prompt for r in batch.requests]))
    return batches


def test_idle_scheduler_returns_none():
    scheduler = FifoScheduler()
    assert scheduler.next_batch() is None
    assert len(scheduler) == 0


def test_fifo_order_with_contiguous_same_expert_batching():
    scheduler = FifoScheduler(max_batch_size=8)
    for expert, tag in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3"), ("b", "b2"), ("b", "b3")]:
        scheduler.add(req(expert, tag))
    assert len(scheduler) == 6
    assert scheduler.queued_by_expert() == {"a": 3, "b": 3}
    assert drain(scheduler) == [("a", ["a1", "a2"]), ("b", ["b1"]), ("a", ["a3"]), ("b", ["b2", "b3"])]
    assert len(scheduler) == 0


def test_batches_are_capped_at_max_batch_size():
    scheduler = FifoScheduler(max_batch_size=2)
    for i in range(5):
        scheduler.add(req("a", f"a{i}"))
    assert drain(scheduler) == [("a", ["a0", "a1"]), ("a", ["a2", "a3"]), ("a", ["a4"])]


def test_batch_is_a_plain_value():
    scheduler = FifoScheduler()
    first = req("a")
    scheduler.add(first)
    assert scheduler.next_batch() == Batch("a", (first,))


def test_cancelled_requests_are_dropped():
    scheduler = FifoScheduler(max_batch_size=8)
    requests = [req("a", "a1"), req("a", "a2"), req("a", "a3"), req("b", "b1"), req("b", "b2")]
    for r in requests:
        scheduler.add(r)
    requests[0].cancel()  # at the head
    requests[2].cancel()  # inside a batch
    requests[3].cancel()  # head of the next batch
    assert drain(scheduler) == [("a", ["a2"]), ("b", ["b2"])]


def test_all_cancelled_means_idle():
    scheduler = FifoScheduler()
    r = req("a")
    scheduler.add(r)
    r.cancel()
    assert scheduler.next_batch() is None
    assert len(scheduler) == 0


def test_cancelled_requests_do_not_count_against_the_batch_size():
    scheduler = FifoScheduler(max_batch_size=2)
    requests = [req("a", f"a{i}") for i in range(4)]
    for r in requests:
        scheduler.add(r)
    requests[1].cancel()
    # a1 is popped while filling the batch but not served; the cap counts served requests
    assert drain(scheduler) == [("a", ["a0", "a2"]), ("a", ["a3"])]


def test_max_queue_refuses_with_overloaded():
    scheduler = FifoScheduler(max_queue=2)
    scheduler.add(req("a"))
    scheduler.add(req("b"))
    with pytest.raises(Overloaded, match="max_queue") as info:
        scheduler.add(req("a"))
    assert info.value.http_status == 429
    assert len(scheduler) == 2
    scheduler.next_batch()
    scheduler.add(req("c"))  # room again after a batch left
    assert len(scheduler) == 2
