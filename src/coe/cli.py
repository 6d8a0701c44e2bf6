"""The command line. The only code that reads argv and the environment."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coe.config import DEFAULT_YAML, CoEConfig, default_config, from_yaml
from coe.errors import CoEError

DEFAULT_CONFIG_NAME = "coe.yaml"


def coe_home() -> Path:
    return Path(os.environ.get("COE_HOME") or Path.home() / ".cache" / "coe").expanduser()


def load_config(path: str | None) -> CoEConfig:
    """--config FILE, else ./coe.yaml if present, else the built-in default of four packaged experts."""
    if path:
        return from_yaml(path)
    if Path(DEFAULT_CONFIG_NAME).exists():
        return from_yaml(DEFAULT_CONFIG_NAME)
    return default_config()


def _human_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
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

    config = load_config(args.config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    engine = Engine.from_config(config, coe_home())
    print(f"coe serving {len(config.experts)} experts ({', '.join(e.name for e in config.experts)}) "
          f"on http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level=args.log_level)
    return 0


def cmd_experts(args) -> int:
    from coe.cache import ModelCache
    from coe.models import ModelStore

    config = load_config(args.config)
    states = ModelCache(config, ModelStore(coe_home())).states()
    rows = [[s.name, _human_params(s.num_params), _human_bytes(s.num_bytes), s.backend, s.state,
             config.expert(s.name).source] for s in states]
    print_table(rows, ["name", "params", "bytes", "backend", "state", "source"])
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
        rows.append([model_id, _human_params(info.num_params if info else None),
                     _human_bytes(info.num_bytes if info else None), info.architecture if info else "-",
                     info.quantization if info else "-", "yes" if model.chat_tuned else "no", state])
    print_table(rows, ["id", "params", "bytes", "arch", "quant", "chat", "state"])
    return 0


def cmd_generate(args) -> int:
    from coe.engine import Engine
    from coe.types import ChatMessage, Request, SamplingParams

    config = load_config(args.config)
    engine = Engine.from_config(config, coe_home())
    expert, _ = engine.resolve(args.expert)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.raw:
        request = Request(expert=expert, sampling=sampling, prompt=args.prompt)
    else:
        request = Request(expert=expert, sampling=sampling, messages=(ChatMessage("user", args.prompt),))
    try:
        for event in engine.stream(request):
            if event.error is not None:
                raise event.error
            print(event.delta, end="", flush=True)
            if event.completion is not None:
                c = event.completion
                print(f"\n[{expert}: {c.completion_tokens} tokens, finish_reason={c.finish_reason}]",
                      file=sys.stderr)
    finally:
        engine.stop()
    return 0


def cmd_bench(args) -> int:
    from coe.bench import run_bench

    args.home = coe_home()
    return run_bench(args)


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coe", description="Composition of Experts: many LLMs behind one "
                                     "OpenAI-compatible endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a commented default config")
    p.add_argument("path", nargs="?", default=DEFAULT_CONFIG_NAME)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("experts", help="list the configured experts")
    p.add_argument("--config")
    p.set_defaults(func=cmd_experts)

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

    from coe.bench import add_bench_parser
    add_bench_parser(sub).set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CoEError as exc:
        print(f"coe: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
