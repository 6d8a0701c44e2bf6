"""`coe bench overhead`: load time, memory and tokens/s of each expert through coe's engine vs
llama-cpp-python called directly on the same file, same prompt, greedy, in one process.

The coe side is served as `coe serve` serves it: the router loaded in the process and every token
decoded on the engine's loop thread (a thread other than the one that loaded the router).
``--isolated`` also serves each expert from a worker process (``params.isolate``) through a second
engine, and compares its tokens/s and time to first token with the in-process engine's, the two
engines' requests taken in turn.

Targets: coe adds under 5% to generation time (ratio coe_s / direct_s <= 1.05); the isolated path
is within 5% of the in-process tokens/s and 10% of its time to first token.
"""

from __future__ import annotations

import statistics
import time

from coe.backends.llama_lib import load_llama_cpp, probe_default_load
from coe.bench import alternating_ratio, in_turn
from coe.config import CoEConfig, ExpertConfig, default_config
from coe.engine import Engine
from coe.errors import CacheFull
from coe.models import path_of
from coe.types import Request, SamplingParams

PROMPT = "The history of the printing press begins"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--experts", nargs="*", help="packaged expert names (default: the four defaults)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats",
        type=int,
        default=16,
        help="timed requests per side (even: see alternating_ratio)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="also serve each expert from a worker process and compare",
    )


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


def _request(engine: Engine, name: str, sampling: SamplingParams) -> tuple[int, float, float]:
    """One greedy request: completion tokens, time to the first one, time to the last."""
    started, first_s = time.perf_counter(), None
    for event in engine.stream(Request(expert=name, sampling=sampling, prompt=PROMPT)):
        if event.error is not None:
            raise event.error
        if first_s is None and event.delta:
            first_s = time.perf_counter() - started
        if event.completion is not None:
            total_s = time.perf_counter() - started
            return event.completion.completion_tokens, first_s or 0.0, total_s
    raise RuntimeError("the stream ended without a completion")


def _through_coe(engines: list[Engine], name: str, args) -> list[dict]:
    """Each engine loads the expert and warms it up; then ``args.repeats`` requests per engine,
    the engines in turn."""
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    loads = []
    for engine in engines:
        rss_before = _rss_bytes()
        started = time.perf_counter()
        engine.cache.activate(name)
        load_s = time.perf_counter() - started
        _request(engine, name, sampling)
        loads.append((load_s, _rss_bytes() - rss_before))
    runs = in_turn(
        lambda side, _round: _request(engines[side], name, sampling), len(engines), args.repeats
    )
    for engine in engines:
        _evict_when_idle(engine, name)
    return [
        {
            "load_s": load_s,
            "gen_s": statistics.median(total_s for _, _, total_s in done),
            "ttft_s": statistics.median(ttft_s for _, ttft_s, _ in done),
            "tokens": done[-1][0],
            "rss_bytes": rss_bytes,
            "runs_s": [total_s for _, _, total_s in done],
            "ttfts_s": [ttft_s for _, ttft_s, _ in done],
        }
        for (load_s, rss_bytes), done in zip(loads, runs)
    ]


def _evict_when_idle(engine: Engine, name: str, timeout_s: float = 30.0) -> None:
    """Evict once the engine's loop has closed the last batch (its lease ends just after the final
    event is delivered)."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            engine.cache.evict(name)
            return
        except CacheFull:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.01)


def run(args) -> dict:
    if args.isolated and (args.repeats < 2 or args.repeats % 2):
        raise SystemExit(
            f"--repeats: an even number >= 2 with --isolated (the sides alternate in pairs of "
            f"pairs), got {args.repeats}"
        )
    defaults = default_config()
    names = args.experts or [e.name for e in defaults.experts]

    def config(isolate: bool) -> CoEConfig:
        params = {"n_threads": args.threads, **({"isolate": True} if isolate else {})}
        return CoEConfig(
            experts=tuple(ExpertConfig(n, defaults.expert(n).source, params=params) for n in names)
        )

    engine = Engine.from_config(config(isolate=False), args.home)
    isolated = Engine.from_config(config(isolate=True), args.home) if args.isolated else None
    engine.start()
    if isolated is not None:
        isolated.start()
    try:
        rows = _rows(engine, isolated, names, args)
    finally:
        engine.stop()
        if isolated is not None:
            isolated.stop()
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
        "target": "gen_ratio <= 1.05"
        + (", isolated_tok_s_ratio >= 0.95, isolated_ttft_ratio <= 1.10" if args.isolated else ""),
        "rows": rows,
    }


def _rows(engine: Engine, isolated: Engine | None, names: list[str], args) -> list[dict]:
    rows = []
    for name in names:
        path = path_of(engine.cache.store, engine.config.expert(name))
        problem = probe_default_load(path)  # the direct side loads with llama-cpp-python's defaults
        direct = _direct(str(path), args) if problem is None else None
        served = _through_coe([engine] + ([isolated] if isolated else []), name, args)
        coe = served[0]
        row = {
            "expert": name,
            "direct": direct,
            "coe": coe,
            "direct_unavailable": problem,
            "gen_ratio": coe["gen_s"] / direct["gen_s"] if direct else None,
            "direct_tok_s": direct["tokens"] / direct["gen_s"] if direct else None,
            "coe_tok_s": coe["tokens"] / coe["gen_s"],
        }
        if isolated is not None:
            worker = served[1]
            row.update(
                isolated=worker,
                isolated_tok_s=worker["tokens"] / worker["gen_s"],
                isolated_tok_s_ratio=alternating_ratio(worker["runs_s"], coe["runs_s"]),
                isolated_ttft_ratio=alternating_ratio(coe["ttfts_s"], worker["ttfts_s"]),
            )
        rows.append(row)
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
    isolated = [r for r in rows if "isolated" in r]
    if isolated:
        print(
            f"\n{'expert':<20} {'tok/s in-process':>16} {'tok/s worker':>12} {'ratio':>6} "
            f"{'TTFT ms in-process':>18} {'TTFT ms worker':>14} {'ratio':>6}"
        )
        for r in isolated:
            print(
                f"{r['expert']:<20} {r['coe_tok_s']:>16.1f} {r['isolated_tok_s']:>12.1f} "
                f"{r['isolated_tok_s_ratio']:>6.3f} {r['coe']['ttft_s'] * 1000:>18.1f} "
                f"{r['isolated']['ttft_s'] * 1000:>14.1f} {r['isolated_ttft_ratio']:>6.3f}"
            )
