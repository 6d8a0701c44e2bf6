"""`coe bench structured`: what constrained decoding costs, and what native tool calling buys.

1. Speed, per default expert, in-process: decode tokens/s (after the first token) and time to
   first token of the same prompt with and without a JSON-schema constraint (greedy). Target: the
   constraint costs at most 10% of the tokens/s.
2. BFCL tool-call accuracy through a real `coe serve`, per tool-calling expert, on the items the
   evaluation scores (the half the router never trained on): the prompt-only format the
   evaluation uses (a Python list of calls asked for in the system prompt, parsed from the text)
   against native ``tools`` (the expert's own template, calls read from ``tool_calls``; with
   ``tool_choice: auto`` and ``required``, which constrains the calls to the functions' schemas).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coe.bench.serve import ServerProcess
from coe.config import ExpertConfig, default_config
from coe.engine import Engine
from coe.engine.structured import json_schema_grammar
from coe.types import ChatMessage, Request, SamplingParams

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "country", "population", "landmarks"],
}
ASK = "Describe Paris as a JSON object with its name, country, population and landmarks."
TOOL_EXPERTS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--experts", nargs="*", help="packaged experts for the speed table (default: the four)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--bfcl-items",
        type=int,
        default=40,
        help="BFCL items per expert, taken in turn from its four sets (0: skip)",
    )
    parser.add_argument("--threads", type=int, default=2)


def run(args) -> dict:
    defaults = default_config()
    names = args.experts or [e.name for e in defaults.experts]
    speed = speed_rows(args, names)
    print_speed(speed)
    bfcl = bfcl_rows(args, [n for n in TOOL_EXPERTS if n in names]) if args.bfcl_items else []
    print_bfcl(bfcl)
    return {
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "schema": CITY,
        "speed": speed,
        "target": "constrained tokens/s >= 0.90 x unconstrained",
        "bfcl": bfcl,
    }


# ---- speed ---------------------------------------------------------------------------------------


def speed_rows(args, names: list[str]) -> list[dict]:
    defaults = default_config()
    experts = tuple(
        ExpertConfig(n, defaults.expert(n).source, params={"n_threads": args.threads})
        for n in names
    )
    engine = Engine.from_config(type(defaults)(experts=experts), args.home)
    grammar = json_schema_grammar(CITY)
    rows = []
    engine.start()  # the loop thread: stream() yields each event as it comes (time to first token)
    try:
        for name in names:
            runner = engine.cache.activate(name)
            chat = runner.vocab.chat_template is not None
            kinds = {"plain": None, "constrained": grammar}
            runs: dict[str, list[_Run]] = {kind: [] for kind in kinds}
            for repeat in range(args.repeats + 1):  # interleaved, so drift hits both alike
                for kind, constraint in kinds.items():
                    run = _timed(engine, name, chat, args.max_tokens, constraint)
                    if repeat:  # the first round warms up
                        runs[kind].append(run)
            base, shaped = _summary(runs["plain"]), _summary(runs["constrained"])
            rows.append(
                {
                    "expert": name,
                    "vocab": runner.vocab.n_vocab,
                    "plain": base,
                    "constrained": shaped,
                    "tokens_per_s_ratio": shaped["tokens_per_s"] / base["tokens_per_s"],
                    "finished": sum(r.finish_reason == "stop" for r in runs["constrained"]),
                    "valid_json": sum(_valid(r.text) for r in runs["constrained"]),
                    "runs": args.repeats,
                }
            )
            engine.cache.evict(name)
    finally:
        engine.stop()
    return rows


@dataclass(frozen=True)
class _Run:
    text: str
    finish_reason: str
    ttft_s: float
    decode_s: float  # after the first token
    decoded: int  # tokens after the first


def _timed(engine: Engine, expert: str, chat: bool, max_tokens: int, grammar: str | None) -> _Run:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=grammar)
    if chat:
        request = Request(expert, sampling, messages=(ChatMessage("user", ASK),))
    else:
        request = Request(expert, sampling, prompt=f"{ASK}\n\nJSON:\n")
    started, first_s = time.perf_counter(), None
    for event in engine.stream(request):
        if first_s is None:
            first_s = time.perf_counter() - started
        if event.error is not None:
            raise event.error
        if event.completion is not None:
            done = event.completion
            total_s = time.perf_counter() - started
            return _Run(
                done.text,
                done.finish_reason,
                first_s,
                total_s - first_s,
                done.completion_tokens - 1,
            )
    raise RuntimeError("no completion")


def _summary(runs: list[_Run]) -> dict:
    return {
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "tokens_per_s": statistics.median(
            r.decoded / r.decode_s for r in runs if r.decode_s > 0 and r.decoded
        ),
        "tokens": statistics.median(r.decoded + 1 for r in runs),
    }


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), CITY)
        return True
    except Exception:  # noqa: BLE001 - invalid JSON or schema: the row says so
        return False


def print_speed(rows: list[dict]) -> None:
    print(
        f"{'expert':<22} {'vocab':>7} {'tok/s plain':>12} {'tok/s schema':>13} {'ratio':>6} "
        f"{'ttft plain':>11} {'ttft schema':>12} {'ended/valid':>12}"
    )
    for r in rows:
        p, c = r["plain"], r["constrained"]
        print(
            f"{r['expert']:<22} {r['vocab']:>7} {p['tokens_per_s']:>12.1f} {c['tokens_per_s']:>13.1f} "
            f"{r['tokens_per_s_ratio']:>6.3f} {p['ttft_s']:>11.3f} {c['ttft_s']:>12.3f} "
            f"{r['finished']}/{r['valid_json']} of {r['runs']:<3}"
        )


# ---- BFCL: prompt-only vs native tools ------------------------------------------------------------


def bfcl_rows(args, experts: list[str]) -> list[dict]:
    import httpx

    from coe.eval import toolcall
    from coe.eval.suites import bfcl_items

    items = spread(bfcl_items(), args.bfcl_items)
    config = "experts:\n" + "".join(f"  - name: {n}\n    source: {n}\n" for n in experts)
    config += "router:\n  enabled: false\ncache:\n  max_hot_experts: 2\n"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "coe.yaml").write_text(config)
        server = ServerProcess(Path(tmp) / "coe.yaml", args.home, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url + "/v1", timeout=600) as client:
                for expert in experts:
                    row: dict = {"expert": expert, "items": len(items), "by_set": {}}
                    for mode in ("prompt", "native_auto", "native_required"):
                        right = [_bfcl_one(client, expert, item, mode, toolcall) for item in items]
                        row[mode] = sum(right) / len(items)
                        for item, ok in zip(items, right):
                            counts = (
                                row["by_set"].setdefault(_set_of(item), {}).setdefault(mode, [0, 0])
                            )
                            counts[0] += ok
                            counts[1] += 1
                    rows.append(row)
        finally:
            server.stop()
    return rows


def _set_of(item) -> str:
    return item.reference["id"].rsplit("_", 1)[0]


def spread(items: list, n: int) -> list:
    """``n`` items taken in turn from each BFCL set (simple, multiple, parallel, parallel-multiple),
    in their order, so every kind of call is measured."""
    by_set: dict[str, list] = {}
    for item in items:
        by_set.setdefault(_set_of(item), []).append(item)
    chosen: list = []
    for rank in range(max((len(group) for group in by_set.values()), default=0)):
        chosen += [group[rank] for group in by_set.values() if rank < len(group)]
    return chosen[:n]


def _bfcl_one(client, expert: str, item, mode: str, toolcall) -> bool:
    row = item.reference
    body: dict = {"model": expert, "temperature": 0.0, "max_tokens": item.max_tokens}
    if mode == "prompt":
        body["messages"] = [{"role": m.role, "content": m.content} for m in item.messages]
    else:
        turn = row["question"][0] if row.get("question") else []
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in turn]
        body["tools"] = [
            {
                "type": "function",
                "function": {**f, "parameters": json_schema_of(f.get("parameters"))},
            }
            for f in row["function"]
        ]
        body["tool_choice"] = "required" if mode == "native_required" else "auto"
    response = client.post("/chat/completions", json=body)
    if response.status_code != 200:
        return False
    message = response.json()["choices"][0]["message"]
    if mode == "prompt":
        return toolcall.score_response(row, message.get("content") or "")[0]
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []
    ]
    try:
        return toolcall.match(row, calls)[0]
    except Exception:  # noqa: BLE001 - a call of an unexpected shape is a wrong answer
        return False


_BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def json_schema_of(spec: object) -> dict:
    """A BFCL parameter spec as JSON Schema ("dict" -> object, "float" -> number, "tuple" -> array,
    "any" -> no type)."""
    if not isinstance(spec, dict):
        return {"type": "object", "properties": {}}
    out = {
        k: v
        for k, v in spec.items()
        if k in ("description", "enum", "required", "default", "format")
    }
    kind = spec.get("type")
    if kind is not None:
        mapped = _BFCL_TYPES.get(kind, kind)
        if mapped is not None:
            out["type"] = mapped
    if isinstance(spec.get("properties"), dict):
        out["properties"] = {k: json_schema_of(v) for k, v in spec["properties"].items()}
    if isinstance(spec.get("items"), dict):
        out["items"] = json_schema_of(spec["items"])
    return out


def print_bfcl(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\nBFCL accuracy ({rows[0]['items']} items per expert, through the server):")
    print(f"{'expert':<22} {'prompt-only':>12} {'native auto':>12} {'native required':>16}")
    for r in rows:
        print(
            f"{r['expert']:<22} {r['prompt']:>12.3f} {r['native_auto']:>12.3f} {r['native_required']:>16.3f}"
        )
        for name, modes in r["by_set"].items():
            right = [
                f"{modes[m][0]}/{modes[m][1]}" for m in ("prompt", "native_auto", "native_required")
            ]
            print(f"  {name:<20} {right[0]:>12} {right[1]:>12} {right[2]:>16}")
