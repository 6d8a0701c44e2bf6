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


class Decoder(ABC):
    """Several sequences decoded together: one forward pass per step for all active sequences.

    Contract: the first ``step`` returns each sequence's first generated token (after prefill);
    every later ``step`` feeds back the tokens returned last time for the sequences still in
    ``active`` and returns their next tokens. A sequence left out of ``active`` is finished and
    never comes back. The decoder of a runner that ``joins_running_batch`` takes new sequences
    between steps (``add``): the next ``step`` prefills them and returns their first tokens with
    everyone else's next ones. ``close`` frees per-batch state and may be called twice.
    """

    @abstractmethod
    def step(self, active: Sequence[int]) -> dict[int, int]: ...

    def cached_tokens(self, index: int) -> int:
        """Prompt tokens of sequence ``index`` its prefill took from cached KV cells."""
        return 0

    def add(self, prompt_ids: list[int], sampling: SamplingParams) -> int:
        """A new sequence for the running batch; returns its index."""
        raise NotImplementedError(f"{type(self).__name__} does not take sequences mid-batch")

    def close(self) -> None:
        """Free the batch's state."""


class _Sequence:
    """One request's decoding state: text assembly, stop strings, max_tokens, cancellation."""

    def __init__(self, request: Request, prompt_ids: list[int], implied_stop: tuple[str, ...]):
        self.request, self.prompt_ids = request, prompt_ids
        self.text = TextAssembler(request.sampling.stop + implied_stop)
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.cached_tokens = 0  # prompt tokens the runner did not evaluate again (prefix caching)
        self.ended = False  # its final event (completion or error) was yielded

    def feed(self, token_id: int, vocab: "Vocab") -> StreamEvent | None:
        """Take one sampled token; a delta event if it produced text. Sets ``finish_reason`` when done."""
        if self.request.cancelled:
            self.finish_reason = "cancelled"
            return None
        if vocab.is_end(token_id):
            self.finish_reason = "stop"
            return None
        self.num_generated += 1
        delta = self.text.feed(vocab.token_bytes(token_id))
        if self.text.stopped:
            self.finish_reason = "stop"
        elif self.num_generated >= self.request.sampling.max_tokens:
            self.finish_reason = "length"
        return StreamEvent(self.request.id, delta=delta) if delta else None

    def finish(self) -> Iterator[StreamEvent]:
        tail = self.text.flush()
        if tail:
            yield StreamEvent(self.request.id, delta=tail)
        yield StreamEvent(self.request.id, completion=Completion(
            text=self.text.text, finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids), completion_tokens=self.num_generated,
            cached_tokens=self.cached_tokens))


class Runner(ABC):
    """Generates for batches of requests on resident weights.

    Contract: the engine thread alone calls ``generate``; ``Request.cancel`` may come from any
    thread and is honoured between tokens; ``close`` frees the weights and may be called twice.
    A runner that can decode several sequences in one forward pass sets ``max_batch_size`` > 1 and
    implements ``_open_decoder``; otherwise the requests of a batch run one after the other. One
    whose decoder ``joins`` sets ``joins_running_batch``: ``generate`` then asks ``join`` for more
    requests whenever a sequence slot is free (continuous batching).
    """

    max_batch_size = 1
    joins_running_batch = False
    last_cached_tokens = 0  # prompt tokens the last ``_sample`` prefill took from cached KV cells

    def __init__(self, expert: ExpertConfig, vocab: Vocab, context_length: int, num_bytes: int):
        self.expert = expert
        self.vocab = vocab
        self.context_length = context_length
        self.num_bytes = num_bytes  # weights on disk
        self.footprint_bytes = 0    # measured memory this runner holds beyond its host weights

    @abstractmethod
    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        """Yield generated token ids one by one until the caller stops iterating."""

    def _open_decoder(self, prompts: list[list[int]], samplings: list[SamplingParams]) -> Decoder:
        raise NotImplementedError(f"{type(self).__name__} decodes one sequence at a time")

    def _batch_token_capacity(self) -> int:
        """Tokens (prompt + max_tokens) all sequences of one decoder may hold together."""
        return self.context_length

    def next_token_logprobs(self, prompt_ids: list[int]) -> list[float]:
        """Log-probabilities over the whole vocabulary of the token after ``prompt_ids`` (one
        prefill, no sampling): the evaluation harness scores multiple choice with it. Engine
        thread only, like ``generate``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose log-probabilities")

    def close(self) -> None:
        """Free the weights. Subclasses release their own handles."""

    def generate(self, batch: Sequence[Request],
                 join: Callable[[int], Sequence[Request]] | None = None) -> Iterator[StreamEvent]:
        """Every request's events; each request ends with a completion or an error event.
        ``join(n)``: up to n more requests for this expert, asked while the last group decodes
        if this runner joins running batches; their events come in the same stream."""
        sequences = []
        for request in batch:
            seq, error = self._sequence(request)
            if error is not None:
                yield error
            else:
                sequences.append(seq)
        groups = list(self._groups(sequences))
        for number, group in enumerate(groups):
            joining = join if self.joins_running_batch and number == len(groups) - 1 else None
            try:
                if len(group) == 1 and joining is None:
                    yield from self._decode_one(group[0])
                else:
                    yield from self._decode_many(group, joining)
            except CoEError as exc:
                yield from self._fail_unfinished(group, exc)
            except Exception as exc:  # a backend failure ends these requests, not the engine
                yield from self._fail_unfinished(group, GenerationError(
                    f"{self.expert.name}: generation failed: {exc}"))

    def _sequence(self, request: Request) -> tuple[_Sequence | None, StreamEvent | None]:
        """The request's decoding state, or the error event that ends it (bad prompt, too long)."""
        try:
            prompt, implied_stop = self.prompt_text(request)
            prompt_ids = self.vocab.encode(prompt)
            self._check_context(len(prompt_ids), request.sampling.max_tokens)
        except CoEError as exc:
            return None, StreamEvent(request.id, error=exc)
        return _Sequence(request, prompt_ids, implied_stop), None

    def _groups(self, sequences: list[_Sequence]) -> Iterator[list[_Sequence]]:
        """Consecutive groups that fit one decoder (size and shared token capacity)."""
        group, tokens = [], 0
        for seq in sequences:
            need = len(seq.prompt_ids) + seq.request.sampling.max_tokens
            if group and (len(group) >= self.max_batch_size or tokens + need > self._batch_token_capacity()):
                yield group
                group, tokens = [], 0
            group.append(seq)
            tokens += need
        if group:
            yield group

    @staticmethod
    def _fail_unfinished(group: list[_Sequence], error: Exception) -> Iterator[StreamEvent]:
        for seq in group:
            if not seq.ended:
                seq.ended = True
                yield StreamEvent(seq.request.id, error=error)

    def prompt_text(self, request: Request) -> tuple[str, tuple[str, ...]]:
        """The prompt string and the stop strings it implies (a plain transcript stops at the next turn)."""
        if request.prompt is not None:
            return request.prompt, ()
        text = render_chat(self.vocab.chat_template, request.messages,
                           bos_text=self.vocab.bos_text, eos_text=self.vocab.eos_text)
        return text, (() if self.vocab.chat_template else PLAIN_STOP)

    def _decode_one(self, seq: _Sequence) -> Iterator[StreamEvent]:
        tokens = self._sample(seq.prompt_ids, seq.request.sampling)
        try:
            for token_id in tokens:
                event = seq.feed(token_id, self.vocab)
                if event is not None:
                    yield event
                if seq.finish_reason is not None:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        seq.ended = True
        seq.cached_tokens = self.last_cached_tokens  # set by this sequence's prefill
        yield from seq.finish()

    def _decode_many(self, group: list[_Sequence],
                     join: Callable[[int], Sequence[Request]] | None = None) -> Iterator[StreamEvent]:
        """One decoder for the whole group: each step is one forward pass over the active
        sequences. With ``join``, free slots are offered to waiting requests after every step;
        one that does not fit the shared token capacity yet waits here for a finished sequence."""
        decoder = self._open_decoder([s.prompt_ids for s in group], [s.request.sampling for s in group])
        held = sum(_need(s) for s in group)
        try:
            active, waiting = list(range(len(group))), []
            while True:
                if join is not None:
                    yield from self._take_joiners(join, len(active) + len(waiting), waiting)
                    while waiting and (not active or held + _need(waiting[0]) <= self._batch_token_capacity()):
                        seq = waiting.pop(0)
                        group.append(seq)
                        active.append(decoder.add(seq.prompt_ids, seq.request.sampling))
                        held += _need(seq)
                if not active:
                    return
                tokens = decoder.step(active)
                still = []
                for i in active:
                    seq = group[i]
                    event = seq.feed(tokens[i], self.vocab)
                    if event is not None:
                        yield event
                    if seq.finish_reason is None:
                        still.append(i)
                    else:
                        seq.ended = True
                        held -= _need(seq)
                        seq.cached_tokens = decoder.cached_tokens(i)
                        yield from seq.finish()
                active = still
        finally:
            decoder.close()
            group.extend(waiting)  # not started: _fail_unfinished ends them if the group failed

    def _take_joiners(self, join, in_use: int, waiting: list[_Sequence]) -> Iterator[StreamEvent]:
        """Ask for requests to fill the free slots; the ones that cannot run end with their error."""
        if in_use >= self.max_batch_size:
            return
        for request in join(self.max_batch_size - in_use):
            seq, error = self._sequence(request)
            if error is not None:
                yield error
            else:
                waiting.append(seq)

    def _check_context(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"{self.expert.name} has a context of {self.context_length} tokens; the prompt has "
                f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more. Shorten the prompt "
                f"or lower max_tokens.", param="max_tokens")

def _need(seq: _Sequence) -> int:
    """Token cells a sequence may hold: its prompt plus max_tokens."""
    return len(seq.prompt_ids) + seq.request.sampling.max_tokens


class Backend(ABC):
    """Reads an expert's weights into host memory and materialises them as a Runner.

    Contract: ``read`` may run on any thread and takes host buffers from ``pool`` when it owns
    memory; ``materialize`` builds the runtime (llama.cpp context, torch module on the device)
    and leaves ``host`` valid: the runner may share its memory, so the cache releases
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
