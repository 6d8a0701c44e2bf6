"""`coe bench router`: how fast the trained router decides, on real chat prompts.

Workload: the first user turns of MT-Bench (80), AlpacaEval (805) and Arena-Hard (750), in a
fixed shuffled order. The encoder's embedding cache is off, so every prompt is encoded.

Measured in one run:
- single: one prompt per call, p50/p99 latency (target p50 <= 15 ms on 2 CPU cores);
- batched: calls of 64 prompts, prompts/s (target >= 300 prompts/s), against the single-prompt
  rate as baseline;
- encoder: the sentence encoder alone on the same prompts, to show what the head adds.
"""
from __future__ import annotations

import json
import random
import statistics
import time

import torch

from coe.router.data import mtbench_path
from coe.router.learned import LearnedRouter
from coe.router.service import default_artifact_dir

TARGET_P50_MS = 15.0
TARGET_PROMPTS_PER_S = 300.0


def add_arguments(parser) -> None:
    parser.add_argument("--artifact", help="router folder (default: $COE_HOME/router/default)")
    parser.add_argument("--single", type=int, default=300, help="prompts timed one at a time")
    parser.add_argument("--batches", type=int, default=15, help="batches of --batch-size timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def workload() -> list[str]:
    from coe.router import data

    prompts = [row["turns"][0] for row in data._jsonl(mtbench_path())]
    framework = data._framework()
    alpaca = json.loads((framework / "alpaca_eval/data/alpaca_eval_gpt4_baseline.json").read_text())
    prompts += [row["instruction"] for row in alpaca]
    prompts += [row["prompt"] for row in
                data._jsonl(framework / "arena_hard/data/arena-hard-v2.0/question.jsonl")]
    random.Random(0).shuffle(prompts)
    return prompts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    folder = args.artifact or default_artifact_dir(args.home)
    router = LearnedRouter.load(folder, "chat")
    router.encoder._cache_entries = 0  # time the work, not the cache
    prompts = workload()
    tokens = [len(router.encoder.token_ids(p)) for p in prompts]
    router.classify(prompts[:16])  # warm-up

    single_s = []
    for prompt in prompts[:args.single]:
        started = time.perf_counter()
        router.classify([prompt])
        single_s.append(time.perf_counter() - started)

    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size][:args.batches]
    started = time.perf_counter()
    for batch in batches:
        router.classify(batch)
    batched_rate = sum(map(len, batches)) / (time.perf_counter() - started)

    started = time.perf_counter()
    for batch in batches:
        router.encoder.encode(batch)
    encoder_rate = sum(map(len, batches)) / (time.perf_counter() - started)

    single_rate = len(single_s) / sum(single_s)
    result = {
        "threads": args.threads, "prompts": len(prompts),
        "tokens_per_prompt": {"mean": statistics.mean(tokens), "p50": _percentile(tokens, 0.5),
                              "p99": _percentile(tokens, 0.99), "max_tokens": router.encoder.max_tokens},
        "single": {"n": len(single_s), "p50_ms": _percentile(single_s, 0.5) * 1e3,
                   "p99_ms": _percentile(single_s, 0.99) * 1e3, "prompts_per_s": single_rate},
        "batched": {"batch_size": args.batch_size, "n": sum(map(len, batches)),
                    "prompts_per_s": batched_rate, "vs_single": batched_rate / single_rate},
        "encoder_only": {"prompts_per_s": encoder_rate, "router_vs_encoder": batched_rate / encoder_rate},
        "targets": {"p50_ms": TARGET_P50_MS, "prompts_per_s": TARGET_PROMPTS_PER_S},
    }
    _print(result)
    return result


def _print(r: dict) -> None:
    t, s, b, e = r["tokens_per_prompt"], r["single"], r["batched"], r["encoder_only"]
    print(f"router bench: {r['prompts']} chat prompts, {t['mean']:.0f} tokens mean "
          f"(p50 {t['p50']}, p99 {t['p99']}, cut at {t['max_tokens']}), {r['threads']} threads")
    rows = [("single prompt p50", f"{s['p50_ms']:.1f} ms", f"<= {TARGET_P50_MS:.0f} ms"),
            ("single prompt p99", f"{s['p99_ms']:.1f} ms", ""),
            ("one at a time", f"{s['prompts_per_s']:.0f} prompts/s", "baseline"),
            (f"batches of {b['batch_size']}", f"{b['prompts_per_s']:.0f} prompts/s",
             f">= {TARGET_PROMPTS_PER_S:.0f}; {b['vs_single']:.2f}x baseline"),
            ("encoder alone, batched", f"{e['prompts_per_s']:.0f} prompts/s",
             f"router/encoder {e['router_vs_encoder']:.2f}")]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>16}  {note}")
