"""`coe bench overhead`: load time, memory and tokens/s of each expert through coe's engine vs
llama-cpp-python called directly on the same file, same prompt, greedy, in one process.

The coe side is served as `coe serve` serves it: the router loaded in the process and every token
decoded on the engine's loop thread (a thread other than the one that loaded the router).

Target: coe adds under 5% to generation time (ratio coe_s / direct_s <= 1.05).
"""

from __future__ import annotations

import statistics
import time

from coe.backends.llama_lib import load_llama_cpp, probe_default_load
from coe.config import ExpertConfig, default_config
from coe.engine import Engine
from coe.models import path_of
from coe.types import Request, SamplingParams

PROMPT = "The history of the printing press begins"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--experts", nargs="*", help="packaged expert names (default: the four defaults)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _direct(path: str, args) -> dict:
    llama_cpp = load_llama_cpp()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=4096,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    run = lambda: llm.create_completion(PROMPT, max_tokens=args.max_tokens, temperature=0.0)  # noqa: E731
    run()  # the first request after a load is slow (weight repacking); both sides warm up
    times, tokens = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - started)
        tokens = out["usage"]["completion_tokens"]
    rss = _rss_bytes() - rss_before
    llm.close()
    return {"load_s": load_s, "gen_s": statistics.median(times), "tokens": tokens, "rss_bytes": rss}


def _through_coe(engine: Engine, name: str, args) -> dict:
    rss_before = _rss_bytes()
    started = time.perf_counter()
    engine.cache.activate(name)
    load_s = time.perf_counter() - started
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def run():
        for event in engine.stream(Request(expert=name, sampling=sampling, prompt=PROMPT)):
            if event.error is not None:
                raise event.error
            if event.completion is not None:
                return event.completion

    run()
    times, tokens = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        tokens = run().completion_tokens
        times.append(time.perf_counter() - started)
    rss = _rss_bytes() - rss_before
    engine.cache.evict(name)
    return {"load_s": load_s, "gen_s": statistics.median(times), "tokens": tokens, "rss_bytes": rss}


def run(args) -> dict:
    defaults = default_config()
    names = args.experts or [e.name for e in defaults.experts]
    experts = tuple(
        ExpertConfig(n, defaults.expert(n).source, params={"n_threads": args.threads})
        for n in names
    )
    config = type(defaults)(experts=experts)
    engine = Engine.from_config(config, args.home)
    engine.start()
    try:
        rows = _rows(engine, config, names, args)
    finally:
        engine.stop()
    router_loaded = engine.routing.router is not None
    print(
        f"coe: served on the engine's loop thread, router {'loaded' if router_loaded else 'absent'}"
    )
    _print(rows)
    return {
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "router_loaded": router_loaded,
        "target": "gen_ratio <= 1.05",
        "rows": rows,
    }


def _rows(engine: Engine, config, names: list[str], args) -> list[dict]:
    rows = []
    for name in names:
        path = path_of(engine.cache.store, config.expert(name))
        problem = probe_default_load(path)  # the direct side loads with llama-cpp-python's defaults
        direct = _direct(str(path), args) if problem is None else None
        coe = _through_coe(engine, name, args)
        rows.append(
            {
                "expert": name,
                "direct": direct,
                "coe": coe,
                "direct_unavailable": problem,
                "gen_ratio": coe["gen_s"] / direct["gen_s"] if direct else None,
                "direct_tok_s": direct["tokens"] / direct["gen_s"] if direct else None,
                "coe_tok_s": coe["tokens"] / coe["gen_s"],
            }
        )
    return rows


def _print(rows: list[dict]) -> None:
    header = (
        f"{'expert':<20} {'load s direct/coe':>18} {'tok/s direct':>12} {'tok/s coe':>10} "
        f"{'coe/direct time':>16} {'RSS MB direct/coe':>18}"
    )
    print(header)
    for r in rows:
        c = r["coe"]
        if r["direct"] is None:
            print(
                f"{r['expert']:<20} {'n/a':>8} / {c['load_s']:<7.2f} {'n/a':>12} {r['coe_tok_s']:>10.1f} {'n/a':>16} "
                f"{'n/a':>8} / {c['rss_bytes'] / 1e6:<7.0f}  (direct cannot run here: {r['direct_unavailable']})"
            )
            continue
        d = r["direct"]
        print(
            f"{r['expert']:<20} {d['load_s']:>8.2f} / {c['load_s']:<7.2f} {r['direct_tok_s']:>12.1f} "
            f"{r['coe_tok_s']:>10.1f} {r['gen_ratio']:>16.3f} "
            f"{d['rss_bytes'] / 1e6:>8.0f} / {c['rss_bytes'] / 1e6:<7.0f}"
        )
