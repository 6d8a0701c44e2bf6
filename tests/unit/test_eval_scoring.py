"""Scoring real suite items with known right and wrong answers, and the judge's rating parser."""
from __future__ import annotations

import pytest

from coe.eval import scoring, suites
from coe.eval.judge import judge_prompt, parse_rating


def first(name: str):
    return suites.load_items(suites.SUITES[name], 1)[0]


def test_letter_logprobs_pick_the_most_likely_option():
    item = first("mmlu_stem")
    right = item.reference["answer"]
    logprobs = [-3.0] * item.num_options
    logprobs[right] = -0.1
    assert scoring.choice_by_logprobs(item, logprobs).score == 1.0
    logprobs[(right + 1) % item.num_options] = 0.0
    verdict = scoring.choice_by_logprobs(item, logprobs)
    assert verdict.score == 0.0 and "picked" in verdict.detail


def test_generated_letters():
    item = first("arc_challenge")
    letter = suites.LETTERS[item.reference["answer"]]
    wrong = suites.LETTERS[(item.reference["answer"] + 1) % item.num_options]
    assert scoring.score_text(item, f"The answer is {letter}.").score == 1.0
    assert scoring.score_text(item, f"The answer is {wrong}.").score == 0.0
    assert scoring.score_text(item, "I am not sure.").score == 0.0


def test_gsm8k_right_and_wrong():
    item = first("gsm8k")
    gold = item.reference["answer"].split("####")[1].strip().replace(",", "")
    assert scoring.score_text(item, f"Step by step... so the answer is \\boxed{{{gold}}}.").score == 1.0
    assert scoring.score_text(item, f"The answer is {int(gold) + 1}.").score == 0.0


def test_math500_right_and_wrong():
    item = first("math500")
    solution = item.reference["solution"]
    assert scoring.score_text(item, solution).score == 1.0
    assert scoring.score_text(item, "The answer is \\boxed{123456789}.").score == 0.0


def test_humaneval_canonical_solution_passes_and_a_stub_fails():
    item = first("humaneval")
    ref = item.reference
    answer = f"Here it is:\n```python\n{ref['prompt']}{ref['canonical_solution']}```\n"
    assert scoring.score_text(item, answer).score == 1.0
    assert scoring.score_text(item, f"```python\n{ref['prompt']}    return None\n```").score == 0.0


def test_mbpp_reference_code_passes_and_garbage_fails():
    item = first("mbpp")
    assert scoring.score_text(item, f"```python\n{item.reference['code']}\n```").score == 1.0
    assert scoring.score_text(item, "```python\ndef nothing():\n    pass\n```").score == 0.0


def test_bfcl_ground_truth_call_passes_and_a_wrong_name_fails():
    item = first("bfcl")
    calls = []
    for call in item.reference["ground_truth"]:
        (name, params), = call.items()
        args = ", ".join(f"{k}={v[0]!r}" for k, v in params.items() if v and v[0] != "")
        calls.append(f"{name}({args})")
    assert scoring.score_text(item, "[" + ", ".join(calls) + "]").score == 1.0
    assert scoring.score_text(item, "[no_such_function(x=1)]").score == 0.0


def test_ifeval_follows_the_rules():
    item = next(i for i in suites.load_items(suites.SUITES["ifeval"], None)
                if i.reference["instruction_id_list"] == ["punctuation:no_comma"])
    assert scoring.score_text(item, "A plain answer without any of those marks.").score == 1.0
    assert scoring.score_text(item, "An answer, with a comma.").score == 0.0


def test_judged_items_need_a_judge():
    item = suites.load_items(suites.SUITES["mtbench"], 1)[0]
    with pytest.raises(ValueError, match="judge"):
        scoring.score_text(item, "an answer")
    verdict = scoring.score_text(item, "an answer", judge=lambda i, text: scoring.Verdict(0.7, "fake judge"))
    assert verdict.score == 0.7
    assert item.reference["question"] in judge_prompt(item, "an answer")


@pytest.mark.parametrize("text, rating", [
    ("Good answer.\nRating: [[8]]", 8), ("[[10]]", 10), ("Rating: 3", 3), ("[[7.5]]", 7),
    ("no rating here", None), ("[[0]]", None), ("first [[2]] then [[9]]", 9)])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating
