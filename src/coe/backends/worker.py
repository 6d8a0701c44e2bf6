"""Experts in worker processes (``params.isolate: true``): a native crash (a segfault, a
``GGML_ASSERT`` abort, the kernel's OOM killer) ends one worker, never the server.

```
parent (server, engine, cache)                 worker: python -m coe.backends.worker FD
  IsolatedBackend.read        Load              the backend reads the weights (llama.cpp: the
                                                model over the mmap'd GGUF, pages shared;
                                                torch: the checkpoint into its buffer)
                              meanwhile the parent keeps what the vocabulary needs
                              (Backend.read_for_worker)
  IsolatedBackend.materialize Materialize       runner (context, KV cache; module) -> Ready
  WorkerDecoder.add           Add (+ removed)   decoder.add: sampler and grammar built here
                                                (the first one opens the worker's decoder)
  WorkerDecoder.step          Step (+ removed)  decoder.step -> Tokens {seq: Token}
  WorkerRunner.close          Park              the runtime freed, the weights kept (warm)
  host weights released       the pipe closes   the worker exits
```
A step carries token ids and ``Token`` results, never logit vectors. A worker that dies (its pipe
closes) raises ``ExpertCrashed`` in the parent; the runner reports itself dead (``alive``) and the
cache moves it out of the device tier, so the next lease starts a new worker. The worker's private
memory counts in the tiers (while warm in the host tier, what the runtime adds in the device
tier); a worker that grows past ``GROWTH_LIMIT`` of it is stopped before the kernel picks a
victim. A worker exits when its pipe closes or its parent process changes: no orphans, whatever
ends the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from coe import errors
from coe.backends.base import Adapter, Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.memory import HostBufferPool, process_status_bytes
from coe.backends.sampling import SamplerDefaults, Token
from coe.config import ExpertConfig
from coe.errors import CoEError, ExpertCrashed, GenerationError, LoadError
from coe.types import Profile, SamplingParams

GROWTH_LIMIT = 1.5  # a worker may grow to this multiple of its measured footprint ...
GROWTH_SLACK_BYTES = 256 * 2**20  # ... plus this, before it is stopped
MEMORY_CHECK_S = 0.5  # how often a decoding worker's memory is read
STOP_WAIT_S = 2.0  # a worker asked to exit gets this long before SIGKILL
PARENT_CHECK_S = 0.5  # how often a worker checks that its parent is alive
# While a reply is awaited, the waiting thread wakes this often. On a 2-vCPU VM (AMD EPYC),
# blocking outright let half the requests that followed another process's decode run 3-4x
# slower (the worker's two compute threads spun at their barriers with a CPU idle: a vCPU slow
# to wake); waking every millisecond kept them at speed (docs/benchmarks.md).
RECEIVE_POLL_S = 0.001
# a sequence's first tokens are not computed ahead (time to first token; >= 1)
SYNC_FIRST_TOKENS = 3


# -- messages (pickled over the pipe) ------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """Read the expert's weights (llama.cpp: load the model over the mmap'd file): warm."""

    expert: ExpertConfig
    path: Path
    backend: str


@dataclass(frozen=True)
class Materialize:
    """Make the loaded expert ready to generate (llama.cpp: a context): hot."""


@dataclass(frozen=True)
class Park:
    """Free the runtime, keep the weights: back to warm."""


@dataclass(frozen=True)
class Ready:
    context_length: int
    max_sequences: int
    sampler_defaults: SamplerDefaults
    shares_context: bool
    footprint_bytes: int  # what the runtime holds beyond the weights, as its backend measured it


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter named across the boundary: the worker reads it onto its own weights."""

    name: str
    path: str
    scale: float


@dataclass(frozen=True)
class Add:
    seq: int
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterRef | None
    removed: tuple[int, ...]  # sequences removed since the last message (before this one)


@dataclass(frozen=True)
class Step:
    removed: tuple[int, ...]


@dataclass(frozen=True)
class CloseDecoder:
    pass


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Tokens:
    tokens: dict[int, Token]


@dataclass(frozen=True)
class Failed:
    """A CoEError raised in the worker, by class name (rebuilt in the parent)."""

    kind: str
    message: str
    param: str | None = None

    def error(self) -> CoEError:
        kind = getattr(errors, self.kind, None)
        if isinstance(kind, type) and issubclass(kind, CoEError):
            try:
                return kind(self.message, param=self.param)
            except TypeError:  # a subclass with its own constructor
                pass
        return GenerationError(self.message, param=self.param)


# -- the parent's side ---------------------------------------------------------------------------
class WorkerProcess:
    """One worker process and its pipe. ``call`` sends a message and waits for the reply; a dead
    worker raises ExpertCrashed naming how it ended."""

    def __init__(self, name: str = "worker"):
        self.name = name
        parent_end, child_end = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coe.backends.worker", str(child_end.fileno())],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child_end.close()
        self.conn = Connection(parent_end.detach())

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, message: Any) -> Any:
        """Send ``message`` and wait for its reply."""
        self.send(message)
        return self.receive()

    def send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except OSError:
            raise self.crashed() from None

    def receive(self) -> Any:
        """The reply to the oldest message sent; a Failed reply is raised as its error."""
        try:
            while not self.conn.poll(RECEIVE_POLL_S):
                pass
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise self.crashed() from None
        if isinstance(reply, Failed):
            raise reply.error()
        return reply

    def crashed(self, why: str | None = None) -> ExpertCrashed:
        """The error for a worker that died (or, with ``why``, was stopped)."""
        if why is None:
            try:
                code = self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:  # the pipe broke, the process lingers: end it
                self.kill()
                code = self.process.returncode
            why = f"its worker process (pid {self.pid}) {_how_it_ended(code)}"
        return ExpertCrashed(f"{self.name}: {why}")

    def private_bytes(self) -> int:
        """The worker's own memory: anonymous resident pages (shared file pages excluded)."""
        return process_status_bytes(self.pid, "RssAnon")

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """Close the pipe (the worker exits when it closes), then make sure it did."""
        if self.alive:
            try:
                self.conn.close()  # the worker exits when its pipe closes
            except OSError:
                pass
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self.process.wait()
        if not self.conn.closed:
            self.conn.close()


class Spares:
    """Workers started ahead of need (interpreter and native library loaded), so making an
    expert hot does not wait for a process to start."""

    def __init__(self, count: int = 1):
        self.count = count
        self._ready: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._closed = False

    def fill(self) -> None:
        with self._lock:
            self._ready = [w for w in self._ready if w.alive]
            while not self._closed and len(self._ready) < self.count:
                self._ready.append(WorkerProcess())

    def take(self, name: str) -> WorkerProcess:
        with self._lock:
            ready = [w for w in self._ready if w.alive]
            worker = ready.pop(0) if ready else WorkerProcess()
            self._ready = ready
        worker.name = name
        self.fill()
        return worker

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for worker in ready:
            worker.stop()


class IsolatedBackend(Backend):
    """``inner``'s expert in a worker process, warm and hot. Warm: the worker has read the
    weights (llama.cpp: the model over the mmap'd file, pages shared with the page cache; torch:
    the checkpoint in the worker's buffer) and this process keeps what the vocabulary needs
    (``Backend.read_for_worker``); the host footprint is both. Hot: the worker's runtime (a
    context, a module); the device footprint is what its backend measured there. Back to warm
    (``WorkerRunner.close``) frees the runtime and keeps the worker; out of host memory stops it.
    A dead worker is started again (its weights read again) by the next ``materialize``."""

    def __init__(self, inner: Backend, spares: Spares | None = None):
        self.inner = inner
        self.name = inner.name
        self.reads_into_pool = inner.reads_into_pool
        self.spares = spares or Spares()
        self._workers: dict[str, WorkerProcess] = {}  # by expert name, while warm
        self._lock = threading.Lock()

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        """The worker loads the weights while this process does (two cores, two loads)."""
        worker = self.spares.take(expert.name)
        try:
            worker.send(Load(expert, path, self.inner.name))
            host = self.inner.read_for_worker(expert, path, pool)
        except BaseException:
            worker.stop()
            raise
        try:
            self._loaded(worker)
        except BaseException:
            host.release()
            raise
        with self._lock:
            self._workers[expert.name] = worker
        host.footprint_bytes += worker.private_bytes()
        release = host.on_release
        host.on_release = lambda: self._release(expert.name, release)
        return host

    @staticmethod
    def _loaded(worker: WorkerProcess) -> None:
        """Wait for the worker's Load; a worker that died loading is a load error."""
        try:
            worker.receive()
        except ExpertCrashed as exc:
            worker.stop()
            raise LoadError(exc.message) from None
        except BaseException:
            worker.stop()
            raise

    def _release(self, name: str, release: Any) -> None:
        """Out of host memory: the expert's worker (the one started after a crash, if any) stops."""
        with self._lock:
            worker = self._workers.pop(name, None)
        if worker is not None:
            worker.stop()
        if release is not None:
            release()

    def weight_bytes(self, path: Path) -> int:
        return self.inner.weight_bytes(path)

    def vocab_of(self, host: HostWeights) -> Vocab:
        return self.inner.vocab_of(host)

    def check_adapter(self, base_path: Path, profile: Profile) -> int:
        return self.inner.check_adapter(base_path, profile)

    def read_adapter(self, host: HostWeights, profile: Profile) -> Adapter:
        """A reference: the worker reads the adapter onto its own weights at first use."""
        assert profile.adapter is not None
        return Adapter(
            profile.name,
            Path(profile.adapter).expanduser(),
            profile.adapter_scale,
            self.inner.check_adapter(host.info.path, profile),
        )

    def materialize(self, host: HostWeights) -> Runner:
        name = host.expert.name
        with self._lock:
            worker = self._workers.get(name)
        if worker is None or not worker.alive:  # crashed while warm or hot: a new one
            worker = self.spares.take(name)
            worker.send(Load(host.expert, host.info.path, self.inner.name))
            self._loaded(worker)
            with self._lock:
                self._workers[name] = worker
        try:
            ready = worker.call(Materialize())
        except ExpertCrashed as exc:
            raise LoadError(exc.message) from None
        runner = WorkerRunner(host, self.inner.vocab_of(host), ready, worker)
        runner.footprint_bytes = ready.footprint_bytes  # RSS on CPU, device memory on CUDA
        return runner

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.stop()
        self.spares.close()


class WorkerRunner(Runner):
    """A hot expert in a worker process. ``alive`` is false once the worker died; ``close``
    frees the worker's runtime and leaves the worker warm."""

    def __init__(self, host: HostWeights, vocab: Vocab, ready: Ready, worker: WorkerProcess):
        super().__init__(
            host.expert,
            vocab,
            ready.context_length,
            host.num_bytes,
            ready.max_sequences,
            ready.sampler_defaults,
        )
        self.worker = worker
        self.shares_context = ready.shares_context
        self.limit_bytes = (
            int(worker.private_bytes() * GROWTH_LIMIT) + GROWTH_SLACK_BYTES
        )  # beyond: stopped
        self._closed = False

    @property
    def alive(self) -> bool:
        return self.worker.alive

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    def open_decoder(self) -> Decoder:
        """The worker opens its decoder with the first sequence (one round trip less)."""
        return WorkerDecoder(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.worker.alive:
            try:
                self.worker.call(Park())
            except CoEError:  # it died parking: the next materialize starts another
                self.worker.kill()


class WorkerDecoder(Decoder):
    """The worker's decoder, driven over the pipe: one round trip per step. A new sequence's Add
    is sent without waiting; its answer is read with the next step's (a refused Add, e.g. a
    grammar that does not compile for this vocabulary, is then ``take_refused``'s), and removals
    ride along with the next message. Room is decided here, by ``Runner.fits`` with the worker's
    runner's ``shares_context``."""

    def __init__(self, runner: WorkerRunner):
        self.runner, self.worker = runner, runner.worker
        self.max_sequences = runner.max_sequences
        self.need_tokens: dict[int, int] = {}
        self.removed: list[int] = []
        self.unanswered: list[int] = []  # sequences whose Add was sent, its answer not yet read
        self.refused: dict[int, CoEError] = {}
        self.used = False  # a sequence was sent: the worker's decoder is open
        self._memory_checked_s = time.monotonic()

    def has_room(self, need_tokens: int) -> bool:
        held = sum(self.need_tokens.values())
        return self.runner.fits(len(self.need_tokens), held, need_tokens)

    def add(
        self,
        seq: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter | None = None,
    ) -> None:
        ref = AdapterRef(adapter.name, str(adapter.path), adapter.scale) if adapter else None
        self.used = True
        self.worker.send(Add(seq, prompt_ids, sampling, ref, self._take_removed()))
        self.unanswered.append(seq)
        self.need_tokens[seq] = len(prompt_ids) + sampling.max_tokens

    def step(self) -> dict[int, Token]:
        self.worker.send(Step(self._take_removed()))
        self._read_add_answers()
        reply: Tokens = self.worker.receive()
        self._check_memory()
        return reply.tokens

    def take_refused(self) -> dict[int, CoEError]:
        refused, self.refused = self.refused, {}
        return refused

    def _read_add_answers(self) -> None:
        """The answers to the Adds sent since the last step, in order: a refused sequence was
        never added there, so it is dropped here; a crash is raised."""
        unanswered, self.unanswered = self.unanswered, []
        for seq in unanswered:
            try:
                self.worker.receive()
            except ExpertCrashed:
                raise
            except CoEError as exc:
                self.refused[seq] = exc
                self.need_tokens.pop(seq, None)

    def remove(self, seq: int) -> None:
        self.need_tokens.pop(seq, None)
        self.removed.append(seq)

    def close(self) -> None:
        """Never raises: a worker that died here is seen dead by the cache (``alive``)."""
        self.need_tokens.clear()
        if self.used and self.worker.alive:
            try:
                self._read_add_answers()
                self.worker.call(CloseDecoder())
            except CoEError:
                self.worker.kill()
        self.used = False
        self.removed.clear()
        self.unanswered.clear()
        self.refused.clear()

    def _take_removed(self) -> tuple[int, ...]:
        removed, self.removed = tuple(self.removed), []
        return removed

    def _check_memory(self) -> None:
        """Stop a worker that outgrew its footprint, before the kernel's OOM killer picks one."""
        now_s = time.monotonic()
        if now_s - self._memory_checked_s < MEMORY_CHECK_S:
            return
        self._memory_checked_s = now_s
        used_bytes, limit_bytes = self.worker.private_bytes(), self.runner.limit_bytes
        if used_bytes > limit_bytes:
            self.worker.kill()
            raise self.worker.crashed(
                f"its worker process grew to {used_bytes / 2**20:.0f} MiB, over its limit of "
                f"{limit_bytes / 2**20:.0f} MiB ({GROWTH_LIMIT}x its measured footprint "
                f"+ {GROWTH_SLACK_BYTES / 2**20:.0f} MiB), and was stopped"
            )


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


# -- the worker's side ---------------------------------------------------------------------------
class _Worker:
    """What one worker process holds: an expert's weights, runner and open decoder."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.host: HostWeights | None = None
        self.runner: Runner | None = None
        self.decoder: Decoder | None = None
        self.adapters: dict[str, Adapter] = {}
        self.left: dict[int, int] = {}  # live sequences: tokens each may still generate
        self.ahead: dict[int, Token] | None = None  # the next step, computed before it was asked
        self.ahead_error: Exception | None = None
        self.given: dict[
            int, int
        ] = {}  # live sequences: tokens answered so far (0: prefill to come)

    def handle(self, message: Any) -> Any:
        try:
            return self._handle(message)
        except CoEError as exc:
            return Failed(type(exc).__name__, exc.message, exc.param)
        except Exception as exc:
            return Failed("GenerationError", f"{type(exc).__name__}: {exc}")

    def _handle(self, message: Any) -> Any:
        if isinstance(message, Load):
            from coe.backends import get_backend

            self.backend = get_backend(message.backend)
            pool = HostBufferPool(pin=message.expert.uses_cuda)
            self.host = self.backend.read(message.expert, message.path, pool)
            return Done()
        assert self.backend is not None and self.host is not None, "no expert loaded"
        if isinstance(message, Materialize):
            self._park()
            self.runner = self.backend.materialize(self.host)
            return Ready(
                self.runner.context_length,
                self.runner.max_sequences,
                self.runner.sampler_defaults,
                self.runner.shares_context,
                self.runner.footprint_bytes,
            )
        if isinstance(message, Park):
            self._park()
            return Done()
        assert self.runner is not None, "the expert is not hot"
        if isinstance(message, CloseDecoder):
            self._forget_sequences()
            if self.decoder is not None:
                self.decoder.close()
                self.decoder = None
            return Done()
        if self.decoder is None:  # the server's decoder opened: ours opens with its first message
            self.decoder = self.runner.open_decoder()
        decoder = self.decoder
        for seq in message.removed:
            if seq in self.left:  # not one whose Add was refused
                decoder.remove(seq)
            self.left.pop(seq, None)
            self.given.pop(seq, None)
        if isinstance(message, Add):
            adapter = self._adapter(message.adapter) if message.adapter else None
            decoder.add(message.seq, message.prompt_ids, message.sampling, adapter)
            self.left[message.seq] = message.sampling.max_tokens
            self.given[message.seq] = 0
            return Done()
        if isinstance(message, Step):
            return Tokens(self._step(decoder))
        raise GenerationError(f"the worker does not know the message {message!r}")

    def _step(self, decoder: Decoder) -> dict[int, Token]:
        """The step computed ahead (less the sequences removed since), else one now."""
        error, self.ahead_error = self.ahead_error, None
        if error is not None:
            raise error
        if self.ahead is not None:
            tokens = {seq: t for seq, t in self.ahead.items() if seq in self.left}
            self.ahead = None
        else:
            tokens = decoder.step()
        assert self.runner is not None
        for seq, token in tokens.items():
            self.given[seq] += 1
            self.left[seq] -= 1
            if self.runner.vocab.is_end(token.id):
                self.left[seq] = 0
        return tokens

    def run_ahead(self) -> None:
        """After answering a step, compute the next one while the server postprocesses this one
        (the round trip and the server's work hide behind the forward pass), unless:
        a sequence may have ended (an end token, its max_tokens; only the server knows its stop
        strings and cancellations, and drops their extra token); a new one awaits its prefill (it
        starts at the step after); or a sequence is within its first ``SYNC_FIRST_TOKENS`` (its
        first text may wait for a second token; on a machine with no core to spare, the server
        would wait for one to deliver it: measured +25% time to first token on 2 cores)."""
        decoder = self.decoder
        if decoder is None or self.ahead is not None or not self.left:
            return
        # a new sequence (0 tokens: its prefill comes with the next step) or a young one
        if min(self.given.values()) < SYNC_FIRST_TOKENS:
            return
        if min(self.left.values()) <= 0:
            return
        try:
            self.ahead = decoder.step()
        except Exception as exc:  # reported as the next step's failure
            self.ahead_error = exc

    def _park(self) -> None:
        self._forget_sequences()
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def _forget_sequences(self) -> None:
        self.left.clear()
        self.given.clear()
        self.ahead, self.ahead_error = None, None

    def _adapter(self, ref: AdapterRef) -> Adapter:
        adapter = self.adapters.get(ref.name)
        if adapter is None:
            assert self.backend is not None and self.host is not None
            profile = Profile(ref.name, adapter=ref.path, adapter_scale=ref.scale)
            adapter = self.adapters[ref.name] = self.backend.read_adapter(self.host, profile)
        return adapter


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose parent is gone exits, even in the middle of a step."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def serve(fd: int) -> None:
    """The worker's loop: one reply per message until the pipe closes."""
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="coe-parent-watch", daemon=True
    ).start()
    # Ctrl-C in a terminal and SIGTERM to the whole group (systemd, docker stop) reach the server,
    # which drains its streams and then closes our pipe; until then we go on decoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # the native library is ready before the first expert comes
        from coe.backends.llama_lib import load_llama_cpp

        load_llama_cpp()
    except Exception:  # noqa: BLE001 - not installed: a Load says so
        pass
    conn = Connection(fd)
    worker = _Worker()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        reply = worker.handle(message)
        try:
            conn.send(reply)
        except OSError:
            break
        if isinstance(reply, Tokens):
            worker.run_ahead()
    os._exit(0)  # the runtime's memory goes with the process; no teardown to crash in


if __name__ == "__main__":  # the messages' classes must be the module's, not __main__'s
    from coe.backends import worker

    worker.serve(int(sys.argv[1]))
