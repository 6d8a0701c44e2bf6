import textwrap

import pytest

from coe.config import (DEFAULT_YAML, CacheConfig, CoEConfig, ExpertConfig, RouterConfig, SchedulerConfig,
                        ServerConfig, default_config, from_yaml, parse_bytes)
from coe.errors import ConfigError

GOOD_EXPERTS = """\
experts:
  - name: a
    source: /models/a
  - name: b
    source: /models/b
"""


def write(tmp_path, text: str, name: str = "coe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_yaml(path)
    return info.value


def test_default_config_has_the_four_packaged_experts():
    config = default_config()
    assert [e.name for e in config.experts] == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
                                                "qwen2.5-coder-1.5b"]
    assert all(e.backend == "auto" and e.source == e.name for e in config.experts)
    assert config.default_expert == "smollm2-135m"
    assert config.cache == CacheConfig(device_bytes=None, host_bytes=None, policy="lrfu", prefetch="host", pins=())
    assert config.scheduler.max_batch_size == 8
    assert config.server.port == 8000


def test_init_template_parses_to_exactly_the_default_config(tmp_path):
    assert from_yaml(write(tmp_path, DEFAULT_YAML)) == default_config()


def test_minimal_yaml_fills_defaults_and_default_expert_is_the_first(tmp_path):
    config = from_yaml(write(tmp_path, GOOD_EXPERTS + "cache:\n  host_bytes: 512MB\n"))
    assert config.default_expert == "a"
    assert config.expert("b").source == "/models/b"
    assert config.cache.host_bytes == 512 * 10**6
    assert config.cache.device_bytes is None  # derived from free memory at start-up
    assert config.cache.policy == "lrfu" and config.cache.prefetch == "host" and config.cache.pins == ()
    assert config.server == ServerConfig()


def test_expert_params_are_kept(tmp_path):
    config = from_yaml(write(tmp_path, """\
        experts:
          - name: t
            source: /x
            backend: torch_hf
            params: {n_ctx: 64, dtype: bfloat16}
        """))
    assert config.expert("t").params == {"n_ctx": 64, "dtype": "bfloat16"}
    assert config.expert("t").backend == "torch_hf"


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    error = config_error(path)
    assert str(path) in error.message
    assert "cannot read" in error.message


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "experts: [\n  - name: a\n")
    error = config_error(path)
    assert str(path) in error.message
    assert "not valid YAML" in error.message


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- just\n- a list\n")
    assert str(path) in config_error(path).message


@pytest.mark.parametrize("text, field", [
    (GOOD_EXPERTS + "scheduler:\n  max_batch_size: 0\n", "scheduler.max_batch_size"),
    (GOOD_EXPERTS + "scheduler:\n  max_queue: true\n", "scheduler.max_queue"),
    (GOOD_EXPERTS + "scheduler:\n  policy: lifo\n", "scheduler.policy"),
    (GOOD_EXPERTS + "scheduler:\n  max_wait_ms: -1\n", "scheduler.max_wait_ms"),
    (GOOD_EXPERTS + "scheduler:\n  max_wait_ms: soon\n", "scheduler.max_wait_ms"),
    (GOOD_EXPERTS + "scheduler:\n  max_queue_per_expert: 0\n", "scheduler.max_queue_per_expert"),
    (GOOD_EXPERTS + "scheduler:\n  lookahead: gpu\n", "scheduler.lookahead"),
    (GOOD_EXPERTS + "scheduler:\n  lookahead: false\n", "scheduler.lookahead"),
    (GOOD_EXPERTS + "scheduler:\n  switch_tolerance: -0.1\n", "scheduler.switch_tolerance"),
    (GOOD_EXPERTS + "scheduler:\n  max_wait: 10\n", "scheduler.max_wait"),
    (GOOD_EXPERTS + "cache:\n  max_hot_experts: 0\n", "cache.max_hot_experts"),
    (GOOD_EXPERTS + "cache:\n  max_hot_experts: 1.5\n", "cache.max_hot_experts"),
    (GOOD_EXPERTS + "cache:\n  keep_warm: 1\n", "cache.keep_warm"),
    (GOOD_EXPERTS + "cache:\n  keep_warm: sometimes\n", "cache.keep_warm"),
    (GOOD_EXPERTS + "server:\n  request_timeout_s: 0\n", "server.request_timeout_s"),
    (GOOD_EXPERTS + "server:\n  request_timeout_s: forever\n", "server.request_timeout_s"),
    (GOOD_EXPERTS + "server:\n  shutdown_grace_s: -5\n", "server.shutdown_grace_s"),
    (GOOD_EXPERTS.replace("source: /models/b", "source: /models/b\n    backend: bogus"), "experts[1].backend"),
    (GOOD_EXPERTS + "cache:\n  host_bytes: lots\n", "cache.host_bytes"),
    (GOOD_EXPERTS + "cache:\n  host_bytes: -1\n", "cache.host_bytes"),
    (GOOD_EXPERTS + "cache:\n  device_bytes: 2 apples\n", "cache.device_bytes"),
    (GOOD_EXPERTS + "cache:\n  resident_bytes: 4GiB\n", "cache.resident_bytes"),
    (GOOD_EXPERTS + "cache:\n  policy: fifo\n", "cache.policy"),
    (GOOD_EXPERTS + "cache:\n  prefetch: gpu\n", "cache.prefetch"),
    (GOOD_EXPERTS + "cache:\n  prefetch: false\n", "cache.prefetch"),
    (GOOD_EXPERTS + "cache:\n  pins: a\n", "cache.pins"),
    (GOOD_EXPERTS + "cache:\n  pins: [a, 3]\n", "cache.pins"),
    (GOOD_EXPERTS + "cache:\n  pins: [zzz]\n", "cache.pins[0]"),
    (GOOD_EXPERTS + "cache:\n  pins: [a, zzz]\n", "cache.pins[1]"),
    (GOOD_EXPERTS + "server:\n  port: 70000\n", "server.port"),
    (GOOD_EXPERTS + "server:\n  port: true\n", "server.port"),
    (GOOD_EXPERTS + "server:\n  max_tokens_limit: many\n", "server.max_tokens_limit"),
    (GOOD_EXPERTS.replace("source: /models/a", "source: /models/a\n    params: [1, 2]"), "experts[0].params"),
    (GOOD_EXPERTS.replace("name: a", "name: coe"), "experts[0].name"),
    (GOOD_EXPERTS.replace("name: a", "name: 'has space'"), "experts[0].name"),
    (GOOD_EXPERTS.replace("name: a", 'name: "a\\n"'), "experts[0].name"),
    (GOOD_EXPERTS.replace("    source: /models/a\n", ""), "experts[0].source"),
    (GOOD_EXPERTS.replace("name: b", "name: a"), "experts"),
    (GOOD_EXPERTS + "router:\n  default_expert: zzz\n", "router.default_expert"),
    (GOOD_EXPERTS + "colour: blue\n", "colour"),
    (GOOD_EXPERTS + "server:\n  hots: 0.0.0.0\n", "server.hots"),
    (GOOD_EXPERTS.replace("source: /models/a", "source: /models/a\n    sorce: x"), "experts[0].sorce"),
    (GOOD_EXPERTS + "router: [1]\n", "router"),
    ("experts: {}\n", "experts"),
    ("experts: []\n", "experts"),
    ("experts:\n  - just-a-string\n", "experts[0]"),
])
def test_errors_name_the_file_and_the_field(tmp_path, text, field):
    path = write(tmp_path, text)
    error = config_error(path)
    assert error.message.startswith(f"{path}: {field}"), error.message
    assert error.param == field


def test_unknown_field_lists_the_known_ones(tmp_path):
    message = config_error(write(tmp_path, GOOD_EXPERTS + "server:\n  hots: x\n")).message
    assert "unknown field" in message and "host" in message


def test_duplicate_names_are_named(tmp_path):
    message = config_error(write(tmp_path, GOOD_EXPERTS.replace("name: b", "name: a"))).message
    assert "unique" in message and "'a'" in message


def test_dataclasses_validate_without_yaml():
    with pytest.raises(ConfigError, match="backend"):
        ExpertConfig("x", "/y", backend="vllm")
    with pytest.raises(ConfigError, match="router.default_expert"):
        CoEConfig(experts=(ExpertConfig("x", "/y"),), router=RouterConfig(default_expert="z"))
    assert CacheConfig(host_bytes="1KiB").host_bytes == 1024
    assert CacheConfig(device_bytes="2KB").device_bytes == 2000
    with pytest.raises(ConfigError, match="cache.pins\\[0\\]: expected one of x, got 'z'"):
        CoEConfig(experts=(ExpertConfig("x", "/y"),), cache=CacheConfig(pins=("z",)))


def test_cache_section(tmp_path):
    config = from_yaml(write(tmp_path, GOOD_EXPERTS + "cache:\n  device_bytes: 1GiB\n  host_bytes: 6GiB\n"
                                                      "  policy: lru\n  prefetch: device\n  pins: [b]\n"))
    assert config.cache == CacheConfig(device_bytes=2**30, host_bytes=6 * 2**30, policy="lru", prefetch="device",
                                       pins=("b",))
    assert from_yaml(write(tmp_path, GOOD_EXPERTS + "cache:\n  prefetch: none\n", "b.yaml")).cache.prefetch == "none"


def test_unknown_cache_pin_names_the_field_and_the_experts(tmp_path):
    error = config_error(write(tmp_path, GOOD_EXPERTS + "cache:\n  pins: [a, nope]\n"))
    assert error.param == "cache.pins[1]"
    assert "one of a, b" in error.message and "'nope'" in error.message


def test_the_old_resident_bytes_field_is_an_unknown_field(tmp_path):
    error = config_error(write(tmp_path, GOOD_EXPERTS + "cache:\n  resident_bytes: 4GiB\n"))
    assert "unknown field" in error.message
    assert "host_bytes" in error.message and "device_bytes" in error.message


@pytest.mark.parametrize("value, expected", [
    ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5KiB", 1536), ("10 kb", 10_000), ("7", 7),
    ("2tib", 2 * 2**40), (123, 123), (0, 0),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value, "f") == expected


@pytest.mark.parametrize("value", ["lots", "4 GiBs", "-3MB", "", True, -1, None, [1]])
def test_parse_bytes_rejects(value):
    with pytest.raises(ConfigError, match="^f: "):
        parse_bytes(value, "f")


def test_scheduler_cache_and_server_sections(tmp_path):
    config = from_yaml(write(tmp_path, GOOD_EXPERTS + textwrap.dedent("""\
        scheduler:
          policy: fifo
          max_wait_ms: 0
          max_queue_per_expert: 3
          lookahead: none
          switch_tolerance: 0.05
        cache:
          max_hot_experts: 1
          keep_warm: false
        server:
          request_timeout_s: 2.5
          shutdown_grace_s: 1
        """)))
    assert config.scheduler == SchedulerConfig(policy="fifo", max_wait_ms=0, max_queue_per_expert=3,
                                               lookahead="none", switch_tolerance=0.05)
    assert config.cache.max_hot_experts == 1 and config.cache.keep_warm is False
    assert (config.server.request_timeout_s, config.server.shutdown_grace_s) == (2.5, 1)


@pytest.mark.parametrize("build, field", [
    (lambda: SchedulerConfig(policy="lifo"), "policy"),
    (lambda: SchedulerConfig(max_wait_ms=-1), "max_wait_ms"),
    (lambda: SchedulerConfig(max_wait_ms=True), "max_wait_ms"),
    (lambda: SchedulerConfig(lookahead="gpu"), "lookahead"),
    (lambda: SchedulerConfig(max_queue_per_expert=0), "max_queue_per_expert"),
    (lambda: SchedulerConfig(switch_tolerance=-1), "switch_tolerance"),
    (lambda: CacheConfig(max_hot_experts=0), "max_hot_experts"),
    (lambda: CacheConfig(keep_warm="no"), "keep_warm"),
    (lambda: CacheConfig(frequency_half_life="fast"), "frequency_half_life"),
    (lambda: CacheConfig(frequency_half_life=0), "frequency_half_life"),
    (lambda: ServerConfig(request_timeout_s=0), "request_timeout_s"),
    (lambda: ServerConfig(shutdown_grace_s=0), "shutdown_grace_s"),
])
def test_new_fields_validate_without_yaml(build, field):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.message.startswith(f"{field}: expected")
    assert info.value.param == field


def test_frequency_half_life_is_auto_by_default_or_a_number_of_requests():
    assert CacheConfig().frequency_half_life == "auto"
    assert CacheConfig(frequency_half_life=64).frequency_half_life == 64


def test_the_default_yaml_spells_out_every_new_field():
    for name in ("policy", "max_wait_ms", "max_queue_per_expert", "lookahead", "switch_tolerance",
                 "max_hot_experts", "keep_warm", "request_timeout_s", "shutdown_grace_s", "api_keys",
                 "public_paths", "rate_limit_per_minute", "frequency_half_life"):
        assert f"\n  {name}: " in DEFAULT_YAML, name


# ---- expert params, per backend --------------------------------------------------------------

def expert_yaml(source: str, params: str, backend: str | None = None) -> str:
    line = f"    backend: {backend}\n" if backend else ""
    return f"experts:\n  - name: x\n    source: {source}\n{line}    params: {params}\n"


@pytest.mark.parametrize("params, message", [
    ("{n_ctxx: 8192}", "experts[0].params.n_ctxx: unknown field (expected one of cache_prompt, isolate, max_sequences"),
    ("{isolate: 1}", "experts[0].params.isolate: expected true or false, got 1"),
    ("{n_ctx: big}", "experts[0].params.n_ctx: expected an integer (or null), got 'big'"),
    ("{repack: 1}", "experts[0].params.repack: expected true or false, got 1"),
    ("{min_p: 2}", "experts[0].params.min_p: expected a number between 0 and 1, got 2"),
    ("{dtype: bfloat16}", "experts[0].params.dtype: unknown field"),  # a torch key on a llama.cpp expert
])
def test_a_bad_llama_cpp_param_names_the_file_and_the_field(tmp_path, params, message):
    path = write(tmp_path, expert_yaml("/m/x.gguf", params, backend="llama_cpp"))
    error = config_error(path)
    assert error.message.startswith(f"{path}: ") and message in error.message


@pytest.mark.parametrize("params, message", [
    ("{n_ctxx: 8192}", "experts[0].params.n_ctxx: unknown field (expected one of device, dtype"),
    ("{dtype: int8}", "experts[0].params.dtype: expected one of float32, bfloat16, float16, got 'int8'"),
    ("{max_sequences: '8'}", "experts[0].params.max_sequences: expected an integer, got '8'"),
    ("{device: tpu}", "experts[0].params.device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ("{repack: true}", "experts[0].params.repack: unknown field"),  # a llama.cpp key on a torch expert
    ("{isolate: 2}", "experts[0].params.isolate: expected true or false, got 2"),
])
def test_a_bad_torch_param_names_the_file_and_the_field(tmp_path, params, message):
    path = write(tmp_path, expert_yaml("/m/x", params, backend="torch_hf"))
    error = config_error(path)
    assert str(path) in error.message and message in error.message


def test_auto_experts_are_checked_for_the_backend_their_source_resolves_to(tmp_path):
    """``backend: auto``: keys no backend knows fail when the file is read; keys of the other
    backend fail once the source is known (a packaged model is GGUF), in `coe serve`'s loader."""
    from coe.cli import load_config

    error = config_error(write(tmp_path, expert_yaml("smollm2-135m", "{n_ctxx: 1}")))
    assert "experts[0].params.n_ctxx: unknown field" in error.message
    path = write(tmp_path, expert_yaml("smollm2-135m", "{dtype: bfloat16}"))
    assert from_yaml(path).expert("x").params == {"dtype": "bfloat16"}  # some backend takes it
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.message.startswith(f"{path}: experts[0].params.dtype: unknown field")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"experts\[0\]\.params\.repack: unknown field"):
        load_config(str(write(tmp_path, expert_yaml(str(folder), "{repack: true}"))))
    assert load_config(str(write(tmp_path, expert_yaml(str(folder), "{dtype: bfloat16}")))).expert("x").backend == "auto"


def test_experts_dir_serves_every_gguf_in_a_folder_by_its_file_name(tmp_path):
    from coe.config import from_dict, from_yaml

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("qwen2.5-coder-1.5b-q4", "gemma", "mmproj-gemma", "notes"):
        (folder / f"{name}.gguf" if name != "notes" else folder / "notes.txt").write_bytes(b"x")
    config = tmp_path / "coe.yaml"
    config.write_text("experts_dir: models\nexperts:\n  - {name: gemma, source: smollm2-135m}\n")
    experts = {e.name: e.source for e in from_yaml(config).experts}  # relative to the config file
    assert experts == {"gemma": "smollm2-135m", "qwen2.5-coder-1.5b-q4": str(folder / "qwen2.5-coder-1.5b-q4.gguf")}
    assert [e.name for e in from_dict({"experts_dir": [str(folder)]}).experts] == ["gemma", "qwen2.5-coder-1.5b-q4"]
    for bad, message in ((3, "a folder or a list"), ([], "a folder or a list"), (str(tmp_path / "no"), "is not a folder")):
        with pytest.raises(ConfigError, match=message) as error:
            from_dict({"experts_dir": bad})
        assert error.value.param == "experts_dir"
    with pytest.raises(ConfigError, match="at least one expert"):
        from_dict({"experts_dir": str(tmp_path)})  # a folder without GGUFs
