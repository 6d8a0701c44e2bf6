"""The command line. The only code that reads argv and the environment."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from coe.config import DEFAULT_YAML, CoEConfig, default_config, from_yaml
from coe.errors import CoEError, ConfigError

DEFAULT_CONFIG_NAME = "coe.yaml"


def coe_home() -> Path:
    return Path(os.environ.get("COE_HOME") or Path.home() / ".cache" / "coe").expanduser()


def load_config(path: str | None) -> CoEConfig:
    """--config FILE, else ./coe.yaml if present, else the built-in default of four packaged
    experts. Every expert's params are checked for the backend that will read it."""
    from coe.models import check_params

    path = path or (DEFAULT_CONFIG_NAME if Path(DEFAULT_CONFIG_NAME).exists() else None)
    config = from_yaml(path) if path else default_config()
    try:
        check_params(config)
    except ConfigError as exc:
        raise ConfigError(
            f"{path}: {exc.message}" if path else exc.message, param=exc.param
        ) from None
    return config


def _human_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    amount = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return ""


def _human_params(num_params: int | None) -> str:
    if num_params is None:
        return "-"
    return f"{num_params / 1e9:.2f}B" if num_params >= 1e9 else f"{num_params / 1e6:.1f}M"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---- commands ----------------------------------------------------------------------------------


def cmd_init(args) -> int:
    target = Path(args.path)
    if target.exists() and not args.force:
        raise CoEError(f"{target} already exists; pass --force to overwrite it")
    target.write_text(DEFAULT_YAML)
    print(f"wrote {target}; start the server with: coe serve --config {target}")
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from coe.server import create_app
    except ImportError:
        raise CoEError("the server needs the 'server' extra: pip install 'coe[server]'") from None
    from coe.engine import Engine

    config = with_env_keys(load_config(args.config))
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    ensure_router(config)
    if args.ray:
        return serve_ray(args, config, host, port)
    engine = Engine.from_config(config, coe_home())
    keys = len(config.server.api_keys)
    print(
        f"coe serving {len(config.experts)} experts ({', '.join(e.name for e in config.experts)}) "
        f"on http://{host}:{port}/v1"
        + (f" ({keys} API key{'s' if keys > 1 else ''} required)" if keys else ""),
        flush=True,
    )
    uvicorn.run(
        create_app(engine),
        host=host,
        port=port,
        log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(config.server.shutdown_grace_s),
    )
    return 0


def serve_ray(args, config: CoEConfig, host: str, port: int) -> int:
    import dataclasses

    from coe.distributed.ray_serve import serve_on_ray

    if args.replicas is not None:
        if args.replicas < 1:
            raise CoEError(f"--replicas: expected an integer >= 1, got {args.replicas}")
        config = dataclasses.replace(
            config, ray=dataclasses.replace(config.ray, replicas=args.replicas)
        )
    serve_on_ray(config, coe_home(), host, port, args.address)
    return 0


def with_env_keys(config: CoEConfig) -> CoEConfig:
    """Add the API keys of COE_API_KEYS (comma-separated) to server.api_keys."""
    import dataclasses

    extra = [k.strip() for k in os.environ.get("COE_API_KEYS", "").split(",") if k.strip()]
    if not extra:
        return config
    keys = tuple(dict.fromkeys([*config.server.api_keys, *extra]))
    return dataclasses.replace(config, server=dataclasses.replace(config.server, api_keys=keys))


def cmd_experts(args) -> int:
    """The experts with their tier and measured footprints: of a running server (--url), or as
    this machine has them on disk."""
    if args.url:
        snapshot = _fetch_experts(args.url)
        experts, sources = snapshot["experts"], {}
    else:
        config = load_config(args.config)
        from coe.server.shapes import expert_json

        experts = [expert_json(s) for s in _states(config)]
        sources = {e.name: e.source for e in config.experts}
    rows = [
        [
            e["name"],
            _human_params(e["num_params"]),
            _human_bytes(e["weight_bytes"]),
            e["backend"],
            e["tier"],
            e["state"],
            _human_bytes(e["host_bytes"] or None),
            _human_bytes(e["device_bytes"] or None),
            "yes" if e["pinned"] else "",
            f"profile of {e['base']}" if e.get("base") else sources.get(e["name"], ""),
        ]
        for e in experts
    ]
    print_table(
        rows,
        [
            "name",
            "params",
            "weights",
            "backend",
            "tier",
            "state",
            "host",
            "device",
            "pinned",
            "source",
        ],
    )
    if args.url:
        _print_cache_summary(snapshot)
    return 0


def _fetch_experts(url: str) -> dict:
    text = _fetch_text(url, "/v1/experts")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"--url: {url} did not answer /v1/experts with JSON ({exc})", param="url"
        ) from None


def _print_cache_summary(snapshot: dict) -> None:
    for name, tier in snapshot["tiers"].items():
        print(
            f"{name} tier: {_human_bytes(tier['used_bytes'])} of {_human_bytes(tier['budget_bytes'])}"
        )
    stats = snapshot["stats"]
    half_life = (
        f" (half-life {snapshot['frequency_half_life']} requests)"
        if snapshot.get("frequency_half_life")
        else ""
    )
    print(
        f"policy {snapshot['policy']}{half_life}: {stats['activations']} activations, {stats['hits']} hot hits, "
        f"{stats['warm_hits']} warm hits, {stats['misses']} misses, {stats['switches']} switches, "
        f"{_human_bytes(stats['bytes_moved']['disk->host'])} read from disk"
    )


def cmd_top(args) -> int:
    """A live view of a running server's /metrics; --once prints one screen and exits."""
    import time

    from coe.server.top import read_samples, render

    before, before_s = None, time.monotonic()
    while True:
        now, now_s = read_samples(_fetch_text(args.url, "/metrics")), time.monotonic()
        screen = render(now, before, now_s - before_s)
        if args.once:
            print(screen)
            return 0
        print("\033[2J\033[H" + f"coe top {args.url}   (Ctrl-C to quit)\n\n" + screen, flush=True)
        before, before_s = now, now_s
        time.sleep(args.interval)


def _fetch_text(url: str, path: str) -> str:
    import urllib.error
    import urllib.request

    endpoint = url.rstrip("/").removesuffix("/v1") + path
    try:
        with urllib.request.urlopen(endpoint, timeout=10) as response:
            return response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"--url: cannot read {endpoint} ({exc})", param="url") from None


def cmd_workload(args) -> int:
    """Write a replayable JSONL trace (for `coe bench serve --trace`)."""
    from coe.bench.workload import generate, save_trace, spec_from_arguments, summarize

    experts = (
        tuple(e.name for e in load_config(args.config).experts)
        if args.model_mode == "expert"
        else ()
    )
    spec = spec_from_arguments(
        args,
        count=args.requests,
        rate_rps=args.rate,
        arrival=args.arrival,
        cv=args.cv,
        zipf_s=args.zipf,
        experts=experts,
        model_mode=args.model_mode,
        max_tokens_median=args.max_tokens_median,
        seed=args.seed,
    )
    items = generate(spec)
    save_trace(items, args.out, spec)
    summary = summarize(items)
    follow_ups = f", {summary['follow_ups']} of them follow-ups" if summary["follow_ups"] else ""
    print(
        f"wrote {args.out}: {summary['num_requests']} requests over {summary['duration_s']:.1f} s{follow_ups}"
    )
    return 0


def cmd_models(args) -> int:
    from coe.models import PACKAGED, ModelStore, describe

    store = ModelStore(coe_home())
    if args.action == "assemble":
        for model_id in args.ids or sorted(PACKAGED):
            path = store.ensure(model_id)
            print(f"{model_id}: {path}", flush=True)
        return 0
    rows = []
    for model_id, model in sorted(PACKAGED.items()):
        state = store.status(model_id)
        info = describe(store.target_path(model)) if state == "ready" else None
        rows.append(
            [
                model_id,
                _human_params(info.num_params if info else None),
                _human_bytes(info.num_bytes if info else None),
                info.architecture if info else "-",
                info.quantization if info else "-",
                "yes" if model.chat_tuned else "no",
                state,
            ]
        )
    print_table(rows, ["id", "params", "bytes", "arch", "quant", "chat", "state"])
    return 0


def cmd_generate(args) -> int:
    from coe.engine import Engine
    from coe.types import ChatMessage, Request, SamplingParams

    config = load_config(args.config)
    engine = Engine.from_config(config, coe_home())
    expert, _ = engine.routing.resolve(args.expert)
    sampling = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    if args.raw:
        request = Request(expert=expert, sampling=sampling, prompt=args.prompt)
    else:
        request = Request(
            expert=expert, sampling=sampling, messages=(ChatMessage("user", args.prompt),)
        )
    try:
        for event in engine.stream(request):
            if event.error is not None:
                raise event.error
            print(event.delta, end="", flush=True)
            if event.completion is not None:
                c = event.completion
                print(
                    f"\n[{expert}: {c.completion_tokens} tokens, finish_reason={c.finish_reason}]",
                    file=sys.stderr,
                )
    finally:
        engine.stop()
    return 0


_LOGGED: dict[str, int] = {}  # the last quarter of each stage written to a log


def _progress(stage: str, done: int, total: int) -> None:
    """A one-line progress bar on a terminal; in logs, a line per quarter."""
    if not sys.stderr.isatty():
        step = 4 * done // total if total else 4
        if step > _LOGGED.get(stage, 0) or done == 1:
            _LOGGED[stage] = step
            print(f"{stage} {done}/{total}", file=sys.stderr, flush=True)
        if done >= total:
            _LOGGED.pop(stage, None)
        return
    width = 30
    filled = int(width * done / total) if total else width
    end = "\n" if done >= total else ""
    print(
        f"\r{stage:<6} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def router_folder(config: CoEConfig) -> Path:
    from coe.router.service import default_artifact_dir

    return (
        Path(config.router.artifact) if config.router.artifact else default_artifact_dir(coe_home())
    )


def ensure_router(config: CoEConfig) -> None:
    """First use: train the default router when no artifact exists yet (a few minutes, offline)."""
    if not config.router.enabled or config.router.artifact:
        return
    from coe.router.train import is_current, train_and_save

    folder = router_folder(config)
    if not is_current(folder):
        print(
            f"coe: no current trained router in {folder}; training the default one now "
            f"(offline, a few minutes)",
            file=sys.stderr,
            flush=True,
        )
        train_and_save(folder, coe_home() / "router" / "cache", progress=_progress)


def build_expert_router(config: CoEConfig, params: dict[str, int | None] | None = None):
    from coe.router.service import load_expert_router

    ensure_router(config)
    if params is None:
        params = {s.name: s.num_params for s in _states(config)}
    return load_expert_router(config.router, coe_home(), params, config.default_expert)


def cmd_router_train(args) -> int:
    from coe.router.train import TrainSettings, format_evaluation, is_current, train_and_save

    config = load_config(args.config)
    out = Path(args.out) if args.out else router_folder(config)
    settings = TrainSettings(
        **{
            k: v
            for k, v in (
                ("epochs", args.epochs),
                ("hidden_size", args.hidden),
                ("tune_layers", args.tune_layers),
            )
            if v is not None
        }
    )
    default_recipe = not args.data and args.precision == "int8" and settings == TrainSettings()
    if args.if_missing and default_recipe and is_current(out):
        print(f"router in {out} is current; nothing to do")
        return 0
    result = train_and_save(
        out,
        coe_home() / "router" / "cache",
        args.data,
        settings,
        config.router.fallback_category,
        _progress,
        args.precision,
    )
    meta = result.head.meta
    print(
        f"trained on {meta.data['train']} prompts in {result.seconds:.0f} s; categories: "
        f"{', '.join(meta.categories)}; temperature {meta.temperature:.3f}; fallback below "
        f"confidence {meta.threshold:.2f} -> {config.router.fallback_category!r}"
    )
    for evaluation in result.evaluations.values():
        print(format_evaluation(evaluation))
    print(f"wrote {out}")
    return 0


def cmd_router_map(args) -> int:
    import dataclasses

    from coe.router.mapping import format_frontier, pareto_frontier
    from coe.router.service import load_score_table, map_problem

    config = load_config(args.config)
    changes = {k: v for k, v in (("scores", args.scores), ("budget_params", args.budget)) if v}
    config = dataclasses.replace(config, router=dataclasses.replace(config.router, **changes))
    params = {s.name: s.num_params for s in _states(config)}
    router = build_expert_router(config, params)
    table = load_score_table(config.router.scores)
    print(f"scores: {table.source}")
    problem = map_problem(
        config.router, router.router.categories, params, table, config.default_expert
    )
    if problem is None:
        print(
            f"no configured expert has scores and a known size: every category goes to "
            f"{config.default_expert}"
        )
    else:
        print("Pareto frontier (average active parameters -> expected score):")
        print(
            format_frontier(
                pareto_frontier(problem.table, problem.params, problem.frequencies, problem.pins)
            )
        )
    budget = config.router.budget_params
    print(f"chosen map ({f'budget {budget:.3g} params' if budget else 'no budget'}):")
    print_table([[c, e] for c, e in router.assignment.items()], ["category", "expert"])
    return 0


def _states(config: CoEConfig):
    from coe.cache import ModelCache
    from coe.models import ModelStore

    return ModelCache(config, ModelStore(coe_home())).states()


def cmd_route(args) -> int:
    config = load_config(args.config)
    router = build_expert_router(config)
    if args.jsonl:
        return _route_jsonl(router)
    if not args.prompt:
        raise CoEError('give a prompt, or --jsonl to read {"prompt": ...} lines from stdin')
    decision, category = router.explain_prompt(args.prompt)
    print_table(
        [[c, f"{p:.3f}", router.assignment.get(c, "")] for c, p in category.ranked()],
        ["category", "probability", "expert"],
    )
    print(
        f"category: {decision.category}  confidence: {decision.confidence:.3f}  "
        f"expert: {decision.expert}"
        + (f"  (fallback: {decision.reason})" if decision.fallback else "")
    )
    print(
        "alternatives: " + ", ".join(f"{c} -> {e} ({p:.3f})" for c, e, p in decision.alternatives)
    )
    return 0


def _route_jsonl(router) -> int:
    """One JSON decision per input line; a bad line gets an error object and the rest go on."""
    failed = 0
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        if not raw.strip():
            continue
        try:
            prompt = _jsonl_prompt(raw, number)
            out = router.route_prompt(prompt).to_dict()
        except CoEError as exc:
            failed += 1
            out = {"line": number, "error": {"message": exc.message, "type": exc.error_type}}
        print(json.dumps(out), flush=True)
    return 1 if failed else 0


def _jsonl_prompt(raw: bytes, number: int) -> str:
    from coe.errors import InvalidRequest

    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"stdin line {number}: not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"stdin line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise InvalidRequest(
            f"stdin line {number}: expected an object with a string field 'prompt'"
        )
    return row["prompt"]


def cmd_bench(args) -> int:
    from coe.bench import run_bench

    args.home = coe_home()
    return run_bench(args)


def cmd_eval(args) -> int:
    from coe.eval.command import EvalSettings, evaluate

    config = load_config(args.config)
    ensure_router(config)
    settings = EvalSettings(
        out=Path(args.out),
        cache_dir=Path(args.cache) if args.cache else coe_home() / "eval" / "cache",
        suite=args.suite,
        experts=tuple(e for e in (args.experts or "").split(",") if e),
        limit=args.limit,
        url=args.url,
        api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
        judge_url=args.judge,
        judge_model=args.judge_model,
        judge_api_key=os.environ.get(args.judge_key_env) if args.judge_key_env else None,
        choice_mode=args.choice_mode,
        cached_only=args.cached_only,
    )
    report, paths = evaluate(config, coe_home(), settings, progress=_progress)
    rows = sorted(report["points"], key=lambda p: p["avg_active_params"])
    print_table(
        [
            [
                p["name"] + (" *" if p.get("detail", {}).get("chosen") else ""),
                p["kind"],
                f"{p['score']:.3f}",
                f"±{p['ci95']:.3f}",
                _human_params(int(p["avg_active_params"])),
            ]
            for p in rows
        ],
        ["policy", "kind", "score", "95%", "avg active"],
    )
    for suite, why in report["skipped"].items():
        print(f"skipped {suite}: {why}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    print(
        f"{report['run']['items']} items, {report['run']['results_computed']} results computed, "
        f"{report['run']['results_cached']} from the cache, "
        + (
            f"{report['run']['results_missing']} not cached (left out: --cached-only), "
            if report["run"].get("results_missing")
            else ""
        )
        + f"{report['run']['seconds']:.0f} s (* = the map chosen for the configured budget)"
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# ---- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from coe.bench.workload import add_prompt_arguments

    parser = argparse.ArgumentParser(
        prog="coe",
        description="Composition of Experts: many LLMs behind one OpenAI-compatible endpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a commented default config")
    p.add_argument("path", nargs="?", default=DEFAULT_CONFIG_NAME)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument(
        "--ray", action="store_true", help="deploy on Ray Serve: an ingress and expert replicas"
    )
    p.add_argument(
        "--address",
        help="with --ray: the Ray cluster (ray://HOST:10001 or HOST:6379; "
        "default: start a local one)",
    )
    p.add_argument(
        "--replicas", type=int, help="with --ray: expert replicas (default: ray.replicas)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("experts", help="list the configured experts, their tier and footprint")
    p.add_argument("--config")
    p.add_argument("--url", help="a running server (http://HOST:PORT) to show its cache instead")
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser(
        "top", help="live view of a running server's metrics (queues, tiers, tokens/s)"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (http://HOST:PORT)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one screen and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser(
        "workload", help="write a replayable request trace (JSONL) from packaged datasets"
    )
    p.add_argument("--out", default="trace.jsonl")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=1.0, help="mean arrival rate (requests/s)")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument(
        "--cv", type=float, default=1.0, help="burstiness of gamma arrivals (>1: bursts)"
    )
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the category mix")
    p.add_argument("--max-tokens-median", type=float, default=48.0)
    add_prompt_arguments(p)
    p.add_argument(
        "--model-mode",
        choices=("coe", "expert"),
        default="coe",
        help="coe: every request asks for model 'coe'; expert: categories go to the config's experts",
    )
    p.add_argument("--config")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_workload)

    p = sub.add_parser("models", help="packaged models: list, or assemble and verify")
    p.add_argument("action", nargs="?", default="list", choices=["list", "assemble"])
    p.add_argument("ids", nargs="*")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate with one expert, streaming to the terminal")
    p.add_argument("prompt")
    p.add_argument("--expert", required=True, help="an expert name, or 'coe'")
    p.add_argument("--config")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("router", help="train the router or show the category-to-expert map")
    router_sub = p.add_subparsers(dest="router_command", required=True)
    p = router_sub.add_parser("train", help="train the router on packaged datasets or your own")
    p.add_argument("--data", help="labelled prompts: JSONL with prompt+category, or CSV")
    p.add_argument(
        "--out",
        help="artifact folder (default: the config's router.artifact or $COE_HOME/router/default)",
    )
    p.add_argument("--config")
    p.add_argument("--epochs", type=int)
    p.add_argument("--hidden", type=int, help="hidden units of the head (0: softmax regression)")
    p.add_argument(
        "--tune-layers",
        type=int,
        choices=range(7),
        metavar="N",
        help="tune the encoder's top N of 6 layers on the data before fitting the head "
        "(default 2; 0: the packaged encoder as it is)",
    )
    p.add_argument(
        "--precision",
        default="int8",
        choices=["int8", "float32"],
        help="encoder precision (int8: per-row int8 linears, the default)",
    )
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when a current default router is already there",
    )
    p.set_defaults(func=cmd_router_train)
    p = router_sub.add_parser("map", help="print the Pareto frontier and the chosen map")
    p.add_argument("--config")
    p.add_argument("--scores", help="score table JSON (category -> expert -> score)")
    p.add_argument("--budget", help="average active parameters allowed: 1B, 500M, 1e9")
    p.set_defaults(func=cmd_router_map)

    p = sub.add_parser("route", help="route a prompt: category probabilities and the chosen expert")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--jsonl", action="store_true", help='read {"prompt": ...} lines on stdin')
    p.add_argument("--config")
    p.set_defaults(func=cmd_route)

    from coe.bench import add_bench_parser

    p = sub.add_parser(
        "eval",
        help="score experts on packaged benchmarks and compare the routed CoE "
        "with every single expert (report.md/json, quality.png)",
    )
    p.add_argument(
        "--suite",
        default="quick",
        help="a set: quick (default, under 20 min), standard (the "
        "packaged score table), all; or suite names separated by commas: "
        + ", ".join(_suite_names()),
    )
    p.add_argument("--out", default="eval-report", help="folder for the report")
    p.add_argument("--experts", help="comma-separated expert names (default: all configured)")
    p.add_argument("--limit", type=int, help="items per suite")
    p.add_argument("--config")
    p.add_argument(
        "--url", help="evaluate the experts of a running OpenAI-compatible server instead"
    )
    p.add_argument("--api-key-env", help="environment variable holding the --url server's API key")
    p.add_argument(
        "--judge", help="OpenAI-compatible judge (http://HOST:PORT) for chat suites (MT-Bench)"
    )
    p.add_argument("--judge-model", default="coe", help="the judge's model name")
    p.add_argument("--judge-key-env", help="environment variable holding the judge's API key")
    p.add_argument(
        "--choice-mode",
        default="logprob",
        choices=["logprob", "letter"],
        help="multiple choice by option-letter log-probabilities (in-process) or generated letter",
    )
    p.add_argument("--cache", help="result cache folder (default: $COE_HOME/eval/cache)")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="analyse the results already cached, running no expert (items some expert lacks "
        "are left out, and the report says how many)",
    )
    p.set_defaults(func=cmd_eval)

    add_bench_parser(sub).set_defaults(func=cmd_bench)
    return parser


def _suite_names() -> list[str]:
    from coe.eval.suites import SUITES

    return list(SUITES)


def entry() -> int:
    """The ``coe`` command. It re-executes itself once with glibc's malloc asking for transparent
    huge pages (``COE_HUGE_PAGES=0`` keeps the process as it is): a llama.cpp context, whose KV
    cache is fresh memory, builds 2-2.5x faster, and every expert switch builds one."""
    from coe.backends.memory import huge_page_environment

    environ = huge_page_environment(dict(os.environ))
    if environ is not None:
        try:
            os.execve(sys.executable, [sys.executable, "-m", "coe", *sys.argv[1:]], environ)
        except OSError:
            pass  # run as we are
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CoEError as exc:
        print(f"coe: error: {exc.message}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as exc:  # a full disk, a file that went away, a port taken: the message, no trace
        print(f"coe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(entry())
