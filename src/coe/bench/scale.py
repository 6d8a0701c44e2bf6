"""`coe bench scale`: does coe stay fast as the fleet grows? Start-up time of `coe serve` and the
per-request work of the router, the scheduler and the cache policy, at 10 vs 150 experts.

The fleet's experts are distinct GGUF files: each a sparse copy of a packaged model (its header
written, its tensor data a hole of the same size), so 150 of them take a few hundred MB of disk
while every header, size and path is real. Start-up reads headers only, which is what is timed:
process start to the first 200 from ``/health``, with the router loaded, median of ``--repeats``.

Per-request work, in this process, on the same objects the server uses:
- router: the learned router's decision for a chat prompt (``ExpertRouter.route_messages``) plus
  residency-aware routing over a quarter of the fleet hot and the next-best lookup, with a score
  table and map over all N experts (scores: the packaged table's rows, one per copy, with noise);
- scheduler: ``Scheduler.add`` for each request and ``next_batch`` / ``join`` as a server would
  call them, over N queues with a Zipf popularity;
- policy: ``Popularity.observe`` for each request; and, per miss (a switch that needs room, not
  every request), ``choose_victims`` over N candidates.
Each is reported in microseconds and as the ratio of the largest fleet to the smallest.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from coe.bench.serve import free_port
from coe.config import RouterConfig, default_config
from coe.models.catalog import ModelStore
from coe.models.gguf import read_gguf_header
from coe.types import ChatMessage, Request

# what is timed per fleet size (and compared between the largest and the smallest)
COLUMNS = (
    "startup_s",
    "router_us",
    "scheduler_us",
    "policy_us",
    "total_us",
    "victims_per_miss_us",
)
PROMPT = "How can I speed up a slow Postgres query with a join on two big tables?"


def add_arguments(parser) -> None:
    parser.add_argument("--experts", default="10,150", help="fleet sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="start-ups per fleet size")
    parser.add_argument("--requests", type=int, default=2000, help="requests per timing")
    parser.add_argument("--workdir", help="where the sparse files go (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)


def sparse_fleet(home: str | Path, count: int, folder: Path) -> list[tuple[str, Path, int]]:
    """``count`` experts cycling through the packaged models: (name, file, parameters)."""
    store = ModelStore(home)
    folder.mkdir(parents=True, exist_ok=True)
    models = [e.source for e in default_config().experts]
    fleet = []
    for k in range(count):
        model = models[k % len(models)]
        source = store.ensure(model)
        header = read_gguf_header(source)
        target = folder / f"{model}-{k}.gguf"
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            with source.open("rb") as src, target.open("wb") as dst:
                dst.write(src.read(header.data_offset))
                dst.truncate(source.stat().st_size)  # the tensor data: a hole
        fleet.append((f"{model}-{k}", target, header.num_params))
    return fleet


def startup_s(home: str | Path, fleet: list[tuple[str, Path, int]], folder: Path) -> float:
    """Seconds from `coe serve` starting to its first 200 from /health."""
    import httpx

    config = {
        "experts": [{"name": name, "source": str(path)} for name, path, _ in fleet],
        "router": {"enabled": True},
    }
    path = folder / f"fleet-{len(fleet)}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = (folder / f"fleet-{len(fleet)}.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "coe", "serve", "--config", str(path), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COE_HOME": str(home)},
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"coe serve exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _zipf_picks(count: int, n: int, seed: int) -> np.ndarray:
    from coe.bench.workload import zipf_weights

    return np.random.default_rng(seed).choice(n, size=count, p=zipf_weights(n, 1.0))


def router_us(home: str | Path, fleet: list[tuple[str, Path, int]], requests: int, seed: int):
    """Microseconds per request of the router's decision, residency and next-best lookups."""
    from coe.router.mapping import ScoreTable
    from coe.router.service import ExpertRouter, build_map, load_expert_router, load_score_table

    packaged = load_score_table(None)
    rng = np.random.default_rng(seed)
    scores = {
        category: {
            name: float(
                np.clip(row[name.rsplit("-", 1)[0]] + rng.normal(0, 0.01), 0, 1)
            )  # the copy of a packaged model scores like it
            for name, _, _ in fleet
        }
        for category, row in packaged.scores.items()
    }
    table = ScoreTable(tuple(scores), tuple(name for name, _, _ in fleet), scores, "bench")
    params: dict[str, int | None] = {name: num for name, _, num in fleet}
    config = RouterConfig(budget_params=1e9)
    base = load_expert_router(config, home, params, fleet[0][0])
    assignment, plan = build_map(config, base.router.categories, params, fleet[0][0], table)
    router = ExpertRouter(base.router, assignment, plan=plan, table=table)
    hot = [name for name, _, _ in fleet[: max(1, len(fleet) // 4)]]
    messages = (ChatMessage("user", PROMPT),)
    router.route_messages(messages)  # warm-up
    started = time.perf_counter()
    for _ in range(requests):
        decision = router.route_messages(messages)
        router.prefer_resident(decision, hot, 0.05)
        router.next_best(decision.category, lambda e: e not in hot)
    return (time.perf_counter() - started) / requests * 1e6


def scheduler_us(n: int, requests: int, seed: int) -> float:
    """Microseconds per request: add, then next_batch / join as the engine's loop calls them."""
    from coe.engine.scheduler import Scheduler

    names = [f"e{k}" for k in range(n)]
    picks = _zipf_picks(requests, n, seed)
    scheduler = Scheduler(max_batch_size=8, max_queue=10**6, max_queue_per_expert=10**6)
    current, now_s = None, 0.0
    started = time.perf_counter()
    for i, k in enumerate(picks):
        now_s += 0.01
        scheduler.add(Request(names[k], prompt="x", arrival_s=now_s))
        if i % 4 == 3:  # a batch ends every few arrivals: the next one is chosen
            batch = scheduler.next_batch(now_s, names[:4], current)
            current = batch.expert if batch else None
        elif current is not None:
            scheduler.join(current, 2, now_s)
    return (time.perf_counter() - started) / requests * 1e6


def policy_us(n: int, requests: int, seed: int) -> tuple[float, float]:
    """Microseconds per request of the popularity update (every request), and per miss of the
    victim choice over every expert's priority (only a switch that needs room makes one)."""
    from coe.cache import policy

    names = [f"e{k}" for k in range(n)]
    picks = _zipf_picks(requests, n, seed)
    popularity = policy.Popularity(policy.AUTO_HALF_LIVES, n)
    started = time.perf_counter()
    for k in picks:
        popularity.observe(names[k])
    observe_us = (time.perf_counter() - started) / requests * 1e6
    started = time.perf_counter()
    for _ in range(requests // 10):
        candidates = [
            policy.Candidate(name, 10**8, popularity.last_request(name)[0]) for name in names
        ]
        policy.choose_victims(candidates, 10**8, 0)
    return observe_us, (time.perf_counter() - started) / (requests // 10) * 1e6


def run(args) -> dict:
    counts = [int(c) for c in args.experts.split(",")]
    if sorted(counts) != counts or counts[0] < 1:
        raise SystemExit(f"--experts: increasing numbers >= 1, got {args.experts!r}")
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="coe-bench-scale-"))
    )
    rows = []
    try:
        for n in counts:
            fleet = sparse_fleet(args.home, n, workdir / "fleet")
            startups = [startup_s(args.home, fleet, workdir) for _ in range(args.repeats)]
            row = {
                "experts": n,
                "apparent_bytes": sum(path.stat().st_size for _, path, _ in fleet),
                "startup_s": round(statistics.median(startups), 3),
                "startup_runs_s": [round(s, 3) for s in startups],
                "router_us": round(router_us(args.home, fleet, args.requests // 10, args.seed), 1),
                "scheduler_us": round(scheduler_us(n, args.requests * 10, args.seed), 2),
            }
            row["policy_us"], row["victims_per_miss_us"] = (
                round(v, 2) for v in policy_us(n, args.requests * 10, args.seed)
            )
            row["total_us"] = round(row["router_us"] + row["scheduler_us"] + row["policy_us"], 1)
            rows.append(row)
            print(f"  {n} experts: {row}", flush=True)
    finally:
        shutil.rmtree(workdir / "fleet", ignore_errors=True)
    first, last = rows[0], rows[-1]
    ratios = {key: round(last[key] / first[key], 3) if first[key] else None for key in COLUMNS}
    result = {"rows": rows, f"ratio_{last['experts']}_vs_{first['experts']}": ratios}
    print_table(rows, ratios)
    return result


def print_table(rows: list[dict], ratios: dict) -> None:
    print(f"\n{'experts':>8}" + "".join(f"{k:>21}" for k in COLUMNS))
    for row in rows:
        print(f"{row['experts']:>8}" + "".join(f"{row[k]:>21}" for k in COLUMNS))
    print(f"{'ratio':>8}" + "".join(f"{str(ratios[k]):>21}" for k in COLUMNS))
