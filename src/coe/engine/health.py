"""Which experts are healthy. An expert that fails to become ready (load error, out of memory,
missing or corrupt weights) or crashes while generating is unhealthy for a backoff that doubles
with each consecutive failure; the first success clears it. Pure: the caller passes the clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

BASE_BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0


@dataclass
class _Record:
    failures: int = 0
    until_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class HealthState:
    healthy: bool
    failures: int  # consecutive, since the last success
    retry_after_s: float
    reason: str


class ExpertHealth:
    """Safe to call from any thread."""

    def __init__(
        self, base_backoff_s: float = BASE_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S
    ):
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def failed(self, expert: str, now_s: float, reason: str) -> float:
        """Record a failure; returns the backoff in seconds."""
        with self._lock:
            record = self._records.setdefault(expert, _Record())
            record.failures += 1
            backoff_s = min(self.max_backoff_s, self.base_backoff_s * 2 ** (record.failures - 1))
            record.until_s, record.reason = now_s + backoff_s, reason
            return backoff_s

    def succeeded(self, expert: str) -> None:
        with self._lock:
            self._records.pop(expert, None)

    def retry_after_s(self, expert: str, now_s: float) -> float:
        """Seconds until the expert may be tried again; 0 when it is healthy."""
        with self._lock:
            record = self._records.get(expert)
            return max(0.0, record.until_s - now_s) if record else 0.0

    def is_healthy(self, expert: str, now_s: float) -> bool:
        return self.retry_after_s(expert, now_s) == 0.0

    def reason(self, expert: str) -> str:
        """Why the expert last failed ("" when it has not)."""
        with self._lock:
            record = self._records.get(expert)
            return record.reason if record else ""

    def snapshot(self, now_s: float) -> dict[str, HealthState]:
        """Every expert that failed since its last success."""
        with self._lock:
            return {
                name: HealthState(
                    r.until_s <= now_s, r.failures, max(0.0, r.until_s - now_s), r.reason
                )
                for name, r in self._records.items()
            }
