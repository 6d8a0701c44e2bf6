"""`coe bench soak`: a real `coe serve` under a long mix of valid and invalid requests from the
official openai client (and raw HTTP for malformed bodies). Every valid request must complete,
every invalid one must get its own 4xx, the server must stay up, and its memory must come back
to the baseline measured after warm-up in the same run (the ratio is the result).

``--kill-worker EXPERT``: every expert runs in worker processes (``params.isolate``) and EXPERT's
hot worker is killed (SIGKILL) every ``--kill-every-s``; requests name their expert (none is
routed, so each one's expert is known). Every valid request to the other experts must complete;
the killed expert's may end with its crash (an error event, or 503 while it backs off)."""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from coe.backends.memory import process_rss_bytes
from coe.bench.serve import ServerProcess

SAMPLE_EVERY_S = 5.0
IDLE_WAIT_S = 60.0
SOAK_CONFIG = """experts:
  - name: smollm2-135m
    source: smollm2-135m
  - name: gemma3-270m
    source: gemma3-270m
router:
  default_expert: smollm2-135m
server:
  max_tokens_limit: 512
  max_body_bytes: 1MiB
"""
MODELS = ("coe", "smollm2-135m", "gemma3-270m")
EXPERTS = MODELS[1:]
PROMPTS = (
    "Name three colours.",
    "What is 17 times 3?",
    "Write a haiku about rain.",
    "Explain what a list comprehension is in Python.",
    "Give one tip for sleeping well.",
)


def add_arguments(parser) -> None:
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument(
        "--invalid-share", type=float, default=0.3, help="share of invalid requests"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kill-worker",
        choices=EXPERTS,
        help="run the experts isolated and kill this one's worker every --kill-every-s",
    )
    parser.add_argument("--kill-every-s", type=float, default=120.0)


def soak_config(isolate: bool) -> str:
    if not isolate:
        return SOAK_CONFIG
    return SOAK_CONFIG.replace("\n    source: ", "\n    params: {isolate: true}\n    source: ")


# ---- the cases: (name, valid, call(client, http, base_url, rng, max_tokens, model) -> outcome) ----
def _chat(client, rng, max_tokens, model, **extra):
    return client.chat.completions.create(
        model=model,
        max_tokens=max_tokens,
        temperature=0.7,
        messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
        **extra,
    )


def valid_chat(client, http, url, rng, max_tokens, model):
    reply = _chat(client, rng, max_tokens, model)
    return "ok" if reply.choices[0].finish_reason in ("stop", "length") else "bad finish"


def valid_stream(client, http, url, rng, max_tokens, model):
    finish = None
    for chunk in _chat(client, rng, max_tokens, model, stream=True):
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return "ok" if finish in ("stop", "length") else "stream ended without finish_reason"


def valid_stream_left_early(client, http, url, rng, max_tokens, model):
    stream = _chat(client, rng, max(4, max_tokens), model, stream=True)
    for _ in zip(range(2), stream):
        pass
    stream.close()  # the client leaves; the server must cancel and free the slot
    return "ok"


def _expect(status: int, call):
    import openai

    try:
        call()
    except openai.APIStatusError as exc:
        return "ok" if exc.status_code == status else f"got {exc.status_code}, expected {status}"
    return f"accepted, expected {status}"


def invalid_model(client, http, url, rng, max_tokens, model):
    return _expect(
        404,
        lambda: client.chat.completions.create(
            model="../no-such-model", messages=[{"role": "user", "content": "hi"}]
        ),
    )


def invalid_max_tokens(client, http, url, rng, max_tokens, model):
    return _expect(
        400,
        lambda: client.chat.completions.create(
            model="smollm2-135m", max_tokens=10**6, messages=[{"role": "user", "content": "hi"}]
        ),
    )


def invalid_field(client, http, url, rng, max_tokens, model):
    return _expect(
        400,
        lambda: client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"temprature": 1},
        ),
    )


def invalid_json(client, http, url, rng, max_tokens, model):
    response = http.post(
        url + "/v1/chat/completions",
        content=b'{"model": "coe", "messages": [',
        headers={"content-type": "application/json"},
    )
    return "ok" if response.status_code == 400 else f"got {response.status_code}, expected 400"


def invalid_huge_body(client, http, url, rng, max_tokens, model):
    body = {"model": "coe", "messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    response = http.post(url + "/v1/chat/completions", json=body)
    return "ok" if response.status_code == 413 else f"got {response.status_code}, expected 413"


VALID = (valid_chat, valid_stream, valid_stream_left_early)
INVALID = (invalid_model, invalid_max_tokens, invalid_field, invalid_json, invalid_huge_body)


# ---- the run -------------------------------------------------------------------------------------
class Tally:
    def __init__(self, killed: str | None = None):
        self.killed = killed  # the expert whose worker is killed: its crash endings are expected
        self.outcomes: Counter = Counter()  # (case, valid, ok, expert) -> requests
        self.unexpected: list[str] = []
        # failed requests that ended with their expert's crash (an error event naming its worker)
        # or its backoff (503), by expert
        self.ended_by_crash: Counter = Counter()
        self._lock = threading.Lock()

    def record(self, case: str, valid: bool, outcome: str, expert: str = "") -> None:
        with self._lock:
            self.outcomes[(case, valid, outcome == "ok", expert)] += 1
            by_crash = outcome != "ok" and ("worker process" in outcome or "503" in outcome)
            if by_crash:
                self.ended_by_crash[expert] += 1
            expected = by_crash and expert == self.killed
            if outcome != "ok" and not expected and len(self.unexpected) < 20:
                self.unexpected.append(f"{case} ({expert or 'invalid'}): {outcome}")


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def client_loop(url: str, deadline_s: float, args, seed: int, tally: Tally) -> None:
    import httpx

    rng = random.Random(seed)
    client = openai_client(url)
    models = EXPERTS if args.kill_worker else MODELS
    with httpx.Client(timeout=300) as http:
        while time.monotonic() < deadline_s:
            valid = rng.random() >= args.invalid_share
            case = rng.choice(VALID if valid else INVALID)
            model = rng.choice(models)
            try:
                outcome = case(client, http, url, rng, args.max_tokens, model)
            except Exception as exc:  # a failed valid request, a dropped connection: all recorded
                outcome = f"{type(exc).__name__}: {str(exc)[:160]}"
            tally.record(case.__name__, valid, outcome, model if valid else "")


def kill_loop(url: str, deadline_s: float, expert: str, every_s: float, kills: list) -> None:
    """SIGKILL the expert's hot worker every ``every_s`` (waiting for it to be hot again)."""
    import httpx

    started_s = time.monotonic()
    next_s = started_s + every_s
    while time.monotonic() < deadline_s:
        time.sleep(0.2)
        if time.monotonic() < next_s:
            continue
        rows = httpx.get(url + "/v1/experts", timeout=30).json()["experts"]
        pid = next((r.get("worker_pid") for r in rows if r["name"] == expert), None)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append(round(time.monotonic() - started_s, 1))
        next_s += every_s


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="coe-soak-"))
    (workdir / "coe.yaml").write_text(soak_config(isolate=args.kill_worker is not None))
    server = ServerProcess(workdir / "coe.yaml", args.home, workdir / "server.log")
    try:
        server.wait_ready()
        baseline = warm_up(server, args)
        samples, tally, kills = [], Tally(args.kill_worker), list[float]()
        started_s = time.monotonic()
        threads = [
            threading.Thread(
                target=client_loop,
                args=(server.url, started_s + args.duration_s, args, args.seed + i, tally),
            )
            for i in range(args.clients)
        ]
        if args.kill_worker:
            threads.append(
                threading.Thread(
                    target=kill_loop,
                    args=(
                        server.url,
                        started_s + args.duration_s,
                        args.kill_worker,
                        args.kill_every_s,
                        kills,
                    ),
                )
            )
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            samples.append(
                (round(time.monotonic() - started_s, 1), process_rss_bytes(server.process.pid))
            )
            time.sleep(SAMPLE_EVERY_S)
        for thread in threads:
            thread.join()
        elapsed_s = time.monotonic() - started_s
        end = settle(server)
        alive = server.process.poll() is None
    finally:
        server.stop()
    result = summarise(tally, baseline, samples, end, elapsed_s, alive, args, kills)
    print_table(result)
    return result


def warm_up(server: ServerProcess, args) -> int:
    """One request per model, then the resident memory once idle: the baseline."""
    client = openai_client(server.url)
    for model in MODELS:
        client.chat.completions.create(
            model=model, max_tokens=args.max_tokens, messages=[{"role": "user", "content": "Hello"}]
        )
    return settle(server)


def settle(server: ServerProcess) -> int:
    """The server's RSS once nothing is in flight (or after IDLE_WAIT_S)."""
    import httpx

    deadline_s = time.monotonic() + IDLE_WAIT_S
    while time.monotonic() < deadline_s:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        in_flight = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("coe_requests_in_flight")
        )
        if in_flight == 0:
            break
        time.sleep(1.0)
    time.sleep(2.0)
    return process_rss_bytes(server.process.pid)


def summarise(
    tally: Tally,
    baseline: int,
    samples: list,
    end: int,
    elapsed_s: float,
    alive: bool,
    args,
    kills: list | None = None,
) -> dict:
    """Valid requests to the killed expert (``args.kill_worker``) are counted apart: they may end
    with its crash; every other valid request must complete."""
    counts, killed = tally.outcomes, args.kill_worker
    valid_sent = sum(n for (_, valid, _, e), n in counts.items() if valid and e != killed)
    valid_ok = sum(n for (_, valid, ok, e), n in counts.items() if valid and ok and e != killed)
    invalid_sent = sum(n for (_, valid, _, _), n in counts.items() if not valid)
    invalid_ok = sum(n for (_, valid, ok, _), n in counts.items() if not valid and ok)
    peak = max([s[1] for s in samples] + [end, baseline])
    per_case: Counter[str] = Counter()
    for (case, _, ok, _), n in counts.items():
        per_case[f"{case} {'ok' if ok else 'unexpected'}"] += n
    crashed = {}
    if killed:
        sent = sum(n for (_, valid, _, e), n in counts.items() if valid and e == killed)
        ok = sum(n for (_, valid, ok, e), n in counts.items() if valid and ok and e == killed)
        crashed = {
            "expert": killed,
            "kills_at_s": kills or [],
            "sent": sent,
            "completed": ok,
            "ended_by_crash_or_backoff": tally.ended_by_crash[killed],
        }
    return {
        "duration_s": round(elapsed_s, 1),
        "clients": args.clients,
        "server_alive": alive,
        "valid_sent": valid_sent,
        "valid_completed": valid_ok,
        "lost": valid_sent - valid_ok,
        "killed_worker": crashed or None,
        "invalid_sent": invalid_sent,
        "invalid_refused_as_expected": invalid_ok,
        "unexpected": tally.unexpected,
        "per_case": dict(sorted(per_case.items())),
        "rss_baseline_bytes": baseline,
        "rss_peak_bytes": peak,
        "rss_end_bytes": end,
        "ratios": {
            "rss_end_vs_baseline": round(end / baseline, 3) if baseline else None,
            "rss_peak_vs_baseline": round(peak / baseline, 3) if baseline else None,
        },
        "rss_samples": samples,
    }


def print_table(result: dict) -> None:
    mib = 2**20
    rows = [
        ("duration s", result["duration_s"]),
        ("server alive", result["server_alive"]),
        (
            "valid sent / completed / lost",
            f"{result['valid_sent']} / {result['valid_completed']} / {result['lost']}",
        ),
        (
            "invalid sent / refused with the right 4xx",
            f"{result['invalid_sent']} / {result['invalid_refused_as_expected']}",
        ),
        (
            "RSS baseline / peak / end MiB",
            f"{result['rss_baseline_bytes'] / mib:.0f} / "
            f"{result['rss_peak_bytes'] / mib:.0f} / {result['rss_end_bytes'] / mib:.0f}",
        ),
        ("RSS end / baseline", result["ratios"]["rss_end_vs_baseline"]),
    ]
    killed = result.get("killed_worker")
    if killed:
        rows[2] = ("valid sent / completed / lost (other experts)", rows[2][1])
        rows.append(
            (
                f"{killed['expert']} (worker killed {len(killed['kills_at_s'])}x): sent / "
                "completed / ended by its crash",
                f"{killed['sent']} / {killed['completed']} / {killed['ended_by_crash_or_backoff']}",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for line in result["unexpected"]:
        print("unexpected:", line)
