"""Plain dataclasses shared by every layer. No torch, no I/O."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from coe.errors import InvalidRequest

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
_ids = itertools.count(1)


class Choice(str, Enum):
    """An enumeration whose members are their own (JSON, YAML) strings: ``Tier.DEVICE == "device"``."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def names(cls) -> str:
        """'a, b or c' for messages."""
        values = [str(m.value) for m in cls]
        return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]


class Tier(Choice):
    """Where an expert's weights are: ready to generate (device: "hot"), in RAM (host: "warm"),
    only on disk ("cold"), or served by another process or server (remote)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


class CachePolicy(Choice):
    """How the cache picks what to evict: cost-aware (lrfu, gdsf) or by recency (lru)."""

    LRFU = "lrfu"
    GDSF = "gdsf"
    LRU = "lru"


class SchedulerPolicy(Choice):
    """expert: keep serving resident experts and batch by expert; fifo: arrival order (the baseline)."""

    EXPERT = "expert"
    FIFO = "fifo"


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made (an assistant message's ``tool_calls``)."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers
    name: str | None = None  # tool: the function's name


@dataclass(frozen=True)
class Profile:
    """What an expert over a shared base adds to each request: a system prompt and few-shot
    messages put before the conversation (a request's own system message replaces the system
    prompt), and a LoRA adapter applied over the base's weights."""

    name: str
    system_prompt: str | None = None
    few_shot: tuple[ChatMessage, ...] = ()
    adapter: str | None = None  # path of the adapter (a GGUF LoRA file or a PEFT folder)
    adapter_scale: float = 1.0

    def messages(self, conversation: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
        """The conversation as the base model sees it."""
        system: tuple[ChatMessage, ...] = ()
        if conversation and conversation[0].role == "system":
            system, conversation = conversation[:1], conversation[1:]
        elif self.system_prompt:
            system = (ChatMessage("system", self.system_prompt),)
        return (*system, *self.few_shot, *conversation)

    def prompt(self, text: str) -> str:
        """A plain completion prompt: the system prompt and the examples' text before it."""
        head = [p for p in (self.system_prompt, *(m.content for m in self.few_shot)) if p]
        return "\n\n".join([*head, text])


@dataclass(frozen=True)
class Tools:
    """The functions a chat request offers (OpenAI ``tools``) and how the model may use them."""

    functions: tuple[dict, ...]  # each {"name", "description"?, "parameters"?}
    choice: str = "auto"  # auto | none | required | a function's name
    parallel: bool = True  # more than one call in an answer

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.functions)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely ones'
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # an llguidance grammar the output must follow (coe.engine.structured)
    grammar: str | None = None
    # token ids whose log-probabilities each step reports (the evaluation's option letters)
    score_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(
                f"temperature must be in [0, 2], got {self.temperature}", param="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop):
            raise InvalidRequest(
                f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}",
                param="top_logprobs",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", param=name)
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -100.0 <= bias <= 100.0:
                raise InvalidRequest(
                    f"logit_bias: token {token_id} has bias {bias}; token ids are >= 0 and biases "
                    f"in [-100, 100]",
                    param="logit_bias",
                )


@dataclass(frozen=True)
class RouteDecision:
    """Why a request went to an expert; travels with the request and back to the client."""

    category: str
    confidence: float
    expert: str
    alternatives: tuple[tuple[str, str, float], ...] = ()  # (category, expert, probability)
    fallback: bool = False
    reason: str = ""
    planned_expert: str | None = None  # the map's choice, when a hot expert served instead
    score_given_up: float = 0.0  # its expected score minus the serving expert's

    def to_dict(self) -> dict:
        """The JSON shape clients see (the server's `coe` field, `coe route --jsonl`)."""
        shape = {
            "category": self.category,
            "confidence": round(self.confidence, 4),
            "expert": self.expert,
            "fallback": self.fallback,
            "reason": self.reason,
            "alternatives": [
                {"category": c, "expert": e, "probability": p} for c, e, p in self.alternatives
            ],
        }
        if self.planned_expert is not None:
            shape.update(
                planned_expert=self.planned_expert, score_given_up=round(self.score_given_up, 4)
            )
        return shape


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """The end of one request's generation."""

    text: str
    finish_reason: str  # stop | length | cancelled | tool_calls
    prompt_tokens: int
    completion_tokens: int
    # prompt tokens taken from KV cells a previous request left (prefix caching)
    cached_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's, when asked for


@dataclass(frozen=True)
class StreamEvent:
    """One step of a request's output: a text delta, or the final completion, or an error."""

    request_id: str
    delta: str = ""
    completion: Completion | None = None
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last delta, when asked for

    @property
    def is_final(self) -> bool:
        return self.completion is not None or self.error is not None


def _no_sink(event: StreamEvent) -> None:
    return None


@dataclass(eq=False)
class Request:
    """One generation request: either chat ``messages`` or a plain ``prompt``.

    ``sink`` receives every StreamEvent for this request, from the engine thread; it must not block.
    """

    expert: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    tools: Tools | None = None
    sink: Callable[[StreamEvent], None] = _no_sink
    route: RouteDecision | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival_s: float = field(default_factory=time.monotonic)
    served_tier: Tier | None = None  # where its expert was when its batch started
    switch_s: float = 0.0  # time its batch waited for the expert to become ready
    served_by: str | None = None  # the Ray Serve replica that ran it (coe serve --ray)
    # set by the engine from ``expert``: the queue it waits in (its base's, or its own where the
    # backend applies its adapter per batch) and what its profile adds
    runs_on: str = ""
    profile: Profile | None = None
    # how long its expert stays where it is once unused (Ollama's keep_alive); None: the config's
    # cache.idle_unload_s; math.inf: until another expert needs the room
    keep_alive_s: float | None = None
    cancel_reason: str = ""
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # called once cancel() has run (the scheduler's: look for cancelled requests at its next call)
    on_cancel: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequest("a request takes either messages or a prompt")

    def cancel(self, reason: str = "cancelled") -> None:
        """Safe from any thread; the runner stops at its next token. ``reason`` (cancelled,
        timeout) is what the metrics count the request as."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
        self._cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def queue(self) -> str:
        """The scheduler queue it waits in: requests in one queue may share a batch."""
        return self.runs_on or self.expert

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
