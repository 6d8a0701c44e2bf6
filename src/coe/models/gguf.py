"""A minimal GGUF header reader: metadata and tensor shapes, no tensor data.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, v2/v3).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from coe.errors import ModelNotAvailable

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (tokenizer vocabularies, merges) are skipped, not kept.
_MAX_KEPT_ARRAY = 64

# llama.cpp's LLAMA_FTYPE values, as stored in general.file_type.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
}


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict  # key -> value; long arrays are replaced by their length (an int)
    tensor_shapes: dict[str, tuple[int, ...]]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes.values())

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        return FILE_TYPES.get(file_type, f"type{file_type}") if file_type is not None else "unknown"

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if value is not None else None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _read(f)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotAvailable(f"{path}: not a readable GGUF file ({exc})") from exc


def _read(f: BinaryIO) -> GGUFHeader:
    if f.read(4) != b"GGUF":
        raise ValueError("bad magic (expected 'GGUF')")
    version = _unpack(f, "<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    num_tensors, num_kv = _unpack(f, "<Q"), _unpack(f, "<Q")
    metadata = {}
    for _ in range(num_kv):
        key = _read_string(f)
        metadata[key] = _read_value(f, _unpack(f, "<I"))
    shapes = {}
    for _ in range(num_tensors):
        name = _read_string(f)
        num_dims = _unpack(f, "<I")
        shapes[name] = tuple(_unpack(f, "<Q") for _ in range(num_dims))
        _unpack(f, "<IQ")  # ggml type (u32) and data offset (u64): checked for truncation, unused
    return GGUFHeader(version=version, metadata=metadata, tensor_shapes=shapes)


def _unpack(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    position = f.tell()
    if length > f.seek(0, 2) - position:  # a corrupt length must not be allocated
        raise ValueError("truncated string")
    f.seek(position)
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated string")
    return data.decode("utf-8")


def _read_value(f: BinaryIO, value_type: int):
    if value_type in _SCALARS:
        return _unpack(f, _SCALARS[value_type])
    if value_type == _STRING:
        return _read_string(f)
    if value_type == _ARRAY:
        item_type, length = _unpack(f, "<I"), _unpack(f, "<Q")
        if length > _MAX_KEPT_ARRAY:
            _skip_array(f, item_type, length)
            return length
        return [_read_value(f, item_type) for _ in range(length)]
    raise ValueError(f"unknown GGUF value type {value_type}")


def _skip_array(f: BinaryIO, item_type: int, length: int) -> None:
    if item_type in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[item_type]) * length, 1)
        return
    for _ in range(length):
        if item_type == _STRING:
            f.seek(_unpack(f, "<Q"), 1)
        else:
            _read_value(f, item_type)
