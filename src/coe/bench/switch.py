"""`coe bench switch`: how fast coe switches experts, against loading on demand, in one run.

1. Hardware: memcpy bandwidth into existing memory, and sequential disk read bandwidth with the
   file dropped from the page cache (posix_fadvise; O_DIRECT where the kernel keeps it).
2. Per expert (the default packaged GGUF experts and 12+ synthetic safetensors experts from 100M
   to 1.5B parameters, written by this bench): the raw read bandwidth of its own file (median of
   3, each just before a cold activation, since this machine's disk varies from minute to
   minute), and time to first token for
   - naive: load the file on demand with default settings (llama-cpp-python ``Llama(path)``;
     for safetensors ``load_file`` + build + load_state_dict), file not in the page cache;
   - cold->hot: through ModelCache from disk; warm->hot: the expert demoted to the host tier;
   - hot: the steady-state TTFT of a loaded expert (the floor every switch pays);
   - packaged experts also warm->hot in a worker process (``params.isolate``) against in-process,
     in pairs taken in turn on the same prompts.
3. Replay: a Zipf(1.0) request sequence over 16 experts with room for 3 hot and 8 more warm, run
   through the real ModelCache with simulated moves whose durations are the ones measured in
   step 2 (a virtual clock, so the replay takes seconds): total switch time and hit rates for LRU
   and for the cost-aware policy.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from coe.backends.base import Adapter, Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.llama_lib import load_llama_cpp, probe_default_load
from coe.backends.memory import drop_file_cache, read_sequential
from coe.backends.sampling import Token
from coe.bench import alternating_ratio, in_turn
from coe.cache.manager import ModelCache
from coe.cache.tiers import Budgets
from coe.config import CacheConfig, CoEConfig, ExpertConfig, RouterConfig, default_config
from coe.engine.batch import generate
from coe.models import ModelStore, path_of
from coe.models.info import ModelInfo
from coe.types import CachePolicy, Request, SamplingParams, Tier

PROMPTS = [
    "Hi there",
    "Name a color",
    "Say hello",
    "Count to three",
    "What is two plus two",
    "Pick a number",
    "Tell me a fact",
    "Greet me",
]
SYNTHETIC_PARAMS = (
    0.1e9,
    0.15e9,
    0.2e9,
    0.3e9,
    0.4e9,
    0.5e9,
    0.6e9,
    0.75e9,
    0.9e9,
    1.1e9,
    1.3e9,
    1.5e9,
)
REPLAY_EXPERTS, REPLAY_HOT, REPLAY_WARM = 16, 3, 8


def add_arguments(parser) -> None:
    parser.add_argument(
        "--synthetic",
        type=int,
        default=len(SYNTHETIC_PARAMS),
        help="how many synthetic experts (100M..1.5B parameters)",
    )
    parser.add_argument(
        "--workdir", help="where synthetic checkpoints are written (default: a temp dir)"
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests in the Zipf replay")
    parser.add_argument(
        "--seeds",
        type=int,
        default=20,
        help="replay sequences averaged (one sequence's saving over LRU varies by 20 points or more)",
    )
    parser.add_argument(
        "--no-llama-settings", action="store_true", help="skip the llama.cpp settings table"
    )
    parser.add_argument(
        "--no-packaged",
        action="store_true",
        help="only the synthetic experts (where llama.cpp or the packaged models are missing)",
    )
    parser.add_argument(
        "--largest",
        type=float,
        default=SYNTHETIC_PARAMS[-1],
        help="parameters of the largest synthetic expert (default 1.5e9)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where synthetic experts run hot: cpu, cuda, or auto (cuda when available)",
    )


# ---- hardware --------------------------------------------------------------------------------------


def memcpy_gbps(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    import torch

    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.zeros(num_bytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - started)
    return num_bytes / statistics.median(times) / 1e9


def h2d_gbps(num_bytes: int = 1024 * 2**20, repeats: int = 5, device: str = "cuda") -> float:
    """Pinned host memory -> existing device memory in one copy (what CUDA's bandwidthTest measures)."""
    import torch

    src = torch.ones(num_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):  # the first copy warms the path up
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return num_bytes / statistics.median(times[1:]) / 1e9


def disk_gbps(path: Path, repeats: int = 3) -> tuple[float, str]:
    """Sequential read of ``path`` into existing memory with its pages dropped from the cache."""
    import torch

    size = path.stat().st_size
    target = torch.empty(size, dtype=torch.uint8)
    target.fill_(0)
    times, method = [], "fadvise-dontneed"
    for _ in range(repeats):
        if not drop_file_cache(path):
            return _direct_read_gbps(path, size), "o_direct"
        started = time.perf_counter()
        read_sequential(path, memoryview(target.numpy()))  # type: ignore[arg-type]  # ndarray is a buffer
        times.append(time.perf_counter() - started)
    return size / statistics.median(times) / 1e9, method


def _direct_read_gbps(path: Path, size: int) -> float:
    import mmap

    chunk = 16 * 2**20
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        started = time.perf_counter()
        done = 0
        while n := os.readv(fd, [buffer]):
            done += n
        return done / (time.perf_counter() - started) / 1e9
    finally:
        os.close(fd)


# ---- synthetic experts -----------------------------------------------------------------------------


def synthetic_shapes(count: int, largest: float = SYNTHETIC_PARAMS[-1]) -> list[tuple[str, dict]]:
    """``count`` Llama/Qwen2-shaped configs spread over 100M..``largest`` parameters."""
    from coe.bench.synthetic import synthetic_config

    smallest = SYNTHETIC_PARAMS[0]
    targets = (
        SYNTHETIC_PARAMS
        if (count, largest) == (len(SYNTHETIC_PARAMS), SYNTHETIC_PARAMS[-1])
        else [smallest * ((largest / smallest) ** (i / max(count - 1, 1))) for i in range(count)]
    )
    shapes = []
    for i, target in enumerate(targets):
        hidden = 768 if target < 0.25e9 else 1024 if target < 0.55e9 else 1536
        inter = int(hidden * 2.75) // 256 * 256
        heads = hidden // 64
        per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // 4) + 3 * hidden * inter
        layers = max(2, round(target / per_layer))
        model_type = "llama" if i % 2 == 0 else "qwen2"
        cfg = synthetic_config(
            "tiny",
            model_type,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
        )
        shapes.append((f"syn-{target / 1e9:.2f}b-{model_type}", cfg))
    return shapes


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the checkpoint coe's module saves (tied lm_head left out)."""
    import torch

    from coe.backends.torch import ModelArgs, build_model

    with torch.device("meta"):
        return {
            name: tuple(t.shape)
            for name, t in build_model(ModelArgs.from_hf(cfg)).state_dict().items()
            if not (cfg.get("tie_word_embeddings") and name == "lm_head.weight")
        }


def write_fast_checkpoint(folder: Path, cfg: dict, dtype: str = "bfloat16") -> Path:
    """A real safetensors checkpoint with N(0, 0.02) weights tiled from one random block, streamed
    to disk (writing 1.5B random parameters one by one would dominate the bench)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(cfg)
    torch_dtype = getattr(torch, dtype)
    item = torch_dtype.itemsize
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * item
        header[name] = {
            "dtype": {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = (
        torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(0))
        .mul_(0.02)
        .to(torch_dtype)
    )
    block_bytes = block.view(torch.uint8).numpy().tobytes()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left > 0:
            f.write(block_bytes[: min(left, len(block_bytes))])
            left -= min(left, len(block_bytes))
        f.flush()
        os.fsync(
            f.fileno()
        )  # dirty pages cannot be dropped, and writeback would compete with the reads
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# ---- measurements per expert -----------------------------------------------------------------------


def first_token_s(runner: Runner, prompt: str) -> float:
    """Time until the runner produces its first token for a chat request."""
    request = Request(
        expert=runner.expert.name,
        sampling=SamplingParams(max_tokens=1, temperature=0.0),
        prompt=prompt,
    )
    started = time.perf_counter()
    for event in generate(runner, [request]):
        if event.error is not None:
            raise event.error
        if event.is_final:
            break
    return time.perf_counter() - started


COLD_REPEATS = 3


def file_read_gbps(path: Path, target: memoryview) -> float:
    """One sequential read of ``path`` from disk into existing memory (the raw baseline)."""
    drop_file_cache(path)
    started = time.perf_counter()
    read_sequential(path, target)
    return path.stat().st_size / (time.perf_counter() - started) / 1e9


def measure_cache(cache: ModelCache, name: str, path: Path, prompts) -> dict:
    """cold->hot, warm->hot and steady TTFT of one expert through the real cache.

    The disk under this machine is noisy (the same file reads at 0.6-2 GB/s from one minute to the
    next), so each cold activation is paired with a raw read of the same file just before it, and
    the medians of ``COLD_REPEATS`` pairs are compared."""
    weights = path if path.is_file() else path / "model.safetensors"
    target = memoryview(bytearray(weights.stat().st_size))
    raw_gbps, cold = [], []
    for _ in range(COLD_REPEATS):
        cache.evict(name, Tier.HOST)
        raw_gbps.append(file_read_gbps(weights, target))
        drop_file_cache(weights)
        started = time.perf_counter()
        runner = cache.activate(name)
        cold_activate_s = time.perf_counter() - started
        state = cache.state_of(name)
        cold.append(
            (
                cold_activate_s + first_token_s(runner, next(prompts)),
                cold_activate_s,
                state.read_s,
                state.file_read_s,
            )
        )
    del target
    cold_to_hot_s, cold_activate_s, _, _ = sorted(cold)[len(cold) // 2]
    moved = cache.state_of(name)
    hot_ttft_s = statistics.median(first_token_s(runner, next(prompts)) for _ in range(3))
    warm_to_hot_s, warm_activate_s = measure_warm(cache, name, prompts)
    return {
        "cold_to_hot_s": cold_to_hot_s,
        "cold_activate_s": cold_activate_s,
        "read_s": statistics.median(r or 0.0 for _, _, r, _ in cold),
        "file_read_s": statistics.median(f or 0.0 for _, _, _, f in cold),
        "file_disk_gbps": statistics.median(raw_gbps),
        "warm_to_hot_s": warm_to_hot_s,
        "warm_activate_s": warm_activate_s,
        "hot_ttft_s": hot_ttft_s,
        "host_bytes": moved.host_bytes,
        "device_bytes": moved.device_bytes,
    }


def measure_warm(cache: ModelCache, name: str, prompts) -> tuple[float, float]:
    """warm->hot (activation + first token) and the activation alone, medians of 3; the expert
    is made warm first."""
    cache.activate(name)
    warm = [warm_to_hot_once(cache, name, next(prompts)) for _ in range(3)]
    warm_to_hot_s, warm_activate_s = sorted(warm)[1]
    return warm_to_hot_s, warm_activate_s


def warm_to_hot_once(cache: ModelCache, name: str, prompt: str) -> tuple[float, float]:
    """One warm -> hot: activation plus first token, and the activation alone; the expert is warm
    or hot before."""
    cache.evict(name, Tier.DEVICE)
    started = time.perf_counter()
    runner = cache.activate(name)
    activate_s = time.perf_counter() - started
    return activate_s + first_token_s(runner, prompt), activate_s


ISOLATED_PAIRS = 16  # even: see alternating_ratio


def isolated_warm_ratio(in_process: ModelCache, isolated: ModelCache, name: str, prompts) -> dict:
    """warm->hot in a worker process against in-process, in ``ISOLATED_PAIRS`` pairs taken in
    turn on the same prompt (a first token's time follows its prompt's length, and this machine's
    speed drifts from one second to the next), the order alternating: each side's median, and
    the ratio by ``alternating_ratio``."""
    in_process.activate(name)
    isolated.activate(name)
    same = [next(prompts) for _ in range(ISOLATED_PAIRS)]
    caches = (in_process, isolated)
    in_s, isolated_s = in_turn(
        lambda side, i: warm_to_hot_once(caches[side], name, same[i])[0],
        len(caches),
        ISOLATED_PAIRS,
    )
    in_process.evict(name, Tier.HOST)
    isolated.evict(name, Tier.HOST)
    return {
        "isolated_warm_to_hot_s": statistics.median(isolated_s),
        "in_process_warm_to_hot_s": statistics.median(in_s),
        "isolated_warm_ratio": alternating_ratio(in_s, isolated_s),
    }


def naive_gguf_s(path: Path, prompt: str, params: dict, cached: bool) -> float:
    """llama-cpp-python's defaults: Llama(path) (mmap, repacking on), then the first token."""
    llama_cpp = load_llama_cpp()
    if cached:
        read_sequential(path)
    else:
        drop_file_cache(path)
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=int(params.get("n_ctx", 4096)),
        n_threads=os.cpu_count(),
        verbose=False,
    )
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    next(iter(llm.generate(ids, temp=0.0)))
    elapsed = time.perf_counter() - started
    llm.close()
    return elapsed


def naive_torch_s(folder: Path, prompt: str, cached: bool, device: str = "cpu") -> float:
    """safetensors ``load_file`` into fresh memory (on ``device``), meta build, load_state_dict,
    first token."""
    import torch
    from safetensors.torch import load_file

    from coe.backends.torch import TorchRunner, build_model, load_vocab, read_model_args
    from coe.config import TorchParams

    file = folder / "model.safetensors"
    if cached:
        read_sequential(file)
    else:
        drop_file_cache(file)
    started = time.perf_counter()
    args = read_model_args(folder)
    state = load_file(str(file), device=device)
    with torch.device("meta"):
        model = build_model(args)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, assign=True)
    runner = TorchRunner(
        ExpertConfig("naive", str(folder)),
        TorchParams(),
        load_vocab(folder, args.vocab_size),
        model,
        torch.device(device),
        file.stat().st_size,
        4096,
    )
    first_token_s(runner, prompt)
    return time.perf_counter() - started


def llama_settings(path: Path, prompt: str, repack_works: bool = True) -> list[dict]:
    """Load time, first token and tokens/s for mmap on/off x repacking on/off (file cached);
    without ``repack_works`` (it crashed in a probe) the repacking rows are left out."""
    from coe.backends.llama_cpp import LlamaCppBackend
    from coe.backends.memory import HostBufferPool

    rows = []
    for use_mmap in (True, False):
        for repack in (False, True) if repack_works else (False,):
            expert = ExpertConfig(
                "settings", str(path), params={"use_mmap": use_mmap, "repack": repack}
            )
            read_sequential(path)
            started = time.perf_counter()
            host = LlamaCppBackend().read(expert, path, HostBufferPool())
            runner = LlamaCppBackend().materialize(host)
            load_s = time.perf_counter() - started
            ttft_s = first_token_s(runner, prompt)
            request = Request(
                expert="settings",
                sampling=SamplingParams(max_tokens=48, temperature=0.0),
                prompt=prompt,
            )
            started = time.perf_counter()
            final = [e for e in generate(runner, [request]) if e.is_final][-1]
            gen_s = time.perf_counter() - started
            tokens = final.completion.completion_tokens if final.completion else 0
            rows.append(
                {
                    "use_mmap": use_mmap,
                    "repack": repack,
                    "load_s": load_s,
                    "ttft_s": ttft_s,
                    "tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
                    "host_bytes": host.footprint_bytes,
                    "device_bytes": runner.footprint_bytes,
                }
            )
            runner.close()
            host.release()
    return rows


# ---- replay ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimExpert:
    name: str
    weight_bytes: int
    read_s: float  # disk -> host
    materialize_s: float  # host -> device


class _VirtualClock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class _SimRunner(Runner):
    def open_decoder(self) -> Decoder:
        return _SimDecoder()


class _SimDecoder(Decoder):
    """Ends every sequence at its first token (the replay moves weights; it generates nothing)."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def has_room(self, need_tokens: int) -> bool:
        return True

    def add(
        self,
        seq: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter | None = None,
    ) -> None:
        self.live.add(seq)

    def step(self) -> dict[int, Token]:
        return {seq: Token(0) for seq in self.live}

    def remove(self, seq: int) -> None:
        self.live.discard(seq)


class _SimVocab(Vocab):
    def encode(self, text):
        return [0]

    def token_bytes(self, token_id):
        return b""

    def is_end(self, token_id):
        return True


class SimulatedBackend(Backend):
    """Moves that take the measured time on a virtual clock; footprints are the weight bytes
    in both tiers (as on a GPU box, where hot means the weights are on the device)."""

    name = "llama_cpp"

    def __init__(self, experts: dict[str, SimExpert], clock: _VirtualClock):
        self.experts, self.clock = experts, clock

    def weight_bytes(self, path: Path) -> int:
        return self.experts[path.stem].weight_bytes

    def read(self, expert, path, pool):
        sim = self.experts[expert.name]
        self.clock.now_s += sim.read_s
        info = ModelInfo(
            path=path,
            format="sim",
            num_bytes=sim.weight_bytes,
            num_params=0,
            architecture="sim",
            quantization="-",
            chat_template=None,
            context_length=None,
        )
        return HostWeights(
            expert=expert, info=info, footprint_bytes=sim.weight_bytes, read_s=sim.read_s
        )

    def materialize(self, host):
        sim = self.experts[host.expert.name]
        self.clock.now_s += sim.materialize_s
        runner = _SimRunner(host.expert, _SimVocab(), 1, sim.weight_bytes)
        runner.footprint_bytes = sim.weight_bytes
        return runner


def zipf_sequence(
    num_experts: int,
    num_requests: int,
    seed: int,
    exponent: float = 1.0,
    shift_every: int | None = None,
) -> list[int]:
    """Zipf(``exponent``) over the experts; with ``shift_every``, the popularity ranks are
    reshuffled every that many requests."""
    rng, sequence = random.Random(seed), list[int]()
    while len(sequence) < num_requests:
        ranks = list(range(num_experts))
        rng.shuffle(ranks)  # popularity independent of size
        weights = [1.0 / (rank + 1) ** exponent for rank in ranks]
        sequence += rng.choices(range(num_experts), weights=weights, k=shift_every or num_requests)
    return sequence[:num_requests]


def replay(experts: list[SimExpert], sequence: list[int], policy_name: str, folder: Path) -> dict:
    mean_bytes = statistics.mean(e.weight_bytes for e in experts)
    largest = max(e.weight_bytes for e in experts)
    budgets = Budgets(
        device_bytes=max(int(REPLAY_HOT * mean_bytes), largest),
        host_bytes=max(int((REPLAY_HOT + REPLAY_WARM) * mean_bytes), largest),
        device_kind="sim",
    )
    for e in experts:
        (folder / f"{e.name}.bin").touch()
    config = CoEConfig(
        experts=tuple(
            ExpertConfig(e.name, str(folder / f"{e.name}.bin"), backend="llama_cpp")
            for e in experts
        ),
        router=RouterConfig(enabled=False),
        cache=CacheConfig(policy=CachePolicy(policy_name), prefetch="none"),
    )
    clock = _VirtualClock()
    backend = SimulatedBackend({e.name: e for e in experts}, clock)
    cache = ModelCache(
        config,
        store=ModelStore(folder),
        backends={"llama_cpp": backend},
        budgets=budgets,
        timer=clock,
    )
    for index in sequence:
        cache.activate(experts[index].name)
    stats = cache.stats
    cache.close()
    return {
        "switch_s": clock.now_s,
        "hit_rate": stats.hits / len(sequence),
        "warm_hit_rate": stats.warm_hits / len(sequence),
        "miss_rate": stats.misses / len(sequence),
    }


REPLAY_POLICIES = ("lru", "gdsf", "lrfu")  # the baseline first, the default policy last


def run_replay(experts: list[SimExpert], num_requests: int, seeds: int) -> dict:
    """Every policy on the same Zipf(1.0) sequences (the target), and on sequences whose
    popularity shifts every 500 requests (a check that the default does not only suit a fixed mix)."""
    workloads = {
        "zipf": zipf_sequence,
        "shifting": lambda n, k, seed: zipf_sequence(n, k, seed, shift_every=500),
    }
    results: dict[str, dict[str, list[dict]]] = {
        w: {p: [] for p in REPLAY_POLICIES} for w in workloads
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for workload, make in workloads.items():
                sequence = make(len(experts), num_requests, seed)
                for policy_name in REPLAY_POLICIES:
                    results[workload][policy_name].append(
                        replay(experts, sequence, policy_name, Path(tmp))
                    )
    mean = lambda rows, key: statistics.mean(r[key] for r in rows)  # noqa: E731
    zipf, default = results["zipf"], CacheConfig().policy
    out = {
        "experts": len(experts),
        "requests": num_requests,
        "seeds": seeds,
        "zipf_exponent": 1.0,
        "hot_slots": REPLAY_HOT,
        "warm_slots": REPLAY_WARM,
        "policy_name": default,
        "lru_switch_s": mean(zipf["lru"], "switch_s"),
        "policy_switch_s": mean(zipf[default], "switch_s"),
        "gdsf_switch_s": mean(zipf["gdsf"], "switch_s"),
    }
    out["reduction"] = 1 - out["policy_switch_s"] / out["lru_switch_s"]
    out.update(
        {
            name: {k: mean(zipf[name], k) for k in ("hit_rate", "warm_hit_rate", "miss_rate")}
            for name in REPLAY_POLICIES
        }
    )
    out["policy"] = out[default]
    out["per_seed"] = {
        f"{name}_switch_s": [r["switch_s"] for r in zipf[name]] for name in REPLAY_POLICIES
    }
    out["shifting"] = {
        f"{name}_switch_s": mean(results["shifting"][name], "switch_s") for name in REPLAY_POLICIES
    }
    return out


# ---- the run ---------------------------------------------------------------------------------------


def _prompts():
    i = 0
    while True:
        yield f"{PROMPTS[i % len(PROMPTS)]} ({i})"
        i += 1


def run(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    prompts = _prompts()
    memcpy = memcpy_gbps()
    h2d = h2d_gbps() if device.startswith("cuda") else None
    store = ModelStore(args.home)
    rows, settings = (
        ([], {}) if args.no_packaged else packaged_rows(store, prompts, not args.no_llama_settings)
    )
    disk, method = None, None
    shapes = synthetic_shapes(args.synthetic, args.largest)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for i, (name, cfg) in enumerate(shapes):
            folder = write_fast_checkpoint(Path(tmp) / name, cfg)
            file = folder / "model.safetensors"
            if disk is None and (file.stat().st_size > 1e9 or i == len(shapes) - 1):
                disk, method = disk_gbps(file)
            row = synthetic_row(store, name, cfg, folder, device, prompts)
            rows.append(row)
            print(
                f"  measured {name}: naive {_num(row['naive_s'], '.3f')}s, cold->hot {row['cold_to_hot_s']:.3f}s, "
                f"warm->hot {row['warm_to_hot_s']:.3f}s, hot ttft {row['hot_ttft_s']:.3f}s",
                flush=True,
            )
            for leftover in folder.iterdir():
                leftover.unlink()
    if disk is None:
        disk, method = disk_gbps(
            store.ensure(default_config().experts[-1].source)
        )  # a packaged model
    copy_gbps = (
        h2d or memcpy
    )  # host -> device tier: into device memory on CUDA, into existing host memory on CPU
    for row in rows:
        # the weights' read alone: a GGUF expert's disk -> host move also builds the llama.cpp model
        row["cold_read_gbps"] = (
            row["weight_bytes"] / row["file_read_s"] / 1e9 if row["file_read_s"] else None
        )
        row["bound_s"] = row["weight_bytes"] / (copy_gbps * 1e9) + row["hot_ttft_s"]
        row["warm_speedup"] = (
            row["naive_s"] / row["warm_to_hot_s"] if row["naive_s"] is not None else None
        )
        row["warm_vs_bound"] = row["warm_to_hot_s"] / row["bound_s"]
        row["cold_read_vs_disk"] = (row["cold_read_gbps"] or 0) / disk
        row["cold_read_vs_file_disk"] = (row["cold_read_gbps"] or 0) / row["file_disk_gbps"]
        row["materialize_gbps"] = row["weight_bytes"] / row["warm_activate_s"] / 1e9
    sims = [
        SimExpert(
            r["name"],
            r["weight_bytes"],
            r["read_s"] or r["weight_bytes"] / (disk * 1e9),
            r["warm_activate_s"],
        )
        for r in rows[:REPLAY_EXPERTS]
    ]
    replay_result = run_replay(sims, args.requests, args.seeds)
    result = {
        "memcpy_gbps": memcpy,
        "h2d_gbps": h2d,
        "disk_gbps": disk,
        "disk_method": method,
        "threads": os.cpu_count(),
        "device": device,
        "device_name": _device_name(torch, device),
        "experts": rows,
        "llama_settings": settings,
        "replay": replay_result,
    }
    print_report(result)
    return result


def _num(value: float | None, spec: str) -> str:
    """A table cell: the number, or n/a where a baseline could not run."""
    return "n/a" if value is None else format(value, spec)


def _device_name(torch, device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def standalone_cache(experts, store) -> ModelCache:
    """A cache of these experts alone: no router, no prefetch (the bench moves every expert itself)."""
    return ModelCache(
        CoEConfig(
            experts=tuple(experts),
            router=RouterConfig(enabled=False),
            cache=CacheConfig(prefetch="none"),
        ),
        store,
    )


def packaged_rows(store, prompts, with_settings: bool) -> tuple[list[dict], dict]:
    """Measure every default (packaged GGUF) expert; with ``with_settings`` also the llama.cpp
    settings table."""
    rows, settings = [], {}
    defaults = default_config()
    cache = standalone_cache(defaults.experts, store)
    isolated = standalone_cache(
        [replace(e, params={**e.params, "isolate": True}) for e in defaults.experts], store
    )
    for expert in defaults.experts:
        path = path_of(cache.store, expert)
        row = {
            "name": expert.name,
            "kind": "packaged",
            "backend": "llama_cpp",
            "weight_bytes": path.stat().st_size,
        }
        problem = probe_default_load(path)  # the naive baseline loads with repacking on
        if problem is None:
            row["naive_s"] = naive_gguf_s(path, next(prompts), expert.params, cached=False)
            row["naive_cached_s"] = naive_gguf_s(path, next(prompts), expert.params, cached=True)
        else:
            row["naive_s"] = row["naive_cached_s"] = None
            row["naive_unavailable"] = problem
            print(
                f"  {expert.name}: the naive baseline cannot run on this machine: {problem}",
                flush=True,
            )
        row.update(measure_cache(cache, expert.name, path, prompts))
        row.update(isolated_warm_ratio(cache, isolated, expert.name, prompts))
        rows.append(row)
        print(f"  measured {expert.name}", flush=True)
        if with_settings:
            settings[expert.name] = llama_settings(
                path, next(prompts), repack_works=problem is None
            )
    cache.close()
    isolated.close()
    return rows, settings


def synthetic_row(store, name: str, cfg: dict, folder: Path, device: str, prompts) -> dict:
    expert = ExpertConfig(
        name, str(folder), backend="torch_hf", params={"dtype": "bfloat16", "device": device}
    )
    cache = standalone_cache((expert,), store)
    file = folder / "model.safetensors"
    row = {
        "name": name,
        "kind": "synthetic",
        "backend": "torch_hf",
        "weight_bytes": file.stat().st_size,
        "num_params": sum(math.prod(s) for s in checkpoint_shapes(cfg).values()),
    }
    try:
        row["naive_s"] = naive_torch_s(folder, next(prompts), cached=False, device=device)
        row["naive_cached_s"] = naive_torch_s(folder, next(prompts), cached=True, device=device)
        row.update(measure_cache(cache, name, folder, prompts))
    finally:
        cache.close()
    return row


def print_report(result: dict) -> None:
    h2d = f", host->device {result['h2d_gbps']:.2f} GB/s (pinned)" if result.get("h2d_gbps") else ""
    print(
        f"\nmemcpy {result['memcpy_gbps']:.2f} GB/s{h2d}, disk {result['disk_gbps']:.2f} GB/s "
        f"({result['disk_method']}), {result['threads']} threads, synthetic experts on {result['device_name']}"
    )
    header = (
        f"{'expert':<26} {'GB':>5} {'naive s':>8} {'cold s':>7} {'read/disk':>9} {'read/file':>9} {'warm s':>7} "
        f"{'hot ttft':>8} {'naive/warm':>10} {'warm/bound':>10} {'warm GB/s':>9}"
    )
    print(header)
    for r in result["experts"]:
        print(
            f"{r['name']:<26} {r['weight_bytes'] / 1e9:>5.2f} {_num(r['naive_s'], '.3f'):>8} "
            f"{r['cold_to_hot_s']:>7.3f} {r['cold_read_vs_disk']:>9.2f} {r['cold_read_vs_file_disk']:>9.2f} "
            f"{r['warm_to_hot_s']:>7.3f} {r['hot_ttft_s']:>8.3f} {_num(r['warm_speedup'], '.1f'):>10} "
            f"{r['warm_vs_bound']:>10.2f} {r['materialize_gbps']:>9.2f}"
        )
        if r.get("naive_unavailable"):
            print(f"  {r['name']}: no naive baseline on this machine ({r['naive_unavailable']})")
    for r in result["experts"]:
        if "isolated_warm_to_hot_s" in r:
            print(
                f"{r['name']}: warm->hot in a worker process {r['isolated_warm_to_hot_s']:.3f}s "
                f"vs in-process {r['in_process_warm_to_hot_s']:.3f}s, {ISOLATED_PAIRS} pairs in "
                f"turn on the same prompts: {r['isolated_warm_ratio']:.2f}x"
            )
    for name, rows in result["llama_settings"].items():
        print(
            f"llama.cpp settings, {name}: "
            + "; ".join(
                f"mmap={int(r['use_mmap'])} repack={int(r['repack'])}: load {r['load_s']:.2f}s, "
                f"{r['tokens_per_s']:.0f} tok/s"
                for r in rows
            )
        )
    rp = result["replay"]
    print(
        f"replay: Zipf(1.0), {rp['experts']} experts, {rp['requests']} requests x {rp['seeds']} seeds, "
        f"room for {rp['hot_slots']} hot + {rp['warm_slots']} warm"
    )
    for name in REPLAY_POLICIES:
        switch_s, rates = rp["per_seed"][f"{name}_switch_s"], rp[name]
        saved = 1 - statistics.mean(switch_s) / rp["lru_switch_s"]
        print(
            f"  {name:<5} switch {statistics.mean(switch_s):6.1f}s  hit {rates['hit_rate']:.2f} "
            f"warm {rates['warm_hit_rate']:.2f} miss {rates['miss_rate']:.2f}  ({saved * 100:.0f}% less than lru; "
            f"shifting popularity: {rp['shifting'][f'{name}_switch_s']:.1f}s)"
        )
