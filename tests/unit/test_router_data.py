"""coe.router.data: stable splits, sampling from a source, prompt templates and user-labelled files.
No packaged dataset is read: sources are fakes."""
import hashlib
import json
from collections import Counter, defaultdict

import pytest

from coe.errors import ConfigError
from coe.router import data
from coe.router.data import (CASUAL_OPENERS, CATEGORIES, EVAL_SHARE, EXTRACTION_FIELDS, EXTRACTION_TASKS,
                             GENERALIST, MTBENCH_CATEGORIES, SPLITS, Example, Item, Source, by_split,
                             default_sources, extraction_task, load_labelled, multiple_choice,
                             passage_question, source_examples, split_of, unit_hash)


# -- splits ---------------------------------------------------------------------------------------
def test_unit_hash_is_the_documented_blake2b_number():
    for key in ("abc", "", "mmlu:anatomy:3", "ünïcode"):
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        assert unit_hash(key) == int.from_bytes(digest, "big") / 2**64
    # pinned: the same on every machine and every Python run (PYTHONHASHSEED does not matter)
    assert unit_hash("abc") == 0.8466046359861451
    assert 0.0 <= unit_hash("x") < 1.0


def test_split_of_is_stable():
    assert [split_of(f"g{i}", False) for i in range(12)] == ["train"] * 11 + ["test"]
    assert [split_of(f"g{i}", True) for i in range(12)] == [
        "train", "eval", "eval", "eval", "train", "eval", "train", "train", "train", "eval", "eval", "test"]


def test_split_of_follows_the_hash():
    for i in range(200):
        group = f"h{i}"
        u = unit_hash("split:" + group)
        expected = "train" if u < 0.8 else "val" if u < 0.9 else "test"
        assert split_of(group, False) == expected
        if u < EVAL_SHARE:
            assert split_of(group, True) == "eval"
        else:
            v = (u - 0.5) / 0.5
            assert split_of(group, True) == ("train" if v < 0.8 else "val" if v < 0.9 else "test")


def test_split_proportions():
    n = 20_000
    plain = Counter(split_of(f"grp:{i}", False) for i in range(n))
    assert set(plain) == set(SPLITS)
    assert plain["train"] / n == pytest.approx(0.8, abs=0.01)
    assert plain["val"] / n == pytest.approx(0.1, abs=0.01)
    assert plain["test"] / n == pytest.approx(0.1, abs=0.01)
    shared = Counter(split_of(f"grp:{i}", True) for i in range(n))
    assert set(shared) == {"eval", *SPLITS}
    assert shared["eval"] / n == pytest.approx(EVAL_SHARE, abs=0.015)
    rest = n - shared["eval"]
    assert shared["train"] / rest == pytest.approx(0.8, abs=0.015)
    assert shared["val"] / rest == pytest.approx(0.1, abs=0.015)
    assert shared["test"] / rest == pytest.approx(0.1, abs=0.015)


# -- sources --------------------------------------------------------------------------------------
def fake_source(groups=200, per_group=5, cap=10_000, eval_shared=False, name="fake",
                category="math", extra=()):
    calls = []

    def read():
        calls.append(1)
        for g in range(groups):
            for k in range(per_group):
                yield Item(f"{name}:{g}", f"question {g} variant {k}")
        yield from extra

    return Source(name, category, read, cap, eval_shared), calls


def test_source_examples_tags_each_prompt_with_its_groups_split():
    source, calls = fake_source(groups=100, per_group=1)
    examples = source_examples(source)
    assert len(calls) == 1
    assert len(examples) == 100
    for ex in examples:
        assert (ex.category, ex.source) == ("math", "fake")
        assert ex.split == split_of(ex.group, False)
        assert ex.text == f"question {ex.group.split(':')[1]} variant 0"


def test_source_examples_at_most_per_group_from_one_group():
    source, _ = fake_source(groups=50, per_group=5)
    counts = Counter(ex.group for ex in source_examples(source))
    assert set(counts.values()) == {3}
    assert len(counts) == 50
    counts = Counter(ex.group for ex in source_examples(source, per_group=1))
    assert set(counts.values()) == {1}
    assert len(source_examples(source, per_group=10)) == 250


def test_source_examples_picks_the_same_texts_every_time():
    source, _ = fake_source(groups=30, per_group=5)
    assert source_examples(source) == source_examples(source)


def test_source_examples_respects_the_cap_exactly():
    source, _ = fake_source(groups=100, per_group=3, cap=10)
    examples = source_examples(source)
    assert len(examples) == 10
    small, _ = fake_source(groups=3, per_group=1, cap=10)
    assert len(source_examples(small)) == 3


def test_source_examples_cap_samples_groups_by_hash_not_by_reading_order():
    source, _ = fake_source(groups=400, per_group=1, cap=40)
    groups = {int(ex.group.split(":")[1]) for ex in source_examples(source)}
    assert len(groups) == 40
    assert max(groups) > 100  # not simply the first 40 read


def test_groups_never_cross_splits():
    source, _ = fake_source(groups=300, per_group=4)
    splits = defaultdict(set)
    for ex in source_examples(source):
        splits[ex.group].add(ex.split)
    assert all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == set(SPLITS)


def test_eval_shared_sources_never_give_the_evaluation_reserve():
    source, _ = fake_source(groups=400, per_group=2, eval_shared=True)
    examples = source_examples(source)
    reserved = {f"fake:{g}" for g in range(400) if split_of(f"fake:{g}", True) == "eval"}
    assert 150 < len(reserved) < 250
    assert not reserved & {ex.group for ex in examples}
    assert {ex.split for ex in examples} == set(SPLITS)
    assert len({ex.group for ex in examples}) == 400 - len(reserved)
    assert all(ex.split == split_of(ex.group, True) for ex in examples)


def test_blank_items_are_skipped_and_a_group_of_blanks_disappears():
    extra = [Item("blank", "   "), Item("blank", ""), Item("fake:0", "\n")]
    source, _ = fake_source(groups=2, per_group=1, extra=extra)
    examples = source_examples(source)
    assert sorted(ex.text for ex in examples) == ["question 0 variant 0", "question 1 variant 0"]


def test_default_sources_use_known_categories_and_unique_names():
    sources = default_sources()  # builds Source objects only; nothing is read
    names = [s.name for s in sources]
    assert len(names) == len(set(names))
    assert {s.category for s in sources} == set(CATEGORIES) - {GENERALIST}
    assert all(s.cap > 0 for s in sources)


def test_mtbench_categories_are_all_router_categories():
    assert set(MTBENCH_CATEGORIES.values()) <= set(CATEGORIES)
    assert GENERALIST in CATEGORIES
    assert MTBENCH_CATEGORIES["coding"] == "code" and MTBENCH_CATEGORIES["roleplay"] == "writing"


def test_by_split():
    exs = [Example("a", "math", "s", "g1", "train"), Example("b", "code", "s", "g2", "val"),
           Example("c", "math", "s", "g3", "train")]
    assert by_split(exs) == {"train": [exs[0], exs[2]], "val": [exs[1]]}
    assert by_split([]) == {}


# -- templates ------------------------------------------------------------------------------------
def group_with(predicate, prefix="grp"):
    for i in range(10_000):
        if predicate(f"{prefix}{i}"):
            return f"{prefix}{i}"
    raise AssertionError("no group found")


OPTIONS = ["red", "green", "blue"]
LISTED = "A. red\nB. green\nC. blue"


@pytest.mark.parametrize("style", range(5))
def test_multiple_choice_styles(style):
    group = group_with(lambda g: data._pick(g, 5) == style)
    opener = CASUAL_OPENERS[data._pick(group + ":opener", len(CASUAL_OPENERS))]
    expected = {
        0: "What colour is the sky?",
        1: f"What colour is the sky?\n{LISTED}",
        2: f"Answer the following multiple choice question.\n\nWhat colour is the sky?\n\n{LISTED}",
        3: f"{opener} What colour is the sky?",
        4: f"{opener}\nWhat colour is the sky?\n{LISTED}",
    }[style]
    assert multiple_choice(group, "  What colour is the sky? \n", OPTIONS) == expected


def test_multiple_choice_without_options_is_bare_or_casual():
    seen = set()
    for i in range(40):
        text = multiple_choice(f"q{i}", "Why?", [])
        assert text == "Why?" or any(text == f"{o} Why?" for o in CASUAL_OPENERS)
        seen.add(text == "Why?")
    assert seen == {True, False}


def test_multiple_choice_lists_at_most_ten_options():
    group = group_with(lambda g: data._pick(g, 5) == 1)
    text = multiple_choice(group, "Pick", [f"o{i}" for i in range(12)])
    assert text.splitlines()[-1] == "J. o9"
    assert "o10" not in text


def test_multiple_choice_is_deterministic_per_group():
    assert multiple_choice("g1", "Q?", OPTIONS) == multiple_choice("g1", "Q?", OPTIONS)


def test_passage_question_both_forms():
    bare = group_with(lambda g: data._pick(g, 2) == 0)
    framed = group_with(lambda g: data._pick(g, 2) == 1)
    assert passage_question(bare, " The text. ", " Why? ") == "The text.\n\nQuestion: Why?"
    assert passage_question(framed, "The text.", "Why?") == (
        "Read the text below and answer the question.\n\nText: The text.\n\nWhy?")


PASSAGE = "Marie Curie was born in Warsaw in 1867 and moved to Paris."


def test_extraction_task_is_a_template_plus_the_passage():
    for i in range(30):
        group = f"e{i}"
        text = extraction_task(group, "  " + PASSAGE + "  ")
        parts = text.split("\n\n")
        assert len(parts) == 2 and PASSAGE in parts
        task = parts[0] if parts[1] == PASSAGE else parts[1]
        templates = [t.split("{")[0] for t in EXTRACTION_TASKS]
        assert any(task.startswith(t) for t in templates)
        if "{fields}" in EXTRACTION_TASKS[data._pick(group + ":task", len(EXTRACTION_TASKS))]:
            assert any(f in task for f in EXTRACTION_FIELDS)
        assert extraction_task(group, PASSAGE) == text


def test_extraction_task_word_count_uses_a_long_word_from_the_passage():
    count_task = EXTRACTION_TASKS.index(
        "Read the paragraph below and count how many times the word \"{word}\" appears.")
    group = group_with(lambda g: data._pick(g + ":task", len(EXTRACTION_TASKS)) == count_task)
    text = extraction_task(group, PASSAGE)
    word = text.split('"')[1]
    assert word in {"Marie", "Curie", "Warsaw", "moved", "Paris"}
    assert extraction_task(group, "a b c") .count('"the"') == 1  # no long words: "the"


def test_extraction_task_puts_the_passage_first_for_a_third_of_groups():
    first = sum(extraction_task(f"o{i}", PASSAGE).startswith(PASSAGE) for i in range(600))
    assert 140 < first < 260


# -- user-labelled files --------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config_error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_labelled(path)
    return info.value.message


def test_load_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "solve 2x=4", "category": " math "}) + "\n\n"
                    + json.dumps({"text": "write a haiku", "category": "writing", "group": "poems"}) + "\n"
                    + json.dumps({"prompt": "fix my bug", "category": "code", "extra": 1}),
                    encoding="utf-8")
    examples = load_labelled(path)
    assert examples == [
        Example("solve 2x=4", "math", "mine.jsonl", "solve 2x=4", split_of("solve 2x=4", False)),
        Example("write a haiku", "writing", "mine.jsonl", "poems", split_of("poems", False)),
        Example("fix my bug", "code", "mine.jsonl", "fix my bug", split_of("fix my bug", False)),
    ]
    assert load_labelled(str(path)) == examples


def test_load_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt": "a", "category": "x"}\r\n{"prompt": "b", "category": "y"}\r\n')
    assert [(e.text, e.category) for e in load_labelled(path)] == [("a", "x"), ("b", "y")]


def test_load_csv(tmp_path):
    path = tmp_path / "mine.CSV"
    path.write_text('prompt,category,group\n"hello, world",chat,\nwhat is 2+2,math,sums\n',
                    encoding="utf-8")
    examples = load_labelled(path)
    assert [(e.text, e.category, e.group, e.source) for e in examples] == [
        ("hello, world", "chat", "hello, world", "mine.CSV"), ("what is 2+2", "math", "sums", "mine.CSV")]
    assert all(e.split == split_of(e.group, False) for e in examples)


def test_load_csv_with_a_text_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,category\nhi there,chat\n", encoding="utf-8")
    assert [(e.text, e.category) for e in load_labelled(path)] == [("hi there", "chat")]


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "category": "x"}\n\n{"prompt": "b", "category": \n',
                    encoding="utf-8")
    assert config_error(path).startswith(f"{path}:3: not valid JSON")


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "math"]\n', encoding="utf-8")
    assert config_error(path) == f"{path}:1: each line must be a JSON object"


@pytest.mark.parametrize("row", [{"prompt": "a"}, {"prompt": "a", "category": ""},
                                 {"prompt": "a", "category": "  "}, {"prompt": "a", "category": 3}])
def test_missing_category_names_file_and_line(tmp_path, row):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "category": "x"}, row])
    assert config_error(path) == f"{path}:2: field 'category' must be a non-empty string"


@pytest.mark.parametrize("row", [{"category": "x"}, {"prompt": "", "category": "x"},
                                 {"prompt": " \n", "category": "x"}, {"prompt": ["a"], "category": "x"},
                                 {"text": None, "category": "x"}])
def test_missing_prompt_names_file_and_line(tmp_path, row):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert config_error(path) == f"{path}:1: field 'prompt' (or 'text') must be a non-empty string"


def test_csv_missing_category_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,category\nfine,math\nno label,\n", encoding="utf-8")
    assert config_error(path) == f"{path}:3: field 'category' must be a non-empty string"


def test_csv_without_a_prompt_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,category\nfine,math\n", encoding="utf-8")
    assert config_error(path) == f"{path}:2: field 'prompt' (or 'text') must be a non-empty string"


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "category": "x"}\n')
    assert config_error(path) == f"{path}: not UTF-8 text (byte 15)"


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n  \n"),
                                          ("e.csv", ""), ("e.csv", "prompt,category\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert config_error(path) == f"{path}: no labelled prompts found"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    message = config_error(path)
    assert message.startswith(f"{path}: cannot read the training data")


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_prompt_with_a_unicode_line_separator(tmp_path, sep):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": f"one{sep}two", "category": "x"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert [e.text for e in load_labelled(path)] == [f"one{sep}two"]


def test_csv_multiline_field_keeps_its_newline_and_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('prompt,category\n"first line\nsecond line",writing\nno label,\n', encoding="utf-8")
    assert config_error(path) == f"{path}:4: field 'category' must be a non-empty string"
    path.write_text('prompt,category\n"first line\nsecond line",writing\n', encoding="utf-8")
    assert [e.text for e in load_labelled(path)] == ["first line\nsecond line"]


@pytest.mark.parametrize("name,body", [("b.csv", "prompt,category\nhi,chat\n"),
                                       ("b.jsonl", '{"prompt": "hi", "category": "chat"}\n')])
def test_utf8_byte_order_mark_is_accepted(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [(e.text, e.category) for e in load_labelled(path)] == [("hi", "chat")]


def test_load_a_conversation_as_its_user_turns_and_tools_as_the_router_lists_them(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                "parameters": {"properties": {"city": {}}}}}]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "solve 2x=4"}], "category": "math"},
        {"prompt": "rain in Oslo?", "tools": tools, "category": "tool_use"},
    ])
    first, second = load_labelled(path)
    assert first.text == "hi\n\nsolve 2x=4"  # what router.text.conversation_text reads
    assert first.group == first.text
    assert second.text == "rain in Oslo?\n\nAvailable functions:\n- get_weather(city): Weather now"


@pytest.mark.parametrize("row, message", [
    ({"messages": "hi", "category": "x"}, "field 'messages' must be a list of {role, content} objects"),
    ({"messages": [{"role": "user"}], "category": "x"}, "field 'messages' must be a list"),
    ({"messages": [{"role": "assistant", "content": "hi"}], "category": "x"},
     "field 'messages' has no user turn with text"),
    ({"prompt": "a", "tools": {"name": "f"}, "category": "x"}, "field 'tools' must be a list of function"),
    ({"prompt": "a", "tools": ["f"], "category": "x"}, "field 'tools' must be a list of function"),
])
def test_bad_conversations_and_tools_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "category": "x"}, row])
    assert config_error(path).startswith(f"{path}:2: {message}")


# -- the packaged chat-style prompts (real files in the repository) ---------------------------------
def _chat_rows(name):
    return [json.loads(line) for line in (data.CHAT_FOLDER / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def test_packaged_chat_sets_use_trained_categories_and_are_large_enough():
    trained = set(CATEGORIES) - {GENERALIST}
    for name, least in (("train.jsonl", 400), ("dev.jsonl", 200), ("test.jsonl", 200)):
        examples = load_labelled(data.CHAT_FOLDER / name)
        counts = Counter(e.category for e in examples)
        assert len(examples) >= least and set(counts) == trained, (name, counts)
        assert min(counts.values()) >= 20, (name, counts)


def test_packaged_chat_test_sets_share_no_prompt_with_training_or_each_other():
    texts = {name: {e.text for e in load_labelled(data.CHAT_FOLDER / name)}
             for name in ("train.jsonl", "dev.jsonl", "test.jsonl")}
    assert not texts["train.jsonl"] & texts["dev.jsonl"]
    assert not texts["train.jsonl"] & texts["test.jsonl"]
    assert not texts["dev.jsonl"] & texts["test.jsonl"]
    assert all(len(rows) == len(_chat_rows(n)) for n, rows in texts.items())  # no duplicate prompt


def test_chat_examples_split_into_training_and_calibration_only():
    examples = data.chat_examples()
    splits = Counter(e.split for e in examples)
    assert set(splits) == {"train", "val"}
    assert 0.2 < splits["val"] / len(examples) < 0.4  # CHAT_VAL_SHARE = 0.3
    assert {e.source for e in examples} == {data.CHAT_SOURCE}
    held = data.chat_test_examples()
    assert {e.split for e in held} == {"heldout"}
    assert Counter(e.source for e in held) == {data.CHAT_DEV_SOURCE: len(_chat_rows("dev.jsonl")),
                                               data.CHAT_TEST_SOURCE: len(_chat_rows("test.jsonl"))}
