"""`coe bench shared`: N specialisations of one base, served as profiles over the shared base vs
as N separate copies of its weights, under one replayed trace and one memory budget.

For each N (default 4, 16, 64), two `coe serve` processes run one after the other, each started
with every weight file dropped from the page cache:
- shared: the base expert and N profiles over it (each its own system prompt): one copy of the
  weights in every tier, and one batch for requests of any profile;
- separate: N experts, each a copy of the base's file (distinct files, so the page cache cannot
  share them) with the same system prompts: what serving a specialisation as a whole model costs.
Both get the same tier budgets (``--budget-copies`` copies of the base fit the host tier, 2 hot).
The trace (`coe.bench.workload`: Poisson arrivals, real prompts, lognormal output lengths) names
the N specialisations by a Zipf popularity. Reported per form: throughput, TTFT p50/p99, peak
resident memory of the server process (sampled), switches and batch sizes from its metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import yaml

from coe.backends.memory import drop_file_cache, process_rss_bytes
from coe.bench.serve import ServerProcess, replay, scrape, summarise
from coe.bench.synthetic import SHAPES, synthetic_config, write_checkpoint
from coe.bench.workload import (
    TraceItem,
    add_prompt_arguments,
    generate,
    save_trace,
    spec_from_arguments,
    zipf_weights,
)
from coe.models.catalog import ModelStore

FORMS = ("shared", "separate")
TOPICS = (
    "tax law",
    "Python code review",
    "cooking",
    "travel in Japan",
    "first aid",
    "chess openings",
    "gardening",
    "personal finance",
    "astronomy",
    "music theory",
    "SQL databases",
    "job interviews",
    "home repair",
    "poetry",
    "statistics",
    "world history",
)
_RSS_SAMPLE_S = 0.1


def add_arguments(parser) -> None:
    parser.add_argument(
        "--n",
        default="4,16,64",
        help="numbers of specialisations, comma-separated (default 4,16,64)",
    )
    parser.add_argument("--base", default="smollm2-135m", help="the packaged base model")
    parser.add_argument(
        "--synthetic",
        metavar="SHAPE",
        choices=tuple(SHAPES),
        help="a synthetic torch checkpoint of this shape as the base instead (torch_hf; with "
        "--params device=cuda on a GPU)",
    )
    parser.add_argument("--requests", type=int, default=96, help="requests in each trace")
    parser.add_argument("--rate", type=float, default=4.0, help="mean arrival rate (requests/s)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent over the N")
    parser.add_argument("--max-tokens-median", type=float, default=24.0)
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=4000,
        help="longest prompt taken from the datasets (synthetic experts read bytes as tokens)",
    )
    add_prompt_arguments(parser)  # --sources, --follow-ups, --think-s, as `coe workload` has
    parser.add_argument(
        "--budget-copies",
        type=float,
        default=2.0,
        help="host tier budget, in copies of the base's weights (same for both forms)",
    )
    parser.add_argument(
        "--params",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="llama.cpp params of the base and of every copy, e.g. repack=true max_sequences=16",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=FORMS, help="run one form only")
    parser.add_argument(
        "--workdir", help="where copies, configs, traces and logs go (default: a temp folder)"
    )


def counts_of(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--n: expected numbers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--n: expected numbers >= 1, got {text!r}")
    return counts


def system_prompt(k: int) -> str:
    topic = TOPICS[k % len(TOPICS)]
    return (
        f"You are specialist number {k}, an assistant for questions about {topic}. Answer in "
        f"two or three short sentences, plainly, and say so when a question is outside {topic}."
    )


def params_of(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value:
            raise SystemExit(f"--params: expected KEY=VALUE, got {item!r}")
        params[key] = yaml.safe_load(value)
    return params


def config_of(
    form: str, n: int, base: Path, copies: list[Path], host_bytes: int, params: dict
) -> dict:
    """The server config of one form: the same names, prompts, params and budgets for both."""
    if form == "shared":
        experts: list[dict] = [{"name": "base", "source": str(base), "params": params}]
        experts += [
            {"name": f"spec-{k}", "base": "base", "system_prompt": system_prompt(k)}
            for k in range(n)
        ]
    else:
        experts = [
            {
                "name": f"spec-{k}",
                "source": str(copies[k]),
                "params": params,
                "system_prompt": system_prompt(k),
            }
            for k in range(n)
        ]
    return {
        "experts": experts,
        "router": {"enabled": False},
        "cache": {"max_hot_experts": 2, "host_bytes": host_bytes},
        "server": {"request_timeout_s": 900},
    }


def make_trace(args, n: int, workdir: Path) -> list[TraceItem]:
    """Real prompts and lengths from the workload generator; each names spec-k by Zipf."""
    spec = spec_from_arguments(
        args,
        count=args.requests,
        rate_rps=args.rate,
        model_mode="expert",
        experts=("spec-0",),
        max_tokens_median=args.max_tokens_median,
        max_prompt_chars=args.max_prompt_chars,
        seed=args.seed,
    )
    items = generate(spec)
    rng = np.random.default_rng([args.seed, n])
    picks = rng.choice(n, size=len(items), p=zipf_weights(n, args.zipf))
    model = {item.index: f"spec-{int(k)}" for item, k in zip(items, picks)}
    for item in items:  # a follow-up stays with the specialisation of the turn it continues
        if item.after is not None:
            model[item.index] = model[item.after]
    items = [dataclasses.replace(item, model=model[item.index]) for item in items]
    save_trace(items, workdir / f"trace-{n}.jsonl", spec)
    return items


class PeakRss:
    """Samples a process's resident memory (its VmRSS) in a thread; ``peak_bytes`` when stopped."""

    def __init__(self, pid: int):
        self.pid, self.peak_bytes = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_RSS_SAMPLE_S):
            self.peak_bytes = max(self.peak_bytes, process_rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, process_rss_bytes(self.pid))
        return self.peak_bytes


def run_form(
    form: str, n: int, trace: list[TraceItem], files: list[Path], config: dict, args, workdir: Path
) -> dict:
    config_path = workdir / f"{form}-{n}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for path in files:
        for file in path.iterdir() if path.is_dir() else (path,):
            drop_file_cache(file)
    server = ServerProcess(config_path, args.home, workdir / f"{form}-{n}.log")
    try:
        server.wait_ready()
        print(f"  n={n} {form}: replaying {len(trace)} requests", flush=True)
        sampler = PeakRss(server.process.pid)
        try:
            results, makespan_s = asyncio.run(replay(server.url, trace))
        finally:
            peak_bytes = sampler.stop()
        metrics = scrape(server.url)
    finally:
        server.stop()
    (workdir / f"{form}-{n}-results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in results)
    )
    summary = summarise(results, makespan_s, metrics)
    return {**summary, "rss_bytes": peak_bytes}


def run(args) -> dict:
    counts = counts_of(args.n)
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="coe-bench-shared-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        base = write_checkpoint(workdir / "base", synthetic_config(args.synthetic))
    else:
        base = ModelStore(args.home).ensure(args.base)
    weight_bytes = _size_bytes(base)
    host_bytes = int(args.budget_copies * weight_bytes)
    copies_dir = workdir / "copies"
    need_bytes = max(counts) * weight_bytes
    free_bytes = shutil.disk_usage(workdir).free
    if args.only != "shared" and need_bytes > free_bytes * 0.9:
        raise SystemExit(
            f"coe bench shared: {max(counts)} copies of {args.base} need {need_bytes / 1e9:.1f} GB "
            f"in {workdir}; {free_bytes / 1e9:.1f} GB are free"
        )
    result: dict = {
        "setup": {
            "base": f"synthetic {args.synthetic}" if args.synthetic else args.base,
            "weight_bytes": weight_bytes,
            "host_budget_bytes": host_bytes,
            "max_hot_experts": 2,
            "requests": args.requests,
            "rate_rps": args.rate,
            "zipf_s": args.zipf,
            "sources": list(args.sources),
            "max_tokens_median": args.max_tokens_median,
            "seed": args.seed,
            "params": params_of(args.params),
            "workdir": str(workdir),
        },
        "rows": [],
    }
    try:
        for n in counts:
            copies = _copies(base, n, copies_dir) if args.only != "shared" else []
            trace = make_trace(args, n, workdir)
            row: dict = {"n": n}
            for form in FORMS:
                if args.only not in (None, form):
                    continue
                files = [base] if form == "shared" else copies
                config = config_of(form, n, base, copies, host_bytes, params_of(args.params))
                row[form] = run_form(form, n, trace, files, config, args, workdir)
            if "shared" in row and "separate" in row:
                row["ratios"] = _ratios(row["separate"], row["shared"])
            result["rows"].append(row)
    finally:
        shutil.rmtree(copies_dir, ignore_errors=True)  # GBs; logs, configs and traces stay
    print_table(result)
    return result


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _copies(base: Path, n: int, folder: Path) -> list[Path]:
    """Distinct copies of the base's file (or checkpoint folder): no shared page-cache pages."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for k in range(n):
        target = folder / (f"spec-{k}" + base.suffix)
        if not target.exists() or _size_bytes(target) != _size_bytes(base):
            if base.is_dir():
                shutil.copytree(base, target, dirs_exist_ok=True)
            else:
                shutil.copyfile(base, target)
        copies.append(target)
    return copies


def _ratios(separate: dict, shared: dict) -> dict:
    def ratio(key: str) -> float | None:
        a, b = shared.get(key), separate.get(key)
        return round(a / b, 3) if a and b else None

    return {
        "throughput_x": ratio("throughput_rps"),
        "ttft_p50_x": ratio("ttft_p50_s"),
        "ttft_p99_x": ratio("ttft_p99_s"),
        "rss_x": ratio("rss_bytes"),
    }


def print_table(result: dict) -> None:
    keys = (
        "completed",
        "errors",
        "lost",
        "throughput_rps",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "latency_p99_s",
        "rss_bytes",
        "switches",
        "mean_batch_size",
        "joined_running_batch",
        "prompt_tokens_cached_share",
    )
    for row in result["rows"]:
        forms = [f for f in FORMS if f in row]
        print(f"\nn = {row['n']}{'':6}" + "".join(f"{f:>14}" for f in forms))
        for key in keys:
            cells = "".join(f"{str(row[f].get(key)):>14}" for f in forms)
            print(f"{key:16}{cells}")
        for key, value in row.get("ratios", {}).items():
            print(f"{key:16}{str(value):>14}")
