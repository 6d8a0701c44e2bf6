"""What a weights file is: bytes, parameters, architecture, quantisation, chat template."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from coe.errors import ModelNotAvailable
from coe.models.gguf import read_gguf_header
from coe.models.safetensors_info import read_checkpoint_info


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: str  # gguf | safetensors
    num_bytes: int
    num_params: int
    architecture: str
    quantization: str
    chat_template: str | None
    context_length: int | None

    @property
    def chat_tuned(self) -> bool:
        return self.chat_template is not None


def describe(path: str | Path, cache_dir: Path | None = None) -> ModelInfo:
    """Read a GGUF file or a safetensors checkpoint folder's headers (no weights are loaded).

    Results are cached per path and the size and mtime of its file(s), so listing models stays
    cheap; with ``cache_dir`` also on disk, so a restart does not parse a fleet's headers again
    (a GGUF header with a 150k-token vocabulary takes 20-40 ms to walk).
    """
    path = Path(path)
    try:
        stamp = _stamp(path)
    except OSError:
        raise ModelNotAvailable(f"{path}: no such file or folder") from None
    return _describe_cached(path, stamp, cache_dir)


def _cache_file(cache_dir: Path, path: Path, stamp: tuple) -> Path:
    key = hashlib.sha256(repr((str(path.resolve()), stamp)).encode()).hexdigest()[:32]
    return cache_dir / f"{key}.json"


# A first start of a large fleet parses every header (150 new GGUFs: 6.6-6.9 s in one process,
# 3.6 s in two); from this many unparsed files on, they are parsed in one process per core.
_PARALLEL_FROM = 16


def parse_headers(paths: list[Path], cache_dir: Path) -> int:
    """Parse the headers of ``paths`` not in the disk cache yet, into it, in one process per core
    (this one included) when there are at least ``_PARALLEL_FROM`` of them; returns how many were
    parsed. Errors are left for ``describe`` to report, which then reads the cache."""
    todo = []
    for path in paths:
        try:
            if not _cache_file(cache_dir, path, _stamp(path)).is_file():
                todo.append(path)
        except OSError:
            continue  # missing: describe says so
    workers = min(os.cpu_count() or 1, len(todo) // (_PARALLEL_FROM // 2) or 1)
    if len(todo) < _PARALLEL_FROM or workers < 2:
        return 0
    chunks = [todo[k::workers] for k in range(workers)]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "coe.models.info", str(cache_dir), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for chunk in chunks[1:]
    ]
    _parse_into(cache_dir, chunks[0])
    for child in children:
        child.wait()
    return len(todo)


def _parse_into(cache_dir: Path, paths: list[Path]) -> None:
    for path in paths:
        try:
            describe(path, cache_dir)
        except ModelNotAvailable:
            pass


_MAX_CACHED_HEADERS = 4096


def _prune(cache_dir: Path) -> None:
    """Keep the newest half when the cache outgrows its bound (files that moved or changed leave
    entries nobody reads). Runs only when a header was parsed, never on a hit."""
    entries = list(cache_dir.glob("*.json"))
    if len(entries) <= _MAX_CACHED_HEADERS:
        return
    entries.sort(key=lambda entry: entry.stat().st_mtime_ns)
    for entry in entries[: len(entries) - _MAX_CACHED_HEADERS // 2]:
        entry.unlink(missing_ok=True)


def _info_from_json(path: Path, row: dict) -> ModelInfo:
    return ModelInfo(**{**row, "path": path})


def _stamp(path: Path) -> tuple:
    """Size and mtime of the file, or of every file in a checkpoint folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(p.name, p.stat()) for p in files]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


# Large enough for a fleet: every /health and /v1/experts reads each expert's header facts, and a
# cache smaller than the fleet misses on every one of them in a sequential walk (at 150 experts
# and 64 entries, /health re-read every header: seconds per call).
@lru_cache(maxsize=4096)
def _describe_cached(path: Path, stamp: tuple, cache_dir: Path | None = None) -> ModelInfo:
    """In memory, per path and stamp; below that, ``cache_dir``'s file (parsed by an earlier run
    or by ``parse_headers``' other processes); the header itself last."""
    if cache_dir is None:
        return _parse(path)
    file = _cache_file(cache_dir, path, stamp)
    try:
        return _info_from_json(path, json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet (or unreadable: read the header again)
    info = _parse(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({**asdict(info), "path": str(info.path)}))
        partial.replace(file)
        _prune(cache_dir)
    except OSError:
        pass  # a read-only home: no disk cache
    return info


def _parse(path: Path) -> ModelInfo:
    if path.is_dir():
        return _describe_checkpoint(path)
    header = read_gguf_header(path)
    return ModelInfo(
        path=path,
        format="gguf",
        num_bytes=path.stat().st_size,
        num_params=header.num_params,
        architecture=header.architecture,
        quantization=header.quantization,
        chat_template=header.chat_template,
        context_length=header.context_length,
    )


def _describe_checkpoint(path: Path) -> ModelInfo:
    info = read_checkpoint_info(path)
    config = read_json(path / "config.json")
    tokenizer_config = read_json(path / "tokenizer_config.json")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelInfo(
        path=path,
        format="safetensors",
        num_bytes=info.num_bytes,
        num_params=info.num_params,
        architecture=str(architectures[0]),
        quantization="/".join(info.dtypes),
        chat_template=tokenizer_config.get("chat_template"),
        context_length=config.get("max_position_embeddings"),
    )


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it does not exist; unreadable files raise ModelNotAvailable."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(f"{path}: unreadable JSON ({exc})") from exc


if __name__ == "__main__":  # parse_headers' other processes: CACHE_DIR PATH...
    _parse_into(Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]])
