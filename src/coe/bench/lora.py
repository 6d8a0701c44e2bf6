"""`coe bench lora`: what per-row LoRA buys on the torch backend. N sequences, each through a
different adapter of one base, decoded in one forward pass per token (the adapters' updates as
two batched matmuls per layer), against one batch per adapter (what a backend that applies one
adapter per batch does) and against the base alone in one batch (the ceiling).

The base is a synthetic checkpoint (``--shape``); the adapters are PEFT-format folders
(``adapter_config.json`` + ``adapter_model.safetensors``) with random A and B on every linear
layer of the attention and the MLP, rank ``--rank``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from coe.bench.synthetic import SHAPES, synthetic_config, write_checkpoint

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_arguments(parser) -> None:
    parser.add_argument("--shape", default="10m", choices=tuple(SHAPES), help="synthetic base")
    parser.add_argument("--adapters", type=int, default=8, help="sequences, one adapter each")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def write_adapter(folder: Path, base: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder with random A [r, in] and B [out, r] on every attention/MLP layer."""
    import torch
    from safetensors.torch import save_file

    from coe.backends.torch.model import linear_shapes, read_model_args

    torch.manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in linear_shapes(read_model_args(base)).items():
        if module.rsplit(".", 1)[-1] in MODULES:
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def tokens_per_s(runner, batches: list[list[tuple[list[int], object]]], steps: int) -> float:
    """Decode ``steps`` tokens for every sequence, one decoder per batch, batches one after another."""
    from coe.types import SamplingParams

    total, started = 0, time.perf_counter()
    for batch in batches:
        decoder = runner.open_decoder()
        for seq, (prompt, adapter) in enumerate(batch):
            decoder.add(seq, prompt, SamplingParams(max_tokens=steps + 1, temperature=0), adapter)
        for _ in range(steps):
            total += len(decoder.step())
        decoder.close()
    return total / (time.perf_counter() - started)


def run(args) -> dict:
    from coe.cache import ModelCache
    from coe.config import CoEConfig, ExpertConfig
    from coe.models import ModelStore

    workdir = Path(tempfile.mkdtemp(prefix="coe-bench-lora-"))
    try:
        base = write_checkpoint(workdir / "base", synthetic_config(args.shape))
        params = {"max_sequences": args.adapters, "device": args.device}
        experts = [ExpertConfig("base", str(base), backend="torch_hf", params=params)]
        for k in range(args.adapters):
            folder = write_adapter(workdir / f"adapter-{k}", base, args.rank, seed=k)
            experts.append(ExpertConfig(f"tuned-{k}", base="base", adapter=str(folder)))
        cache = ModelCache(CoEConfig(experts=tuple(experts)), ModelStore(workdir))
        cache.check_adapters()
        prompts = [
            [256, *f"Tell me about topic {k}, please.".encode()] for k in range(args.adapters)
        ]
        forms: dict[str, list[float]] = {}
        with cache.lease("base") as runner:
            adapters = [cache.adapter(f"tuned-{k}") for k in range(args.adapters)]
            plans: dict[str, list[list[tuple[list[int], object]]]] = {
                "base_one_batch": [[(p, None) for p in prompts]],
                "per_row_one_batch": [list(zip(prompts, adapters))],
                "batch_per_adapter": [[(p, a)] for p, a in zip(prompts, adapters)],
            }
            tokens_per_s(runner, plans["per_row_one_batch"], 2)  # warm-up
            for _ in range(args.repeats):
                for name, plan in plans.items():
                    forms.setdefault(name, []).append(tokens_per_s(runner, plan, args.steps))
        cache.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = {name: round(statistics.median(runs), 1) for name, runs in forms.items()}
    result = {
        "setup": {k: getattr(args, k) for k in ("shape", "adapters", "rank", "steps", "device")},
        "tokens_per_s": rows,
        "runs": {name: [round(r, 1) for r in runs] for name, runs in forms.items()},
        "per_row_vs_batch_per_adapter_x": round(
            rows["per_row_one_batch"] / rows["batch_per_adapter"], 3
        ),
        "per_row_vs_base_x": round(rows["per_row_one_batch"] / rows["base_one_batch"], 3),
    }
    print(f"\n{'':28}{'tokens/s':>10}")
    for name, value in rows.items():
        print(f"{name:28}{value:>10}")
    print(f"{'per-row / batch per adapter':28}{result['per_row_vs_batch_per_adapter_x']:>10}")
    print(f"{'per-row / base alone':28}{result['per_row_vs_base_x']:>10}")
    return result
