"""Shared fixtures: tiny random-initialised safetensors checkpoints written into tmp folders.

The checkpoints are real (real config.json, real safetensors file with Hugging Face parameter
names) and small enough that loading and generating take milliseconds on a CPU. They use coe's
byte tokenizer: ids 0-255 are bytes, 256 is BOS, 257 is EOS.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from coe.bench import synthetic

TINY_LLAMA = synthetic.synthetic_config("tiny", "llama")
TINY_QWEN2 = synthetic.synthetic_config("tiny", "qwen2")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: make_checkpoint(name, **config_overrides) -> folder of a fresh tiny checkpoint."""

    def make(name: str = "ckpt", base: dict = TINY_LLAMA, seed: int = 0, **overrides) -> Path:
        folder = tmp_path_factory.mktemp(name)
        return synthetic.write_checkpoint(folder, {**base, **overrides}, seed=seed)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """A Llama-shaped checkpoint folder (2 layers, hidden 64, GQA 4/2 heads, tied embeddings)."""
    return make_checkpoint("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(make_checkpoint) -> Path:
    """The same shape with model_type qwen2, which adds q/k/v projection biases."""
    return make_checkpoint("tiny-qwen2", base=TINY_QWEN2, seed=1)
