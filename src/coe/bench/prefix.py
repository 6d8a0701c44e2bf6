"""`coe bench prefix`: prefix caching on real two-turn conversations.

MT-Bench's questions have two turns. For each expert, each conversation runs as a user would run
it: the first turn (greedy, ``--max-tokens``), then the second turn with the first answer in the
history. Measured on the expert's runner, one process, greedy:
- the second turn's time to first token (its prompt starts with the whole first turn, whose KV
  cells the expert still holds), and
- the first turn's time to first token (only the chat template's opening is shared, with the
  previous conversation),
with prefix caching on (the default) against the same expert with ``cache_prompt: false`` (the
baseline: every prompt evaluated from its first token), measured in the same run.
"""

from __future__ import annotations

import statistics
import time

from coe.bench.switch import standalone_cache
from coe.config import ExpertConfig, default_config
from coe.engine.batch import generate
from coe.models import ModelStore
from coe.router.data import mtbench_path, read_jsonl
from coe.types import ChatMessage, Completion, Request, SamplingParams, Tier


def add_arguments(parser) -> None:
    parser.add_argument(
        "--experts", nargs="*", help="packaged expert names (default: the four defaults)"
    )
    parser.add_argument(
        "--conversations", type=int, default=6, help="MT-Bench conversations per expert"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="length of the first turn's answer"
    )


def conversations(count: int) -> list[tuple[str, str]]:
    """(first turn, second turn) of ``count`` MT-Bench questions, one category after another."""
    rows = read_jsonl(mtbench_path())
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    picked = [row for group in zip(*by_category.values()) for row in group][:count]
    return [(row["turns"][0], row["turns"][1]) for row in picked]


def _chat(expert: str, messages: list[tuple[str, str]], max_tokens: int) -> Request:
    return Request(
        expert,
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=tuple(ChatMessage(role, text) for role, text in messages),
    )


def _timed(runner, request: Request) -> tuple[float, Completion]:
    """(seconds to the first event, the completion)."""
    started = time.perf_counter()
    first_s: float | None = None
    completion: Completion | None = None
    for event in generate(runner, [request]):
        if first_s is None:
            first_s = time.perf_counter() - started
        if event.error is not None:
            raise event.error
        if event.is_final:
            completion = event.completion
    assert first_s is not None and completion is not None  # one request: it ended with a completion
    return first_s, completion


def measure(
    store: ModelStore, expert: ExpertConfig, cache_prompt: bool, talks, max_tokens: int
) -> dict:
    config = ExpertConfig(
        expert.name, expert.source, params={**expert.params, "cache_prompt": cache_prompt}
    )
    cache = standalone_cache((config,), store)
    try:
        runner = cache.activate(expert.name)
        _timed(runner, _chat(expert.name, [("user", "Hello")], 4))  # the first decode after a load
        first, second = [], []
        for question, follow_up in talks:
            ttft_s, answer = _timed(runner, _chat(expert.name, [("user", question)], max_tokens))
            first.append((ttft_s, answer.prompt_tokens, answer.cached_tokens))
            history = [("user", question), ("assistant", answer.text), ("user", follow_up)]
            ttft_s, done = _timed(runner, _chat(expert.name, history, 1))
            second.append((ttft_s, done.prompt_tokens, done.cached_tokens))
    finally:
        cache.evict(expert.name, Tier.HOST)
    return {"first_turn": _summary(first), "second_turn": _summary(second)}


def _summary(rows: list[tuple[float, int, int]]) -> dict:
    return {
        "ttft_p50_s": statistics.median(r[0] for r in rows),
        "ttft_mean_s": statistics.mean(r[0] for r in rows),
        "prompt_tokens_mean": statistics.mean(r[1] for r in rows),
        "cached_tokens_mean": statistics.mean(r[2] for r in rows),
    }


def run(args) -> dict:
    defaults = default_config()
    names = args.experts or [e.name for e in defaults.experts]
    store = ModelStore(args.home)
    talks = conversations(args.conversations)
    rows = []
    for name in names:
        expert = defaults.expert(name)
        off = measure(store, expert, False, talks, args.max_tokens)
        on = measure(store, expert, True, talks, args.max_tokens)
        rows.append(
            {
                "expert": name,
                "off": off,
                "on": on,
                "second_turn_speedup": off["second_turn"]["ttft_mean_s"]
                / on["second_turn"]["ttft_mean_s"],
                "first_turn_speedup": off["first_turn"]["ttft_mean_s"]
                / on["first_turn"]["ttft_mean_s"],
            }
        )
    _print(rows, len(talks))
    return {
        "conversations": len(talks),
        "max_tokens": args.max_tokens,
        "baseline": "cache_prompt: false",
        "experts": rows,
    }


def _print(rows: list[dict], count: int) -> None:
    print(
        f"prefix caching, {count} MT-Bench two-turn conversations per expert; time to first token, "
        f"mean (baseline: cache_prompt false)"
    )
    print(
        f"{'expert':<20} {'turn 2 tokens':>13} {'cached':>7} {'off s':>7} {'on s':>7} {'speedup':>8}   "
        f"{'turn 1 tokens':>13} {'cached':>7} {'speedup':>8}"
    )
    for r in rows:
        off2, on2, on1 = r["off"]["second_turn"], r["on"]["second_turn"], r["on"]["first_turn"]
        print(
            f"{r['expert']:<20} {on2['prompt_tokens_mean']:>13.0f} {on2['cached_tokens_mean']:>7.0f} "
            f"{off2['ttft_mean_s']:>7.3f} {on2['ttft_mean_s']:>7.3f} {r['second_turn_speedup']:>7.2f}x   "
            f"{on1['prompt_tokens_mean']:>13.0f} {on1['cached_tokens_mean']:>7.0f} {r['first_turn_speedup']:>7.2f}x"
        )
