"""torch backend for safetensors checkpoints of Llama / Qwen2 / Mistral shaped decoders.

``model``: the module (typed ModelArgs, built on ``meta``); ``vocab``: tokenizers; ``weights``:
the host tier's buffer viewed as tensors; ``runner``: the runner and its batched decoder.

Warm: the checkpoint's files read into one reusable host buffer (pinned on CUDA) and viewed as
tensors in place. Hot: the module built on ``meta`` and given those tensors with ``assign=True``
(CPU: no copy) or copied to the device with one non-blocking transfer (CUDA).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from coe.backends.base import Adapter, Backend, HostWeights, Runner, Vocab
from coe.backends.memory import HostBufferPool, anon_rss_bytes, read_sequential
from coe.backends.torch import lora
from coe.backends.torch.model import ModelArgs, attach_lora, build_model, read_model_args
from coe.backends.torch.runner import TorchDecoder, TorchRunner
from coe.backends.torch.vocab import BYTE_VOCAB_SIZE, ByteVocab, HFTokenizerVocab, load_vocab
from coe.backends.torch.weights import WarmCheckpoint, tensors_in, views_at_same_offsets
from coe.config import ExpertConfig, TorchParams
from coe.errors import LoadError
from coe.models.info import describe
from coe.models.safetensors_info import checkpoint_files
from coe.types import Profile

__all__ = [
    "TorchBackend",
    "TorchRunner",
    "TorchDecoder",
    "ModelArgs",
    "build_model",
    "read_model_args",
    "ByteVocab",
    "HFTokenizerVocab",
    "load_vocab",
    "BYTE_VOCAB_SIZE",
    "WarmCheckpoint",
    "tensors_in",
    "views_at_same_offsets",
]


class TorchBackend(Backend):
    """Expert params: ``TorchParams`` (dtype, device, n_ctx, max_sequences, sampling defaults)."""

    name = "torch_hf"
    reads_into_pool = True

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        args = read_model_args(path)
        dtype = getattr(torch, TorchParams.of(expert).dtype)
        files = checkpoint_files(path)
        sizes = [file.stat().st_size for file in files]
        buffer = pool.acquire(sum(sizes))
        state, offset, converted_bytes = {}, 0, 0
        started = time.perf_counter()
        try:
            for file, size in zip(files, sizes):
                view = buffer[offset : offset + size]
                read_sequential(file, memoryview(view.numpy()))
                state.update(tensors_in(view, file))
                offset += size
        except BaseException:
            pool.release(buffer)
            raise
        read_s = time.perf_counter() - started
        for name, tensor in state.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                state[name] = tensor.to(dtype)  # a checkpoint in another dtype costs one copy here
                converted_bytes += state[name].nbytes
        warm = WarmCheckpoint(args, state, buffer[:offset], load_vocab(path, args.vocab_size))
        return HostWeights(
            expert=expert,
            info=describe(path),
            payload=warm,
            footprint_bytes=buffer.numel() + converted_bytes,
            read_s=read_s,
            on_release=lambda: pool.release(buffer),
        )

    def read_for_worker(
        self, expert: ExpertConfig, path: Path, pool: HostBufferPool
    ) -> HostWeights:
        """The weights live in the worker's buffer alone: this process keeps the tokenizer."""
        vocab = load_vocab(path, read_model_args(path).vocab_size)
        return HostWeights(expert=expert, info=describe(path), payload=vocab)

    def vocab_of(self, host: HostWeights) -> Vocab:
        payload = host.payload
        return payload.vocab if isinstance(payload, WarmCheckpoint) else payload

    def materialize(self, host: HostWeights) -> Runner:
        warm: WarmCheckpoint = host.payload
        params = TorchParams.of(host.expert)
        device = _device(host.expert, params)
        with torch.device("meta"):
            model = build_model(
                warm.args
            )  # no memory; but the first one in a process imports torch._dynamo (~70 MB)
        before = _allocated_bytes(device)
        state = warm.to_device(device)
        if "lm_head.weight" not in state and warm.args.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        try:
            model.load_state_dict(state, assign=True, strict=True)
        except (RuntimeError, TypeError, KeyError) as exc:
            raise LoadError(f"{host.info.path}: weights do not match config.json ({exc})") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host buffer may be reused once this returns
        model.eval()
        lora_rows = attach_lora(model)
        context = min(params.n_ctx, warm.args.max_position_embeddings or params.n_ctx)
        runner = TorchRunner(
            host.expert, params, warm.vocab, model, device, host.num_bytes, context, lora_rows
        )
        runner.footprint_bytes = max(0, _allocated_bytes(device) - before)
        return runner

    def check_adapter(self, base_path: Path, profile: Profile) -> int:
        return lora.check_adapter(read_model_args(base_path), profile)

    def read_adapter(self, host: HostWeights, profile: Profile) -> Adapter:
        return lora.read_adapter(profile, getattr(torch, TorchParams.of(host.expert).dtype))


def _allocated_bytes(device: torch.device) -> int:
    """Device memory held by torch (CUDA), or this process's anonymous RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return anon_rss_bytes() or 0


def _device(expert: ExpertConfig, params: TorchParams) -> torch.device:
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(
            f"expert {expert.name}: params.device is {params.device!r} but CUDA is not available"
        )
    return torch.device(params.device)
