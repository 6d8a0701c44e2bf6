"""Evaluation suites read from the packaged datasets: disjoint from the router's training data."""
from __future__ import annotations

import pytest

from coe.errors import ConfigError
from coe.eval import suites
from coe.router import data

AUTOMATIC = [s for s in suites.SUITES.values() if not s.judged]


@pytest.mark.parametrize("suite", AUTOMATIC, ids=lambda s: s.name)
def test_every_suite_has_items_of_its_category(suite):
    items = suites.load_items(suite, 40)
    assert len(items) == 40
    assert {i.suite for i in items} == {suite.name} and {i.category for i in items} == {suite.category}
    assert {i.kind for i in items} == {suite.kind}
    assert len({i.id for i in items}) == len(items)
    assert all(i.messages[-1].role == "user" and i.messages[-1].content.strip() for i in items)


@pytest.mark.parametrize("suite", [s for s in AUTOMATIC if s.kind == "choice"], ids=lambda s: s.name)
def test_choice_items_show_every_option_and_a_valid_answer(suite):
    for item in suites.load_items(suite, 20):
        prompt = item.messages[-1].content
        assert 2 <= item.num_options <= len(suites.LETTERS)
        assert 0 <= item.reference["answer"] < item.num_options
        for k, option in enumerate(item.reference["options"]):
            assert f"{suites.LETTERS[k]}. {option.strip()}" in prompt


@pytest.mark.parametrize("name", ["gsm8k", "humaneval", "mbpp", "medmcqa", "hellaswag", "ifeval", "bfcl"])
def test_items_never_reach_the_router_training_data(name):
    source = next(s for s in data.default_sources() if s.name == name)
    trained_groups = {e.group for e in data.source_examples(source)}
    items = suites.SUITES[name].load()
    assert items and not trained_groups & {i.id for i in items}
    assert all(data.split_of(i.id, eval_shared=True) == "eval" for i in items)


def test_boolq_uses_only_the_router_test_split():
    items = suites.SUITES["boolq"].load()
    assert items and all(data.split_of(i.id, eval_shared=False) == "test" for i in items)


def test_a_limit_takes_the_same_sample_every_time():
    first = [i.id for i in suites.load_items(suites.SUITES["gsm8k"], 5)]
    assert first == [i.id for i in suites.load_items(suites.SUITES["gsm8k"], 5)]
    assert first == [i.id for i in suites.load_items(suites.SUITES["gsm8k"], 10)][:5]


def test_resolve_names_aliases_and_errors():
    for name in ("quick", "standard"):
        chosen, limits = suites.resolve(name)
        assert {s.category for s in chosen} >= set(data.CATEGORIES) - {"chat"}
        assert all(s.kind in limits for s in chosen)
    chosen, limits = suites.resolve("gsm8k, mbpp,gsm8k")
    assert not limits and [s.name for s in chosen] == ["gsm8k", "mbpp"]
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        suites.resolve("gsm8k,nope")
    with pytest.raises(ConfigError, match="no suite"):
        suites.resolve(" , ")


def test_item_keys_change_with_the_prompt():
    item = suites.load_items(suites.SUITES["gsm8k"], 1)[0]
    import dataclasses

    changed = dataclasses.replace(item, max_tokens=item.max_tokens + 1)
    assert suites.item_key(item) == suites.item_key(dataclasses.replace(item))
    assert suites.item_key(item) != suites.item_key(changed)
