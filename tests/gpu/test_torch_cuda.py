"""The torch backend on a real CUDA device: pinned host tier, device copy, generation.

Skipped without CUDA; run on a GPU machine with `pytest tests/gpu`.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from coe.backends.torch_hf import TorchHFBackend  # noqa: E402
from coe.config import ExpertConfig  # noqa: E402
from coe.types import Request, SamplingParams  # noqa: E402


def _expert(path, device: str, dtype: str = "float32") -> ExpertConfig:
    return ExpertConfig("tiny", str(path), backend="torch_hf", params={"device": device, "dtype": dtype})


def _greedy_text(runner, prompt: str, max_tokens: int = 12) -> str:
    request = Request(expert="tiny", prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=0))
    events = list(runner.generate([request]))
    assert events[-1].completion is not None, events[-1].error
    return events[-1].completion.text


def test_read_pins_host_weights_and_materialize_moves_them_to_the_device(tiny_checkpoint):
    backend = TorchHFBackend()
    host = backend.read(_expert(tiny_checkpoint, "cuda"), tiny_checkpoint)
    _, state = host.payload
    assert all(t.is_pinned() for t in state.values())
    runner = backend.materialize(host)
    devices = {p.device.type for p in runner.model.parameters()}
    assert devices == {"cuda"}
    runner.close()


def test_cuda_logits_match_cpu(tiny_checkpoint):
    backend = TorchHFBackend()
    runners = {d: backend.materialize(backend.read(_expert(tiny_checkpoint, d), tiny_checkpoint))
               for d in ("cpu", "cuda")}
    ids = runners["cpu"].vocab.encode("hello gpu")
    logits = {}
    for device, runner in runners.items():
        cache = runner._new_cache(len(ids) + 1)
        with torch.inference_mode():
            logits[device] = runner.model(torch.tensor(ids, device=device), cache, 0).float().cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=1e-3, rtol=1e-3)


def test_bfloat16_generation_on_cuda(tiny_checkpoint):
    backend = TorchHFBackend()
    runner = backend.materialize(backend.read(_expert(tiny_checkpoint, "cuda", "bfloat16"), tiny_checkpoint))
    assert _greedy_text(runner, "abc") == _greedy_text(runner, "abc")
    runner.close()
