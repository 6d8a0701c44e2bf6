"""Backends turn resident weights into Runners. Heavy libraries are imported lazily."""
from __future__ import annotations

from pathlib import Path

from coe.backends.base import Backend, HostWeights, Runner, Vocab
from coe.errors import ConfigError

__all__ = ["Backend", "HostWeights", "Runner", "Vocab", "get_backend", "backend_name_for"]


def backend_name_for(backend: str, path: Path) -> str:
    """Resolve ``auto``: a folder is a safetensors checkpoint, a file is GGUF."""
    if backend != "auto":
        return backend
    return "torch_hf" if path.is_dir() else "llama_cpp"


def get_backend(name: str) -> Backend:
    if name == "llama_cpp":
        from coe.backends.llama_cpp import LlamaCppBackend
        return LlamaCppBackend()
    if name == "torch_hf":
        from coe.backends.torch_hf import TorchHFBackend
        return TorchHFBackend()
    raise ConfigError(f"backend: unknown backend {name!r}", param="backend")
