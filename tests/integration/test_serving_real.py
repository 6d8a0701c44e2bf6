"""Serving under load, against a real `coe serve` with the real packaged experts: 64 concurrent
streaming `openai` clients, half of them disconnecting, admission control (429 + Retry-After),
request timeouts, graceful shutdown, /metrics, `coe top`, and a small `coe bench serve`."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI, RateLimitError

from coe.server.top import read_samples, total

pytestmark = pytest.mark.integration


def metrics(server) -> dict:
    return read_samples(httpx.get(server.base_url + "/metrics", timeout=10).text)


def wait_idle(server, timeout_s: float = 120.0) -> dict:
    """Metrics once nothing is in flight and no batch is running (or the last reading after the
    timeout). The running gauge drops when the engine finishes the batch, just after its last
    request has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = metrics(server)
        idle = total(samples, "coe_requests_in_flight") == 0 and total(samples, "coe_requests_running") == 0
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


async def stream_one(client: AsyncOpenAI, k: int, leave_after: int | None) -> dict:
    """One streaming chat; with ``leave_after``, close the stream after that many chunks."""
    model = "smollm2-135m" if k % 2 == 0 else "gemma3-270m"
    stream = await client.chat.completions.create(
        model=model, stream=True, max_tokens=24, temperature=0.0,
        messages=[{"role": "user", "content": f"Count from {k} to {k + 10}."}])
    chunks, finish = 0, None
    async for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if leave_after is not None and chunks >= leave_after:
            await stream.close()
            return {"k": k, "left": True, "chunks": chunks}
    return {"k": k, "left": False, "chunks": chunks, "finish": finish}


async def run_clients(base_url: str, count: int, leave: set[int]) -> list[dict]:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    try:
        return await asyncio.gather(*(stream_one(client, k, 2 if k in leave else None) for k in range(count)))
    finally:
        await client.close()


def test_64_streaming_clients_complete(load_server):
    results = asyncio.run(run_clients(load_server.v1, 64, leave=set()))
    assert len(results) == 64
    assert all(r["finish"] in ("stop", "length") and r["chunks"] >= 2 for r in results)
    samples = wait_idle(load_server)
    assert total(samples, "coe_requests_in_flight") == 0
    assert total(samples, "coe_requests_total", outcome="completed") >= 64
    assert total(samples, "coe_batch_size_count") < 64  # requests were batched, not run one by one


def test_half_the_clients_disconnecting_leaks_no_slots(load_server):
    before = metrics(load_server)
    results = asyncio.run(run_clients(load_server.v1, 64, leave=set(range(0, 64, 2))))
    finished = [r for r in results if not r["left"]]
    assert len(finished) == 32 and all(r["finish"] in ("stop", "length") for r in finished)
    samples = wait_idle(load_server)
    assert total(samples, "coe_requests_in_flight") == 0
    assert total(samples, "coe_requests_running") == 0
    assert total(samples, "coe_queue_depth") == 0
    ended = total(samples, "coe_requests_total") - total(before, "coe_requests_total")
    assert ended == 64  # every request ended exactly once: completed or cancelled
    assert total(samples, "coe_requests_total", outcome="cancelled") > total(before, "coe_requests_total",
                                                                              outcome="cancelled")
    health = httpx.get(load_server.base_url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    reply = OpenAI(base_url=load_server.v1, api_key="unused").chat.completions.create(
        model="smollm2-135m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content


def test_served_tier_and_switch_time_are_reported(load_server):
    response = httpx.post(load_server.v1 + "/chat/completions", timeout=120, json={
        "model": "gemma3-270m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]})
    assert response.status_code == 200
    assert response.headers["x-coe-tier"] in ("device", "host", "disk")
    assert float(response.headers["x-coe-switch-ms"]) >= 0
    assert response.json()["coe"]["tier"] == response.headers["x-coe-tier"]


def test_coe_top_once_shows_the_experts(load_server):
    result = subprocess.run([sys.executable, "-m", "coe", "top", "--once", "--url", load_server.base_url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m" in result.stdout and "in flight" in result.stdout


def test_full_queue_answers_429_with_retry_after(server_with_config, two_experts):
    server = server_with_config(two_experts + "scheduler:\n  max_batch_size: 1\n  max_queue: 2\n  max_queue_per_expert: 2\n")

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": "smollm2-135m", "max_tokens": 200, "messages": [{"role": "user", "content": "Tell a story"}]}
            return await asyncio.gather(*(client.post(server.v1 + "/chat/completions", json=body) for _ in range(12)))

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 429]
    assert refused, [r.status_code for r in responses]
    assert all(r.status_code in (200, 429) for r in responses)
    assert int(refused[0].headers["retry-after"]) >= 1
    assert refused[0].json()["error"]["code"] == "overloaded"
    client = OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(RateLimitError):  # the openai client surfaces it as its rate-limit error
        asyncio.run(flood_then(client, server))
    samples = wait_idle(server)
    assert total(samples, "coe_requests_total", outcome="rejected") >= len(refused)
    assert total(samples, "coe_requests_in_flight") == 0


async def flood_then(client: OpenAI, server) -> None:
    """Fill the queue with background requests, then call the openai client while it is full."""
    async with httpx.AsyncClient(timeout=300) as http:
        background = await fill_queue(http, server, depth=2)
        try:
            await asyncio.to_thread(client.chat.completions.create, model="smollm2-135m", max_tokens=4,
                                    messages=[{"role": "user", "content": "Hi"}])
        finally:
            statuses = [r.status_code for r in await asyncio.gather(*background)]
            assert set(statuses) <= {200, 429}, statuses


async def fill_queue(http: httpx.AsyncClient, server, depth: int, timeout_s: float = 60.0) -> list[asyncio.Task]:
    """Send long requests one at a time until ``depth`` of them are queued (one more runs)."""
    body = {"model": "smollm2-135m", "max_tokens": 200, "messages": [{"role": "user", "content": "Tell a story"}]}
    background: list[asyncio.Task] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = read_samples((await http.get(server.base_url + "/metrics")).text)
        if total(samples, "coe_queue_depth") >= depth:
            return background
        background.append(asyncio.create_task(http.post(server.v1 + "/chat/completions", json=body)))
        await asyncio.sleep(0.2)
    await asyncio.gather(*background)
    raise AssertionError(f"the queue never reached {depth} requests")


def test_request_timeout_is_408_and_the_server_keeps_serving(server_with_config, two_experts):
    server = server_with_config(two_experts + "server:\n  request_timeout_s: 0.5\n")
    response = httpx.post(server.v1 + "/chat/completions", timeout=120, json={
        "model": "gemma3-270m", "max_tokens": 400, "messages": [{"role": "user", "content": "Write an essay"}]})
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert total(wait_idle(server), "coe_requests_in_flight") == 0


def test_sigterm_lets_an_inflight_stream_finish(server_with_config, two_experts):
    server = server_with_config(two_experts + "server:\n  shutdown_grace_s: 60\n")
    body = {"model": "smollm2-135m", "max_tokens": 64, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "List ten animals."}]}
    lines = []
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 2:
                    os.killpg(server.process.pid, signal.SIGTERM)
    assert lines[-1] == "[DONE]"
    finals = [json.loads(x) for x in lines[:-1] if json.loads(x).get("choices")]
    assert finals[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM, no crash
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log.read_text()


def test_bench_serve_writes_both_configurations(tmp_path, coe_home):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, "-m", "coe", "bench", "serve", "--experts", "2", "--requests", "6", "--rate", "4",
         "--max-tokens-median", "8", "--seed", "3", "--follow-ups", "1.0", "--think-s", "0.2",
         "--json", str(out)],  # seed 3: one MT-Bench first turn, so one follow-up
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "COE_HOME": str(coe_home), "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())
    workdir = Path(record["setup"]["workdir"])
    assert workdir.parent == tmp_path and (workdir / "coe.log").exists()
    assert not (workdir / "experts").exists()  # the GBs of expert copies are gone, the logs stay
    for kind in ("naive", "coe"):
        row = record[kind]
        for key in ("throughput_rps", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p99_s",
                    "switches", "completed", "errors", "lost"):
            assert key in row, (kind, key)
        assert row["completed"] + row["errors"] + row["lost"] + row["skipped"] == 7
        assert row["lost"] == 0 and row["follow_ups"] == 1
        assert row["slots_in_use_after"] == 0
    assert "throughput_x" in record["ratios"]
    results = {r["index"]: r for r in map(json.loads, (workdir / "coe-results.jsonl").read_text().splitlines())}
    trace = {r["index"]: r for r in map(json.loads, (workdir / "trace.jsonl").read_text().splitlines()[1:])}
    follow_up = results[6]
    first = results[trace[6]["after"]]
    # the follow-up carried the first turn and its answer, and reused the cells of that first turn
    assert follow_up["follow_up"] and follow_up["prompt_tokens"] > first["prompt_tokens"]
    assert follow_up["cached_tokens"] >= first["prompt_tokens"] - 1
