"""Scripted parts shared by unit tests (each has a real counterpart in the integration tests)."""
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections import Counter
from pathlib import Path

from coe.backends.base import Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.sampling import Token
from coe.models.info import describe


class LetterVocab(Vocab):
    """Token i is the i-th lowercase letter. A chat template, so no stop string holds text back."""

    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def encode(self, text: str) -> list[int]:
        return [0] * len(text)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([ord("a") + token_id])

    def is_end(self, token_id: int) -> bool:
        return False


# ---- an engine on fake backends: real ModelCache and scheduler, no torch -----------------------

def write_weights(folder: Path, num_bytes: int = 1000) -> Path:
    """A real safetensors checkpoint folder holding one uint8 tensor of ``num_bytes``."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "U8", "shape": [num_bytes], "data_offsets": [0, num_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(num_bytes))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 1000}))
    return folder


class LetterRunner(Runner):
    """Every sequence generates a, b, c, a, b, ... from its own start (never an end token).
    ``delay_s`` sleeps before each step; ``fail_after`` raises RuntimeError('device lost') at the
    step after that many; ``sequences`` is max_sequences (more join a running decoder as rows free)."""

    def __init__(self, host: HostWeights, delay_s: float = 0.0, fail_after: int | None = None,
                 sequences: int = 1):
        super().__init__(host.expert, LetterVocab(), context_length=1000, num_bytes=host.num_bytes,
                         max_sequences=sequences)
        self.host, self.delay_s, self.fail_after = host, delay_s, fail_after
        self.closed = False
        self.decoders: list[LetterDecoder] = []

    def open_decoder(self) -> "LetterDecoder":
        assert not self.closed, f"runner of {self.expert.name} used after close()"
        decoder = LetterDecoder(self)
        self.decoders.append(decoder)
        return decoder

    @property
    def sequences_given(self) -> int:
        return sum(len(d.added_at) for d in self.decoders)

    def close(self) -> None:
        self.closed = True


class LetterDecoder(Decoder):
    """``added_at[i]``: how many steps had run when the i-th sequence was added (0: at the start;
    more: it joined a running decoder)."""

    def __init__(self, runner: LetterRunner):
        self.runner, self.max_sequences = runner, runner.max_sequences
        self.live: dict[int, int] = {}  # seq -> tokens generated
        self.added_at: list[int] = []
        self.steps = 0

    def has_room(self, need_tokens: int) -> bool:
        return len(self.live) < self.max_sequences and need_tokens <= self.runner.context_length

    def add(self, seq, prompt_ids, sampling, adapter=None) -> None:
        self.live[seq] = 0
        self.added_at.append(self.steps)

    def step(self):
        if self.runner.fail_after is not None and self.steps >= self.runner.fail_after:
            raise RuntimeError("device lost")
        if self.runner.delay_s:
            time.sleep(self.runner.delay_s)
        self.steps += 1
        tokens = {seq: Token(count % 3) for seq, count in self.live.items()}
        for seq in self.live:
            self.live[seq] += 1
        return tokens

    def remove(self, seq) -> None:
        del self.live[seq]


class LetterBackend(Backend):
    """Reads nothing (host weights are a token object), materialises LetterRunners.

    ``runner_options[name]`` are LetterRunner keyword arguments for that expert; ``read_delay_s``
    makes every disk -> host move take that long; ``fail_read`` names experts whose read raises
    ``read_error`` (an exception instance)."""

    name = "letters"

    def __init__(self, runner_options: dict[str, dict] | None = None, read_delay_s: float = 0.0):
        self.runner_options = runner_options or {}
        self.read_delay_s = read_delay_s
        self.reads: Counter = Counter()
        self.materializes: Counter = Counter()
        self.releases: Counter = Counter()
        self.runners: dict[str, list[LetterRunner]] = {}
        self.fail_read: dict[str, Exception] = {}
        self._lock = threading.Lock()

    def read(self, expert, path: Path, pool) -> HostWeights:
        with self._lock:
            self.reads[expert.name] += 1
        if expert.name in self.fail_read:
            raise self.fail_read[expert.name]
        time.sleep(self.read_delay_s)
        info = describe(path)
        return HostWeights(expert=expert, info=info, payload=object(), footprint_bytes=info.num_bytes,
                           on_release=lambda: self._released(expert.name))

    def _released(self, name: str) -> None:
        with self._lock:
            self.releases[name] += 1

    def materialize(self, host: HostWeights) -> Runner:
        with self._lock:
            self.materializes[host.expert.name] += 1
        runner = LetterRunner(host, **self.runner_options.get(host.expert.name, {}))
        self.runners.setdefault(host.expert.name, []).append(runner)
        return runner

    def generated(self, name: str) -> int:
        """Sequences the expert's runners were given."""
        return sum(runner.sequences_given for runner in self.runners.get(name, []))


def fake_engine(tmp_path: Path, names=("a", "b"), backend: LetterBackend | None = None,
                remote: dict | None = None, **sections):
    """An Engine over a real ModelCache whose experts (``names``) are read by ``backend``; the
    ``sections`` are CoEConfig sections (cache=CacheConfig(...), scheduler=..., server=...).
    ``remote`` maps more expert names to httpx request handlers: remote experts (1B parameters,
    no waits between retries) answered by those handlers. The backend is ``engine.fake``."""
    import httpx

    from coe.backends.remote import RemoteExpert
    from coe.cache import ModelCache
    from coe.cache.tiers import Budgets
    from coe.config import CoEConfig, ExpertConfig
    from coe.engine import Engine
    from coe.models import ModelStore

    backend = backend or LetterBackend()
    experts = tuple(ExpertConfig(n, str(write_weights(tmp_path / "experts" / n)), backend="torch_hf")
                    for n in names)
    remote = remote or {}
    remote_experts = tuple(ExpertConfig(n, "http://remote.test/v1", backend="remote", params={"num_params": "1B"})
                           for n in remote)
    config = CoEConfig(experts=experts + remote_experts, **sections)
    cache = ModelCache(config, ModelStore(tmp_path / "home"), backends={"torch_hf": backend},
                       budgets=Budgets(device_bytes=10**9, host_bytes=10**9, device_kind="cpu"))
    remotes = {e.name: RemoteExpert(e, transport=httpx.MockTransport(remote[e.name]), sleep=lambda _: None)
               for e in remote_experts}
    engine = Engine(config, cache, remotes=remotes)
    engine.fake = backend
    return engine


def serve_text(path: str, text: str, content_type: str):
    """A one-route HTTP server on a free port answering GET ``path`` with ``text`` (404 elsewhere)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200 if self.path == path else 404)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
