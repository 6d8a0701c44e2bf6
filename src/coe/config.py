"""Frozen configuration dataclasses. YAML is read only here, in ``from_yaml``.

Every validation error is a ConfigError whose message names the field; ``from_yaml`` adds the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeGuard, TypeVar

from coe.errors import ConfigError, InvalidRequest
from coe.types import CachePolicy, ChatMessage, Choice, Profile, SamplingParams, SchedulerPolicy

ChoiceT = TypeVar("ChoiceT", bound=Choice)

BACKENDS = ("auto", "llama_cpp", "torch_hf", "remote")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
ROUTED_MODEL = "coe"


def parse_bytes(value: Any, field_name: str) -> int:
    """An int, or a string like '4GiB' / '512MB'."""
    if isinstance(value, bool):
        raise ConfigError(
            f"{field_name}: expected a size in bytes, got {value!r}", param=field_name
        )
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field_name}: expected a size >= 0, got {value}", param=field_name)
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(
            f"{field_name}: expected a size like 4GiB or 512MB, got {value!r}", param=field_name
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(value: Any, field_name: str) -> float:
    """A positive number, or a string like '1.5B', '500M' or '1e9' (parameter counts)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        match = _COUNT.match(str(value)) if isinstance(value, str) else None
        if not match:
            raise ConfigError(
                f"{field_name}: expected a count like 1.5B, 500M or 1e9, got {value!r}",
                param=field_name,
            )
        number = float(match.group(1)) * _COUNT_UNITS[match.group(2).lower()]
    if not number > 0:
        raise ConfigError(
            f"{field_name}: expected a positive count, got {value!r}", param=field_name
        )
    return number


def _require(ok: bool, field_name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}", param=field_name)


def _choice(kind: type[ChoiceT], value: Any, field_name: str) -> ChoiceT:
    """``value`` as a member of the enumeration ``kind``, or ConfigError listing its members."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(
            f"{field_name}: expected {kind.names()}, got {value!r}", param=field_name
        ) from None


def _positive_int(value: Any, field_name: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field_name,
        "an integer > 0",
        value,
    )


# what a profile's ``sampling`` may preset (a request's own value wins): field -> accepted types
PROFILE_SAMPLING = {
    "temperature": (int, float),
    "top_p": (int, float),
    "max_tokens": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "stop": (list, str),
    "seed": (int,),
}
ADAPTER_FORMATS = (
    "a GGUF LoRA file (llama_cpp) or a PEFT adapter folder with safetensors (torch_hf)"
)


@dataclass(frozen=True)
class ExpertConfig:
    """One expert. ``source`` is a packaged model id (see `coe experts`) or a path.

    An expert with a ``base`` (another expert's name) is a *profile* of it: it runs on the base's
    weights (one copy in every tier, one batch) and adds a system prompt, few-shot messages,
    sampling defaults and/or a LoRA ``adapter``. ``CoEConfig`` fills in its source, backend and
    params from the base.
    """

    name: str
    source: str = ""
    backend: str = "auto"
    description: str = ""
    params: dict = field(default_factory=dict)  # backend options, e.g. n_ctx, n_threads
    base: str | None = None
    system_prompt: str | None = None
    few_shot: tuple = ()  # messages put before the conversation: {role, content} mappings
    sampling: dict = field(default_factory=dict)  # defaults for the fields a request leaves unset
    adapter: str | None = None  # a LoRA over the base's weights
    adapter_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(
            isinstance(self.name, str)
            and bool(_NAME.fullmatch(self.name))
            and self.name != ROUTED_MODEL,
            "name",
            f"letters, digits, '.', '_', ':' or '-' (not {ROUTED_MODEL!r})",
            self.name,
        )
        _require(self.backend in BACKENDS, "backend", "one of " + ", ".join(BACKENDS), self.backend)
        _require(isinstance(self.params, dict), "params", "a mapping", self.params)
        self._check_profile()
        if self.base is not None:
            return  # source, backend and params come from the base (CoEConfig)
        _require(
            isinstance(self.source, str) and self.source != "",
            "source",
            "a packaged model id or a path (or a base expert)",
            self.source,
        )
        if self.adapter is not None:
            raise ConfigError(
                "adapter: a LoRA adapter needs a base expert to apply to (add base: NAME)",
                param="adapter",
            )
        if self.is_remote:
            remote_settings(self)  # validated here, so a bad remote expert fails at load time
        elif self.backend in BACKEND_PARAMS:
            BACKEND_PARAMS[self.backend].parse(self.params)
        else:  # auto: the backend is known once the source is (coe.models.sources.check_params)
            _reject_unknown(
                self.params, set().union(*(c.names() for c in BACKEND_PARAMS.values())), "params"
            )

    def _check_profile(self) -> None:
        _require(
            self.base is None or (isinstance(self.base, str) and self.base != ""),
            "base",
            "the name of another expert",
            self.base,
        )
        _require(
            self.system_prompt is None or isinstance(self.system_prompt, str),
            "system_prompt",
            "a string",
            self.system_prompt,
        )
        _require(
            isinstance(self.few_shot, list | tuple), "few_shot", "a list of messages", self.few_shot
        )
        messages = tuple(_message(m, f"few_shot[{i}]") for i, m in enumerate(self.few_shot))
        object.__setattr__(self, "few_shot", messages)
        _require(isinstance(self.sampling, dict), "sampling", "a mapping", self.sampling)
        _reject_unknown(self.sampling, set(PROFILE_SAMPLING), "sampling")
        for key, value in self.sampling.items():
            _require(
                isinstance(value, PROFILE_SAMPLING[key])
                and not isinstance(value, bool)
                and (not isinstance(value, list) or all(isinstance(v, str) for v in value)),
                f"sampling.{key}",
                "a string or a list of strings" if key == "stop" else "a number",
                value,
            )
        self.sampling_defaults()  # in range, as a request's would be
        _require(
            self.adapter is None or (isinstance(self.adapter, str) and self.adapter != ""),
            "adapter",
            ADAPTER_FORMATS,
            self.adapter,
        )
        _require(is_number(self.adapter_scale), "adapter_scale", "a number", self.adapter_scale)

    @property
    def is_remote(self) -> bool:
        """Served elsewhere behind an OpenAI-compatible API; ``source`` is its URL."""
        return self.backend == "remote"

    @property
    def uses_cuda(self) -> bool:
        """Its ``params.device`` names a CUDA device (its host weights are then pinned)."""
        return str(self.params.get("device", "cpu")).startswith("cuda")

    def sampling_defaults(self) -> dict:
        """``sampling`` as SamplingParams fields (``stop`` a tuple), checked like a request's."""
        defaults = dict(self.sampling)
        if "stop" in defaults:
            stop = defaults["stop"]
            defaults["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            SamplingParams(**defaults)
        except InvalidRequest as exc:
            raise ConfigError(
                f"sampling.{exc.param}: {exc.message}", param=f"sampling.{exc.param}"
            ) from None
        return defaults

    @property
    def profile(self) -> Profile | None:
        """What the expert adds to the requests it serves (None: nothing)."""
        if not (self.system_prompt or self.few_shot or self.adapter):
            return None
        return Profile(
            self.name, self.system_prompt, self.few_shot, self.adapter, float(self.adapter_scale)
        )


def _message(item: Any, where: str) -> ChatMessage:
    """A few-shot message: {role: system | user | assistant, content: text}."""
    if isinstance(item, ChatMessage):
        return item
    ok = (
        isinstance(item, dict)
        and set(item) == {"role", "content"}
        and item["role"] in ("system", "user", "assistant")
        and isinstance(item["content"], str)
    )
    _require(ok, where, "{role: system | user | assistant, content: text}", item)
    return ChatMessage(item["role"], item["content"])


_PARAM_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_PARAM_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}


@dataclass(frozen=True)
class BackendParams:
    """An expert's ``params`` for one backend: every key known and typed, ranges checked, or a
    ConfigError naming ``params.KEY``."""

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, params: dict, where: str = "params") -> BackendParams:
        _reject_unknown(params, cls.names(), where)
        for f in dataclasses.fields(cls):
            if f.name not in params:
                continue
            value, kind = params[f.name], str(f.type)
            optional = kind.endswith(" | None")
            allowed = _PARAM_TYPES[kind.removesuffix(" | None")]
            ok = (value is None and optional) or (
                isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            )
            words = _PARAM_WORDS[kind.removesuffix(" | None")] + (" (or null)" if optional else "")
            _require(ok, f"{where}.{f.name}", words, value)
        return _construct(cls, dict(params), where)

    @classmethod
    def of(cls, expert: ExpertConfig):
        """The expert's params (validated when the config was built; this only types them)."""
        return cls.parse(expert.params)


@dataclass(frozen=True)
class LlamaCppParams(BackendParams):
    """``params`` of a GGUF expert (llama.cpp)."""

    DEFAULT_CONTEXT: ClassVar[int] = 4096

    # context cells shared by the sequences of a batch (default: min(4096, trained))
    n_ctx: int | None = None
    n_threads: int | None = None  # default: every core
    n_batch: int = 512  # prompt tokens per forward pass
    use_mmap: bool = True  # weights stay in the page cache (the warm tier shares them)
    repack: bool = False  # llama.cpp's extra buffer types: faster kernels, weights copied at load
    max_sequences: int = 8  # sequences decoded together in one forward pass
    # prefix caching: a new sequence reuses cached cells of its prompt's prefix
    cache_prompt: bool = True
    top_k: int = 40  # llama.cpp server's sampling defaults (OpenAI requests carry
    min_p: float = 0.05  # only temperature and top_p)
    repeat_penalty: float = 1.0
    n_gpu_layers: int = 0
    # hot in a worker process of its own: a native crash ends the worker, not the server
    isolate: bool = False

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_threads"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, "an integer > 0", value)
        for name in ("n_batch", "max_sequences"):
            _positive_int(getattr(self, name), name)
        _require(self.top_k >= 0, "top_k", "an integer >= 0", self.top_k)
        _require(0 <= self.min_p <= 1, "min_p", "a number between 0 and 1", self.min_p)
        _require(self.repeat_penalty > 0, "repeat_penalty", "a number > 0", self.repeat_penalty)
        _require(self.n_gpu_layers >= 0, "n_gpu_layers", "an integer >= 0", self.n_gpu_layers)

    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1


TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TorchParams(BackendParams):
    """``params`` of a safetensors checkpoint expert (torch)."""

    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda or cuda:N
    n_ctx: int = 4096  # tokens per sequence (at most the model's max_position_embeddings)
    max_sequences: int = 8  # sequences decoded together in one forward pass
    top_k: int = 0  # sampling defaults: off unless set
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    # in a worker process of its own: its weights are read there (this process keeps the
    # tokenizer); a native crash ends the worker, not the server
    isolate: bool = False

    def __post_init__(self) -> None:
        _require(
            self.dtype in TORCH_DTYPES, "dtype", "one of " + ", ".join(TORCH_DTYPES), self.dtype
        )
        _require(
            re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            "cpu, cuda or cuda:N",
            self.device,
        )
        for name in ("n_ctx", "max_sequences"):
            _positive_int(getattr(self, name), name)
        _require(self.top_k >= 0, "top_k", "an integer >= 0", self.top_k)
        _require(0 <= self.min_p <= 1, "min_p", "a number between 0 and 1", self.min_p)
        _require(self.repeat_penalty > 0, "repeat_penalty", "a number > 0", self.repeat_penalty)


BACKEND_PARAMS: dict[str, type[BackendParams]] = {
    "llama_cpp": LlamaCppParams,
    "torch_hf": TorchParams,
}


@dataclass(frozen=True)
class RemoteSettings:
    """How to reach a remote expert (``backend: remote``); read from the expert's ``params``."""

    url: str  # the server's /v1 base
    model: str  # the model name the remote server knows
    num_params: float  # active parameters, declared: the map optimiser prices it
    api_key_env: str | None = None  # environment variable holding its API key
    timeout_s: float = 600.0  # whole request (reading the stream)
    connect_timeout_s: float = 5.0
    retries: int = 2  # more attempts before the first token (connect errors, 429, 5xx)
    backoff_s: float = 0.5  # first wait between attempts; doubles
    max_concurrency: int = 16  # requests in flight to it at once


_REMOTE_PARAMS = {
    "model",
    "num_params",
    "api_key_env",
    "timeout_s",
    "connect_timeout_s",
    "retries",
    "backoff_s",
    "max_concurrency",
}


def openai_endpoint(url: str, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The ``/v1`` base of an OpenAI-compatible server given as http://HOST:PORT or .../v1, and
    the headers that carry its API key."""
    url = url.rstrip("/")
    return (url if url.endswith("/v1") else url + "/v1"), (
        {"Authorization": f"Bearer {api_key}"} if api_key else {}
    )


def remote_settings(expert: ExpertConfig) -> RemoteSettings:
    """The remote endpoint of a ``backend: remote`` expert; ConfigError names the bad field."""
    params = expert.params
    _reject_unknown(params, _REMOTE_PARAMS, "params")
    url = expert.source.rstrip("/")
    _require(
        re.fullmatch(r"https?://[^\s/]+(/\S*)?", url) is not None,
        "source",
        "the http(s) URL of an OpenAI-compatible server for backend remote",
        expert.source,
    )
    _require(
        "num_params" in params,
        "params.num_params",
        "the remote expert's active parameters (like 7B) so the map optimiser can price it",
        None,
    )
    model = params.get("model", expert.name)
    _require(isinstance(model, str) and model != "", "params.model", "the remote model name", model)
    key_env = params.get("api_key_env")
    _require(
        key_env is None or (isinstance(key_env, str) and key_env != ""),
        "params.api_key_env",
        "the name of an environment variable",
        key_env,
    )
    for name in ("timeout_s", "connect_timeout_s", "backoff_s"):
        value = params.get(name, 1.0)
        _require(is_number(value) and value > 0, f"params.{name}", "a number of seconds > 0", value)
    retries = params.get("retries", 2)
    _require(
        isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0,
        "params.retries",
        "an integer >= 0",
        retries,
    )
    _positive_int(params.get("max_concurrency", 16), "params.max_concurrency")
    return RemoteSettings(
        url=openai_endpoint(url, None)[0],
        model=model,
        num_params=parse_count(params["num_params"], "params.num_params"),
        **{
            k: params[k]
            for k in (
                "api_key_env",
                "timeout_s",
                "connect_timeout_s",
                "retries",
                "backoff_s",
                "max_concurrency",
            )
            if k in params
        },
    )


@dataclass(frozen=True)
class RouterConfig:
    """How model "coe" picks an expert: category router, then the category-to-expert map."""

    enabled: bool = True  # false: every "coe" request goes to default_expert
    artifact: str | None = None  # trained router folder (default: COE_HOME/router/default)
    # pins the fallback category (else the map chooses it) and serves "coe" when the router is
    # off (else the first expert)
    default_expert: str | None = None
    fallback_category: str = "chat"  # where prompts go when the router is unsure
    threshold: float | None = None  # override the calibrated confidence threshold
    scores: str | None = None  # category x expert score table (JSON); default: measured table
    budget_params: float | None = None  # average active parameters allowed; None = best score
    pins: dict = field(default_factory=dict)  # category -> expert, fixed by hand
    frequencies: dict = field(default_factory=dict)  # category -> weight (default: uniform)
    stay_margin: float = 0.2  # a conversation changes expert only when the router is
    # this much more confident in the new category

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), "enabled", "true or false", self.enabled)
        for name in ("artifact", "scores", "default_expert"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value != ""), name, "a string", value
            )
        _require(
            isinstance(self.fallback_category, str) and self.fallback_category != "",
            "fallback_category",
            "a category name",
            self.fallback_category,
        )
        _require(
            self.threshold is None or (is_number(self.threshold) and 0 <= self.threshold <= 1),
            "threshold",
            "a number between 0 and 1",
            self.threshold,
        )
        if self.budget_params is not None:
            object.__setattr__(
                self, "budget_params", parse_count(self.budget_params, "budget_params")
            )
        _require(
            isinstance(self.pins, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.pins.items()),
            "pins",
            "a mapping of category -> expert name",
            self.pins,
        )
        _require(
            isinstance(self.frequencies, dict)
            and all(
                isinstance(k, str) and is_number(v) and v >= 0 for k, v in self.frequencies.items()
            ),
            "frequencies",
            "a mapping of category -> non-negative weight",
            self.frequencies,
        )
        _require(
            is_number(self.stay_margin) and 0 <= self.stay_margin <= 1,
            "stay_margin",
            "a number between 0 and 1",
            self.stay_margin,
        )


def is_number(value: Any) -> TypeGuard[int | float]:
    """An int or float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MOVE_TIERS = (
    "host",
    "device",
    "none",
)  # where prefetch and lookahead move an expert (none: nowhere)


@dataclass(frozen=True)
class CacheConfig:
    """The three tiers: disk (cold), host RAM (warm), device (hot). Budgets left out are derived
    from the machine's free memory at start-up."""

    device_bytes: int | None = None  # hot experts' runtimes (GPU memory on CUDA)
    host_bytes: int | None = None  # warm experts' weights in RAM (pinned on CUDA)
    policy: CachePolicy = CachePolicy.LRFU  # lrfu or gdsf (cost-aware), or lru
    # lrfu: requests over which a request count halves; auto: chosen online
    frequency_half_life: int | str = "auto"
    prefetch: str = "host"  # where a routed request's expert is moved while it queues
    pins: tuple = ()  # experts loaded hot at start-up and never evicted
    # experts hot at once, whatever their bytes (Ollama's max loaded models)
    max_hot_experts: int = 4
    keep_warm: bool = True  # false: no warm tier, an expert leaving the device goes back to disk
    # an expert unused for this long moves down a tier (device -> host, then host -> disk);
    # None: only when another expert needs the room. A request's keep_alive overrides it.
    idle_unload_s: float | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.keep_warm, bool), "keep_warm", "true or false", self.keep_warm)
        _require(
            self.idle_unload_s is None
            or (is_number(self.idle_unload_s) and self.idle_unload_s >= 0),
            "idle_unload_s",
            "seconds >= 0, or null (never)",
            self.idle_unload_s,
        )
        _positive_int(self.max_hot_experts, "max_hot_experts")
        for name in ("device_bytes", "host_bytes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_bytes(value, name))
        object.__setattr__(self, "policy", _choice(CachePolicy, self.policy, "policy"))
        half_life = self.frequency_half_life
        _require(
            half_life == "auto"
            or (isinstance(half_life, int) and not isinstance(half_life, bool) and half_life > 0),
            "frequency_half_life",
            "auto or an integer > 0 (requests)",
            half_life,
        )
        _require(
            self.prefetch in MOVE_TIERS,
            "prefetch",
            "one of " + ", ".join(MOVE_TIERS),
            self.prefetch,
        )
        pins = self.pins
        _require(
            isinstance(pins, (list, tuple)) and all(isinstance(n, str) for n in pins),
            "pins",
            "a list of expert names",
            pins,
        )
        object.__setattr__(self, "pins", tuple(pins))


@dataclass(frozen=True)
class SchedulerConfig:
    """Which expert's requests run next, and how many wait."""

    policy: SchedulerPolicy = (
        SchedulerPolicy.EXPERT
    )  # expert: stay on resident experts, batch by expert; fifo: arrival order
    max_batch_size: int = 8  # requests for the same expert served together
    max_wait_ms: float = 2000  # a request waiting this long goes next, whatever the switch costs
    max_queue: int = 256  # waiting requests in all; beyond: 429 with Retry-After
    max_queue_per_expert: int = 128  # waiting requests per expert; beyond: 429
    lookahead: str = "host"  # move the next scheduled expert up while the current one generates
    switch_tolerance: float = 0.0  # serve "coe" from a hot expert whose expected score is within
    # this much of the best (cold) one; 0 = off
    join_running: bool = True  # requests for the running expert join its batch at the next token

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", _choice(SchedulerPolicy, self.policy, "policy"))
        for name in ("max_batch_size", "max_queue", "max_queue_per_expert"):
            _positive_int(getattr(self, name), name)
        _require(
            is_number(self.max_wait_ms) and self.max_wait_ms >= 0,
            "max_wait_ms",
            "a number of milliseconds >= 0",
            self.max_wait_ms,
        )
        _require(
            self.lookahead in MOVE_TIERS,
            "lookahead",
            "one of " + ", ".join(MOVE_TIERS),
            self.lookahead,
        )
        _require(
            is_number(self.switch_tolerance) and self.switch_tolerance >= 0,
            "switch_tolerance",
            "a score difference >= 0",
            self.switch_tolerance,
        )
        _require(
            isinstance(self.join_running, bool), "join_running", "true or false", self.join_running
        )


OPTIONAL_PUBLIC_PATHS = ("/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    # queued + generating; beyond: 408 (or an error event mid-stream)
    request_timeout_s: float = 600.0
    shutdown_grace_s: float = 30.0  # on SIGTERM/Ctrl-C, in-flight requests get this long to finish
    api_keys: tuple = field(
        default=(), repr=False
    )  # with keys, /v1 routes need one (also COE_API_KEYS)
    public_paths: tuple = ("/health",)  # of /health and /metrics: which stay open when keys are set
    rate_limit_per_minute: int = 0  # requests per key per minute; beyond: 429 (0 = no limit)
    max_body_bytes: int = 4 * 2**20  # larger request bodies: 413
    max_messages: int = 512  # more messages in one chat request: 400

    def __post_init__(self) -> None:
        for name, allowed in (("api_keys", None), ("public_paths", OPTIONAL_PUBLIC_PATHS)):
            value = getattr(self, name)
            _require(
                isinstance(value, (list, tuple))
                and all(isinstance(v, str) and v.strip() for v in value)
                and (allowed is None or all(v in allowed for v in value)),
                name,
                "a list of non-empty strings"
                if allowed is None
                else "a list of " + ", ".join(allowed),
                "[...]" if name == "api_keys" else value,
            )  # never echo a key
            object.__setattr__(self, name, tuple(value))
        _require(
            isinstance(self.rate_limit_per_minute, int)
            and not isinstance(self.rate_limit_per_minute, bool)
            and self.rate_limit_per_minute >= 0,
            "rate_limit_per_minute",
            "an integer >= 0",
            self.rate_limit_per_minute,
        )
        for name in ("request_timeout_s", "shutdown_grace_s"):
            _require(
                is_number(getattr(self, name)) and getattr(self, name) > 0,
                name,
                "seconds > 0",
                getattr(self, name),
            )
        _require(
            isinstance(self.host, str) and self.host != "",
            "host",
            "a host name or address",
            self.host,
        )
        _require(
            isinstance(self.port, int)
            and not isinstance(self.port, bool)
            and 0 <= self.port < 65536,
            "port",
            "an integer in 0..65535",
            self.port,
        )
        object.__setattr__(
            self, "max_body_bytes", parse_bytes(self.max_body_bytes, "max_body_bytes")
        )
        _require(self.max_body_bytes > 0, "max_body_bytes", "a size > 0", self.max_body_bytes)
        _positive_int(self.max_messages, "max_messages")
        _positive_int(self.max_tokens_limit, "max_tokens_limit")
        _positive_int(self.default_max_tokens, "default_max_tokens")


_AUTOSCALING = {"min_replicas", "max_replicas", "target_ongoing_requests"}


@dataclass(frozen=True)
class RayConfig:
    """`coe serve --ray`: the expert replicas on Ray Serve (each one a coe engine with its own
    tier cache; requests go to a replica that already holds their expert)."""

    replicas: int = 2  # expert replicas (the start, when autoscaling is set)
    cpus_per_replica: float = 1.0  # Ray CPUs each replica reserves
    gpus_per_replica: float = 0.0  # Ray GPUs each replica reserves (experts with device: cuda)
    max_experts_per_replica: int = 4  # experts a replica advertises as loaded (Serve multiplexing)
    max_ongoing_requests: int = 16  # requests one replica takes at once
    autoscaling: dict | None = None  # {min_replicas, max_replicas, target_ongoing_requests}

    def __post_init__(self) -> None:
        for name in ("replicas", "max_experts_per_replica", "max_ongoing_requests"):
            _positive_int(getattr(self, name), name)
        for name in ("cpus_per_replica", "gpus_per_replica"):
            value = getattr(self, name)
            _require(is_number(value) and value >= 0, name, "a number >= 0", value)
        if self.autoscaling is not None:
            _require(
                isinstance(self.autoscaling, dict), "autoscaling", "a mapping", self.autoscaling
            )
            _reject_unknown(self.autoscaling, _AUTOSCALING, "autoscaling")
            for name in ("min_replicas", "max_replicas"):
                if name in self.autoscaling:
                    _positive_int(self.autoscaling[name], f"autoscaling.{name}")
            target = self.autoscaling.get("target_ongoing_requests", 1)
            _require(
                is_number(target) and target > 0,
                "autoscaling.target_ongoing_requests",
                "a number > 0",
                target,
            )


@dataclass(frozen=True)
class CoEConfig:
    experts: tuple[ExpertConfig, ...]
    router: RouterConfig = field(default_factory=RouterConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _require(len(self.experts) > 0, "experts", "at least one expert", self.experts)
        names = [e.name for e in self.experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _require(not duplicates, "experts", "unique names", duplicates)
        object.__setattr__(self, "experts", _with_bases(self.experts))
        default = self.router.default_expert
        _require(
            default is None or default in names,
            "router.default_expert",
            "one of " + ", ".join(names),
            default,
        )
        for category, expert in self.router.pins.items():
            _require(
                expert in names, f"router.pins.{category}", "one of " + ", ".join(names), expert
            )
        for i, expert in enumerate(self.cache.pins):
            _require(expert in names, f"cache.pins[{i}]", "one of " + ", ".join(names), expert)
            _require(
                not self.expert(expert).is_remote,
                f"cache.pins[{i}]",
                "a local expert (a remote expert holds no weights here)",
                expert,
            )

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    def runs_on(self, name: str) -> str:
        """The expert whose weights ``name`` runs on: its base, or itself."""
        for expert in self.experts:
            if expert.name == name:
                return expert.base or name
        return name

    @property
    def default_expert(self) -> str:
        return self.router.default_expert or self.experts[0].name


def _with_bases(experts: tuple[ExpertConfig, ...]) -> tuple[ExpertConfig, ...]:
    """Each profile with its base's source, backend and params: it runs on those weights. A base
    must be a local expert that is not itself a profile; a profile sets none of the three."""
    by_name = {e.name: e for e in experts}
    out = []
    for i, expert in enumerate(experts):
        if expert.base is None:
            out.append(expert)
            continue
        where = f"experts[{i}]"
        base = by_name.get(expert.base)
        if base is None:
            raise ConfigError(
                f"{where}.base: no expert named {expert.base!r} (declare the model as an expert "
                f"first; experts: {', '.join(by_name)})",
                param=f"{where}.base",
            )
        if base.base is not None or base.is_remote or base.name == expert.name:
            raise ConfigError(
                f"{where}.base: {expert.base} is "
                + ("itself a profile of " + base.base if base.base else "not a local model")
                + "; a base is a local expert with weights of its own",
                param=f"{where}.base",
            )
        for key in ("source", "params"):
            if getattr(expert, key) and getattr(expert, key) != getattr(base, key):
                raise ConfigError(
                    f"{where}.{key}: a profile runs on its base's weights ({base.name}); set "
                    f"{key} on the base",
                    param=f"{where}.{key}",
                )
        if expert.backend not in ("auto", base.backend):
            raise ConfigError(
                f"{where}.backend: {expert.backend} differs from its base's ({base.backend})",
                param=f"{where}.backend",
            )
        out.append(
            dataclasses.replace(
                expert, source=base.source, backend=base.backend, params=base.params
            )
        )
    return tuple(out)


DEFAULT_BUDGET_PARAMS = 1.0e9  # average active parameters of the default composition


def default_config() -> CoEConfig:
    """The four packaged experts."""
    return CoEConfig(
        experts=(
            ExpertConfig("smollm2-135m", "smollm2-135m", description="small generalist chat"),
            ExpertConfig("gemma3-270m", "gemma3-270m", description="base model, plain completion"),
            ExpertConfig("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b", description="code"),
            ExpertConfig(
                "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b", description="code and reasoning"
            ),
        ),
        router=RouterConfig(budget_params=DEFAULT_BUDGET_PARAMS),
    )


# ---- YAML edge --------------------------------------------------------------------------------

_SECTIONS = {
    "router": RouterConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "server": ServerConfig,
    "ray": RayConfig,
}


def from_yaml(path: str | Path) -> CoEConfig:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return from_dict(data, base=path.parent)  # experts_dir: relative to the config file
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", param=exc.param) from None


def from_dict(data: Any, base: Path = Path()) -> CoEConfig:
    """``base``: the folder a relative ``experts_dir`` is in (the config file's, or the current
    one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"top level: expected a mapping, got {type(data).__name__}")
    _reject_unknown(data, {"experts", "experts_dir", *_SECTIONS}, "")
    raw_experts = data.get("experts", [] if "experts_dir" in data else None)
    if not isinstance(raw_experts, list):
        raise ConfigError(
            f"experts: expected a list of experts, got {raw_experts!r}", param="experts"
        )
    experts = tuple(
        _build(ExpertConfig, item, f"experts[{i}]") for i, item in enumerate(raw_experts)
    )
    if "experts_dir" in data:
        experts += experts_in_folders(data["experts_dir"], {e.name for e in experts}, base)
    sections = {key: _build(cls, data.get(key) or {}, key) for key, cls in _SECTIONS.items()}
    return _construct(CoEConfig, {"experts": experts, **sections}, "")


def experts_in_folders(value: Any, named: set[str], base: Path) -> tuple[ExpertConfig, ...]:
    """``experts_dir``: one expert per ``.gguf`` file in the folder(s), named by the file's stem
    (llama-server's ``--models-dir``); an expert listed under ``experts`` with that name wins.
    Multimodal projectors (``mmproj*``) are not experts."""
    folders = [value] if isinstance(value, str) else value
    if not isinstance(folders, list) or not folders or not all(isinstance(f, str) for f in folders):
        raise ConfigError(
            f"experts_dir: expected a folder or a list of folders, got {value!r}",
            param="experts_dir",
        )
    found: list[ExpertConfig] = []
    for folder in folders:
        path = base / Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(f"experts_dir: {folder!r} is not a folder", param="experts_dir")
        for file in sorted(path.glob("*.gguf")):
            if file.stem in named or file.name.startswith("mmproj"):
                continue
            named.add(file.stem)
            found.append(ExpertConfig(name=file.stem, source=str(file)))
    return tuple(found)


def _build(cls, item: Any, where: str):
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping, got {item!r}", param=where)
    names = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(item, names, where)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in item]
    if missing:
        raise ConfigError(
            f"{where}.{missing[0]}: required field is missing", param=f"{where}.{missing[0]}"
        )
    return _construct(cls, item, where)


def _construct(cls, kwargs: dict, where: str):
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise (
            exc.within(where) if where else ConfigError(exc.message, param=exc.param or "")
        ) from None


def _reject_unknown(item: dict, known: set, where: str) -> None:
    unknown = sorted(str(k) for k in item if k not in known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field (expected one of {', '.join(sorted(known))})",
            param=prefix + unknown[0],
        )


DEFAULT_YAML = """\
# coe configuration. Every field is optional except experts[].name and experts[].source.
# Sizes take bytes or units: 512MB, 4GiB.

# experts_dir: /models      # also serve every .gguf in a folder, named by its file name
experts:
  # source: a packaged model id (`coe experts` lists them), a .gguf file, or a safetensors folder.
  # backend: auto (from the source), llama_cpp (GGUF) or torch_hf (safetensors checkpoints).
  # params: backend options, checked at start-up (an unknown or ill-typed key is an error);
  #         llama_cpp takes n_ctx, n_threads, n_batch, use_mmap, repack, max_sequences,
  #         cache_prompt (prefix caching, default true), top_k, min_p, repeat_penalty, n_gpu_layers;
  #         torch_hf takes dtype (float32, bfloat16, float16), device (cpu, cuda), n_ctx,
  #         max_sequences, top_k, min_p, repeat_penalty.
  - name: smollm2-135m
    source: smollm2-135m
    description: small generalist chat
  - name: gemma3-270m
    source: gemma3-270m
    description: base model, plain completion
  - name: qwen2.5-coder-0.5b
    source: qwen2.5-coder-0.5b
    description: code
  - name: qwen2.5-coder-1.5b
    source: qwen2.5-coder-1.5b
    description: code and reasoning
  # An expert with a base runs on that expert's weights (one copy, one batch) and adds any of
  # system_prompt, few_shot ([{role, content}]), sampling (temperature, top_p, max_tokens,
  # presence_penalty, frequency_penalty, stop, seed: defaults a request may override) and
  # adapter (a GGUF LoRA for llama_cpp, a PEFT folder for torch_hf) with adapter_scale:
  # - name: sql-helper
  #   base: qwen2.5-coder-0.5b
  #   system_prompt: "You write PostgreSQL queries and explain them briefly."
  #   sampling: {temperature: 0.2}

router:
  # model "coe": a trained router picks a category, the category-to-expert map picks the expert.
  enabled: true
  # default_expert: smollm2-135m # pin the fallback category to one expert (and serve "coe"
                                 # with it when the router is off); default: the map chooses
  fallback_category: chat        # where prompts go when the router's confidence is low
  # artifact: path/to/router     # default: $COE_HOME/router/default (`coe router train`)
  # threshold: 0.45              # default: the threshold calibrated at training time
  # scores: scores.json          # category x expert scores; default: measured by `coe eval`
  budget_params: 1B              # average active parameters allowed (remove for no limit)
  pins: {}                       # e.g. {code: qwen2.5-coder-1.5b}
  frequencies: {}                # category weights for the budget; default: uniform
  stay_margin: 0.2               # conversations change expert only when clearly better elsewhere

cache:
  # Three tiers: disk (cold) -> host RAM (warm) -> device (hot, ready to generate).
  # Budgets default to shares of the memory free at start-up; set them to cap coe's memory.
  # device_bytes: 2GiB   # hot experts' runtimes (GPU memory on CUDA; contexts and buffers on CPU)
  # host_bytes: 8GiB     # warm experts' weights in RAM (page cache for GGUF, pinned buffers on CUDA)
  policy: lrfu         # lrfu / gdsf: weigh reload cost, size and popularity; lru: least recently used
  frequency_half_life: auto  # lrfu: requests over which a request count halves (auto: 50, 200 or 1000,
                             # whichever has been predicting the requests best)
  prefetch: host       # move a routed request's expert up while it queues: host, device or none
  pins: []             # experts made hot at start-up and never evicted
  max_hot_experts: 4   # experts hot at once, whatever their bytes
  keep_warm: true      # false: no warm tier (an expert leaving the device goes back to disk)

scheduler:
  policy: expert            # expert: keep serving resident experts, batch by expert; fifo: arrival order
  max_batch_size: 8         # requests for the same expert served together (one forward pass)
  max_wait_ms: 2000         # a request that waited this long goes next, whatever the switch costs
  max_queue: 256            # waiting requests in all; beyond this: 429 with Retry-After
  max_queue_per_expert: 128 # waiting requests per expert; beyond this: 429
  lookahead: host           # move the next scheduled expert up while this one generates: host, device (GPUs), none
  switch_tolerance: 0       # "coe": serve from a hot expert scoring within this of the best cold one (0 = off)
  join_running: true        # requests for the running expert join its batch at the next token (not under fifo)

server:
  host: 127.0.0.1
  port: 8000
  max_tokens_limit: 4096    # largest max_tokens a request may ask for
  default_max_tokens: 256   # used when a request does not say
  request_timeout_s: 600    # a request queued and generating longer than this ends with 408
  shutdown_grace_s: 30      # on shutdown, in-flight streams get this long to finish
  api_keys: []              # with keys, /v1 routes need "Authorization: Bearer KEY" (also env COE_API_KEYS)
  public_paths: [/health]   # which of /health and /metrics stay open when keys are set
  rate_limit_per_minute: 0  # requests per key per minute; beyond: 429 with Retry-After (0 = no limit)
  max_body_bytes: 4MiB      # larger request bodies get 413
  max_messages: 512         # more messages in one chat request get 400
ray:                        # `coe serve --ray` only
  replicas: 2               # expert replicas, each a coe engine with its own tier cache
  cpus_per_replica: 1       # Ray CPUs each replica reserves
  gpus_per_replica: 0       # Ray GPUs each replica reserves (for experts with params.device: cuda)
  max_experts_per_replica: 4  # experts a replica advertises as loaded; requests prefer such a replica
  max_ongoing_requests: 16  # requests one replica takes at once
  autoscaling: null         # e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 4}
"""
