"""`coe bench serve`: real servers under a replayed trace, naive configuration vs coe's defaults.

Setup: N experts (default 8) from the packaged GGUF models, each a copy of its file under the
work folder so no two experts share page-cache pages; at most 2 are hot at once
(`cache.max_hot_experts: 2`). One trace (`coe.bench.workload`: Poisson arrivals, Zipf category mix,
real prompts, lognormal output lengths) is replayed against two `coe serve` processes, one after
the other, each started with every expert file dropped from the page cache:
- naive: FIFO scheduling, no warm tier (an expert leaving the device goes back to disk), no
  prefetch or lookahead: what a server that loads experts on demand does;
- coe: the defaults: expert-aware scheduling with max_wait, warm tier, prefetch on routing,
  lookahead loading of the next expert, batched decoding.
With ``--routed`` every request asks for model ``coe`` over the four packaged experts (2 hot), and
the two configurations are coe without and with residency-aware routing (``switch_tolerance``):
latency gained against expected score given up (from the placeholder score table until the
evaluation harness measures one).
With ``--ray`` the coe configuration runs as `coe serve --ray` with 1 expert replica, then with 2
(each replica a coe engine with its own cache of ``--hot`` experts; every expert's llama.cpp uses
``--threads`` threads, so on one machine a replica stands for one share of its cores).
Clients are real HTTP clients (httpx, streaming chat completions, one task per request started at
its arrival time). A request is *lost* if it ends with neither a completion nor an explicit error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from coe.backends.memory import drop_file_cache
from coe.bench.workload import (
    TraceItem,
    add_prompt_arguments,
    generate,
    load_trace,
    save_trace,
    spec_from_arguments,
)
from coe.config import default_config
from coe.models.catalog import ModelStore

CONFIGS = ("naive", "coe", "coe_resident", "ray1", "ray2")
_START_TIMEOUT_S = 300.0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--experts", type=int, default=8, help="experts (copies of the packaged GGUFs)"
    )
    parser.add_argument("--hot", type=int, default=2, help="experts that fit hot at once")
    parser.add_argument("--requests", type=int, default=120, help="requests in the trace")
    parser.add_argument("--rate", type=float, default=2.0, help="mean arrival rate (requests/s)")
    parser.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    parser.add_argument("--cv", type=float, default=3.0, help="burstiness of gamma arrivals")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the category mix")
    parser.add_argument("--max-tokens-median", type=float, default=32.0)
    add_prompt_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", help="replay this JSONL trace instead of generating one")
    parser.add_argument(
        "--workdir",
        help="where expert copies, configs, trace and logs go (default: a temp folder, "
        "whose expert copies are deleted at the end)",
    )
    parser.add_argument("--only", choices=CONFIGS, help="run one configuration only")
    parser.add_argument(
        "--routed",
        action="store_true",
        help="model 'coe' through the router over the packaged experts: coe with and "
        "without residency-aware routing (latency gained vs expected score lost)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="`coe serve --ray` with 1 expert replica, then with 2, on the same trace "
        "(each expert llama.cpp thread count: --threads)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="with --ray: n_threads of every expert"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="scheduler.switch_tolerance of the coe_resident configuration (--routed)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a setting of the coe configuration, e.g. scheduler.lookahead=none",
    )


# ---- setup -------------------------------------------------------------------------------------


def expert_files(
    home: str | Path, count: int, workdir: Path, models: Sequence[str] = ()
) -> list[tuple[str, Path]]:
    """``count`` experts cycling through packaged models (default: the default experts'), each
    a copy of its file."""
    store = ModelStore(home)
    models = list(models) or [e.source for e in default_config().experts]
    folder = workdir / "experts"
    folder.mkdir(parents=True, exist_ok=True)
    experts = []
    for k in range(count):
        model = models[k % len(models)]
        name = f"{model}-{k // len(models) + 1}"
        target = folder / f"{name}.gguf"
        source = store.ensure(model)
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target)
        experts.append((name, target))
    return experts


def packaged_experts(home: str | Path) -> list[tuple[str, Path]]:
    """The default config's packaged experts under their own names (what the router maps to)."""
    store = ModelStore(home)
    return [(e.name, store.ensure(e.source)) for e in default_config().experts]


def server_config(
    kind: str,
    experts: list[tuple[str, Path]],
    hot: int,
    overrides: Sequence[str] = (),
    routed: bool = False,
    tolerance: float = 0.0,
    threads: int | None = None,
) -> dict:
    config: dict[str, Any] = {
        "experts": [{"name": name, "source": str(path)} for name, path in experts],
        "router": {"enabled": routed},
        "cache": {"max_hot_experts": hot},
        "server": {"request_timeout_s": 900},
    }
    if threads is not None:
        for expert in config["experts"]:
            expert["params"] = {"n_threads": threads}
    if kind.startswith("ray"):
        config["ray"] = {"replicas": int(kind[3:]), "max_experts_per_replica": hot}
    if routed:
        config["router"]["default_expert"] = experts[0][0]
    if kind == "coe_resident":
        config["scheduler"] = {"switch_tolerance": tolerance}
    if kind == "naive":
        config["cache"].update(keep_warm=False, prefetch="none")
        config["scheduler"] = {"policy": "fifo", "lookahead": "none"}
    else:
        for item in overrides:
            key, _, value = item.partition("=")
            section, _, field_name = key.partition(".")
            if not (section and field_name and value):
                raise ValueError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
            config.setdefault(section, {})[field_name] = yaml.safe_load(value)
    return config


def make_trace(args, experts: list[str], workdir: Path) -> list[TraceItem]:
    if args.trace:
        return load_trace(args.trace)
    spec = spec_from_arguments(
        args,
        count=args.requests,
        rate_rps=args.rate,
        arrival=args.arrival,
        cv=args.cv,
        zipf_s=args.zipf,
        experts=() if args.routed else tuple(experts),
        model_mode="coe" if args.routed else "expert",
        max_tokens_median=args.max_tokens_median,
        seed=args.seed,
    )
    items = generate(spec)
    save_trace(items, workdir / "trace.jsonl", spec)
    return items


# ---- one server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(
    process: subprocess.Popen, url: str, log_name: str, what: str = "the server"
) -> None:
    """Poll ``url`` until it answers 200; RuntimeError naming the log if the process exits or
    ``_START_TIMEOUT_S`` passes."""
    import httpx

    deadline_s = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log_name}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in {_START_TIMEOUT_S} s; see {log_name}")


class ServerProcess:
    """`coe serve` in a child process, with its log in the work folder."""

    def __init__(
        self, config_path: Path, home: str | Path, log_path: Path, extra_args: tuple[str, ...] = ()
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        env = {**os.environ, "COE_HOME": str(home)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coe",
                "serve",
                "--config",
                str(config_path),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *extra_args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self) -> None:
        wait_until_ready(self.process, self.url + "/health", self.log.name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# ---- the replay --------------------------------------------------------------------------------


class Conversations:
    """What each replayed request sent and was answered, so that a follow-up carries its real
    history; a follow-up waits until the answer it continues has ended."""

    def __init__(self, trace: list[TraceItem]):
        self.ended = {item.index: asyncio.Event() for item in trace}
        # index -> messages sent + the answer (completed only)
        self.history: dict[int, list[dict]] = {}

    async def messages_for(self, item: TraceItem) -> list[dict] | None:
        """The messages to send; None for a follow-up whose first turn got no answer."""
        if item.after is None:
            return item.messages
        await self.ended[item.after].wait()
        before = self.history.get(item.after)
        if before is None:
            return None
        await asyncio.sleep(item.think_s)
        return [*before, *item.messages]

    def end(self, item: TraceItem, messages: list[dict] | None, result: dict, answer: str) -> None:
        if messages is not None and result["outcome"] == "completed":
            self.history[item.index] = [*messages, {"role": "assistant", "content": answer}]
        self.ended[item.index].set()


async def one_request(
    client, url: str, item: TraceItem, started_s: float, talks: Conversations
) -> dict:
    """Stream one chat completion; record TTFT, latency, tokens and how it ended."""
    await asyncio.sleep(max(0.0, started_s + item.arrival_s - time.monotonic()))
    result = {
        "index": item.index,
        "model": item.model,
        "sent_s": None,
        "ttft_s": None,
        "latency_s": None,
        "completion_tokens": 0,
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "outcome": "lost",
        "tier": None,
        "status": None,
        "expert": None,
        "planned_expert": None,
        "score_given_up": 0.0,
        "follow_up": item.after is not None,
    }
    messages = await talks.messages_for(item)
    answer: list[str] = []
    if messages is None:
        result["outcome"] = "skipped"  # its first turn failed: a client would not ask the follow-up
    else:
        await _stream(client, url, item, messages, result, answer, started_s)
    talks.end(item, messages, result, "".join(answer))
    return result


async def _stream(
    client,
    url: str,
    item: TraceItem,
    messages: list[dict],
    result: dict,
    answer: list[str],
    started_s: float,
) -> None:
    sent_s = time.monotonic()
    result["sent_s"] = sent_s - started_s
    body = {
        "model": item.model,
        "messages": messages,
        "max_tokens": item.max_tokens,
        "temperature": 0.7,
        "seed": item.index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            result["status"] = response.status_code
            result["tier"] = response.headers.get("x-coe-tier")
            if response.status_code != 200:
                result["error"] = (await response.aread()).decode(errors="replace")[:500]
                result["outcome"] = "error"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    if result["outcome"] == "lost" and result["latency_s"] is not None:
                        result["outcome"] = "completed"
                    break
                _read_chunk(json.loads(data), result, sent_s, answer)
    except Exception as exc:  # a dropped connection is a lost request, recorded as such
        result["exception"] = f"{type(exc).__name__}: {exc}"


def _read_chunk(chunk: dict, result: dict, sent_s: float, answer: list[str]) -> None:
    now_s = time.monotonic()
    if "error" in chunk:
        result["outcome"] = "error"
        return
    if result["expert"] is None and "coe" in chunk:
        result["expert"] = chunk["coe"].get("expert")
        result["planned_expert"] = chunk["coe"].get("planned_expert")
        result["score_given_up"] = chunk["coe"].get("score_given_up", 0.0)
    for choice in chunk.get("choices", []):
        content = choice.get("delta", {}).get("content")
        if content:
            answer.append(content)
            result["completion_tokens"] += 1  # one token per chunk until the usage chunk says
        if result["ttft_s"] is None and (content or choice.get("finish_reason")):
            result["ttft_s"] = now_s - sent_s
        if choice.get("finish_reason") and result["latency_s"] is None:
            result["latency_s"] = now_s - sent_s  # a server sending no usage chunk ends here
    if chunk.get("usage"):
        usage = chunk["usage"]
        result["completion_tokens"] = usage["completion_tokens"]
        result["prompt_tokens"] = usage.get("prompt_tokens", 0)
        result["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        result["latency_s"] = now_s - sent_s


async def replay(url: str, trace: list[TraceItem]) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(1800.0, connect=30.0), limits=limits
    ) as client:
        started_s, talks = time.monotonic(), Conversations(trace)
        results = await asyncio.gather(
            *(one_request(client, url, item, started_s, talks) for item in trace)
        )
        return list(results), time.monotonic() - started_s


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus samples: each under its name summed over labels, and each
    labelled one under its full key (``name{label="value"}``) too."""
    import httpx

    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
            if key != name:
                totals[key] = float(value)
    return totals


def summarise(results: list[dict], makespan_s: float, metrics: dict[str, float]) -> dict:
    done = [r for r in results if r["outcome"] == "completed"]
    ttfts = sorted(r["ttft_s"] for r in done if r["ttft_s"] is not None)
    latencies = sorted(r["latency_s"] for r in done)
    tokens = sum(r["completion_tokens"] for r in done)
    prompt_tokens = sum(r["prompt_tokens"] for r in done)
    follow_up_ttfts = sorted(
        r["ttft_s"] for r in done if r["follow_up"] and r["ttft_s"] is not None
    )
    tiers: dict[str, int] = {}
    for r in done:
        tiers[r["tier"] or "?"] = tiers.get(r["tier"] or "?", 0) + 1
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": sum(r["outcome"] == "error" for r in results),
        "lost": sum(r["outcome"] == "lost" for r in results),
        "skipped": sum(r["outcome"] == "skipped" for r in results),
        "makespan_s": round(makespan_s, 3),
        "throughput_rps": round(len(done) / makespan_s, 4),
        "tokens_per_s": round(tokens / makespan_s, 3),
        "ttft_p50_s": _quantile(ttfts, 0.5),
        "ttft_p99_s": _quantile(ttfts, 0.99),
        "latency_p50_s": _quantile(latencies, 0.5),
        "latency_p99_s": _quantile(latencies, 0.99),
        "follow_ups": len(follow_up_ttfts),
        "follow_up_ttft_p50_s": _quantile(follow_up_ttfts, 0.5),
        "prompt_tokens_cached_share": round(
            sum(r["cached_tokens"] for r in done) / prompt_tokens, 4
        )
        if prompt_tokens
        else None,
        "switches": int(metrics.get("coe_cache_switches_total", 0)),
        "switch_s_total": round(metrics.get("coe_switch_seconds_sum", 0.0), 3),
        "mean_batch_size": round(
            metrics.get("coe_batch_size_sum", 0.0)
            / max(metrics.get("coe_batch_size_count", 0.0), 1),
            3,
        ),
        "joined_running_batch": int(metrics.get("coe_requests_joined_total", 0)),
        "served_from_tier": tiers,
        "served_off_plan": sum(1 for r in done if r["planned_expert"]),
        "mean_score_given_up": round(
            sum(r["score_given_up"] or 0 for r in done) / max(len(done), 1), 5
        ),
        "slots_in_use_after": metrics.get("coe_requests_in_flight", -1),
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 4)


def run_one(
    kind: str, experts: list[tuple[str, Path]], trace: list[TraceItem], args, workdir: Path
) -> dict:
    config_path = workdir / f"{kind}.yaml"
    ray = kind.startswith("ray")
    config = server_config(
        kind,
        experts,
        args.hot,
        args.set,
        args.routed,
        args.tolerance,
        args.threads if ray else None,
    )
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for _, path in experts:
        drop_file_cache(path)
    server = ServerProcess(
        config_path, args.home, workdir / f"{kind}.log", ("--ray",) if ray else ()
    )
    try:
        server.wait_ready()
        print(f"  {kind}: replaying {len(trace)} requests against {server.url}", flush=True)
        results, makespan_s = asyncio.run(replay(server.url, trace))
        metrics = scrape(server.url)
    finally:
        server.stop()
    (workdir / f"{kind}-results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return summarise(results, makespan_s, metrics)


# ---- the bench ---------------------------------------------------------------------------------


def run(args) -> dict:
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="coe-bench-serve-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    experts = (
        packaged_experts(args.home)
        if args.routed
        else expert_files(args.home, args.experts, workdir)
    )
    kinds = (
        ("ray1", "ray2")
        if args.ray
        else ("coe", "coe_resident")
        if args.routed
        else ("naive", "coe")
    )
    trace = make_trace(args, [name for name, _ in experts], workdir)
    follow_ups = sum(item.after is not None for item in trace)
    print(
        f"{len(experts)} experts, {args.hot} hot at most; trace: {len(trace)} requests"
        f"{f' ({follow_ups} follow-ups)' if follow_ups else ''} arriving over "
        f"{max(item.arrival_s for item in trace):.1f} s ({workdir})",
        flush=True,
    )
    result = {
        "setup": {
            "experts": [name for name, _ in experts],
            "hot": args.hot,
            "requests": len(trace),
            "rate_rps": args.rate,
            "arrival": args.arrival,
            "zipf_s": args.zipf,
            "max_tokens_median": args.max_tokens_median,
            "seed": args.seed,
            "sources": list(args.sources),
            "follow_up_share": args.follow_ups,
            "think_s_mean": args.think_s,
            "overrides": args.set,
            "routed": args.routed,
            "ray": args.ray,
            "threads": args.threads if args.ray else None,
            "workdir": str(workdir),
        }
    }
    try:
        for kind in kinds:
            if args.only in (None, kind):
                result[kind] = run_one(kind, experts, trace, args, workdir)
    finally:
        if not args.workdir:  # the expert copies are GBs; the logs, trace and results stay
            shutil.rmtree(workdir / "experts", ignore_errors=True)
    if "naive" in result and "coe" in result:
        result["ratios"] = ratios(result["naive"], result["coe"])
    if "ray1" in result and "ray2" in result:
        result["ratios"] = ratios(result["ray1"], result["ray2"])
    if "coe_resident" in result and "coe" in result:
        result["ratios"] = ratios(result["coe"], result["coe_resident"])
        result["ratios"]["mean_score_given_up"] = result["coe_resident"]["mean_score_given_up"]
    print_table(result)
    return result


def ratios(baseline: dict, candidate: dict) -> dict:
    """candidate / baseline for throughput and tail latencies."""

    def ratio(key):
        a, b = candidate[key], baseline[key]
        return round(a / b, 3) if a and b else None

    return {
        "throughput_x": ratio("throughput_rps"),
        "tokens_per_s_x": ratio("tokens_per_s"),
        "ttft_p50_x": ratio("ttft_p50_s"),
        "ttft_p99_x": ratio("ttft_p99_s"),
        "latency_p99_x": ratio("latency_p99_s"),
        "follow_up_ttft_p50_x": ratio("follow_up_ttft_p50_s"),
    }


def print_table(result: dict) -> None:
    keys = (
        "completed",
        "errors",
        "lost",
        "skipped",
        "throughput_rps",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "latency_p50_s",
        "latency_p99_s",
        "switches",
        "switch_s_total",
        "mean_batch_size",
        "joined_running_batch",
        "makespan_s",
        "prompt_tokens_cached_share",
        "follow_ups",
        "follow_up_ttft_p50_s",
        "served_off_plan",
        "mean_score_given_up",
    )
    kinds = [k for k in CONFIGS if k in result]
    print(f"\n{'':16}" + "".join(f"{k:>12}" for k in kinds))
    for key in keys:
        print(f"{key:16}" + "".join(f"{str(result[k][key]):>12}" for k in kinds))
    for key, value in result.get("ratios", {}).items():
        print(f"{key:16}{str(value):>12}")
