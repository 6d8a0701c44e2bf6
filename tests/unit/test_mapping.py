import itertools
import json
import random

import pytest

from coe.errors import ConfigError
from coe.router.mapping import (ExpertMap, ScoreTable, best_map, evaluate_map, format_frontier,
                                pareto_frontier, uniform_frequencies)

TOL = 1e-9


def _table():
    return ScoreTable.from_dict({"source": "placeholder", "scores": {
        "code": {"small": 0.4, "mid": 0.7, "big": 0.9},
        "math": {"small": 0.5, "mid": 0.6, "big": 0.8},
        "chat": {"small": 0.6, "mid": 0.65, "big": 0.7},
    }})


PARAMS = {"small": 135e6, "mid": 1.5e9, "big": 7e9}


def _random_case(seed):
    rng = random.Random(seed)
    cats = [f"c{i}" for i in range(rng.randint(2, 5))]
    experts = [f"e{j}" for j in range(rng.randint(2, 4))]
    # coarse values make exact ties between maps common
    scores = {c: {e: rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]) for e in experts} for c in cats}
    params = {e: rng.choice([1.0, 2.0, 3.0, rng.uniform(0.5, 5.0)]) * 1e8 for e in experts}
    freqs = {c: rng.choice([0.0, 1.0, 2.0, rng.random()]) for c in cats}
    if rng.random() < 0.3:
        del freqs[cats[-1]]  # missing counts as 0
    if sum(freqs.values()) == 0:
        freqs[cats[0]] = 1.0
    pins = {c: rng.choice(experts) for c in cats if rng.random() < 0.25} if seed % 2 else None
    return ScoreTable.from_dict({"scores": scores}), params, freqs, pins, rng


def _brute(table, params, freqs, pins):
    """Every total map as (params, score, assignment), computed independently of the module."""
    total = sum(freqs.values())
    f = {c: freqs.get(c, 0.0) / total for c in table.categories}
    choices = [[pins[c]] if pins and c in pins else list(table.experts) for c in table.categories]
    out = []
    for combo in itertools.product(*choices):
        amap = dict(zip(table.categories, combo))
        out.append((sum(f[c] * params[e] for c, e in amap.items()),
                    sum(f[c] * table.scores[c][e] for c, e in amap.items()), amap))
    return out


@pytest.mark.parametrize("seed", range(50))
def test_frontier_matches_brute_force(seed):
    table, params, freqs, pins, _ = _random_case(seed)
    frontier = pareto_frontier(table, params, freqs, pins)
    every = _brute(table, params, freqs, pins)
    assert frontier
    for a, b in zip(frontier, frontier[1:]):
        assert b.avg_active_params > a.avg_active_params
        assert b.expected_score > a.expected_score
    for point in frontier:
        assert all(c in point.assignment for c in table.categories)
        if pins:
            assert all(point.assignment[c] == e for c, e in pins.items())
        again = evaluate_map(point.assignment, table, params, freqs)
        assert again.expected_score == pytest.approx(point.expected_score, abs=TOL)
        assert again.avg_active_params == pytest.approx(point.avg_active_params, rel=TOL)
        # non-dominated: no map is at most as expensive and strictly better
        assert not any(p <= point.avg_active_params * (1 + TOL) and s > point.expected_score + TOL
                       for p, s, _ in every)
    for p, s, _ in every:  # every map is dominated by or equal to a frontier point
        assert any(m.avg_active_params <= p * (1 + TOL) and m.expected_score >= s - TOL for m in frontier)


@pytest.mark.parametrize("seed", range(50))
def test_best_map_matches_brute_force(seed):
    table, params, freqs, pins, rng = _random_case(seed)
    every = _brute(table, params, freqs, pins)
    lowest = min(p for p, _, _ in every)
    budgets = [None, lowest, max(p for p, _, _ in every), rng.choice(every)[0], rng.choice(every)[0],
               rng.uniform(lowest, 6e8)]
    for budget in budgets:
        got = best_map(table, params, freqs, budget, pins)
        fits = [(p, s) for p, s, _ in every if budget is None or p <= budget * (1 + TOL)]
        best_score = max(s for _, s in fits)
        assert got.expected_score == pytest.approx(best_score, abs=TOL)
        if budget is not None:
            assert got.avg_active_params <= budget * (1 + TOL)
        else:  # ties broken by fewer params
            fewest = min(p for p, s in fits if s >= best_score - TOL)
            assert got.avg_active_params == pytest.approx(fewest, rel=TOL)
        if pins:
            assert all(got.assignment[c] == e for c, e in pins.items())


def test_best_map_small_example():
    table = _table()
    freqs = {"code": 0.5, "math": 0.25, "chat": 0.25}
    assert best_map(table, PARAMS, freqs, None).assignment == {"code": "big", "math": "big", "chat": "big"}
    cheap = best_map(table, PARAMS, freqs, 135e6)
    assert cheap.assignment == {"code": "small", "math": "small", "chat": "small"}
    assert cheap.expected_score == pytest.approx(0.5 * 0.4 + 0.25 * 0.5 + 0.25 * 0.6, abs=1e-12)
    mid = best_map(table, PARAMS, freqs, 1e9)
    assert mid.assignment == {"code": "mid", "math": "small", "chat": "small"}
    assert mid.avg_active_params == pytest.approx(0.5 * 1.5e9 + 0.5 * 135e6)


def test_zero_frequency_gets_cheapest_expert_and_weights_normalise():
    table = _table()
    frontier = pareto_frontier(table, PARAMS, {"code": 2.0, "math": 2.0})  # chat missing -> 0
    assert all(m.assignment["chat"] == "small" for m in frontier)
    top = best_map(table, PARAMS, {"code": 2.0, "math": 2.0, "chat": 0.0}, None)
    assert top.expected_score == pytest.approx(0.5 * 0.9 + 0.5 * 0.8)
    assert top.avg_active_params == pytest.approx(0.5 * 7e9 + 0.5 * 7e9)


def test_pins_are_kept_and_counted():
    table = _table()
    freqs = uniform_frequencies(table.categories)
    got = best_map(table, PARAMS, freqs, None, pins={"chat": "small"})
    assert got.assignment == {"code": "big", "math": "big", "chat": "small"}
    assert got.avg_active_params == pytest.approx((7e9 + 7e9 + 135e6) / 3)
    assert all(m.assignment["chat"] == "small" for m in pareto_frontier(table, PARAMS, freqs, {"chat": "small"}))


def test_uniform_frequencies():
    assert uniform_frequencies(["a", "b", "c", "d"]) == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


def test_scales_to_twelve_categories_by_twenty_experts():
    rng = random.Random(7)
    cats = [f"cat{i}" for i in range(12)]
    experts = [f"x{j}" for j in range(20)]
    table = ScoreTable.from_dict({"scores": {c: {e: rng.random() for e in experts} for c in cats}})
    params = {e: rng.uniform(1e8, 1e10) for e in experts}
    frontier = pareto_frontier(table, params, uniform_frequencies(cats))
    assert frontier[-1].expected_score == pytest.approx(
        sum(max(table.scores[c].values()) for c in cats) / 12, abs=TOL)
    assert frontier[0].avg_active_params == pytest.approx(min(params.values()))


def test_errors():
    table = _table()
    freqs = uniform_frequencies(table.categories)
    with pytest.raises(ConfigError, match="unknown expert 'huge'") as err:
        best_map(table, PARAMS, freqs, None, pins={"code": "huge"})
    assert err.value.param == "pins"
    with pytest.raises(ConfigError, match="unknown category 'poetry'"):
        best_map(table, PARAMS, freqs, None, pins={"poetry": "big"})
    with pytest.raises(ConfigError, match="minimum feasible budget is 135M") as err:
        best_map(table, PARAMS, freqs, 100e6)
    assert err.value.param == "budget_params"
    with pytest.raises(ConfigError, match="minimum feasible budget is 2.42B"):
        best_map(table, PARAMS, freqs, 135e6, pins={"code": "big"})
    with pytest.raises(ConfigError, match="'math' must be a number >= 0"):
        best_map(table, PARAMS, {"code": 1.0, "math": -0.5}, None)
    with pytest.raises(ConfigError, match="unknown category 'poetry'"):
        pareto_frontier(table, PARAMS, {"poetry": 1.0})
    with pytest.raises(ConfigError, match="sum to 0"):
        pareto_frontier(table, PARAMS, {"code": 0.0})
    with pytest.raises(ConfigError, match="expert 'big'"):
        pareto_frontier(table, {"small": 1.0, "mid": 2.0}, freqs)
    with pytest.raises(ConfigError, match="unknown expert 'huge'"):
        evaluate_map({"code": "huge", "math": "big", "chat": "big"}, table, PARAMS, freqs)
    with pytest.raises(ConfigError, match="without an expert"):
        evaluate_map({"code": "big"}, table, PARAMS, freqs)


def test_from_dict_validates_and_names_where():
    with pytest.raises(ConfigError, match=r"^my\.json: .*category 'b', expert 'y'"):
        ScoreTable.from_dict({"scores": {"a": {"x": 1.0, "y": 0.5}, "b": {"x": 0.2}}}, where="my.json")
    with pytest.raises(ConfigError, match="scores.json: .*'scores'"):
        ScoreTable.from_dict({"source": "x"}, where="scores.json")
    with pytest.raises(ConfigError, match="category 'a', expert 'x'"):
        ScoreTable.from_dict({"scores": {"a": {"x": "high"}}})
    with pytest.raises(ConfigError, match="'source' must be a string"):
        ScoreTable.from_dict({"source": 3, "scores": {"a": {"x": 1.0}}})


def test_round_trip_and_restricted():
    table = _table()
    data = table.to_dict()
    assert data["source"] == "placeholder"
    assert ScoreTable.from_dict(json.loads(json.dumps(data))) == table
    small = table.restricted(["big", "small"])
    assert small.experts == ("small", "big")
    assert small.scores["code"] == {"small": 0.4, "big": 0.9}
    assert best_map(small, PARAMS, uniform_frequencies(small.categories), 1e9).assignment["code"] == "small"
    with pytest.raises(ConfigError, match="unknown expert 'huge'"):
        table.restricted(["big", "huge"])


def test_load_from_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(_table().to_dict()))
    assert ScoreTable.load(path) == _table()
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        ScoreTable.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"scores": {"a": {"x": None}}}))
    with pytest.raises(ConfigError, match="wrong.json: .*category 'a', expert 'x'"):
        ScoreTable.load(wrong)
    with pytest.raises(ConfigError, match="missing.json: cannot read"):
        ScoreTable.load(tmp_path / "missing.json")


def test_format_frontier():
    table = _table()
    text = format_frontier(pareto_frontier(table, PARAMS, uniform_frequencies(table.categories)))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["avg", "params", "score", "map"]
    assert "135M" in lines[1] and "small: code,math,chat" in lines[1]
    assert lines[1].split()[1] == f"{(0.4 + 0.5 + 0.6) / 3:.3f}"
    assert lines[-1].split()[0] == "7B" and "big: code,math,chat" in lines[-1]
    one = ExpertMap({"a": "x"}, 0.5, 1.54e9)
    assert "1.54B" in format_frontier([one]) and "0.500" in format_frontier([one])


def test_zero_frequency_picks_cheapest_even_when_not_first():
    params = {"small": 2e9, "mid": 1e8, "big": 7e9}
    frontier = pareto_frontier(_table(), params, {"code": 1.0, "math": 1.0, "chat": 0.0})
    assert all(m.assignment["chat"] == "mid" for m in frontier)


def test_exact_ties_follow_table_order():
    for order in (["x", "y"], ["y", "x"]):
        table = ScoreTable.from_dict({"scores": {"a": {e: 0.5 for e in order}, "b": {e: 0.25 for e in order}}})
        frontier = pareto_frontier(table, {"x": 1.0, "y": 1.0}, {"a": 1.0, "b": 1.0})
        assert [m.assignment for m in frontier] == [{"a": order[0], "b": order[0]}]
