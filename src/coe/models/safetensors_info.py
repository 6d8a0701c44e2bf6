"""Read parameter counts and dtypes from safetensors headers (no tensor data, no torch)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from coe.errors import ModelNotAvailable

_MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class SafetensorsInfo:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    num_bytes: int

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({dtype for dtype, _ in self.tensors.values()}))


def read_safetensors_header(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes is implausible")
            return json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelNotAvailable(f"{path}: not a readable safetensors file ({exc})") from exc


def file_params(path: str | Path) -> int:
    """Parameters stored in one safetensors file (from its header; no weights are read)."""
    header = read_safetensors_header(path)
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def checkpoint_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files. Pickle checkpoints are never loaded: unpickling runs
    code from the file."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelNotAvailable(
                f"{directory}: only pickle weights ({', '.join(pickles[:3])}); coe loads "
                f"safetensors and GGUF only, because unpickling can run code. Convert "
                f"the checkpoint to safetensors."
            )
        raise ModelNotAvailable(f"{directory}: no *.safetensors files")
    return files


def read_checkpoint_info(directory: str | Path) -> SafetensorsInfo:
    """All *.safetensors files of a checkpoint folder together."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    num_bytes = 0
    for file in checkpoint_files(Path(directory)):
        for name, entry in read_safetensors_header(file).items():
            if name != "__metadata__":
                tensors[name] = (entry["dtype"], tuple(entry["shape"]))
        num_bytes += file.stat().st_size
    return SafetensorsInfo(tensors=tensors, num_bytes=num_bytes)
