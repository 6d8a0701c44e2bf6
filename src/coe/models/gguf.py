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
    data_offset: int = 0  # where the tensor data starts: the header's bytes

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
            return _read(_Cursor(f, path.stat().st_size))
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotAvailable(f"{path}: not a readable GGUF file ({exc})") from exc


_FIRST_READ_BYTES = 8 << 20  # the headers of the packaged models are 1.8-6.5 MB
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALAR_STRUCTS = {kind: struct.Struct(fmt) for kind, fmt in _SCALARS.items()}


class _Cursor:
    """The header read through one in-memory window (grown if a header is larger): parsing and
    skipping a 150k-token vocabulary is a loop over bytes, not a file call per token, so a fleet's
    start-up, which reads every expert's header, stays short."""

    def __init__(self, f: BinaryIO, size_bytes: int):
        self.f, self.size_bytes = f, size_bytes
        self.buf = f.read(min(size_bytes, _FIRST_READ_BYTES))
        self.pos = 0

    def _need(self, end: int) -> None:
        if end > len(self.buf):
            if end > self.size_bytes:
                raise ValueError("truncated header")
            self.buf += self.f.read(max(end - len(self.buf), len(self.buf)))
            if end > len(self.buf):
                raise ValueError("truncated header")

    def unpack(self, fmt: struct.Struct):
        self._need(self.pos + fmt.size)
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def skip(self, num_bytes: int) -> None:
        self._need(self.pos + num_bytes)
        self.pos += num_bytes

    def string(self) -> str:
        length = self.unpack(_U64)
        if length > self.size_bytes - self.pos:  # a corrupt length must not be allocated
            raise ValueError("truncated string")
        self._need(self.pos + length)
        text = self.buf[self.pos : self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def skip_strings(self, count: int) -> None:
        """Walk ``count`` strings (u64 length + bytes). The loop checks no bounds: a length read
        past the window raises struct.error, and the window grows (or the header is truncated)."""
        unpack_from, pos, left = _U64.unpack_from, self.pos, count
        while left:
            buf, done = self.buf, 0
            try:
                for done in range(left):  # noqa: B007 - how far it got is kept on purpose
                    pos += 8 + unpack_from(buf, pos)[0]
                left = 0
            except struct.error:
                left -= done
                self._need(pos + 8)
        self._need(pos)
        self.pos = pos


def _read(c: _Cursor) -> GGUFHeader:
    c._need(4)
    if c.buf[:4] != b"GGUF":
        raise ValueError("bad magic (expected 'GGUF')")
    c.pos = 4
    version = c.unpack(_U32)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    num_tensors, num_kv = c.unpack(_U64), c.unpack(_U64)
    metadata = {}
    for _ in range(num_kv):
        key = c.string()
        metadata[key] = _read_value(c, c.unpack(_U32))
    shapes = {}
    for _ in range(num_tensors):
        name = c.string()
        num_dims = c.unpack(_U32)
        shapes[name] = tuple(c.unpack(_U64) for _ in range(num_dims))
        c.skip(12)  # ggml type (u32) and data offset (u64): checked for truncation, unused
    alignment = int(metadata.get("general.alignment", 32))
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFHeader(version, metadata, shapes, data_offset)


def _read_value(c: _Cursor, value_type: int):
    if value_type in _SCALAR_STRUCTS:
        return c.unpack(_SCALAR_STRUCTS[value_type])
    if value_type == _STRING:
        return c.string()
    if value_type == _ARRAY:
        item_type, length = c.unpack(_U32), c.unpack(_U64)
        if length > _MAX_KEPT_ARRAY:
            _skip_array(c, item_type, length)
            return length
        return [_read_value(c, item_type) for _ in range(length)]
    raise ValueError(f"unknown GGUF value type {value_type}")


def _skip_array(c: _Cursor, item_type: int, length: int) -> None:
    if item_type in _SCALAR_STRUCTS:
        c.skip(_SCALAR_STRUCTS[item_type].size * length)
    elif item_type == _STRING:
        c.skip_strings(length)
    else:
        for _ in range(length):
            _read_value(c, item_type)
