"""Run experts over evaluation suites, one expert at a time, caching every item's result.

A *target* produces the outputs: ``EngineTarget`` runs experts in this process through coe's own
engine (batched generation, log-probabilities for multiple choice); ``ServerTarget`` sends the
same chats to any running OpenAI-compatible server (``--url``; multiple choice then reads the
generated letter). Results are cached on disk in JSONL, keyed by the expert's identity (name,
source, weight bytes), the item's content and the scoring mode, so a rerun, a larger ``--limit``
or a new expert costs only what is new.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from coe.config import openai_endpoint
from coe.engine.batch import next_token_logprobs, prompt_of
from coe.errors import CoEError
from coe.eval.scoring import Verdict, choice_by_logprobs, score_text
from coe.eval.suites import LETTERS, EvalItem, item_key
from coe.types import ChatMessage, Completion, Request, SamplingParams, StreamEvent

Progress = Callable[[str, int, int], None]
MAX_RESPONSE_CHARS = 4000
# Items sent to an expert at once, their results cached before the next ones start: a stopped run
# keeps what it finished, and a chunk still fills the engine's batches.
CHUNK_ITEMS = 32
T = TypeVar("T")


@dataclass(frozen=True)
class ItemResult:
    expert: str
    suite: str
    category: str
    item: str
    score: float
    detail: str
    mode: str  # logprob | generate | judge
    seconds: float
    response: str = ""

    @classmethod
    def from_dict(cls, row: dict) -> ItemResult:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


class ResultCache:
    """One JSONL file of item results per expert identity; appended as results arrive."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._rows: dict[str, dict[str, ItemResult]] = {}
        self._lock = threading.Lock()

    def _path(self, identity: str) -> Path:
        return (
            self.folder / f"{hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()}.jsonl"
        )

    def _load(self, identity: str) -> dict[str, ItemResult]:
        if identity not in self._rows:
            rows: dict[str, ItemResult] = {}
            path = self._path(identity)
            if path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                        rows[row["key"]] = ItemResult.from_dict(row)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line from an interrupted run: recomputed
            self._rows[identity] = rows
        return self._rows[identity]

    def get(self, identity: str, key: str) -> ItemResult | None:
        with self._lock:
            return self._load(identity).get(key)

    def put(self, identity: str, key: str, result: ItemResult) -> None:
        with self._lock:
            self._load(identity)[key] = result
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self._path(identity), "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, **asdict(result)}) + "\n")


def result_key(item: EvalItem, mode: str) -> str:
    return f"{item_key(item)}:{mode}"


# -- targets ----------------------------------------------------------------------------------------
class EngineTarget:
    """Experts in this process, through the engine (no loop thread: the caller drives it)."""

    name = "engine"

    def __init__(self, engine):
        self.engine = engine
        self._states = {s.name: s for s in engine.views.expert_states()}

    def identity(self, expert: str) -> str:
        """What the cached results depend on: the weights and, for a profile, what it adds."""
        state = self._states[expert]
        config = self.engine.config.expert(expert)
        identity = f"{expert}|{config.source}|{state.num_bytes}"
        if config.base is not None or config.profile is not None:
            adds = repr((config.profile, sorted(config.sampling.items())))
            identity += "|" + hashlib.sha256(adds.encode()).hexdigest()[:16]
        return identity

    def num_params(self, expert: str) -> int | None:
        return self._states[expert].num_params

    def has_logprobs(self, expert: str) -> bool:
        """Local experts score multiple choice by letter log-probabilities; remote ones answer."""
        return expert not in self.engine.remotes

    def letter_logprobs(
        self, expert: str, items: Sequence[EvalItem], progress: Callable[[], None]
    ) -> list[list[float]] | None:
        """Log-probabilities of the option letters as the answer's first token, per item."""
        out = []
        profile = self.engine.routing.profile(expert)
        with self.engine.cache.lease(expert) as runner:
            adapter = self.engine.cache.adapter(expert) if profile and profile.adapter else None
            letter_ids = [runner.vocab.encode(letter)[-1] for letter in LETTERS]
            for item in items:
                request = Request(expert=expert, messages=item.messages)
                self.engine.routing.place(request)  # its profile, as a served request gets it
                prompt, _ = prompt_of(runner.vocab, request)
                ids = letter_ids[: item.num_options]
                out.append(next_token_logprobs(runner, runner.vocab.encode(prompt), ids, adapter))
                progress()
        return out

    def generate(
        self, expert: str, items: Sequence[EvalItem], progress: Callable[[], None]
    ) -> list[str | CoEError]:
        """Greedy answers (or the error that ended one), one scheduler batch at a time, so no
        request waits in a queue long enough to time out."""
        texts: dict[int, str | CoEError] = {}
        chunk_size, indexed = self.engine.config.scheduler.max_batch_size, list(enumerate(items))
        for start in range(0, len(items), chunk_size):
            chunk = indexed[start : start + chunk_size]
            done: dict[int, StreamEvent] = {}
            ended = threading.Semaphore(0)
            for index, item in chunk:
                request = Request(
                    expert=expert,
                    messages=item.messages,
                    sampling=SamplingParams(max_tokens=item.max_tokens, temperature=0.0),
                )
                request.sink = _collector(done, index, progress, ended)
                self.engine.submit(request)
            while self.engine.step():
                pass
            for _ in chunk:  # a remote expert's answers arrive on its own workers
                ended.acquire()
            for index, _ in chunk:
                texts[index] = _text_of(done.get(index))
        return [texts[i] for i in range(len(items))]


def _collector(
    done: dict[int, StreamEvent],
    index: int,
    progress: Callable[[], None],
    ended: threading.Semaphore,
):
    def sink(event: StreamEvent) -> None:
        if event.is_final:
            done[index] = event
            progress()
            ended.release()

    return sink


def _text_of(event: StreamEvent | None) -> str | CoEError:
    if event is None:
        return CoEError("the engine ended without answering")
    if event.error is not None:
        return event.error if isinstance(event.error, CoEError) else CoEError(str(event.error))
    assert isinstance(event.completion, Completion)
    return event.completion.text


TOP_LOGPROBS = 20  # the most a server returns (OpenAI's limit)
UNLIKELY_LOGPROB = -100.0  # a letter the server did not list among its top tokens


def _first_token_logprobs(expert: str, messages: Sequence[ChatMessage]) -> dict:
    """A chat request for one greedy token with the most top log-probabilities a server gives."""
    return {
        "model": expert,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
    }


class ServerTarget:
    """Experts behind a running OpenAI-compatible server (coe, vLLM, Ollama...)."""

    name = "server"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        params: Mapping[str, float | None] | None = None,
    ):
        self.url = url.rstrip("/")
        self.base, self.headers = openai_endpoint(url, api_key)
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self._params = params or {}
        # expert -> whether the server returns top log-probabilities
        self._logprobs: dict[str, bool] = {}

    def identity(self, expert: str) -> str:
        return f"{expert}|{self.url}"

    def num_params(self, expert: str) -> float | None:
        return self._params.get(expert)

    def has_logprobs(self, expert: str) -> bool:
        """Whether the server returns top log-probabilities for the expert (coe does; asked once):
        then multiple choice is scored by the letters' log-probabilities, else by the generated letter."""
        if expert not in self._logprobs:
            import httpx

            probe = (ChatMessage("user", "Answer A or B."),)
            try:
                response = httpx.post(
                    self.base + "/chat/completions",
                    json=_first_token_logprobs(expert, probe),
                    headers=self.headers,
                    timeout=self.timeout_s,
                )
                content = (response.json()["choices"][0].get("logprobs") or {}).get("content") or []
                self._logprobs[expert] = response.status_code == 200 and bool(
                    content and content[0]["top_logprobs"]
                )
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                self._logprobs[expert] = False
        return self._logprobs[expert]

    def letter_logprobs(
        self, expert: str, items: Sequence[EvalItem], progress: Callable[[], None]
    ) -> list[list[float]] | None:
        """The option letters' log-probabilities as the answer's first token, read from the server's
        top log-probabilities (a letter outside the top ones counts as very unlikely)."""
        import httpx

        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:

            def one(item: EvalItem) -> list[float]:
                response = client.post(
                    self.base + "/chat/completions",
                    json=_first_token_logprobs(expert, item.messages),
                )
                progress()
                if response.status_code != 200:
                    raise CoEError(
                        f"{self.base}: {expert} answered {response.status_code}: {response.text[:300]}"
                    )
                tops = response.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                best: dict[str, float] = {}
                for entry in tops:
                    letter = entry["token"].strip()
                    best[letter] = max(best.get(letter, UNLIKELY_LOGPROB), entry["logprob"])
                return [best.get(LETTERS[i], UNLIKELY_LOGPROB) for i in range(item.num_options)]

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, items))

    def generate(
        self, expert: str, items: Sequence[EvalItem], progress: Callable[[], None]
    ) -> list[str | CoEError]:
        import httpx

        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:

            def one(item: EvalItem) -> str | CoEError:
                body = {
                    "model": expert,
                    "temperature": 0.0,
                    "max_tokens": item.max_tokens,
                    "messages": [{"role": m.role, "content": m.content} for m in item.messages],
                }
                response = client.post(self.base + "/chat/completions", json=body)
                progress()
                if response.status_code >= 500 or response.status_code in (401, 403, 404, 429):
                    raise CoEError(
                        f"{self.base}: {expert} answered {response.status_code}: {response.text[:300]}"
                    )
                if response.status_code != 200:  # this item is beyond the expert (e.g. its context)
                    return CoEError(f"HTTP {response.status_code}: {response.text[:200]}")
                return response.json()["choices"][0]["message"]["content"] or ""

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, items))


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class RunLog:
    results: list[ItemResult]
    skipped: dict[str, str]  # suite -> why
    cached: int = 0
    computed: int = 0
    missing: int = 0  # not cached, and not computed (``cached_only``)
    seconds: float = 0.0


def run(
    target,
    experts: Sequence[str],
    items: Sequence[EvalItem],
    cache: ResultCache,
    judge: Callable[[EvalItem, str], Verdict] | None = None,
    choice_mode: str = "logprob",
    progress: Progress | None = None,
    cached_only: bool = False,
) -> RunLog:
    """Every expert on every item (judged items only with a judge); one expert at a time. With
    ``cached_only``, only what the cache holds (the rest counted as missing)."""
    started = time.perf_counter()
    skipped = {
        i.suite: "needs a judge (--judge URL); skipped"
        for i in items
        if i.kind == "judge" and judge is None
    }
    items = [i for i in items if i.suite not in skipped]
    log = RunLog([], skipped)
    for expert in experts:
        identity = target.identity(expert)
        todo: list[tuple[EvalItem, str]] = []
        for item in items:
            mode = _mode(item, choice_mode, target, expert)
            hit = cache.get(identity, result_key(item, mode))
            if hit is not None:
                log.results.append(hit)
                log.cached += 1
            else:
                todo.append((item, mode))
        if cached_only:
            log.missing += len(todo)
            continue
        log.results += _compute(target, expert, identity, todo, cache, judge, progress)
        log.computed += len(todo)
    log.seconds = time.perf_counter() - started
    return log


def _mode(item: EvalItem, choice_mode: str, target, expert: str) -> str:
    if item.kind == "choice" and choice_mode == "logprob" and target.has_logprobs(expert):
        return "logprob"
    return "judge" if item.kind == "judge" else "generate"


def _compute(
    target,
    expert: str,
    identity: str,
    todo: list[tuple[EvalItem, str]],
    cache: ResultCache,
    judge,
    progress: Progress | None,
) -> list[ItemResult]:
    if not todo:
        return []
    count = [0]

    def tick() -> None:
        count[0] += 1
        if progress:
            progress(expert, count[0], len(todo))

    results = []
    by_logprob = [item for item, mode in todo if mode == "logprob"]
    for chunk in _chunks(by_logprob):
        started = time.perf_counter()
        rows = target.letter_logprobs(expert, chunk, tick)
        per_item_s = (time.perf_counter() - started) / len(chunk)
        for item, row in zip(chunk, rows):
            results.append(
                _record(
                    cache,
                    identity,
                    expert,
                    item,
                    "logprob",
                    choice_by_logprobs(item, row),
                    per_item_s,
                    "",
                )
            )
    generated = [(item, mode) for item, mode in todo if mode != "logprob"]
    for part in _chunks(generated):
        started = time.perf_counter()
        texts = target.generate(expert, [item for item, _ in part], tick)
        per_item_s = (time.perf_counter() - started) / len(part)
        for (item, mode), text in zip(part, texts):
            verdict = (
                Verdict(0.0, f"no answer: {text.message}")
                if isinstance(text, CoEError)
                else score_text(item, text, judge)
            )
            results.append(
                _record(
                    cache,
                    identity,
                    expert,
                    item,
                    mode,
                    verdict,
                    per_item_s,
                    "" if isinstance(text, CoEError) else text,
                )
            )
    return results


def _chunks(items: list[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), CHUNK_ITEMS):
        yield items[start : start + CHUNK_ITEMS]


def _record(
    cache: ResultCache,
    identity: str,
    expert: str,
    item: EvalItem,
    mode: str,
    verdict: Verdict,
    seconds: float,
    response: str,
) -> ItemResult:
    result = ItemResult(
        expert,
        item.suite,
        item.category,
        item.id,
        verdict.score,
        verdict.detail,
        mode,
        round(seconds, 4),
        response[:MAX_RESPONSE_CHARS],
    )
    cache.put(identity, result_key(item, mode), result)
    return result
