"""Backend and Runner interfaces.

A Backend turns an expert's source into weights in host memory (``read``: the host tier, "warm")
and host weights into a ready ``Runner`` (``materialize``: the device tier, "hot"); the cache
decides when either happens. Both report the bytes they hold as measured by the operating system
(page cache residency, anonymous RSS or device memory deltas, owned allocations), never the file
size. A Runner generates.
The policy common to every runner (prompt rendering, context check, stop strings, max_tokens,
cancellation, usage counts) is written once here; a runner only samples token ids.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from coe.backends.chat import PLAIN_STOP, render_chat
from coe.backends.memory import HostBufferPool
from coe.backends.text import TextAssembler
from coe.config import ExpertConfig
from coe.errors import CoEError, ContextLengthExceeded, GenerationError
from coe.models.info import ModelInfo, describe
from coe.types import Completion, Request, SamplingParams, StreamEvent


@dataclass
class HostWeights:
    """An expert's weights in host memory (an owned buffer or the page cache); ``payload`` is
    backend-specific. ``footprint_bytes`` is measured; ``release`` gives the memory back and may be
    called twice."""

    expert: ExpertConfig
    info: ModelInfo
    payload: Any = None
    footprint_bytes: int = 0
    read_s: float = 0.0  # time spent reading the file (0 when it was already in memory)
    on_release: Callable[[], None] | None = None

    @property
    def num_bytes(self) -> int:
        """Bytes of weights on disk."""
        return self.info.num_bytes

    def release(self) -> None:
        callback, self.on_release, self.payload = self.on_release, None, None
        if callback is not None:
            callback()


class Vocab(ABC):
    """Tokenizer facts a Runner needs."""

    bos_text: str = ""
    eos_text: str = ""
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a full prompt, with the model's BOS if it wants one; special tokens parsed."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes: ...

    @abstractmethod
    def is_end(self, token_id: int) -> bool:
        """End of generation (EOS, end-of-turn)."""


class Runner(ABC):
    """Generates for batches of requests on resident weights.

    Contract: the engine thread alone calls ``generate``; ``Request.cancel`` may come from any
    thread and is honoured between tokens; ``close`` frees the weights and may be called twice.
    """

    def __init__(self, expert: ExpertConfig, vocab: Vocab, context_length: int, num_bytes: int):
        self.expert = expert
        self.vocab = vocab
        self.context_length = context_length
        self.num_bytes = num_bytes  # weights on disk
        self.footprint_bytes = 0    # measured memory this runner holds beyond its host weights

    @abstractmethod
    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        """Yield generated token ids one by one until the caller stops iterating."""

    def close(self) -> None:
        """Free the weights. Subclasses release their own handles."""

    def generate(self, batch: Sequence[Request]) -> Iterator[StreamEvent]:
        for request in batch:
            yield from self._generate_one(request)

    def prompt_text(self, request: Request) -> tuple[str, tuple[str, ...]]:
        """The prompt string and the stop strings it implies (a plain transcript stops at the next turn)."""
        if request.prompt is not None:
            return request.prompt, ()
        text = render_chat(self.vocab.chat_template, request.messages,
                           bos_text=self.vocab.bos_text, eos_text=self.vocab.eos_text)
        return text, (() if self.vocab.chat_template else PLAIN_STOP)

    def _generate_one(self, request: Request) -> Iterator[StreamEvent]:
        try:
            prompt, implied_stop = self.prompt_text(request)
            prompt_ids = self.vocab.encode(prompt)
            self._check_context(len(prompt_ids), request.sampling.max_tokens)
        except CoEError as exc:
            yield StreamEvent(request.id, error=exc)
            return
        try:
            yield from self._decode(request, prompt_ids, implied_stop)
        except CoEError as exc:
            yield StreamEvent(request.id, error=exc)
        except Exception as exc:  # a backend failure ends this request, not the engine
            yield StreamEvent(request.id, error=GenerationError(f"{self.expert.name}: generation failed: {exc}"))

    def _decode(self, request: Request, prompt_ids: list[int],
                implied_stop: tuple[str, ...]) -> Iterator[StreamEvent]:
        sampling = request.sampling
        text = TextAssembler(sampling.stop + implied_stop)
        finish_reason, num_generated = "length", 0
        tokens = self._sample(prompt_ids, sampling)
        try:
            for token_id in tokens:
                if request.cancelled:
                    finish_reason = "cancelled"
                    break
                if self.vocab.is_end(token_id):
                    finish_reason = "stop"
                    break
                num_generated += 1
                delta = text.feed(self.vocab.token_bytes(token_id))
                if delta:
                    yield StreamEvent(request.id, delta=delta)
                if text.stopped:
                    finish_reason = "stop"
                    break
                if num_generated >= sampling.max_tokens:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        tail = text.flush()
        if tail:
            yield StreamEvent(request.id, delta=tail)
        yield StreamEvent(request.id, completion=Completion(
            text=text.text, finish_reason=finish_reason,
            prompt_tokens=len(prompt_ids), completion_tokens=num_generated))

    def _check_context(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"{self.expert.name} has a context of {self.context_length} tokens; the prompt has "
                f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more. Shorten the prompt "
                f"or lower max_tokens.", param="max_tokens")


class Backend(ABC):
    """Reads an expert's weights into host memory and materialises them as a Runner.

    Contract: ``read`` may run on any thread and takes host buffers from ``pool`` when it owns
    memory; ``materialize`` builds the runtime (llama.cpp context, torch module on the device),
    warms it up, and leaves ``host`` valid: the runner may share its memory, so the cache releases
    host weights only after closing their runner.
    """

    name: str = ""

    @abstractmethod
    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights: ...

    def weight_bytes(self, path: Path) -> int:
        """Bytes of weights on disk (from the headers; nothing is read)."""
        return describe(path).num_bytes

    @abstractmethod
    def materialize(self, host: HostWeights) -> Runner: ...
