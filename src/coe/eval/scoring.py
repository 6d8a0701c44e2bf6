"""Turn an expert's output on one item into a score in [0, 1] and a short reason.

Multiple choice is scored two ways: by the log-probabilities of the option letters at the first
token of the answer (one prefill, no sampling; in-process only) or by the letter found in a
generated answer (works against any server). Everything else is scored on the generated text:
exact match after answer extraction (GSM8K, MATH), pass@1 in the sandbox (HumanEval, MBPP), rule
checks (IFEval), AST match (BFCL), or an LLM judge's 1-10 rating (MT-Bench).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coe.eval import answers, ifeval, sandbox, toolcall
from coe.eval.suites import LETTERS, EvalItem

CODE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Verdict:
    score: float  # 0..1
    detail: str


def choice_by_logprobs(item: EvalItem, letter_logprobs: Sequence[float]) -> Verdict:
    """The option whose letter is most likely as the answer's first token."""
    best = max(range(len(letter_logprobs)), key=lambda i: letter_logprobs[i])
    right = item.reference["answer"]
    probs = _softmax(letter_logprobs)
    return Verdict(
        float(best == right),
        f"picked {LETTERS[best]} (p={probs[best]:.2f}), "
        f"answer {LETTERS[right]} (p={probs[right]:.2f})",
    )


def _softmax(logprobs: Sequence[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def score_text(
    item: EvalItem, text: str, judge: Callable[[EvalItem, str], Verdict] | None = None
) -> Verdict:
    """Score a generated answer. ``judge`` rates judged items (required for kind 'judge')."""
    scorer = _SCORERS.get(item.kind)
    if item.kind == "judge":
        if judge is None:
            raise ValueError(f"{item.suite} needs a judge (--judge URL)")
        return judge(item, text)
    if scorer is None:
        raise ValueError(f"no scorer for item kind {item.kind!r}")
    return scorer(item, text)


def _choice(item: EvalItem, text: str) -> Verdict:
    picked = answers.choice_letter(text, item.num_options)
    right = item.reference["answer"]
    if picked is None:
        return Verdict(0.0, "no option letter found in the answer")
    return Verdict(float(picked == right), f"picked {LETTERS[picked]}, answer {LETTERS[right]}")


def _gsm8k(item: EvalItem, text: str) -> Verdict:
    gold = answers.gsm8k_gold(item.reference["answer"])
    found = answers.gsm8k_extract(text)
    ok = found is not None and answers.numbers_equal(found, gold)
    return Verdict(float(ok), f"answered {found!r}, gold {gold!r}")


def _math(item: EvalItem, text: str) -> Verdict:
    gold = answers.math_gold(item.reference)
    found = answers.math_extract(text)
    ok = found is not None and answers.math_equal(found, gold)
    return Verdict(float(ok), f"answered {found!r}, gold {gold!r}")


def _humaneval(item: EvalItem, text: str) -> Verdict:
    result = sandbox.check_humaneval(item.reference, text, timeout_s=CODE_TIMEOUT_S)
    return Verdict(float(result.passed), f"{result.status}: {result.detail[-200:]}".strip())


def _mbpp(item: EvalItem, text: str) -> Verdict:
    result = sandbox.check_mbpp(item.reference, text, timeout_s=CODE_TIMEOUT_S)
    return Verdict(float(result.passed), f"{result.status}: {result.detail[-200:]}".strip())


def _ifeval(item: EvalItem, text: str) -> Verdict:
    result = ifeval.score_item(item.reference, text)
    kept = sum(result.instruction_strict)
    return Verdict(
        float(result.prompt_level_strict),
        f"{kept}/{len(result.instruction_strict)} instructions followed (strict); "
        f"loose: {'all' if result.prompt_level_loose else 'not all'}",
    )


def _bfcl(item: EvalItem, text: str) -> Verdict:
    ok, reason = toolcall.score_response(item.reference, text)
    return Verdict(float(ok), reason)


_SCORERS: dict[str, Callable[[EvalItem, str], Verdict]] = {
    "choice": _choice,
    "gsm8k": _gsm8k,
    "math": _math,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "ifeval": _ifeval,
    "bfcl": _bfcl,
}
