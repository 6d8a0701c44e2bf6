"""The torch backend on a real CUDA device: pinned host tier, device copy, generation.

Skipped without CUDA; run on a GPU machine with `pytest tests/gpu`.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from coe.backends.memory import HostBufferPool  # noqa: E402
from coe.backends.torch import TorchBackend  # noqa: E402
from coe.cache.manager import ModelCache  # noqa: E402
from coe.config import CacheConfig, CoEConfig, ExpertConfig, RouterConfig  # noqa: E402
from coe.models.catalog import ModelStore  # noqa: E402
from coe.types import Request, SamplingParams  # noqa: E402


def _expert(path, device: str, dtype: str = "float32") -> ExpertConfig:
    return ExpertConfig("tiny", str(path), backend="torch_hf", params={"device": device, "dtype": dtype})


def _greedy_text(runner, prompt: str, max_tokens: int = 12) -> str:
    request = Request(expert="tiny", prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=0))
    events = list(runner.generate([request]))
    assert events[-1].completion is not None, events[-1].error
    return events[-1].completion.text


def test_read_pins_host_weights_and_materialize_moves_them_to_the_device(tiny_checkpoint):
    backend = TorchBackend()
    host = backend.read(_expert(tiny_checkpoint, "cuda"), tiny_checkpoint, HostBufferPool(pin=True))
    assert host.payload.buffer.is_pinned() and all(t.is_pinned() for t in host.payload.state.values())
    runner = backend.materialize(host)
    devices = {p.device.type for p in runner.model.parameters()}
    assert devices == {"cuda"}
    # one host -> device copy of the whole buffer: every parameter views the same device storage
    assert len({p.untyped_storage().data_ptr() for p in runner.model.parameters()}) == 1
    runner.close()


def test_cuda_logits_match_cpu(tiny_checkpoint):
    backend = TorchBackend()
    runners = {d: backend.materialize(backend.read(_expert(tiny_checkpoint, d), tiny_checkpoint,
                                                   HostBufferPool(pin=d == "cuda")))
               for d in ("cpu", "cuda")}
    ids = runners["cpu"].vocab.encode("hello gpu")
    logits = {}
    for device, runner in runners.items():
        cache = runner._new_cache(len(ids) + 1)
        with torch.inference_mode():
            logits[device] = runner.model(torch.tensor(ids, device=device), cache, 0).float().cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=1e-3, rtol=1e-3)


def test_bfloat16_generation_on_cuda(tiny_checkpoint):
    backend = TorchBackend()
    runner = backend.materialize(backend.read(_expert(tiny_checkpoint, "cuda", "bfloat16"), tiny_checkpoint,
                                              HostBufferPool(pin=True)))
    assert _greedy_text(runner, "abc") == _greedy_text(runner, "abc")
    runner.close()


def test_model_cache_on_cuda_pins_the_warm_tier_and_switches_within_budget(tiny_checkpoint, tmp_path):
    """Two CUDA experts, room for one hot: each activation demotes the other to pinned host memory,
    generation works after every switch, and the device tier never holds more than its budget."""
    experts = tuple(ExpertConfig(name, str(tiny_checkpoint), backend="torch_hf",
                                 params={"device": "cuda", "dtype": "bfloat16"}) for name in ("a", "b"))
    config = CoEConfig(experts=experts, router=RouterConfig(enabled=False),
                       cache=CacheConfig(prefetch="none", max_hot_experts=1))
    cache = ModelCache(config, ModelStore(tmp_path))
    assert cache.budgets.device_kind == "cuda" and cache.pool.pin
    try:
        texts = []
        for name in ("a", "b", "a", "b"):
            with cache.lease(name) as runner:
                assert {p.device.type for p in runner.model.parameters()} == {"cuda"}
                texts.append(_greedy_text(runner, "abc"))
            assert cache.hot_experts() == [name]
            other = "b" if name == "a" else "a"
            assert cache.state_of(other).state in ("warm", "ready")
            usage = cache.tier_usage()
            assert usage["device"]["used_bytes"] <= usage["device"]["budget_bytes"]
            assert cache.state_of(name).device_bytes > 0
        assert texts[0] == texts[2] and texts[1] == texts[3]
        assert cache.stats.warm_hits >= 2  # the second round came from pinned host memory
    finally:
        cache.close()
