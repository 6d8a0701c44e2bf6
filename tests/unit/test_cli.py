import re
import textwrap

import pytest

from fakes import serve_text

from coe.cli import main
from coe.config import DEFAULT_YAML, default_config, from_yaml
from coe.engine import Engine
from coe.types import Request, SamplingParams


@pytest.fixture(autouse=True)
def coe_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("COE_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # no stray ./coe.yaml
    return home


@pytest.fixture
def tiny_config(tmp_path, tiny_checkpoint):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        experts:
          - name: tiny
            source: {tiny_checkpoint}
            backend: torch_hf
            description: tiny test expert
        cache:
          host_bytes: 64MB
          device_bytes: 64MB
        """))
    return path


def test_init_writes_the_template(tmp_path, capsys):
    target = tmp_path / "new.yaml"
    assert main(["init", str(target)]) == 0
    assert target.read_text() == DEFAULT_YAML
    assert from_yaml(target) == default_config()
    assert f"wrote {target}" in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    target.write_text("# my config\n")
    assert main(["init", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coe: error:") and "--force" in err and str(target) in err
    assert target.read_text() == "# my config\n"
    assert main(["init", str(target), "--force"]) == 0
    assert target.read_text() == DEFAULT_YAML


def test_init_default_path_is_coe_yaml_in_the_working_directory(tmp_path):
    assert main(["init"]) == 0
    assert (tmp_path / "coe.yaml").read_text() == DEFAULT_YAML


def test_experts_table(tiny_config, tiny_checkpoint, capsys):
    assert main(["experts", "--config", str(tiny_config)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "params", "weights", "backend", "tier", "state", "host", "device", "pinned",
                              "source"]
    assert row.index("disk") == header.index("tier")  # the tier column lines up with its header
    cells = row.split()
    assert cells[0] == "tiny"
    assert re.fullmatch(r"\d+\.\dM", cells[1])
    size_kb = (tiny_checkpoint / "model.safetensors").stat().st_size / 1000
    # nothing is loaded by `coe experts`: on disk, no host or device bytes, not pinned (empty cell)
    assert cells[2:] == [f"{size_kb:.1f}", "KB", "torch_hf", "disk", "ready", "-", "-", str(tiny_checkpoint)]


def serve_json(payload: dict):
    """A one-route HTTP server on a free port answering GET /v1/experts with ``payload``."""
    import json

    return serve_text("/v1/experts", json.dumps(payload), "application/json")


def test_experts_url_shows_a_running_servers_cache(tiny_config, capsys):
    from coe.cache import ModelCache
    from coe.models import ModelStore

    cache = ModelCache(from_yaml(tiny_config), ModelStore("unused"))
    cache.activate("tiny")
    from coe.server.shapes import snapshot_json

    snapshot = snapshot_json(cache.snapshot())
    cache.close()
    server = serve_json(snapshot)
    try:
        for url in (f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{server.server_port}/v1/"):
            assert main(["experts", "--url", url]) == 0
            lines = capsys.readouterr().out.splitlines()
            header, row = lines[0].split(), lines[1].split()
            assert header[:6] == ["name", "params", "weights", "backend", "tier", "state"]
            assert row[0] == "tiny" and row[5:7] == ["device", "hot"]  # weights take two cells: "68.2 KB"
            assert "device tier:" in lines[2] and "of 64.0 MB" in lines[2]
            assert lines[3].startswith("host tier:") and "of 64.0 MB" in lines[3]
            assert lines[4].startswith("policy lrfu (half-life 50 requests): 1 activations, 0 hot hits, 0 warm hits, 1 misses")
    finally:
        server.shutdown()


def test_experts_url_without_a_server_is_a_clear_error(capsys):
    assert main(["experts", "--url", "http://127.0.0.1:1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("coe: error: --url: cannot read http://127.0.0.1:1/v1/experts")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_experts_url_that_is_not_a_coe_server(capsys):
    server = serve_json({})
    try:
        assert main(["experts", "--url", f"http://127.0.0.1:{server.server_port}/elsewhere"]) == 2
    finally:
        server.shutdown()
    assert "--url: cannot read" in capsys.readouterr().err


def test_experts_uses_coe_yaml_from_the_working_directory(tmp_path, tiny_config, capsys):
    (tmp_path / "coe.yaml").write_text(tiny_config.read_text())
    assert main(["experts"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("tiny ")


def test_generate_prints_the_expert_output(tiny_config, capsys):
    assert main(["generate", "Once upon", "--expert", "tiny", "--config", str(tiny_config),
                 "--raw", "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    match = re.search(r"\[tiny: (\d+) tokens, finish_reason=(\w+)\]", err)
    assert match, err
    assert match.group(2) in ("length", "stop")
    assert int(match.group(1)) == 5 or match.group(2) == "stop"

    engine = Engine.from_config(from_yaml(tiny_config), "unused")
    events = list(engine.stream(Request("tiny", SamplingParams(max_tokens=5, temperature=0.0), prompt="Once upon")))
    assert out == events[-1].completion.text  # greedy by default: exactly the model's continuation
    engine.stop()


def test_generate_through_the_routed_model(tiny_config, capsys):
    assert main(["generate", "hi", "--expert", "coe", "--config", str(tiny_config), "--max-tokens", "3"]) == 0
    assert "[tiny: " in capsys.readouterr().err


def test_generate_with_an_unknown_expert(tiny_config, capsys):
    assert main(["generate", "hi", "--expert", "nope", "--config", str(tiny_config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coe: error:") and "'nope'" in err


def test_generate_error_from_the_engine_is_reported(tmp_path, capsys):
    config = tmp_path / "bad-source.yaml"
    config.write_text(f"experts:\n  - name: gone\n    source: {tmp_path / 'gone'}\n")
    assert main(["generate", "hi", "--expert", "gone", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coe: error: expert gone:") and "Traceback" not in err


def test_bad_config_names_file_and_field_without_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("experts:\n  - name: a\n    source: /x\n    backend: bogus\n")
    assert main(["experts", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"coe: error: {config}: experts[0].backend: expected one of")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(["experts", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: cannot read config" in capsys.readouterr().err


def test_models_list_without_installed_packages(capsys, monkeypatch):
    import coe.models.catalog as catalog

    def not_installed(part):
        raise catalog.ModelNotAvailable(f"package {part.dist!r} is not installed")

    monkeypatch.setattr(catalog, "locate_part", not_installed)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "params", "bytes", "arch", "quant", "chat", "state"]
    assert {line.split()[0] for line in lines[1:]} == set(catalog.PACKAGED)
    assert all(line.endswith("not installed") for line in lines[1:])


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fly"])
    assert info.value.code == 2


def test_workload_in_expert_mode_sends_requests_to_the_config_experts(tmp_path, capsys):
    from coe.bench.workload import read_trace

    config = tmp_path / "two.yaml"
    config.write_text("experts:\n  - name: x\n    source: /x\n  - name: y\n    source: /y\n")
    out = tmp_path / "trace.jsonl"
    assert main(["workload", "--out", str(out), "--requests", "20", "--rate", "4", "--seed", "3",
                 "--model-mode", "expert", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 20 requests over ")
    spec, items = read_trace(out)
    assert (spec.count, spec.rate_rps, spec.seed, spec.experts) == (20, 4.0, 3, ("x", "y"))
    assert {item.model for item in items} <= {"x", "y"} and len(items) == 20


def test_workload_with_follow_ups_says_how_many(tmp_path, capsys):
    from coe.bench.workload import read_trace

    out = tmp_path / "trace.jsonl"
    assert main(["workload", "--out", str(out), "--requests", "6", "--rate", "4", "--seed", "3",
                 "--follow-ups", "1", "--think-s", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", 1 of them follow-ups")
    spec, items = read_trace(out)
    assert (spec.follow_up_share, spec.think_s_mean) == (1.0, 2.0)
    assert len(items) == 7 and items[6].after is not None


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "coe.yaml"  # its parent is a file: the write fails
    assert main(["init", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("coe: error: ") and str(target) in err and "Traceback" not in err
