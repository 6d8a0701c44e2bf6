"""`coe bench load`: how fast an expert's weights move disk -> host and host -> device through
the torch backend, against raw copies of the same bytes measured in the same run.

- read: TorchHFBackend.read (safetensors -> host tensors, pinned when the device is CUDA) vs a
  plain read of the file into one buffer.
- materialize: TorchHFBackend.materialize (meta build, copy to device, assign) vs one
  ``tensor.to(device)`` of a host buffer of the same size.
Drop the page cache between runs for cold-disk numbers; this bench reads warm files.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from coe.config import ExpertConfig


def add_arguments(parser) -> None:
    parser.add_argument(
        "--shape", default="500m", help="synthetic shape: tiny, 10m, 100m, 500m, 1.5b"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, torch, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(torch, device)
        started = time.perf_counter()
        result = fn()
        _sync(torch, device)
        times.append(time.perf_counter() - started)
        del result
    return statistics.median(times)


def run(args) -> dict:
    import torch

    from coe.backends.memory import HostBufferPool
    from coe.backends.torch import TorchBackend
    from coe.bench.synthetic import synthetic_config, write_checkpoint

    device_name = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(
            Path(tmp) / args.shape, synthetic_config(args.shape), dtype=args.dtype
        )
        file = folder / "model.safetensors"
        num_bytes = file.stat().st_size
        expert = ExpertConfig(
            "bench",
            str(folder),
            backend="torch_hf",
            params={"device": device_name, "dtype": args.dtype},
        )
        backend = TorchBackend()
        pin = device.type == "cuda"
        pool = HostBufferPool(pin=pin)
        host = backend.read(expert, folder, pool)
        raw_host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pin)

        def raw_read():
            with file.open("rb") as f:
                f.readinto(raw_host.numpy())
            return None

        def coe_read():
            backend.read(expert, folder, pool).release()  # back to the pool, as the cache does

        read_s = _timed(coe_read, torch, device, args.repeats)
        raw_read_s = _timed(raw_read, torch, device, args.repeats)
        materialize_s = _timed(lambda: backend.materialize(host), torch, device, args.repeats)
        raw_copy_s = _timed(
            lambda: raw_host.to(device, non_blocking=True, copy=True), torch, device, args.repeats
        )
    gbps = lambda s: num_bytes / s / 1e9  # noqa: E731
    rows: list[dict[str, Any]] = [
        {"step": "disk->host (read)", "coe_s": read_s, "baseline_s": raw_read_s},
        {"step": "host->device (materialize)", "coe_s": materialize_s, "baseline_s": raw_copy_s},
    ]
    print(
        f"shape {args.shape}, {num_bytes / 1e9:.2f} GB {args.dtype}, device {device_name}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(f"{'step':<28} {'coe GB/s':>9} {'raw GB/s':>9} {'coe/raw speed':>14}")
    for row in rows:
        row["coe_gb_s"], row["baseline_gb_s"] = gbps(row["coe_s"]), gbps(row["baseline_s"])
        row["ratio"] = row["baseline_s"] / row["coe_s"]
        print(
            f"{row['step']:<28} {row['coe_gb_s']:>9.2f} {row['baseline_gb_s']:>9.2f} {row['ratio']:>14.2f}"
        )
    return {
        "shape": args.shape,
        "num_bytes": num_bytes,
        "dtype": args.dtype,
        "device": device_name,
        "rows": rows,
    }
