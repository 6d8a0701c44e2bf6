"""Backends turn resident weights into Runners. Heavy libraries are imported lazily."""

from __future__ import annotations

from coe.backends.base import Adapter, Backend, Decoder, HostWeights, Runner, Vocab
from coe.errors import ConfigError

__all__ = ["Adapter", "Backend", "Decoder", "HostWeights", "Runner", "Vocab", "get_backend"]

# backends whose decoder applies a different LoRA adapter to each sequence of one batch; the
# others (llama.cpp: adapters are set per context) batch an adapter's requests together
PER_SEQUENCE_ADAPTERS = frozenset({"torch_hf"})


def get_backend(name: str) -> Backend:
    if name == "llama_cpp":
        from coe.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend()
    if name == "torch_hf":
        from coe.backends.torch import TorchBackend

        return TorchBackend()
    raise ConfigError(f"backend: unknown backend {name!r}", param="backend")
