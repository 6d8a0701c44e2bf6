from coe.backends.text import TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> list[str]:
    return [assembler.feed(piece) for piece in pieces]


def test_plain_bytes_pass_straight_through():
    text = TextAssembler()
    assert feed_all(text, [b"Hel", b"lo", b" "]) == ["Hel", "lo", " "]
    assert text.flush() == ""
    assert text.text == "Hello "
    assert not text.stopped


def test_multibyte_character_split_across_feeds_is_held_until_complete():
    euro = "€".encode()  # 3 bytes
    text = TextAssembler()
    assert feed_all(text, [b"a" + euro[:1], euro[1:2], euro[2:] + b"b"]) == ["a", "", "€b"]
    assert text.text == "a€b"


def test_four_byte_emoji_one_byte_at_a_time():
    text = TextAssembler()
    deltas = feed_all(text, [bytes([b]) for b in "🙂!".encode()])
    assert deltas == ["", "", "", "🙂", "!"]


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    text = TextAssembler()
    assert text.feed(b"ok\xe2\x82") == "ok"
    assert text.flush() == "\ufffd"
    assert text.text == "ok\ufffd"


def test_stop_string_inside_one_feed_keeps_the_text_before_it():
    text = TextAssembler(("STOP",))
    deltas = feed_all(text, [b"hello STOP world"])
    assert "".join(deltas) == "hello "
    assert text.stopped
    assert text.text == "hello "
    assert text.feed(b"more") == ""
    assert text.flush() == ""


def test_stop_string_spanning_feeds_is_never_shown():
    text = TextAssembler(("\nUser:",))
    deltas = feed_all(text, [b"Sure", b"!\n", b"Us", b"er: next"])
    assert "".join(deltas) == "Sure!"
    assert all("\n" not in d for d in deltas)
    assert text.stopped
    assert text.text == "Sure!"


def test_held_prefix_is_released_when_it_cannot_be_a_stop():
    text = TextAssembler(("END",))
    assert text.feed(b"E") == ""      # might be the start of END
    assert text.feed(b"N") == ""
    assert text.feed(b"D?") == ""     # it was: stopped with nothing before it
    assert text.stopped and text.text == ""

    text = TextAssembler(("END",))
    assert text.feed(b"abcE") == "ab"
    assert text.feed(b"Nx") == "cE"
    assert text.flush() == "Nx"
    assert text.text == "abcENx" and not text.stopped


def test_earliest_of_several_stop_strings_wins_and_multibyte_stop():
    text = TextAssembler(("zz", "ü!"))
    assert "".join(feed_all(text, ["aü".encode(), b"!", b"zz"])) == "a"
    assert text.stopped and text.text == "a"


def test_flush_releases_held_text():
    text = TextAssembler(("<|end|>",))
    assert text.feed(b"short") == ""
    assert text.flush() == "short"
    assert text.text == "short"
