"""Evaluation suites built from the packaged datasets (read as files, never committed).

Every suite belongs to one router category and yields ``EvalItem``s: the chat the expert sees,
what the scorer needs, and how the item is scored (``kind``). Items come from the half of each
benchmark the router never trained on (``router.data.split_of(group, eval_shared=True) ==
"eval"``); BoolQ, which the router does train on, contributes only its router *test* split. Items
are ordered by a stable hash of their id, so ``--limit N`` takes the same sample on every machine.

Chat-style sets without automatic scoring (MT-Bench) need an LLM judge; ``judged`` marks them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from coe.errors import ConfigError
from coe.router import data
from coe.types import ChatMessage

LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Answer with the letter of the correct option only."
RECIPE = 1  # bump when a prompt or a reference changes: cached results are keyed by it


@dataclass(frozen=True)
class EvalItem:
    suite: str
    category: str
    id: str
    kind: str  # choice | gsm8k | math | humaneval | mbpp | ifeval | bfcl | judge
    messages: tuple[ChatMessage, ...]
    reference: dict = field(default_factory=dict)  # what the scorer needs (answer, tests, rules)
    max_tokens: int = 8
    tools: tuple[dict, ...] = ()  # the functions offered (routing sees them as OpenAI tools)

    @property
    def num_options(self) -> int:
        return len(self.reference.get("options", ()))


@dataclass(frozen=True)
class Suite:
    name: str
    category: str
    kind: str
    load: Callable[[], list[EvalItem]]
    judged: bool = False


def _reserved(group: str) -> bool:
    return data.split_of(group, eval_shared=True) == "eval"


def _ordered(items: list[EvalItem]) -> list[EvalItem]:
    """One item per id (HellaSwag repeats a source id), in a stable pseudo-random order."""
    unique = list({item.id: item for item in reversed(items)}.values())
    return sorted(unique, key=lambda item: data.unit_hash("eval:" + item.id))


def _user(text: str, system: str | None = None) -> tuple[ChatMessage, ...]:
    head = (ChatMessage("system", system),) if system else ()
    return head + (ChatMessage("user", text),)


# -- multiple choice --------------------------------------------------------------------------------
def choice_prompt(question: str, options: list[str]) -> str:
    lines = [question.strip(), ""] + [
        f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)
    ]
    return "\n".join(lines + ["", CHOICE_INSTRUCTION])


def choice_item(
    suite: str, category: str, group: str, question: str, options: list, answer: int
) -> EvalItem:
    options = [str(o) for o in options]
    if not 0 <= answer < len(options) <= len(LETTERS):
        raise ValueError(f"{group}: answer {answer} outside {len(options)} options")
    return EvalItem(
        suite,
        category,
        group,
        "choice",
        _user(choice_prompt(question, options)),
        {"options": options, "answer": answer},
        max_tokens=8,
    )


def _mmlu(category: str) -> Callable[[], list[EvalItem]]:
    def load() -> list[EvalItem]:
        items = []
        for subject in data.MMLU_GROUPS[category]:
            for i, row in enumerate(data.arrow_rows(f"hails/mmlu_no_train/{subject}/test")):
                group = f"mmlu:{subject}:{i}"
                if _reserved(group):
                    items.append(
                        choice_item(
                            f"mmlu_{category}",
                            category,
                            group,
                            row["question"],
                            data.as_list(row["choices"]),
                            int(row["answer"]),
                        )
                    )
        return items

    return load


def _arc_challenge() -> list[EvalItem]:
    items = []
    for row in data.arrow_rows("ai2_arc/ARC-Challenge/validation"):
        group = f"arc:{row['id']}"
        choices = row["choices"] if isinstance(row["choices"], dict) else eval_dict(row["choices"])
        labels = list(choices["label"])
        if _reserved(group) and row["answerKey"] in labels:
            items.append(
                choice_item(
                    "arc_challenge",
                    "stem",
                    group,
                    row["question"],
                    list(choices["text"]),
                    labels.index(row["answerKey"]),
                )
            )
    return items


def eval_dict(text: str) -> dict:
    """A dict stored as its Python repr (some Arrow columns), read without eval."""
    import ast

    value = ast.literal_eval(text)
    if not isinstance(value, dict):
        raise ValueError("expected a dict")
    return {k: list(v) for k, v in value.items()}


def _hellaswag() -> list[EvalItem]:
    items = []
    for row in data.arrow_rows("hellaswag/none/validation"):
        group = f"hellaswag:{row['ind']}"
        if _reserved(group):
            items.append(
                choice_item(
                    "hellaswag",
                    "reasoning",
                    group,
                    f"What happens next? {row['ctx']}",
                    data.as_list(row["endings"]),
                    int(row["label"]),
                )
            )
    return items


def _medmcqa() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("medmcqa/mc_5shot"):
        group = f"medmcqa:{doc['id']}"
        if _reserved(group):
            options = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
            items.append(
                choice_item("medmcqa", "medicine", group, doc["question"], options, int(doc["cop"]))
            )
    return items


def _medqa() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("medqa_en/mc_5shot"):
        group = f"medqa:{doc['index']}"
        if not _reserved(group):
            continue
        question, options = _split_options(
            doc["query"].removeprefix("Question:").rsplit("Answer:", 1)[0]
        )
        items.append(choice_item("medqa", "medicine", group, question, options, int(doc["gold"])))
    return items


def _split_options(body: str) -> tuple[str, list[str]]:
    """A question followed by lines ' A. option', ' B. option'... (the question may span lines)."""
    lines = body.rstrip().rstrip('"').rstrip().split("\n")
    tail: list[tuple[str, str]] = []
    while lines:
        found = re.match(r"^\s*([A-J])\.\s?(.*)$", lines[-1])
        if not found:
            break
        tail.append((found.group(1), found.group(2).strip()))
        lines.pop()
    tail.reverse()
    if [letter for letter, _ in tail] != list(LETTERS[: len(tail)]):
        raise ValueError(f"options not in order: {[letter for letter, _ in tail]}")
    return "\n".join(lines).strip(), [text for _, text in tail]


def _boolq() -> list[EvalItem]:
    items = []
    for i, row in enumerate(data.arrow_rows("boolq/none/validation")):
        group = f"boolq:{i}"
        if data.split_of(group, eval_shared=False) == "test":
            question = f"{row['passage']}\n\nQuestion: {row['question'].capitalize()}?"
            answer = 0 if str(row["answer"]).lower() in ("true", "1") else 1
            items.append(choice_item("boolq", "extraction", group, question, ["Yes", "No"], answer))
    return items


# -- generated answers ------------------------------------------------------------------------------
MATH_INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{ANSWER}."


def _gsm8k() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("gsm8k/gold_bpb_5shot"):
        group = f"gsm8k:{doc['id']}"
        if _reserved(group):
            text = f"{doc['question']}\n\n{MATH_INSTRUCTION}"
            items.append(
                EvalItem(
                    "gsm8k",
                    "math",
                    group,
                    "gsm8k",
                    _user(text),
                    {"answer": doc["answer"]},
                    max_tokens=320,
                )
            )
    return items


def _math500() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("minerva_math_500/gold_bpb_0shot"):
        group = f"math500:{doc['index']}"  # MATH-500 is never in the router's training data
        text = f"{doc['problem']}\n\n{MATH_INSTRUCTION}"
        items.append(
            EvalItem(
                "math500",
                "math",
                group,
                "math",
                _user(text),
                {"solution": doc["solution"], "answer": doc["answer"]},
                max_tokens=512,
            )
        )
    return items


CODE_INSTRUCTION = "Write the complete Python function in one ```python code block."


def _humaneval() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("codex_humaneval/gold_bpb_0shot"):
        group = doc["task_id"]
        if _reserved(group):
            problem = {
                k: doc[k]
                for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")
            }
            text = f"Complete this Python function.\n\n```python\n{doc['prompt']}```\n\n{CODE_INSTRUCTION}"
            items.append(
                EvalItem(
                    "humaneval", "code", group, "humaneval", _user(text), problem, max_tokens=384
                )
            )
    return items


def _mbpp() -> list[EvalItem]:
    items = []
    for doc in data.task_docs("codex_mbpp/gold_bpb_3shot"):
        group = f"mbpp:{doc['task_id']}"
        if not _reserved(group):
            continue
        tests = list(doc.get("test_list") or [])
        if not tests:
            continue
        text = (
            f"{doc['text']}\n\nYour code must pass this test:\n```python\n{tests[0]}\n```\n\n"
            f"Write the Python code in one ```python code block."
        )
        reference = {
            "task_id": doc["task_id"],
            "test_list": tests,
            "code": doc.get("code", ""),
            "test_setup_code": doc.get("test_setup_code", ""),
        }
        items.append(
            EvalItem("mbpp", "code", group, "mbpp", _user(text), reference, max_tokens=384)
        )
    return items


def _ifeval() -> list[EvalItem]:
    from coe.eval import ifeval

    items = []
    for row in ifeval.load_rows():
        group = f"ifeval:{row['key']}"
        if _reserved(group) and all(i in ifeval.SUPPORTED for i in row["instruction_id_list"]):
            items.append(
                EvalItem(
                    "ifeval",
                    "writing",
                    group,
                    "ifeval",
                    _user(row["prompt"]),
                    dict(row),
                    max_tokens=512,
                )
            )
    return items


def bfcl_items() -> list[EvalItem]:
    """BFCL items the evaluation scores (the reserved half), in its prompt-only format, with tools."""
    from coe.eval import toolcall

    items = []
    for name in toolcall.SETS:
        for row in toolcall.load_items(name):
            group = f"bfcl:{row['id']}"
            if _reserved(group):
                system, user = toolcall.tool_prompt(row)
                tools = tuple({"type": "function", "function": f} for f in row["function"])
                items.append(
                    EvalItem(
                        "bfcl",
                        "tool_use",
                        group,
                        "bfcl",
                        _user(user, system),
                        row,
                        max_tokens=256,
                        tools=tools,
                    )
                )
    return items


def _mtbench() -> list[EvalItem]:
    items = []
    for row in data.read_jsonl(data.mtbench_path()):
        group = f"mtbench:{row['question_id']}"
        category = data.MTBENCH_CATEGORIES[row["category"]]
        reference = {"question": row["turns"][0], "reference": (row.get("reference") or [""])[0]}
        items.append(
            EvalItem(
                "mtbench",
                category,
                group,
                "judge",
                _user(row["turns"][0]),
                reference,
                max_tokens=512,
            )
        )
    return items


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("mmlu_math", "math", "choice", _mmlu("math")),
        Suite("gsm8k", "math", "gsm8k", _gsm8k),
        Suite("math500", "math", "math", _math500),
        Suite("humaneval", "code", "humaneval", _humaneval),
        Suite("mbpp", "code", "mbpp", _mbpp),
        Suite("mmlu_stem", "stem", "choice", _mmlu("stem")),
        Suite("arc_challenge", "stem", "choice", _arc_challenge),
        Suite("mmlu_medicine", "medicine", "choice", _mmlu("medicine")),
        Suite("medmcqa", "medicine", "choice", _medmcqa),
        Suite("medqa", "medicine", "choice", _medqa),
        Suite("mmlu_humanities", "humanities", "choice", _mmlu("humanities")),
        Suite("mmlu_reasoning", "reasoning", "choice", _mmlu("reasoning")),
        Suite("hellaswag", "reasoning", "choice", _hellaswag),
        Suite("boolq", "extraction", "choice", _boolq),
        Suite("ifeval", "writing", "ifeval", _ifeval),
        Suite("bfcl", "tool_use", "bfcl", bfcl_items),
        Suite("mtbench", "chat", "judge", _mtbench, judged=True),
    ]
}


@dataclass(frozen=True)
class SuiteSet:
    """A named selection of suites with per-kind item limits (``--limit`` overrides them)."""

    suites: tuple[str, ...]
    limits: dict[str, int]


SETS = {
    # The default: one or two suites per category, small enough to finish in under 20 min here.
    "quick": SuiteSet(
        (
            "mmlu_math",
            "gsm8k",
            "humaneval",
            "mbpp",
            "arc_challenge",
            "medmcqa",
            "mmlu_humanities",
            "hellaswag",
            "boolq",
            "ifeval",
            "bfcl",
            "mtbench",
        ),
        {"choice": 16, "gsm8k": 6, "humaneval": 6, "mbpp": 6, "ifeval": 6, "bfcl": 6, "judge": 8},
    ),
    # What the packaged default score table was measured with (about 2 hours here).
    "standard": SuiteSet(
        (
            "mmlu_math",
            "gsm8k",
            "humaneval",
            "mbpp",
            "mmlu_stem",
            "arc_challenge",
            "mmlu_medicine",
            "medmcqa",
            "mmlu_humanities",
            "mmlu_reasoning",
            "hellaswag",
            "boolq",
            "ifeval",
            "bfcl",
            "mtbench",
        ),
        # At least 100 items per category, so the overall score's 95% interval is within +-0.05.
        {
            "choice": 100,
            "gsm8k": 24,
            "humaneval": 50,
            "mbpp": 50,
            "ifeval": 100,
            "bfcl": 100,
            "judge": 16,
        },
    ),
    "all": SuiteSet(tuple(SUITES), {}),
}


def resolve(spec: str) -> tuple[list[Suite], dict[str, int]]:
    """Suites named by ``spec`` (a set name: quick, standard, all; or suite names separated by
    commas) and the per-kind item limits of the set (none for named suites)."""
    names: list[str] = []
    limits: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        chosen = SETS.get(part)
        limits.update(chosen.limits if chosen else {})
        for name in chosen.suites if chosen else (part,):
            if name not in SUITES:
                raise ConfigError(
                    f"unknown suite {name!r}; choose a set ({', '.join(SETS)}) or suites: "
                    f"{', '.join(SUITES)}",
                    param="suite",
                )
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError("no suite given", param="suite")
    return [SUITES[n] for n in names], limits


def load_items(suite: Suite, limit: int | None) -> list[EvalItem]:
    items = _ordered(suite.load())
    return items[:limit] if limit is not None else items


def item_key(item: EvalItem) -> str:
    """What identifies an item's content for the result cache."""
    body = json.dumps(
        [
            item.suite,
            item.id,
            item.kind,
            item.max_tokens,
            [(m.role, m.content) for m in item.messages],
            RECIPE,
        ],
        sort_keys=True,
    )
    return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()
