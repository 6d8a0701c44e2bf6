"""Experts in worker processes (params.isolate) on a real `coe serve` with the real packaged
experts: a worker killed mid-stream (SIGSEGV, SIGKILL) ends that stream with an error event, the
other expert serves before and after, /health shows the crashed expert backing off, and after the
backoff it serves again from a new worker. No worker outlives the server, however it ends."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import running, start_server, stop_server

pytestmark = pytest.mark.integration

ISOLATED = """
experts:
  - name: smollm2-135m
    source: smollm2-135m
    params: {isolate: true}
  - name: gemma3-270m
    source: gemma3-270m
    params: {isolate: true}
router:
  enabled: false
  default_expert: smollm2-135m
server:
  max_tokens_limit: 2048
"""


@pytest.fixture(scope="module")
def isolated_server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("isolated"), ISOLATED) as server:
        yield server


def chat(server, model: str, content: str = "Say hello.", max_tokens: int = 8) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=300, json={
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": content}]})


def expert(server, name: str) -> dict:
    experts = httpx.get(server.v1 + "/experts", timeout=30).json()["experts"]
    return next(e for e in experts if e["name"] == name)


def worker_pids(server_pid: int) -> set[int]:
    """The server's worker processes (hot, warm and spare)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"coe.backends.worker" in cmdline:
            pids.add(int(proc.name))
    return pids


def gone(pids: set[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = set()
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":  # a zombie has exited; its parent (init, once orphaned) reaps it
                alive.add(pid)
        if not alive:
            return True
        time.sleep(0.2)
    return False


class Stream(threading.Thread):
    """A streamed chat request read on its own thread: deltas and the error event, if any."""

    def __init__(self, server, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.server, self.model, self.max_tokens = server, model, max_tokens
        self.deltas: list[str] = []
        self.errors: list[dict] = []
        self.done = False

    def run(self) -> None:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}]}
        with httpx.stream("POST", self.server.v1 + "/chat/completions", json=body, timeout=300) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self.errors.append(chunk["error"])
                elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    self.deltas.append(chunk["choices"][0]["delta"]["content"])


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_worker_killed_mid_stream_ends_only_that_expert(isolated_server, sig):
    server = isolated_server
    assert chat(server, "smollm2-135m").status_code == 200
    before = expert(server, "smollm2-135m")
    pid = before["worker_pid"]
    assert pid is not None and pid in worker_pids(server.process.pid)

    stream = Stream(server, "smollm2-135m", max_tokens=1500)
    stream.start()
    deadline = time.monotonic() + 120
    while len(stream.deltas) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stream.deltas) >= 5, "the stream did not start"
    queued: list[httpx.Response] = []  # a request to the other expert, sent before the crash
    other = threading.Thread(target=lambda: queued.append(chat(server, "gemma3-270m")), daemon=True)
    other.start()
    time.sleep(0.2)
    os.kill(pid, sig)

    stream.join(60)
    assert not stream.is_alive()
    assert len(stream.errors) == 1, stream.errors
    error = stream.errors[0]
    assert error["code"] == "expert_crashed" and sig.name in error["message"], error
    health = httpx.get(server.base_url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    backing_off = health["unhealthy"]["smollm2-135m"]
    assert backing_off["healthy"] is False and "worker process" in backing_off["reason"]
    refused = chat(server, "smollm2-135m")
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text

    other.join(120)
    assert queued and queued[0].status_code == 200, queued
    assert chat(server, "gemma3-270m").status_code == 200  # sent after the crash
    assert server.alive()

    health = httpx.get(server.base_url + "/health", timeout=10).json()
    time.sleep(health["unhealthy"].get("smollm2-135m", {}).get("retry_after_s", 0) + 0.5)
    again = chat(server, "smollm2-135m")
    assert again.status_code == 200, again.text
    after = expert(server, "smollm2-135m")
    assert after["worker_pid"] not in (None, pid)
    assert after["crashes"] == before["crashes"] + 1 and after["restarts"] == after["crashes"]
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert f'coe_expert_crashes_total{{expert="smollm2-135m"}} {after["crashes"]}.0' in metrics


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_server(tmp_path, how):
    server = start_server(tmp_path, ISOLATED)
    try:
        assert chat(server, "smollm2-135m").status_code == 200
        assert chat(server, "gemma3-270m").status_code == 200
        pids = worker_pids(server.process.pid)
        assert len(pids) >= 2  # both experts' workers (and a spare)
        os.kill(server.process.pid, getattr(signal, how))  # the server alone, not its group
        server.process.wait(60)
        assert gone(pids), f"workers left after {how}: {pids}"
    finally:
        stop_server(server)


def test_sampling_grammars_and_logprobs_run_in_the_worker(isolated_server):
    """What crosses the boundary is ids and log-probabilities; the grammar runs next to the model."""
    reply = httpx.post(isolated_server.v1 + "/chat/completions", timeout=300, json={
        "model": "smollm2-135m", "max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "Give a colour as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
            "required": ["colour"], "additionalProperties": False}}}})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert json.loads(choice["message"]["content"])["colour"] in ("red", "blue")
    content = choice["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) <= 2 and t["logprob"] <= 0 for t in content)


def test_a_worker_that_outgrows_its_memory_is_stopped(coe_home):
    from coe.backends.llama_cpp import LlamaCppBackend
    from coe.backends.memory import HostBufferPool
    from coe.backends.worker import MEMORY_CHECK_S, IsolatedBackend
    from coe.config import ExpertConfig
    from coe.errors import ExpertCrashed
    from coe.models import ModelStore, path_of
    from coe.types import SamplingParams

    expert = ExpertConfig("smollm2-135m", "smollm2-135m", params={"isolate": True})
    backend = IsolatedBackend(LlamaCppBackend())
    host = backend.read(expert, path_of(ModelStore(coe_home), expert), HostBufferPool())
    try:
        runner = backend.materialize(host)
        assert runner.footprint_bytes > 0 and host.footprint_bytes > runner.footprint_bytes
        decoder = runner.open_decoder()
        decoder.add(1, runner.vocab.encode("Once upon a time"), SamplingParams(max_tokens=50, temperature=0))
        decoder.step()
        runner.limit_bytes = 1  # as if it had grown past 1.5x its footprint
        time.sleep(MEMORY_CHECK_S)
        with pytest.raises(ExpertCrashed, match="grew to .* MiB, over its limit"):
            decoder.step()
        assert not runner.alive
        runner.close()
        again = backend.materialize(host)  # a new worker, from the page cache
        assert again.alive and again.pid != runner.pid
        again.close()
    finally:
        host.release()
        backend.close()


def test_a_torch_expert_in_a_worker_generates_what_it_does_in_process(tiny_checkpoint):
    """The worker reads the checkpoint into its own buffer; this process keeps the tokenizer."""
    from coe.backends.memory import HostBufferPool
    from coe.backends.torch import TorchBackend
    from coe.backends.worker import IsolatedBackend
    from coe.config import ExpertConfig
    from coe.engine.batch import generate
    from coe.types import Request, SamplingParams

    def text(backend, isolate: bool) -> str:
        expert = ExpertConfig("tiny", str(tiny_checkpoint), backend="torch_hf",
                              params={"n_ctx": 64, "isolate": isolate})
        host = backend.read(expert, tiny_checkpoint, HostBufferPool())
        runner = backend.materialize(host)
        try:
            requests = [Request("tiny", SamplingParams(max_tokens=12, temperature=0), prompt=p)
                        for p in ("Hello", "Why?")]
            events = [e for e in generate(runner, requests) if e.is_final]
            assert all(e.error is None for e in events), events
            return "|".join(e.completion.text for e in events)
        finally:
            runner.close()
            host.release()

    isolated = IsolatedBackend(TorchBackend())
    try:
        in_process = text(TorchBackend(), False)
        assert len(in_process) > 2 and text(isolated, True) == in_process
        assert not isolated._workers  # released with its host weights
    finally:
        isolated.close()


def test_a_sequence_the_worker_refuses_ends_alone(tiny_checkpoint):
    """Adds are answered with the next step: one the worker refuses (a grammar that does not
    compile) ends that request with the worker's error; its batch-mate completes, and the same
    decoder goes on serving."""
    from coe.backends.memory import HostBufferPool
    from coe.backends.torch import TorchBackend
    from coe.backends.worker import IsolatedBackend
    from coe.config import ExpertConfig
    from coe.engine.batch import generate
    from coe.errors import InvalidRequest
    from coe.types import Request, SamplingParams

    expert = ExpertConfig("tiny", str(tiny_checkpoint), backend="torch_hf",
                          params={"n_ctx": 64, "isolate": True})
    backend = IsolatedBackend(TorchBackend())
    host = backend.read(expert, tiny_checkpoint, HostBufferPool())
    runner = backend.materialize(host)
    try:
        good = Request("tiny", SamplingParams(max_tokens=6, temperature=0), prompt="Hello")
        bad = Request("tiny", SamplingParams(max_tokens=6, temperature=0, grammar="%%% not a grammar"),
                      prompt="Why?")
        events: list = []
        batch = threading.Thread(target=lambda: events.extend(generate(runner, [bad, good])),
                                 daemon=True)
        batch.start()
        batch.join(120)  # a refused sequence left running would step forever
        assert not batch.is_alive(), "the batch did not end"
        final = {e.request_id: e for e in events if e.is_final}
        assert isinstance(final[bad.id].error, InvalidRequest), final[bad.id]
        assert final[good.id].error is None and final[good.id].completion.completion_tokens > 0
        again = Request("tiny", SamplingParams(max_tokens=6, temperature=0), prompt="Hello")
        [done] = [e for e in generate(runner, [again]) if e.is_final]
        assert done.error is None and done.completion.text == final[good.id].completion.text
    finally:
        runner.close()
        host.release()
        backend.close()
