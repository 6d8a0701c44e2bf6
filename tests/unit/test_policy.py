import pytest

from coe.types import CachePolicy
from coe.cache.policy import AUTO_HALF_LIVES, Candidate, Eviction, Popularity, choose_victims, decay, priority

GB = 10**9


def lru(name, num_bytes, last_used_s, pinned=False) -> Candidate:
    return Candidate(name, num_bytes, priority("lru", clock=0.0, recency=last_used_s, frequency=1, reload_s=1.0,
                                               num_bytes=num_bytes), pinned=pinned)


def test_nothing_evicted_when_it_fits():
    resident = [lru("a", 40, 1.0), lru("b", 40, 2.0)]
    assert choose_victims(resident, 20, free_bytes=20) == Eviction((), 0.0)
    assert choose_victims([], 100, free_bytes=100, clock=3.5) == Eviction((), 3.5)
    assert choose_victims([], 0, free_bytes=0).victims == ()


def test_lru_priority_is_the_time_of_last_use():
    assert priority("lru", clock=99.0, recency=12.5, frequency=7, reload_s=3.0, num_bytes=GB) == 12.5


def test_least_recently_used_goes_first():
    resident = [lru("new", 30, 3.0), lru("old", 30, 1.0), lru("mid", 30, 2.0)]  # budget 100: 10 free
    assert choose_victims(resident, 20, free_bytes=10).victims == ("old",)
    assert choose_victims(resident, 50, free_bytes=10).victims == ("old", "mid")
    assert choose_victims(resident, 100, free_bytes=10).victims == ("old", "mid", "new")


def test_equal_priorities_are_broken_by_name():
    resident = [lru("b", 10, 1.0), lru("a", 10, 1.0)]
    assert choose_victims(resident, 10, free_bytes=0).victims == ("a",)


def test_gdsf_priority_formula():
    # clock + frequency x reload_s / size in GB
    assert priority("gdsf", clock=0.0, recency=5.0, frequency=1, reload_s=2.0, num_bytes=GB) == pytest.approx(2.0)
    assert priority("gdsf", clock=1.5, recency=5.0, frequency=3, reload_s=2.0, num_bytes=2 * GB) == pytest.approx(4.5)
    # the time of use does not matter, only the clock
    assert priority("gdsf", clock=1.0, recency=0.0, frequency=1, reload_s=1.0, num_bytes=GB) == \
        priority("gdsf", clock=1.0, recency=1e9, frequency=1, reload_s=1.0, num_bytes=GB)
    # zero bytes does not divide by zero
    assert priority("gdsf", clock=0.0, recency=0.0, frequency=1, reload_s=1.0, num_bytes=0) > 0


def test_gdsf_prefers_to_keep_frequent_costly_small_experts():
    def p(frequency, reload_s, num_bytes):
        return priority("gdsf", clock=0.0, recency=0.0, frequency=frequency, reload_s=reload_s, num_bytes=num_bytes)

    assert p(5, 1.0, GB) > p(1, 1.0, GB)        # more popular
    assert p(1, 2.0, GB) > p(1, 1.0, GB)        # costlier to reload
    assert p(1, 1.0, GB) > p(1, 1.0, 4 * GB)    # smaller
    resident = [Candidate("popular", GB, p(5, 1.0, GB)), Candidate("rare", GB, p(1, 1.0, GB))]
    assert choose_victims(resident, GB, free_bytes=0).victims == ("rare",)


def test_gdsf_clock_rises_to_the_victims_priority():
    resident = [Candidate("a", 10, 2.0), Candidate("b", 10, 5.0), Candidate("c", 10, 9.0)]
    assert choose_victims(resident, 10, free_bytes=0, clock=1.0) == Eviction(("a",), 2.0)
    assert choose_victims(resident, 20, free_bytes=0, clock=1.0) == Eviction(("a", "b"), 5.0)
    # the clock never goes down
    assert choose_victims(resident, 10, free_bytes=0, clock=7.0) == Eviction(("a",), 7.0)


def test_aging_through_the_clock_lets_a_new_expert_outrank_an_old_popular_one():
    old_popular = priority("gdsf", clock=0.0, recency=0.0, frequency=10, reload_s=1.0, num_bytes=GB)  # 10
    clock = choose_victims([Candidate("x", GB, 9.5)], GB, free_bytes=0).clock
    newcomer = priority("gdsf", clock=clock, recency=0.0, frequency=1, reload_s=1.0, num_bytes=GB)
    assert newcomer > old_popular


def test_pinned_experts_are_skipped():
    resident = [lru("old", 30, 1.0, pinned=True), lru("mid", 30, 2.0), lru("new", 30, 3.0)]
    assert choose_victims(resident, 40, free_bytes=10).victims == ("mid",)
    assert choose_victims(resident, 50, free_bytes=10).victims == ("mid", "new")


def test_impossible_fit_raises():
    with pytest.raises(ValueError, match="do not fit"):
        choose_victims([], 101, free_bytes=100)
    with pytest.raises(ValueError, match="40 bytes free"):  # 10 free + q's 30; p is pinned
        choose_victims([lru("p", 30, 1.0, pinned=True), lru("q", 30, 2.0)], 80, free_bytes=10)


def test_lrfu_keys_order_experts_by_their_decayed_value_now():
    """The stored key is time-invariant: comparing keys is comparing count x 0.5 ** (age / half-life)
    x reload_s / size at any later moment."""
    experts = [(5.0, 10, 1.0, GB), (2.0, 90, 1.0, GB), (1.0, 100, 3.0, GB), (9.0, 0, 1.0, 2 * GB)]
    keys = [priority("lrfu", clock=0.0, recency=at, frequency=1, reload_s=c, num_bytes=b, decayed=n, now=at,
                     half_life=50) for n, at, c, b in experts]
    for now in (100, 400):
        values = [decay(n, now - at, 50) * c / (b / GB) for n, at, c, b in experts]
        assert sorted(range(4), key=keys.__getitem__) == sorted(range(4), key=values.__getitem__)
    assert decay(8.0, 100, 50) == pytest.approx(2.0)


def test_lrfu_counts_an_expert_moved_up_before_its_request_as_requested_now():
    prefetched = priority("lrfu", clock=0.0, recency=0, frequency=1, reload_s=1.0, num_bytes=GB, decayed=0.0, now=70)
    requested = priority("lrfu", clock=0.0, recency=70, frequency=1, reload_s=1.0, num_bytes=GB, decayed=1.0, now=70)
    assert prefetched == pytest.approx(requested)
    # an old favourite keeps its own (higher) key when moved up again
    old = priority("lrfu", clock=0.0, recency=60, frequency=9, reload_s=1.0, num_bytes=GB, decayed=9.0, now=60)
    assert priority("lrfu", clock=0.0, recency=60, frequency=9, reload_s=1.0, num_bytes=GB, decayed=9.0,
                    now=70) == pytest.approx(old)


def test_unknown_policy():
    assert tuple(CachePolicy) == ("lrfu", "gdsf", "lru")
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        priority("fifo", clock=0.0, recency=0.0, frequency=1, reload_s=1.0, num_bytes=1)


def test_max_others_evicts_until_few_enough_stay_even_when_the_bytes_fit():
    resident = [lru("new", 10, 3.0), lru("old", 10, 1.0), lru("mid", 10, 2.0)]
    assert choose_victims(resident, 10, free_bytes=100, max_others=3) == Eviction((), 0.0)
    assert choose_victims(resident, 10, free_bytes=100, max_others=2) == Eviction(("old",), 1.0)
    assert choose_victims(resident, 10, free_bytes=100, max_others=0).victims == ("old", "mid", "new")
    assert choose_victims(resident, 10, free_bytes=100, max_others=None).victims == ()


def test_max_others_and_bytes_both_have_to_hold():
    resident = [lru("new", 10, 3.0), lru("old", 10, 1.0), lru("mid", 10, 2.0)]
    assert choose_victims(resident, 30, free_bytes=10, max_others=2).victims == ("old", "mid")  # bytes need two
    assert choose_victims(resident, 5, free_bytes=10, max_others=1).victims == ("old", "mid")  # the count needs two


def test_max_others_skips_pinned_candidates_and_fails_when_the_pins_are_too_many():
    resident = [lru("pinned", 10, 1.0, pinned=True), lru("b", 10, 2.0), lru("c", 10, 3.0)]
    assert choose_victims(resident, 0, free_bytes=100, max_others=1).victims == ("b", "c")
    with pytest.raises(ValueError):
        choose_victims(resident, 0, free_bytes=100, max_others=0)


def test_the_switch_replay_reports_every_policy_on_the_same_sequences():
    """The bench's replay drives the real ModelCache on a virtual clock (deterministic)."""
    from coe.bench.switch import REPLAY_POLICIES, SimExpert, run_replay

    experts = [SimExpert(f"e{i}", (i + 1) * 10**8, 0.1 * (i + 1), 0.05 * (i + 1)) for i in range(16)]
    result = run_replay(experts, num_requests=300, seeds=2)
    assert result["policy_name"] == "lrfu" and set(REPLAY_POLICIES) == {"lru", "gdsf", "lrfu"}
    assert result["policy_switch_s"] == pytest.approx(sum(result["per_seed"]["lrfu_switch_s"]) / 2)
    assert result["reduction"] == pytest.approx(1 - result["policy_switch_s"] / result["lru_switch_s"])
    for name in REPLAY_POLICIES:
        rates = result[name]
        assert rates["hit_rate"] + rates["warm_hit_rate"] + rates["miss_rate"] == pytest.approx(1.0)
        assert result["shifting"][f"{name}_switch_s"] > 0
    assert run_replay(experts, num_requests=300, seeds=2) == result  # same sequences, same moves


# ---- Popularity: decayed counts, and the half-life that predicts best ------------------------------

def test_popularity_with_one_half_life_counts_and_decays():
    popularity = Popularity((4,), num_experts=2)
    assert popularity.last_request("a") == (0.0, 0)
    for _ in range(3):
        popularity.observe("a")
    for _ in range(4):
        popularity.observe("b")
    assert popularity.half_life == 4
    at_last_request = 0.5 ** 0.5 + 0.5 ** 0.25 + 1  # three requests, a quarter half-life apart
    assert popularity.last_request("a") == (pytest.approx(at_last_request), 3)
    assert popularity.counts("a") == pytest.approx([at_last_request * 0.5])  # one half-life later
    assert popularity.counts("b")[0] == pytest.approx(1 + 0.5 ** 0.25 + 0.5 ** 0.5 + 0.5 ** 0.75)


def _drive(popularity: Popularity, names: list[str]) -> Popularity:
    for name in names:
        popularity.observe(name)
    return popularity


def test_popularity_picks_the_longest_half_life_for_a_steady_mix():
    import random

    rng = random.Random(0)
    experts = [f"e{i}" for i in range(16)]
    weights = [1 / (rank + 1) for rank in range(16)]
    steady = rng.choices(experts, weights=weights, k=3000)
    assert _drive(Popularity(AUTO_HALF_LIVES, 16), steady).half_life == max(AUTO_HALF_LIVES)


def test_popularity_picks_the_shortest_half_life_when_the_favourite_keeps_changing():
    import random

    rng = random.Random(0)
    experts = [f"e{i}" for i in range(16)]
    shifting = []
    for _ in range(60):  # a new favourite, taking 80% of the requests, every 50 requests
        favourite = rng.choice(experts)
        shifting += [favourite if rng.random() < 0.8 else rng.choice(experts) for _ in range(50)]
    assert _drive(Popularity(AUTO_HALF_LIVES, 16), shifting).half_life == min(AUTO_HALF_LIVES)
