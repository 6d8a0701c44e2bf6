"""Benchmarks: each is a `coe bench ...` command that prints a table and writes JSON.

Results are ratios against a baseline measured in the same run. Run benchmarks alone on the
machine: parallel builds or tests distort them.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BENCHES = {
    "overhead": ("coe.bench.overhead", "coe's generation path vs llama-cpp-python called directly"),
    "load": ("coe.bench.load", "torch expert load bandwidth (disk->host->device) vs raw copies"),
    "router": ("coe.bench.router", "router latency (one prompt) and throughput (batches of 64)"),
    "switch": (
        "coe.bench.switch",
        "expert switch time (cold/warm -> hot) vs on-demand loading; LRU vs GDSF vs LRFU replay",
    ),
    "prefix": (
        "coe.bench.prefix",
        "prefix caching: time to first token of follow-up turns vs cache_prompt false",
    ),
    "serve": (
        "coe.bench.serve",
        "real servers under a replayed trace: naive (FIFO, no warm tier) vs coe's defaults",
    ),
    "shared": (
        "coe.bench.shared",
        "N specialisations of one base: profiles over the shared base vs N separate copies",
    ),
    "lora": (
        "coe.bench.lora",
        "per-row LoRA: N adapters of one base in one batch vs one batch per adapter (torch)",
    ),
    "scale": (
        "coe.bench.scale",
        "start-up time and per-request router/scheduler/policy work at 10 vs 150 experts",
    ),
    "fleet": (
        "coe.bench.fleet",
        "100+ experts totalling 2x RAM on disk: coe vs naive vs llama-server's router mode",
    ),
    "structured": (
        "coe.bench.structured",
        "JSON-schema constraint cost (tokens/s) per expert; BFCL accuracy, native tools vs prompt-only",
    ),
    "soak": (
        "coe.bench.soak",
        "a real server under a long mix of valid and invalid requests: nothing lost, memory back to baseline",
    ),
}


def add_bench_parser(sub):
    """Add `bench <name>` subcommands; returns the `bench` parser."""
    parser = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    benches = parser.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        p = benches.add_parser(name, help=help_text)
        p.add_argument(
            "--out",
            "--json",
            dest="out",
            default=f"bench-results/{name}.json",
            help="where to write the JSON results",
        )
        _import(module).add_arguments(p)
    return parser


def run_bench(args) -> int:
    module = _import(BENCHES[args.bench][0])
    exit_on_sigterm()
    result = module.run(args)
    write_json(Path(args.out), args.bench, result)
    print(f"\nwrote {args.out}")
    return 0


def exit_on_sigterm() -> None:
    """A `timeout` or `kill` unwinds like Ctrl-C: servers are stopped and temp folders (GBs of
    expert copies) are deleted by the benches' own ``finally`` and ``with`` blocks."""

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def write_json(path: Path, name: str, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.machine(),
        "processor": platform.processor(),
        **result,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def in_turn(run: Callable[[int, int], T], sides: int, pairs: int) -> list[list[T]]:
    """``pairs`` rounds of ``run(side, round)`` once per side, the order rotating from round to
    round: a drift in this machine's speed falls on every side alike, and each side follows the
    others as often as it leads (for two sides: ``alternating_ratio``). One list of runs per side."""
    runs: list[list[T]] = [[] for _ in range(sides)]
    for i in range(pairs):
        for k in range(sides):
            side = (i + k) % sides
            runs[side].append(run(side, i))
    return runs


def alternating_ratio(first_s: list[float], second_s: list[float]) -> float:
    """``second_s`` over ``first_s`` for paired runs taken in turn, the order of each pair the
    opposite of the previous one's (pair 0: one side first, pair 1: the other). Whichever side
    runs second in a pair pays for following the other (measured: a first token 30-50% slower
    after another model's decode), so each two consecutive pairs make a block whose orders cancel
    (the geometric mean of its two ratios); the result is the median over blocks."""
    ratios = [s / f for f, s in zip(first_s, second_s)]
    blocks = [math.sqrt(a * b) for a, b in zip(ratios[::2], ratios[1::2])]
    return statistics.median(blocks)


def _import(module: str):
    import importlib

    return importlib.import_module(module)
