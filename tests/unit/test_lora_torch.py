"""LoRA adapters on the torch backend, against PEFT itself: a LoRA trained with ``peft`` on a tiny
synthetic base, saved as PEFT saves it, applied by coe per batch row; coe's logits with the adapter
equal those of the merged-weights model (PEFT's ``merge_and_unload``, served by coe as a plain
expert), and a row without the adapter in the same forward pass equals the base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coe.cache import ModelCache
from coe.config import CoEConfig, ExpertConfig
from coe.errors import ConfigError
from coe.models import ModelStore
from coe.types import SamplingParams
from lora_files import train_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROMPTS = ([256, 72, 101, 108, 108, 111], [256, 87, 104, 121, 32, 63, 32, 66, 101])


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("lora")
    peft_model = train_lora(tiny_checkpoint, root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(root / "merged"), safe_serialization=True)
    return tiny_checkpoint, root / "adapter", root / "merged"


def cache_for(base, adapter, merged, scale: float = 1.0) -> ModelCache:
    experts = (
        ExpertConfig("base", str(base), backend="torch_hf"),
        ExpertConfig("tuned", base="base", adapter=str(adapter), adapter_scale=scale),
        ExpertConfig("merged", str(merged), backend="torch_hf"),
    )
    cache = ModelCache(CoEConfig(experts=experts), ModelStore("unused"))
    cache.check_adapters()
    return cache


def first_logprobs(runner, rows: list[tuple[list[int], object]]) -> list[np.ndarray]:
    """Every token's log-probability after each prompt, all rows in one decoder (one batch)."""
    decoder = runner.open_decoder()
    everything = tuple(range(runner.vocab.n_vocab))
    try:
        for seq, (prompt, adapter) in enumerate(rows):
            decoder.add(seq, prompt, SamplingParams(max_tokens=1, temperature=0.0, score_ids=everything), adapter)
        tokens = decoder.step()
        return [np.array(tokens[seq].scored) for seq in range(len(rows))]
    finally:
        decoder.close()


def test_coe_with_the_adapter_equals_the_merged_model_row_by_row(lora_setup):
    base, adapter_dir, merged_dir = lora_setup
    cache = cache_for(base, adapter_dir, merged_dir)
    with cache.lease("merged") as merged:
        want = first_logprobs(merged, [(p, None) for p in PROMPTS])
    with cache.lease("tuned") as runner:
        adapter = cache.adapter("tuned")
        plain = first_logprobs(runner, [(p, None) for p in PROMPTS])
        # one forward pass: row 0 through the adapter, row 1 the base alone, then the reverse
        mixed = first_logprobs(runner, [(PROMPTS[0], adapter), (PROMPTS[1], None)])
        mixed_back = first_logprobs(runner, [(PROMPTS[0], None), (PROMPTS[1], adapter)])
    assert np.abs(plain[0] - want[0]).max() > 1e-2  # the adapter changes the answer
    np.testing.assert_allclose(mixed[0], want[0], atol=1e-4)
    np.testing.assert_allclose(mixed[1], plain[1], atol=1e-5)
    np.testing.assert_allclose(mixed_back[1], want[1], atol=1e-4)
    np.testing.assert_allclose(mixed_back[0], plain[0], atol=1e-5)
    state = {s.name: s for s in cache.states()}["tuned"]
    expected_params = sum(t.numel() for n, t in _lora_tensors(adapter_dir).items())
    assert state.num_params == state_of(cache, "base").num_params + expected_params
    assert state.adapter_bytes == expected_params * 4  # float32 A and B, measured as held
    cache.close()


def state_of(cache, name):
    return {s.name: s for s in cache.states()}[name]


def _lora_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_adapter_scale_scales_the_update(lora_setup, tmp_path):
    base, adapter_dir, merged_dir = lora_setup
    zero = cache_for(base, adapter_dir, merged_dir, scale=0.0)
    with zero.lease("tuned") as runner:
        off = first_logprobs(runner, [(PROMPTS[0], zero.adapter("tuned"))])[0]
        plain = first_logprobs(runner, [(PROMPTS[0], None)])[0]
    np.testing.assert_allclose(off, plain, atol=1e-6)
    zero.close()


def write_adapter(folder, config: dict | None = None, tensors: dict | None = None, weights=True):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    if weights:
        save_file(tensors or {}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("case, words", [
    ("wrong shape", "does not fit the base"),
    ("unknown module", "no such linear layer"),
    ("pickle only", "pickle files are not loaded"),
    ("dora", "use_dora"),
    ("no folder", "not a PEFT adapter folder"),
])
def test_a_bad_adapter_fails_at_start_naming_the_file_and_field(tiny_checkpoint, tmp_path, case, words):
    folder = tmp_path / "adapter"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {f"{prefix}.lora_A.weight": torch.zeros(2, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 2)}
    if case == "wrong shape":
        write_adapter(folder, tensors={**good, f"{prefix}.lora_A.weight": torch.zeros(2, 32)})
    elif case == "unknown module":
        name = "base_model.model.model.layers.9.self_attn.q_proj"
        write_adapter(folder, tensors={f"{name}.lora_A.weight": torch.zeros(2, 64),
                                       f"{name}.lora_B.weight": torch.zeros(64, 2)})
    elif case == "pickle only":
        write_adapter(folder, weights=False)
        (folder / "adapter_model.bin").write_bytes(b"not read")
    elif case == "dora":
        write_adapter(folder, config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}, tensors=good)
    experts = (ExpertConfig("base", str(tiny_checkpoint), backend="torch_hf"),
               ExpertConfig("tuned", base="base", adapter=str(folder)))
    cache = ModelCache(CoEConfig(experts=experts), ModelStore("unused"))
    with pytest.raises(ConfigError) as info:
        cache.check_adapters()
    assert info.value.param == "experts[1].adapter"
    assert words in info.value.message and str(folder) in info.value.message
