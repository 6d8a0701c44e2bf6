"""What a backend provides: host weights, a runner over them, and the runner's decoder.

A Backend turns an expert's source into weights in host memory (``read``: the host tier, "warm")
and host weights into a ready ``Runner`` (``materialize``: the device tier, "hot"); the cache
decides when either happens. Both report the bytes they hold as measured by the operating system
(page cache residency, anonymous RSS or device memory deltas, owned allocations), never the file
size. A Runner opens a ``Decoder``: the only way tokens are generated, one forward pass per step
for every sequence it holds (a single request is a batch of one). The engine owns everything
around the forward pass (prompt rendering, stop strings, max_tokens, cancellation, usage:
``coe.engine.batch``); sampling is ``coe.backends.sampling``, shared by every decoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.backends.memory import HostBufferPool
from coe.backends.sampling import PLAIN, SamplerDefaults, Token, TokenSampler
from coe.config import ExpertConfig
from coe.errors import CoEError, ConfigError
from coe.models.info import ModelInfo, describe
from coe.types import Profile, SamplingParams


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


@dataclass
class Adapter:
    """A profile's LoRA adapter read onto its base's host weights (``Backend.read_adapter``):
    ``payload`` is backend-specific; ``num_bytes`` is measured; ``release`` frees it (twice is fine)."""

    name: str  # the profile's
    path: Path
    scale: float
    num_params: int
    num_bytes: int = 0
    payload: Any = None
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        callback, self.on_release, self.payload = self.on_release, None, None
        if callback is not None:
            callback()


class Vocab(ABC):
    """Tokenizer facts the engine needs: to encode a rendered prompt, to detokenise byte-exactly
    and to know the end of generation; and, for constrained decoding, llguidance's view of it."""

    bos_text: str = ""
    eos_text: str = ""
    chat_template: str | None = None
    n_vocab: int = 0  # the width of the model's logits
    _grammar_tokenizer: Any = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a full prompt, with the model's BOS if it wants one; special tokens parsed."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS, special tokens not parsed."""
        return self.encode(text)

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer for this vocabulary, built on first use (it reads every token)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = self._build_grammar_tokenizer()
        return self._grammar_tokenizer

    def _build_grammar_tokenizer(self) -> Any:
        from coe.backends.grammar import tokenizer_from

        return tokenizer_from(self, self.n_vocab)

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes: ...

    @abstractmethod
    def is_end(self, token_id: int) -> bool:
        """End of generation (EOS, end-of-turn)."""


class Decoder(ABC):
    """Sequences of one runner decoded together: each ``step`` is one forward pass.

    Contract (engine thread only; a runner has at most one open decoder): ``add`` takes a new
    sequence, keyed by the caller's ``seq`` number, when ``has_room`` says it fits; the next
    ``step`` prefills it and returns its first token, together with the next token of every
    sequence already running. ``add`` raises a CoEError for a sequence it refuses, or (a decoder
    across a process boundary) defers it: a sequence refused at the next ``step`` gets no token
    there and is returned once by ``take_refused`` after it. ``remove`` ends a sequence (finished
    or cancelled): it is never stepped again. ``close`` ends them all and frees the decoder's
    state; it may be called twice.
    A step exchanges token ids and small per-token results, never logit vectors, so a decoder can
    sit on the other side of a process boundary.
    """

    max_sequences: int = 1

    @abstractmethod
    def has_room(self, need_tokens: int) -> bool:
        """Whether a new sequence that may hold ``need_tokens`` cells (prompt + max_tokens) fits now."""

    @abstractmethod
    def add(
        self,
        seq: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter | None = None,
    ) -> None:
        """A new sequence, decoded through ``adapter`` (a LoRA over the runner's weights) when
        given. A backend that applies adapters per batch (not in ``PER_SEQUENCE_ADAPTERS``) is
        only ever given sequences of one adapter (or none) at a time."""

    @abstractmethod
    def step(self) -> dict[int, Token]:
        """One forward pass: the next token of every sequence added and not removed."""

    @abstractmethod
    def remove(self, seq: int) -> None: ...

    def take_refused(self) -> dict[int, CoEError]:
        """Sequences whose deferred ``add`` was refused at the last step, with the reason."""
        return {}

    def close(self) -> None:
        """End every sequence and free per-decoder state."""


class Runner(ABC):
    """An expert ready to generate: its vocabulary and a decoder over its resident weights.

    Contract: the engine thread alone opens decoders, one at a time; ``close`` frees the runtime
    (not the host weights it may share) and may be called twice.
    """

    def __init__(
        self,
        expert: ExpertConfig,
        vocab: Vocab,
        context_length: int,
        num_bytes: int,
        max_sequences: int = 1,
        sampler_defaults: SamplerDefaults = PLAIN,
    ):
        self.expert = expert
        self.vocab = vocab
        # the expert's params: top_k, min_p, repeat_penalty
        self.sampler_defaults = sampler_defaults
        self.context_length = context_length  # tokens one sequence may hold (prompt + output)
        self.max_sequences = max_sequences  # sequences one decoder steps together
        self.num_bytes = num_bytes  # weights on disk
        self.footprint_bytes = 0  # measured memory this runner holds beyond its host weights
        # its sequences share one context of ``context_length`` cells (llama.cpp), or each has
        # its own (torch): how a decoder decides it has room
        self.shares_context = False

    def fits(self, live: int, held_tokens: int, need_tokens: int) -> bool:
        """Whether a new sequence that may hold ``need_tokens`` cells (prompt + max_tokens) joins
        ``live`` ones that may hold ``held_tokens`` together: a free sequence, and room in the
        shared context (or in its own)."""
        cells = held_tokens + need_tokens if self.shares_context else need_tokens
        return live < self.max_sequences and cells <= self.context_length

    @abstractmethod
    def open_decoder(self) -> Decoder: ...

    @property
    def alive(self) -> bool:
        """False once the runtime is gone for good (an isolated expert's worker died): the cache
        moves the expert out of the device tier."""
        return True

    @property
    def pid(self) -> int | None:
        """The process its runtime lives in, when that is not this one."""
        return None

    def sampler(self, sampling: SamplingParams) -> TokenSampler:
        """A new sequence's sampler, with its grammar's mask when it has one (InvalidRequest if
        the grammar cannot be used with this vocabulary)."""
        mask = None
        if sampling.grammar is not None:
            from coe.backends.grammar import GrammarMask

            mask = GrammarMask(self.vocab.grammar_tokenizer(), sampling.grammar, self.vocab.n_vocab)
        return TokenSampler(sampling, self.sampler_defaults, mask)

    def close(self) -> None:
        """Free the runtime. Subclasses release their own handles."""


class Backend(ABC):
    """Reads an expert's weights into host memory and materialises them as a Runner.

    Contract: ``read`` may run on any thread and takes host buffers from ``pool`` when it owns
    memory (``reads_into_pool``); ``materialize`` builds the runtime (llama.cpp context, torch
    module on the device) and leaves ``host`` valid: the runner may share its memory, so the cache
    releases host weights only after closing their runner.
    """

    name: str = ""
    # read fills a reusable HostBufferPool buffer (else the page cache)
    reads_into_pool: bool = False

    @abstractmethod
    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights: ...

    def weight_bytes(self, path: Path) -> int:
        """Bytes of weights on disk (from the headers; nothing is read)."""
        return describe(path).num_bytes

    @abstractmethod
    def materialize(self, host: HostWeights) -> Runner: ...

    def read_for_worker(
        self, expert: ExpertConfig, path: Path, pool: HostBufferPool
    ) -> HostWeights:
        """What this process keeps of an expert whose weights live in a worker process: by
        default the same warm weights (llama.cpp: a model over the page cache, whose pages the
        worker's model shares); a backend whose warm weights are a private buffer keeps only what
        ``vocab_of`` needs."""
        return self.read(expert, path, pool)

    def vocab_of(self, host: HostWeights) -> Vocab:
        """The vocabulary of warm weights, without a runtime (an isolated expert's runner keeps
        it in the server while its runtime lives in a worker process)."""
        raise ConfigError(
            f"{host.expert.name}: the {self.name} backend cannot run in a worker process",
            param="isolate",
        )

    def close(self) -> None:
        """Free what the backend holds beyond its experts (an isolated one's spare workers)."""

    def check_adapter(self, base_path: Path, profile: Profile) -> int:
        """Check the profile's adapter against the base's weights from the headers alone (its
        format, architecture and shapes): ConfigError naming the file; returns its parameters."""
        raise ConfigError(
            f"{profile.adapter}: the {self.name} backend does not apply LoRA adapters",
            param="adapter",
        )

    def read_adapter(self, host: HostWeights, profile: Profile) -> Adapter:
        """The profile's adapter in host memory, ready for the base's decoders."""
        raise ConfigError(
            f"{profile.adapter}: the {self.name} backend does not apply LoRA adapters",
            param="adapter",
        )
