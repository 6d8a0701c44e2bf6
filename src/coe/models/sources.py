"""Where an expert's weights are and which backend reads them, from its config alone.

``path_of`` resolves a source to a file or folder (assembling and verifying a packaged model);
``disk_info`` reads the headers without assembling anything; ``backend_of`` resolves ``auto``;
``check_params`` validates every expert's params for the backend that will read it.
"""

from __future__ import annotations

from pathlib import Path

from coe.config import BACKEND_PARAMS, CoEConfig, ExpertConfig
from coe.errors import ConfigError, ModelNotAvailable
from coe.models.catalog import PACKAGED, ModelStore
from coe.models.info import ModelInfo, describe, parse_headers


def path_of(store: ModelStore, expert: ExpertConfig) -> Path:
    """The weights on disk: a packaged id is assembled and verified first."""
    if expert.source in PACKAGED:
        return store.ensure(expert.source)
    path = Path(expert.source).expanduser()
    if not path.exists():
        raise ModelNotAvailable(
            f"expert {expert.name}: source {expert.source!r} is neither a "
            f"packaged model ({', '.join(sorted(PACKAGED))}) nor an existing path"
        )
    return path


def backend_of(expert: ExpertConfig, path: Path | None = None) -> str:
    """``auto`` resolved: a folder is a safetensors checkpoint (torch_hf), a file GGUF (llama_cpp);
    packaged models are GGUF files. ``path``: the resolved source, when known."""
    if expert.backend != "auto":
        return expert.backend
    if path is None:
        if expert.source in PACKAGED:
            return "llama_cpp"
        path = Path(expert.source).expanduser()
    return "torch_hf" if path.is_dir() else "llama_cpp"


def check_params(config: CoEConfig) -> None:
    """Every local expert's params, for the backend that reads it: ConfigError naming
    ``experts[i].params.KEY`` (``auto`` experts were only checked against every backend's keys)."""
    for i, expert in enumerate(config.experts):
        if expert.is_remote:
            continue
        try:
            BACKEND_PARAMS[backend_of(expert)].parse(expert.params)
        except ConfigError as exc:
            raise exc.within(f"experts[{i}]") from None


def parse_fleet_headers(store: ModelStore, config: CoEConfig) -> int:
    """Start-up: the GGUF headers of every expert file not parsed before, into the header cache,
    in parallel for a large fleet (``parse_headers``); returns how many were parsed."""
    cache_dir = store.header_cache_dir
    if cache_dir is None:
        return 0
    paths = [
        Path(expert.source).expanduser()
        for expert in config.experts
        if not expert.is_remote and expert.source not in PACKAGED
    ]
    files = sorted({path for path in paths if path.is_file()})
    cache_dir.mkdir(parents=True, exist_ok=True)
    return parse_headers(files, cache_dir)


def disk_info(store: ModelStore, expert: ExpertConfig) -> tuple[ModelInfo | None, str]:
    """Header facts without assembling anything, and the source's availability: ready,
    not assembled, not installed, missing or unreadable."""
    if expert.source in PACKAGED:
        state = store.status(expert.source)
        if state == "not installed":
            return None, state
        target = store.target_path(PACKAGED[expert.source])
        if not target.is_file():
            return None, state
        try:  # the header is readable before the checksum is recorded
            return describe(target, store.header_cache_dir), state
        except ModelNotAvailable:
            return None, "unreadable"
    path = Path(expert.source).expanduser()
    if not path.exists():
        return None, "missing"
    try:
        return describe(path, store.header_cache_dir), "ready"
    except ModelNotAvailable:
        return None, "unreadable"
