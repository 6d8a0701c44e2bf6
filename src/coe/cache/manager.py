"""ModelCache: the only code that moves expert weights (disk -> host -> runtime).

This first version keeps whole experts resident up to ``cache.resident_bytes`` and unloads the
least recently used one to make room. The three-tier cache replaces it behind the same calls.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coe.backends import Runner, backend_name_for, get_backend
from coe.cache.policy import Resident, choose_victims
from coe.config import CoEConfig, ExpertConfig
from coe.errors import CacheFull, ModelNotAvailable, UnknownExpert
from coe.models.catalog import PACKAGED, ModelStore
from coe.models.info import ModelInfo, describe


@dataclass(frozen=True)
class ExpertState:
    name: str
    backend: str
    state: str  # resident | ready | not assembled | not installed | missing
    num_bytes: int | None
    num_params: int | None
    load_s: float | None


@dataclass
class _Entry:
    runner: Runner
    load_s: float
    last_used_s: float


class ModelCache:
    """Contract: ``activate``/``evict``/``close`` run on the engine thread; ``states`` and
    ``is_resident`` are safe from any thread. Nothing is pinned yet; any resident expert may be
    evicted when another needs its bytes."""

    def __init__(self, config: CoEConfig, store: ModelStore):
        self.config = config
        self.store = store
        self._resident: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._last_load_s: dict[str, float] = {}

    def _expert(self, name: str) -> ExpertConfig:
        try:
            return self.config.expert(name)
        except KeyError:
            raise UnknownExpert(f"no expert named {name!r}") from None

    def path_of(self, expert: ExpertConfig) -> Path:
        """The weights on disk: a packaged id is assembled and verified first."""
        if expert.source in PACKAGED:
            return self.store.ensure(expert.source)
        path = Path(expert.source).expanduser()
        if not path.exists():
            raise ModelNotAvailable(f"expert {expert.name}: source {expert.source!r} is neither a "
                                    f"packaged model ({', '.join(sorted(PACKAGED))}) nor an existing path")
        return path

    def activate(self, name: str) -> Runner:
        """Return a ready Runner for the expert, loading it (and evicting others) if needed."""
        entry = self._resident.get(name)
        if entry is not None:
            entry.last_used_s = time.monotonic()
            return entry.runner
        expert = self._expert(name)
        path = self.path_of(expert)
        backend = get_backend(backend_name_for(expert.backend, path))
        started = time.perf_counter()
        host = backend.read(expert, path)
        self._make_room(name, host.num_bytes)
        runner = backend.materialize(host)
        load_s = time.perf_counter() - started
        with self._lock:
            self._resident[name] = _Entry(runner, load_s, time.monotonic())
            self._last_load_s[name] = load_s
        return runner

    def _make_room(self, name: str, incoming_bytes: int) -> None:
        resident = [Resident(n, e.runner.num_bytes, e.last_used_s) for n, e in self._resident.items()]
        try:
            victims = choose_victims(resident, incoming_bytes, self.config.cache.resident_bytes)
        except ValueError:
            raise CacheFull(f"expert {name} needs {incoming_bytes} bytes, more than cache.resident_bytes "
                            f"({self.config.cache.resident_bytes}); raise the budget in the config") from None
        for victim in victims:
            self.evict(victim)

    def evict(self, name: str) -> None:
        with self._lock:
            entry = self._resident.pop(name, None)
        if entry is not None:
            entry.runner.close()

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def close(self) -> None:
        for name in list(self._resident):
            self.evict(name)

    def states(self) -> list[ExpertState]:
        return [self._state(expert) for expert in self.config.experts]

    def _state(self, expert: ExpertConfig) -> ExpertState:
        info, state = self._disk_info(expert)
        if self.is_resident(expert.name):
            state = "resident"
        backend = expert.backend
        if info is not None:
            backend = backend_name_for(expert.backend, info.path)
        return ExpertState(expert.name, backend, state, info.num_bytes if info else None,
                           info.num_params if info else None, self._last_load_s.get(expert.name))

    def _disk_info(self, expert: ExpertConfig) -> tuple[ModelInfo | None, str]:
        """Header facts without assembling anything."""
        if expert.source in PACKAGED:
            state = self.store.status(expert.source)
            if state == "not installed":
                return None, state
            target = self.store.target_path(PACKAGED[expert.source])
            if not target.is_file():
                return None, state
            try:  # the header is readable before the checksum is recorded
                return describe(target), state
            except ModelNotAvailable:
                return None, "unreadable"
        path = Path(expert.source).expanduser()
        if not path.exists():
            return None, "missing"
        try:
            return describe(path), "ready"
        except ModelNotAvailable:
            return None, "unreadable"
