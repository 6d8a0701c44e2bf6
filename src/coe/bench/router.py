"""`coe bench router`: how fast the trained router decides, on real chat prompts.

Workloads (real first user turns, fixed shuffled order; the encoder's embedding cache is off,
so every prompt is encoded):
- chat: MT-Bench (80) and AlpacaEval (805) instructions, typical chat requests;
- long: Arena-Hard (750), long technical prompts, most of them cut at the encoder's limit;
- mixed: all of them.

Measured per workload in one run:
- single: one prompt per call, p50/p99 latency (target p50 <= 15 ms on 2 CPU cores);
- batched: calls of 64 prompts, prompts/s (target >= 300 prompts/s), against the single-prompt
  rate as baseline;
- encoder: the sentence encoder alone on the same batches, to show what the head adds;
- concurrent: ``--clients`` threads each routing one prompt at a time, as the server's request
  threads do, straight to the router vs through ``BatchingRouter`` (what the server uses).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from coe.router.data import mtbench_path
from coe.router.service import default_artifact_dir

if TYPE_CHECKING:  # torch loads only when the bench runs: `coe --help` builds every bench's parser
    from coe.router.learned import LearnedRouter

TARGET_P50_MS = 15.0
TARGET_PROMPTS_PER_S = 300.0


def add_arguments(parser) -> None:
    parser.add_argument("--artifact", help="router folder (default: $COE_HOME/router/default)")
    parser.add_argument("--single", type=int, default=300, help="prompts timed one at a time")
    parser.add_argument("--batches", type=int, default=15, help="batches of --batch-size timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent routing threads")


def workloads() -> dict[str, list[str]]:
    from coe.router import data

    framework = data.framework_folder()
    alpaca = json.loads((framework / "alpaca_eval/data/alpaca_eval_gpt4_baseline.json").read_text())
    chat = [row["turns"][0] for row in data.read_jsonl(mtbench_path())]
    chat += [row["instruction"] for row in alpaca]
    long = [
        row["prompt"]
        for row in data.read_jsonl(framework / "arena_hard/data/arena-hard-v2.0/question.jsonl")
    ]
    out = {"chat": chat, "long": long, "mixed": chat + long}
    for prompts in out.values():
        random.Random(0).shuffle(prompts)
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args) -> dict:
    import torch

    from coe.router.learned import LearnedRouter

    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    folder = args.artifact or default_artifact_dir(args.home)
    router = LearnedRouter.load(folder, "chat")
    router.encoder._cache_entries = 0  # time the work, not the cache
    prompts = workloads()
    results = {name: _measure(router, texts, args) for name, texts in prompts.items()}
    concurrent = _concurrent(router, prompts["chat"][:640], args.clients)
    result = {
        "threads": args.threads,
        "max_tokens": router.encoder.max_tokens,
        "precision": router.encoder.precision,
        "workloads": results,
        "concurrent": concurrent,
        "targets": {"p50_ms": TARGET_P50_MS, "prompts_per_s": TARGET_PROMPTS_PER_S},
    }
    _print(result)
    return result


def _measure(router: LearnedRouter, prompts: list[str], args) -> dict:
    tokens = [len(router.encoder.token_ids(p)) for p in prompts]
    router.classify(prompts[:16])  # warm-up
    single_s = []
    for prompt in prompts[: args.single]:
        started = time.perf_counter()
        router.classify([prompt])
        single_s.append(time.perf_counter() - started)
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size][: args.batches]
    batched_rate = _rate(router.classify, batches)
    encoder_rate = _rate(router.encoder.encode, batches)
    single_rate = len(single_s) / sum(single_s)
    return {
        "prompts": len(prompts),
        "tokens_per_prompt": {
            "mean": statistics.mean(tokens),
            "p50": _percentile(tokens, 0.5),
            "p99": _percentile(tokens, 0.99),
        },
        "single": {
            "n": len(single_s),
            "p50_ms": _percentile(single_s, 0.5) * 1e3,
            "p99_ms": _percentile(single_s, 0.99) * 1e3,
            "prompts_per_s": single_rate,
        },
        "batched": {
            "batch_size": args.batch_size,
            "n": sum(map(len, batches)),
            "prompts_per_s": batched_rate,
            "vs_single": batched_rate / single_rate,
        },
        "encoder_only": {
            "prompts_per_s": encoder_rate,
            "router_vs_encoder": batched_rate / encoder_rate,
        },
    }


def _concurrent(router: LearnedRouter, prompts: list[str], clients: int) -> dict:
    """Prompts/s when ``clients`` threads route single prompts at once."""
    from coe.router.batching import BatchingRouter

    batching = BatchingRouter(router)
    direct_rate = _threaded_rate(router, prompts, clients)
    batched_rate = _threaded_rate(batching, prompts, clients)
    return {
        "clients": clients,
        "prompts": len(prompts),
        "direct_prompts_per_s": direct_rate,
        "batching_prompts_per_s": batched_rate,
        "batching_vs_direct": batched_rate / direct_rate,
        "inner_calls": batching.calls,
    }


def _threaded_rate(router, prompts: list[str], clients: int) -> float:
    shares = [prompts[i::clients] for i in range(clients)]

    def client(share: list[str]) -> None:
        for prompt in share:
            router.classify([prompt])

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(prompts) / (time.perf_counter() - started)


def _rate(fn, batches: list[list[str]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        fn(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


def _print(r: dict) -> None:
    print(
        f"router bench: encoder {r['precision']}, cut at {r['max_tokens']} tokens, "
        f"{r['threads']} threads; targets p50 <= {TARGET_P50_MS:.0f} ms, "
        f">= {TARGET_PROMPTS_PER_S:.0f} prompts/s batched"
    )
    header = (
        "workload",
        "prompts",
        "tokens mean",
        "p50 ms",
        "p99 ms",
        "1-by-1 /s",
        "batch64 /s",
        "vs 1-by-1",
        "encoder /s",
    )
    rows = [header]
    for name, w in r["workloads"].items():
        s, b = w["single"], w["batched"]
        rows.append(
            (
                name,
                str(w["prompts"]),
                f"{w['tokens_per_prompt']['mean']:.0f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['prompts_per_s']:.0f}",
                f"{b['prompts_per_s']:.0f}",
                f"{b['vs_single']:.2f}x",
                f"{w['encoder_only']['prompts_per_s']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  "
            + "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
    c = r["concurrent"]
    print(
        f"  {c['clients']} concurrent clients, one chat prompt per call: "
        f"{c['direct_prompts_per_s']:.0f} prompts/s straight to the router, "
        f"{c['batching_prompts_per_s']:.0f} through BatchingRouter "
        f"({c['batching_vs_direct']:.2f}x; {c['prompts']} prompts in {c['inner_calls']} encoder calls)"
    )
