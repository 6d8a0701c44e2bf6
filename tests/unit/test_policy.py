import pytest

from coe.cache.policy import Resident, choose_victims


def test_nothing_evicted_when_it_fits():
    resident = [Resident("a", 40, last_used_s=1.0), Resident("b", 40, last_used_s=2.0)]
    assert choose_victims(resident, 20, budget_bytes=100) == []
    assert choose_victims([], 100, budget_bytes=100) == []


def test_least_recently_used_goes_first():
    resident = [Resident("new", 30, 3.0), Resident("old", 30, 1.0), Resident("mid", 30, 2.0)]
    assert choose_victims(resident, 20, budget_bytes=100) == ["old"]
    assert choose_victims(resident, 50, budget_bytes=100) == ["old", "mid"]
    assert choose_victims(resident, 100, budget_bytes=100) == ["old", "mid", "new"]


def test_pinned_experts_are_skipped():
    resident = [Resident("old", 30, 1.0, pinned=True), Resident("mid", 30, 2.0), Resident("new", 30, 3.0)]
    assert choose_victims(resident, 40, budget_bytes=100) == ["mid"]
    assert choose_victims(resident, 50, budget_bytes=100) == ["mid", "new"]


def test_impossible_fit_raises():
    with pytest.raises(ValueError, match="do not fit"):
        choose_victims([], 101, budget_bytes=100)
    with pytest.raises(ValueError, match="30 bytes pinned"):
        choose_victims([Resident("p", 30, 1.0, pinned=True), Resident("q", 30, 2.0)], 80, budget_bytes=100)
