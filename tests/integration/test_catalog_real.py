"""The real packaged models: installed, assembled, verified, and described from their headers."""
from __future__ import annotations

import pytest

from coe.models import PACKAGED, ModelStore, describe

pytestmark = pytest.mark.integration

EXPECTED = {  # id: (architecture, quantization, chat template, params range)
    "smollm2-135m": ("llama", "Q4_1", True, (1.3e8, 1.4e8)),
    "gemma3-270m": ("gemma3", "Q4_K_M", False, (2.6e8, 2.8e8)),
    "qwen2.5-coder-0.5b": ("qwen2", "Q4_K_M", True, (6.0e8, 6.5e8)),
    "qwen2.5-coder-1.5b": ("qwen2", "Q4_K_M", True, (1.7e9, 1.8e9)),
}


@pytest.mark.parametrize("model_id", sorted(PACKAGED))
def test_packaged_model_is_verified_and_described(model_id, coe_home):
    store = ModelStore(coe_home)
    path = store.ensure(model_id)
    assert store.status(model_id) == "ready"
    info = describe(path)
    arch, quant, chat, (low, high) = EXPECTED[model_id]
    assert (info.architecture, info.quantization, info.chat_tuned) == (arch, quant, chat)
    assert low < info.num_params < high
    assert info.num_bytes == path.stat().st_size
    assert PACKAGED[model_id].chat_tuned == chat
