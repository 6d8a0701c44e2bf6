"""LoRA adapters end to end: a LoRA trained with peft on a synthetic base, converted to a GGUF
LoRA with the gguf package's writer (llama.cpp's layout), applied by llama.cpp over the base's
GGUF; its logits equal the merged model's. Adapter-bearing experts of both backends serve through
a real server, next to their base, and a bad adapter stops the server at start naming the field."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest

import lora_files
from lora_files import train_lora
from conftest import running
from coe.cache import ModelCache
from coe.config import CoEConfig, ExpertConfig
from coe.errors import ConfigError
from coe.models import ModelStore
from coe.types import SamplingParams

peft = pytest.importorskip("peft")
pytest.importorskip("gguf")

PROMPTS = ([256, 72, 101, 108, 108, 111], [256, 87, 104, 121, 32, 63, 32, 66, 101])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("gguf-lora")
    peft_model = train_lora(tiny_checkpoint, root / "adapter", seed=1)
    peft_model.merge_and_unload().save_pretrained(str(root / "merged"), safe_serialization=True)
    return {
        "checkpoint": tiny_checkpoint,
        "adapter": root / "adapter",
        "base.gguf": lora_files.write_base(tiny_checkpoint, root / "base.gguf"),
        "merged.gguf": lora_files.write_base(root / "merged", root / "merged.gguf"),
        "lora.gguf": lora_files.write_lora(root / "adapter", tiny_checkpoint, root / "lora.gguf"),
    }


def logprobs(runner, prompt, adapter=None) -> np.ndarray:
    decoder = runner.open_decoder()
    try:
        everything = tuple(range(runner.vocab.n_vocab))
        decoder.add(0, prompt, SamplingParams(max_tokens=1, temperature=0.0, score_ids=everything), adapter)
        return np.array(decoder.step()[0].scored)
    finally:
        decoder.close()


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_llama_cpp_with_the_gguf_lora_equals_the_merged_model(files, isolate):
    """Also with the base in a worker process: the adapter is read there, onto the worker's model."""
    params = {"n_ctx": 256, "max_sequences": 2, "isolate": isolate}
    experts = (ExpertConfig("base", str(files["base.gguf"]), params=params),
               ExpertConfig("tuned", base="base", adapter=str(files["lora.gguf"])),
               ExpertConfig("merged", str(files["merged.gguf"]), params=params))
    cache = ModelCache(CoEConfig(experts=experts), ModelStore("unused"))
    cache.check_adapters()
    with cache.lease("merged") as runner:
        want = [logprobs(runner, p) for p in PROMPTS]
    with cache.lease("tuned") as runner:
        adapter = cache.adapter("tuned")
        tuned = [logprobs(runner, p, adapter) for p in PROMPTS]
        plain = [logprobs(runner, p) for p in PROMPTS]  # the adapter comes off again
        again = logprobs(runner, PROMPTS[0], adapter)
    for got, ref, off in zip(tuned, want, plain):
        assert np.abs(off - ref).max() > 0.05  # the adapter changes the answer
        np.testing.assert_allclose(got, ref, atol=2e-3)
    np.testing.assert_allclose(again, tuned[0], atol=1e-5)  # no stale prefix from the base
    state = {s.name: s for s in cache.states()}["tuned"]
    assert state.base == "base" and state.adapter_bytes >= 0
    assert state.num_params > {s.name: s for s in cache.states()}["base"].num_params
    cache.close()


def test_a_lora_for_another_shape_fails_at_start_naming_the_field(files, make_checkpoint, tmp_path):
    other = make_checkpoint("wider", hidden_size=96, intermediate_size=160)
    train_lora(other, tmp_path / "wide-adapter")
    wrong = lora_files.write_lora(tmp_path / "wide-adapter", other, tmp_path / "wide.gguf")
    experts = (ExpertConfig("base", str(files["base.gguf"])),
               ExpertConfig("tuned", base="base", adapter=str(wrong)))
    with pytest.raises(ConfigError) as info:
        ModelCache(CoEConfig(experts=experts), ModelStore("unused")).check_adapters()
    assert info.value.param == "experts[1].adapter" and str(wrong) in info.value.message
    assert "does not fit the base" in info.value.message
    not_lora = ExpertConfig("tuned", base="base", adapter=str(files["merged.gguf"]))
    with pytest.raises(ConfigError, match="not a GGUF LoRA adapter"):
        ModelCache(CoEConfig(experts=(experts[0], not_lora)), ModelStore("unused")).check_adapters()


def config_text(files, isolate: bool = False) -> str:
    flag = "true" if isolate else "false"
    return f"""experts:
  - name: base-gguf
    source: {files['base.gguf']}
    params: {{n_ctx: 512, max_sequences: 4, isolate: {flag}}}
  - name: tuned-gguf
    base: base-gguf
    adapter: {files['lora.gguf']}
  - name: base-torch
    source: {files['checkpoint']}
    params: {{isolate: {flag}}}
  - name: tuned-torch
    base: base-torch
    adapter: {files['adapter']}
    adapter_scale: 1.0
router:
  enabled: false
"""


def complete(base_url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    return httpx.post(base_url + "/v1/completions", json=body, timeout=120)


def test_adapter_experts_serve_through_a_real_server(files, tmp_path):
    with running(tmp_path / "server", config_text(files)) as server:
        replies = {name: complete(server.base_url, name)
                   for name in ("base-gguf", "tuned-gguf", "base-torch", "tuned-torch", "tuned-gguf")}
        assert all(r.status_code == 200 for r in replies.values()), {k: r.text for k, r in replies.items()}
        first = {name: r.json()["choices"][0]["logprobs"]["token_logprobs"][0] for name, r in replies.items()}
        assert abs(first["tuned-gguf"] - first["base-gguf"]) > 1e-3
        assert abs(first["tuned-torch"] - first["base-torch"]) > 1e-3
        rows = {row["name"]: row for row in httpx.get(server.base_url + "/v1/experts", timeout=10).json()["experts"]}
        assert rows["tuned-torch"]["base"] == "base-torch" and rows["tuned-torch"]["adapter_bytes"] > 0
        assert rows["tuned-gguf"]["base"] == "base-gguf"


def test_adapter_experts_in_worker_processes_answer_as_in_process(files, tmp_path):
    """Both backends' bases isolated: the adapters are read in the workers; the log-probabilities
    of a greedy completion are the in-process server's."""
    names = ("base-gguf", "tuned-gguf", "base-torch", "tuned-torch")
    first = {}
    for isolate in (False, True):
        with running(tmp_path / f"server-{isolate}", config_text(files, isolate)) as server:
            replies = {name: complete(server.base_url, name) for name in names}
            assert all(r.status_code == 200 for r in replies.values()), {k: r.text for k, r in replies.items()}
            first[isolate] = {n: r.json()["choices"][0]["logprobs"]["token_logprobs"] for n, r in replies.items()}
            if isolate:
                rows = httpx.get(server.base_url + "/v1/experts", timeout=10).json()["experts"]
                pids = {r["name"]: r["worker_pid"] for r in rows if r["name"].startswith("base")}
                assert len(pids) == 2 and all(pids.values()), pids  # both bases hot, in workers
    for name in names:
        np.testing.assert_allclose(first[True][name], first[False][name], atol=2e-3)
    assert abs(first[True]["tuned-torch"][0] - first[True]["base-torch"][0]) > 1e-3


def test_a_bad_adapter_stops_the_server_at_start_naming_file_and_field(files, tmp_path):
    (tmp_path / "coe.yaml").write_text(config_text(files).replace(str(files["adapter"]), str(tmp_path / "nowhere")))
    result = subprocess.run([sys.executable, "-m", "coe", "serve", "--config", str(tmp_path / "coe.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "experts[3].adapter" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
