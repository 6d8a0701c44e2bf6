"""API keys for the server: ``server.api_keys`` (and ``COE_API_KEYS``, read by the CLI).

With keys configured, every ``/v1`` route needs ``Authorization: Bearer KEY`` (or ``x-api-key``);
``/health`` and ``/metrics`` follow ``server.public_paths``; the console page itself (``/ui``) is
public and asks for a key. ``server.rate_limit_per_minute`` limits each key's requests over a
sliding minute (429 with Retry-After). Keys are compared in constant time and never logged or
echoed: a key is known to the rest of the server only by a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from coe.errors import AuthenticationError, RateLimited

WINDOW_S = 60.0
ALWAYS_PUBLIC = ("/ui", "/")


def key_id(key: str) -> str:
    """A short, non-reversible name for a key (for metrics or logs)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyAuth:
    """Checks a request's key and its per-key rate. Safe to call from any thread."""

    def __init__(
        self,
        keys: Sequence[str],
        public_paths: Sequence[str] = ("/health",),
        rate_limit_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.public_paths = tuple(public_paths)
        self.rate_limit_per_minute = rate_limit_per_minute
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def protects(self, path: str) -> bool:
        if not self.enabled or path in ALWAYS_PUBLIC or path in self.public_paths:
            return False
        return path.startswith("/v1") or path in ("/health", "/metrics")

    def check(self, path: str, headers: Mapping[str, str]) -> str | None:
        """The caller's key id, or None for a public path; raises AuthenticationError (401) or
        RateLimited (429)."""
        if not self.protects(path):
            return None
        key = presented_key(headers)
        if key is None:
            raise AuthenticationError(
                "this server needs an API key: send 'Authorization: Bearer KEY'"
            )
        digest = hashlib.sha256(key.encode()).digest()
        if not any(hmac.compare_digest(digest, known) for known in self._digests):
            raise AuthenticationError("the API key is not valid")
        ident = key_id(key)
        self._count(ident)
        return ident

    def _count(self, ident: str) -> None:
        if self.rate_limit_per_minute <= 0:
            return
        now_s = self._clock()
        with self._lock:
            recent = self._recent.setdefault(ident, deque())
            while recent and now_s - recent[0] >= WINDOW_S:
                recent.popleft()
            if len(recent) >= self.rate_limit_per_minute:
                wait_s = WINDOW_S - (now_s - recent[0])
                raise RateLimited(
                    f"this key may send {self.rate_limit_per_minute} requests per minute "
                    f"(server.rate_limit_per_minute); retry later",
                    retry_after_s=max(1.0, wait_s),
                )
            recent.append(now_s)


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None
