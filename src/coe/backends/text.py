"""Incremental detokenisation with stop strings: bytes in, safe text deltas out."""

from __future__ import annotations

import codecs


class TextAssembler:
    """Feeds token bytes, returns text that can be shown now.

    Multi-byte characters split across tokens are held until complete; text that might be the
    start of a stop string is held until it cannot be. On a stop string, output ends before it.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._hold_chars = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self._emitted: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        for stop in self._stop:
            index = self._pending.find(stop)
            if index >= 0:
                self.stopped = True
                return self._emit(self._pending[:index], rest="")
        if self._hold_chars == 0:
            return self._emit(self._pending, rest="")
        cut = max(0, len(self._pending) - self._hold_chars)
        return self._emit(self._pending[:cut], rest=self._pending[cut:])

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self._pending + self._decoder.decode(b"", final=True), rest="")

    def _emit(self, out: str, rest: str) -> str:
        self._pending = rest
        if out:
            self._emitted.append(out)
        return out
