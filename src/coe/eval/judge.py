"""An LLM judge for chat-style suites without automatic scoring (MT-Bench): any
OpenAI-compatible endpoint rates an answer from 1 to 10; the score is rating / 10."""

from __future__ import annotations

import re
from collections.abc import Callable

from coe.config import openai_endpoint
from coe.errors import CoEError
from coe.eval.scoring import Verdict
from coe.eval.suites import EvalItem

JUDGE_SYSTEM = "You are a strict, impartial judge of answers written by AI assistants."
JUDGE_TEMPLATE = """Rate the assistant's answer to the user's question below. Consider helpfulness, \
relevance, accuracy, depth and clarity{reference_hint}. Write one short paragraph of reasons, then \
the rating on its own line, exactly in this form: Rating: [[N]] where N is an integer from 1 to 10.

[Question]
{question}
{reference}
[The assistant's answer]
{answer}
[End of answer]"""
RATING = re.compile(r"\[\[\s*(10|[1-9])(?:\.\d+)?\s*\]\]|Rating:\s*(10|[1-9])\b")


def judge_prompt(item: EvalItem, answer: str) -> str:
    reference = item.reference.get("reference") or ""
    return JUDGE_TEMPLATE.format(
        question=item.reference.get("question", item.messages[-1].content),
        reference=f"\n[Reference answer]\n{reference}\n" if reference else "",
        reference_hint=", and compare with the reference answer" if reference else "",
        answer=answer.strip() or "(empty)",
    )


def parse_rating(text: str) -> int | None:
    found = RATING.findall(text)
    if not found:
        return None
    first, second = found[-1]
    return int(first or second)


def http_judge(
    url: str, model: str, api_key: str | None = None, timeout_s: float = 300.0
) -> Callable[[EvalItem, str], Verdict]:
    """A judge behind ``url`` (http://HOST:PORT or .../v1) answering as ``model``."""
    import httpx

    base, headers = openai_endpoint(url, api_key)

    def judge(item: EvalItem, answer: str) -> Verdict:
        body = {
            "model": model,
            "temperature": 0.0,
            "max_tokens": 400,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": judge_prompt(item, answer)},
            ],
        }
        try:
            response = httpx.post(
                base + "/chat/completions", json=body, headers=headers, timeout=timeout_s
            )
        except httpx.HTTPError as exc:
            raise CoEError(f"judge {base}: {exc}") from None
        if response.status_code != 200:
            raise CoEError(f"judge {base} answered {response.status_code}: {response.text[:300]}")
        text = response.json()["choices"][0]["message"]["content"] or ""
        rating = parse_rating(text)
        if rating is None:
            return Verdict(0.0, f"judge gave no rating: {text[-160:]!r}")
        return Verdict(rating / 10, f"judge rating {rating}/10")

    return judge
