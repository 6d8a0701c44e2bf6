"""The host tier of a torch expert: a checkpoint's files in one buffer, viewed as tensors in place."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from coe.backends.base import Vocab
from coe.backends.torch.model import ModelArgs
from coe.errors import LoadError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensors_in(buffer: torch.Tensor, path: Path) -> dict[str, torch.Tensor]:
    """Views into ``buffer`` (a uint8 tensor holding one safetensors file) for every tensor in it.

    No copy: the host tier keeps one allocation per expert. A tensor whose offset does not suit
    its dtype's alignment is copied out instead.
    """
    header_bytes = int.from_bytes(bytes(buffer[:8].numpy()), "little")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_bytes].numpy()))
    except ValueError as exc:
        raise LoadError(f"{path}: not a readable safetensors file ({exc})") from None
    data_start = 8 + header_bytes
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise LoadError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        expected_bytes = math.prod(entry["shape"]) * dtype.itemsize
        if not data_start <= begin <= end <= buffer.numel() or end - begin != expected_bytes:
            raise LoadError(
                f"{path}: tensor {name} should hold {expected_bytes} bytes at {begin}..{end} of a "
                f"{buffer.numel()}-byte file: the file is truncated or corrupt"
            )
        raw = buffer[begin:end]
        if (
            raw.storage_offset() % dtype.itemsize
        ):  # where it lies in the whole buffer (shards follow each other)
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


@dataclass(frozen=True)
class WarmCheckpoint:
    """What the host tier holds of a torch expert: its shape, tokenizer, and tensors viewing
    ``buffer`` (the checkpoint files' bytes, back to back; pinned on CUDA)."""

    args: ModelArgs
    state: dict[str, torch.Tensor]
    buffer: torch.Tensor  # uint8
    vocab: Vocab

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors on ``device``: on CPU the host tensors themselves; on CUDA the whole buffer
        in one non-blocking copy (one transfer runs at the link's bandwidth, hundreds of small
        ones do not), viewed back into tensors at the same offsets."""
        if device.type != "cuda":
            return dict(self.state)
        on_device = torch.empty(self.buffer.numel(), dtype=torch.uint8, device=device)
        on_device.copy_(self.buffer, non_blocking=True)
        return views_at_same_offsets(self.state, self.buffer, on_device)


def views_at_same_offsets(
    state: dict[str, torch.Tensor], buffer: torch.Tensor, copy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``state``'s tensors that view ``buffer``, as views of ``copy`` (a copy of ``buffer``, maybe
    on another device) at the same offsets; the others (converted to another dtype, or copied for
    alignment, at read) are copied to ``copy``'s device on their own."""
    base, moved = buffer.data_ptr(), {}
    for name, tensor in state.items():
        offset = tensor.data_ptr() - base
        if 0 <= offset and offset + tensor.nbytes <= buffer.numel():
            moved[name] = (
                copy[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            )
        else:
            moved[name] = tensor.to(copy.device, non_blocking=True)
    return moved
