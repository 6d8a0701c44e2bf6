"""The token loop's state: one expert's sequences decoding together, and what happens to each token.

``RunningBatch`` wraps a runner's decoder. ``admit`` turns requests into sequences (render the
prompt, tokenise, check the context); ``step`` adds the waiting ones that fit, runs one decoder
step (one forward pass) and postprocesses every token (detokenise, stop strings, max_tokens,
cancellation, usage) into StreamEvents. The engine drives it one step at a time and lets waiting
requests of the running expert join between steps; ``generate`` drives it to the end for one
runner (benchmarks, the evaluation, tests).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq

from coe.backends.base import Adapter, Runner, Vocab
from coe.backends.chat import PLAIN_STOP, render_chat, supports_tools
from coe.backends.sampling import Token
from coe.backends.text import TextAssembler
from coe.engine.tools import ToolCallStream, with_tool_prompt
from coe.errors import (
    CoEError,
    ContextLengthExceeded,
    GenerationError,
    InvalidRequest,
    LoadError,
)
from coe.types import Completion, Request, SamplingParams, StreamEvent, TokenLogprob, ToolCall

AdapterSource = Callable[[str], Adapter]  # a profile's name -> its adapter (ModelCache.adapter)


def prompt_of(vocab: Vocab, request: Request) -> tuple[str, tuple[str, ...]]:
    """The prompt string and the stop strings it implies (a plain transcript stops at the next turn).
    The request's profile (system prompt, few-shot examples) goes first, so it stays a cached
    prefix. Tools go to a chat template that renders them; other experts get coe's documented tool
    format in the system message (``coe.engine.tools``)."""
    profile = request.profile
    if request.prompt is not None:
        return (request.prompt if profile is None else profile.prompt(request.prompt)), ()
    messages, tools = request.messages or (), request.tools
    if profile is not None:
        messages = profile.messages(messages)
    offered = tools is not None and tools.choice != "none"
    native = supports_tools(vocab.chat_template)
    if native:
        functions = list(tools.functions) if offered and tools is not None else None
    else:
        functions = None
        if offered or any(m.tool_calls or m.role == "tool" for m in messages):
            messages = with_tool_prompt(messages, tools if offered else None)
    text = render_chat(
        vocab.chat_template,
        messages,
        bos_text=vocab.bos_text,
        eos_text=vocab.eos_text,
        tools=functions,
    )
    return text, (() if vocab.chat_template else PLAIN_STOP)


def check_context(
    expert: str, context_length: int, num_prompt_tokens: int, max_tokens: int
) -> None:
    if num_prompt_tokens + max_tokens > context_length:
        raise ContextLengthExceeded(
            f"{expert} has a context of {context_length} tokens; the prompt has {num_prompt_tokens} "
            f"and max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )


def check_bias(expert: str, n_vocab: int, sampling: SamplingParams) -> None:
    """logit_bias names token ids of this expert's vocabulary."""
    outside = [t for t, _ in sampling.logit_bias if n_vocab and t >= n_vocab]
    if outside:
        raise InvalidRequest(
            f"logit_bias: token {outside[0]} is not in {expert}'s vocabulary of {n_vocab} tokens",
            param="logit_bias",
        )


class Sequence:
    """One request's postprocessing: text assembly, stop strings, max_tokens, cancellation, usage,
    log-probabilities, and tool calls read out of the text."""

    def __init__(
        self,
        request: Request,
        prompt_ids: list[int],
        implied_stop: tuple[str, ...],
        adapter: Adapter | None = None,
    ):
        self.request, self.prompt_ids, self.adapter = request, prompt_ids, adapter
        self.text = TextAssembler(request.sampling.stop + implied_stop)
        tools = request.tools
        self.tool_stream = (
            ToolCallStream(tools) if tools is not None and tools.choice != "none" else None
        )
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.cached_tokens = 0  # prompt tokens the decoder did not evaluate again (prefix caching)
        # the first token's log-probabilities of sampling.score_ids
        self.scored: tuple[float, ...] = ()
        self.logprobs: list[TokenLogprob] = []  # every generated token's, when asked for
        self._unsent_logprobs = 0  # of those, the ones no event carried yet
        self._shown: list[str] = []  # text sent as content

    @property
    def need_tokens(self) -> int:
        """Token cells the sequence may hold: its prompt plus max_tokens."""
        return len(self.prompt_ids) + self.request.sampling.max_tokens

    def feed(self, token: Token, vocab: Vocab) -> StreamEvent | None:
        """Take one generated token; a delta event if it produced text. Sets ``finish_reason`` when done."""
        if self.num_generated == 0:
            self.cached_tokens, self.scored = token.cached_prompt_tokens, token.scored
        if self.request.cancelled:
            self.finish_reason = "cancelled"
            return None
        if vocab.is_end(token.id):
            self.finish_reason = "stop"
            return None
        self.num_generated += 1
        if token.logprob is not None:
            self.logprobs.append(
                TokenLogprob(
                    vocab.token_bytes(token.id),
                    token.logprob,
                    tuple((vocab.token_bytes(i), lp) for i, lp in token.top),
                )
            )
            self._unsent_logprobs += 1
        delta = self.text.feed(vocab.token_bytes(token.id))
        if self.text.stopped:
            self.finish_reason = "stop"
        elif self.num_generated >= self.request.sampling.max_tokens:
            self.finish_reason = "length"
        return self._delta(delta)

    def _delta(self, text: str) -> StreamEvent | None:
        if self.tool_stream is not None:
            text = self.tool_stream.feed(text)
        if not text:
            return None
        self._shown.append(text)
        return StreamEvent(self.request.id, delta=text, logprobs=self._take_logprobs())

    def _take_logprobs(self) -> tuple[TokenLogprob, ...]:
        if not self._unsent_logprobs:
            return ()
        taken = tuple(self.logprobs[-self._unsent_logprobs :])
        self._unsent_logprobs = 0
        return taken

    def finish(self) -> list[StreamEvent]:
        events = [e for e in (self._delta(self.text.flush()),) if e is not None]
        calls: tuple[ToolCall, ...] = ()
        if self.tool_stream is not None:
            rest, calls = self.tool_stream.finish()
            if rest:
                self._shown.append(rest)
                events.append(
                    StreamEvent(self.request.id, delta=rest, logprobs=self._take_logprobs())
                )
        finish_reason = self.finish_reason or "length"
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        completion = Completion(
            text="".join(self._shown),
            finish_reason=finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.num_generated,
            cached_tokens=self.cached_tokens,
            tool_calls=calls,
            logprobs=tuple(self.logprobs),
        )
        events.append(
            StreamEvent(self.request.id, completion=completion, logprobs=self._take_logprobs())
        )
        return events


class RunningBatch:
    """Contract: engine thread only. Every admitted request gets exactly one final event (its
    completion or an error), from ``admit``, ``step`` or ``fail``; ``close`` closes the decoder."""

    def __init__(self, runner: Runner, adapter_of: AdapterSource | None = None):
        self.runner, self.vocab = runner, runner.vocab
        self.adapter_of = adapter_of
        self.expert = runner.expert.name
        self.decoder = runner.open_decoder()
        self.running: dict[int, Sequence] = {}
        self.waiting: deque[Sequence] = deque()  # admitted, not yet in the decoder (no room yet)
        self._numbers = itertools.count()

    @property
    def done(self) -> bool:
        return not self.running and not self.waiting

    @property
    def free_slots(self) -> int:
        """Requests the batch can take now without anyone waiting."""
        return max(0, self.decoder.max_sequences - len(self.running) - len(self.waiting))

    @property
    def width(self) -> int:
        """Sequences the next step decodes together: the running and the waiting that fit."""
        return min(len(self.running) + len(self.waiting), self.decoder.max_sequences)

    def requests(self) -> list[Request]:
        return [s.request for s in (*self.running.values(), *self.waiting)]

    def admit(self, requests: Iterable[Request]) -> list[StreamEvent]:
        """Queue the requests for the decoder; the ones that cannot run end here with their error
        (template refused the messages, prompt too long)."""
        errors = []
        for request in requests:
            try:
                prompt, implied_stop = prompt_of(self.vocab, request)
                prompt_ids = self.vocab.encode(prompt)
                check_context(
                    request.expert,
                    self.runner.context_length,
                    len(prompt_ids),
                    request.sampling.max_tokens,
                )
                check_bias(request.expert, self.vocab.n_vocab, request.sampling)
                adapter = self._adapter(request)
            except CoEError as exc:
                errors.append(StreamEvent(request.id, error=exc))
                continue
            self.waiting.append(Sequence(request, prompt_ids, implied_stop, adapter))
        return errors

    def _adapter(self, request: Request) -> Adapter | None:
        """The request's LoRA adapter, read onto the base's weights on first use."""
        profile = request.profile
        if profile is None or profile.adapter is None:
            return None
        if self.adapter_of is None:
            raise GenerationError(f"{request.expert}: no adapter source for {profile.adapter}")
        try:
            return self.adapter_of(profile.name)
        except CoEError:
            raise
        except Exception as exc:  # an unreadable file: this request fails, the batch goes on
            raise LoadError(
                f"{request.expert}: cannot read the adapter {profile.adapter}: {exc}"
            ) from None

    def step(self) -> list[StreamEvent]:
        """One forward pass for every running sequence (and the waiting ones that fit), postprocessed."""
        events = self._start_waiting()
        if not self.running:
            return events
        tokens = self.decoder.step()
        for number, error in self.decoder.take_refused().items():
            refused = self.running.pop(number, None)  # None: it was removed meanwhile
            if refused is not None:
                events.append(StreamEvent(refused.request.id, error=error))
        for number, token in tokens.items():
            seq = self.running[number]
            event = seq.feed(token, self.vocab)
            if event is not None:
                events.append(event)
            if seq.finish_reason is not None:
                self.decoder.remove(number)
                del self.running[number]
                events.extend(seq.finish())
        return events

    def _start_waiting(self) -> list[StreamEvent]:
        """Move waiting sequences into the decoder in arrival order while they fit (an empty
        decoder always takes the first: admit checked it fits the context). One whose sampler
        cannot be built (its grammar does not compile for this vocabulary) ends with that error."""
        errors = []
        while self.waiting and (
            not self.running or self.decoder.has_room(self.waiting[0].need_tokens)
        ):
            seq = self.waiting.popleft()
            number = next(self._numbers)
            try:
                self.decoder.add(number, seq.prompt_ids, seq.request.sampling, seq.adapter)
            except CoEError as exc:
                errors.append(StreamEvent(seq.request.id, error=exc))
                continue
            self.running[number] = seq
        return errors

    def fail(self, error: Exception) -> list[StreamEvent]:
        """End every unfinished request with ``error`` (the decoder failed)."""
        failed = [
            StreamEvent(s.request.id, error=error) for s in (*self.running.values(), *self.waiting)
        ]
        self.running.clear()
        self.waiting.clear()
        return failed

    def close(self) -> None:
        self.decoder.close()


def generate(
    runner: Runner, requests: Seq[Request], adapter_of: AdapterSource | None = None
) -> Iterator[StreamEvent]:
    """Every request's events, decoded together on ``runner`` until all have ended (one final
    event each). A decoder that fails to open or step ends the unfinished ones with its error."""
    try:
        batch = RunningBatch(runner, adapter_of)
    except Exception as exc:
        error = (
            exc
            if isinstance(exc, CoEError)
            else GenerationError(f"{runner.expert.name}: generation failed: {exc}")
        )
        yield from (StreamEvent(r.id, error=error) for r in requests)
        return
    try:
        yield from batch.admit(requests)
        while not batch.done:
            try:
                events = batch.step()
            except CoEError as exc:
                events = batch.fail(exc)
            except Exception as exc:  # a backend failure ends these requests, not the caller
                events = batch.fail(GenerationError(f"{batch.expert}: generation failed: {exc}"))
            yield from events
    finally:
        batch.close()


def next_token_logprobs(
    runner: Runner, prompt_ids: list[int], token_ids: Seq[int], adapter: Adapter | None = None
) -> list[float]:
    """Log-probabilities of ``token_ids`` as the token after ``prompt_ids`` (one prefill through the
    decoder): the evaluation scores multiple choice with it. Engine thread only."""
    check_context(runner.expert.name, runner.context_length, len(prompt_ids), 1)
    decoder = runner.open_decoder()
    try:
        decoder.add(
            0,
            prompt_ids,
            SamplingParams(max_tokens=1, temperature=0.0, score_ids=tuple(token_ids)),
            adapter,
        )
        return list(decoder.step()[0].scored)
    finally:
        decoder.close()
