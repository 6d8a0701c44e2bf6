"""Synthetic experts: random-initialised Llama/Qwen2-shaped checkpoints written as real
safetensors folders, for systems tests and benchmarks (no downloads).

They use coe's byte tokenizer (vocab 258), so they generate text without a tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

# name -> shape; parameter counts are approximate (tied embeddings, byte vocabulary).
SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "10m": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=14,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
    "500m": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
}


def synthetic_config(shape: str = "tiny", model_type: str = "llama", **overrides) -> dict:
    from coe.backends.torch import BYTE_VOCAB_SIZE

    architecture = "LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": BYTE_VOCAB_SIZE,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.2,
        **SHAPES[shape],
        **overrides,
    }


def write_checkpoint(folder: Path, cfg: dict, seed: int = 0, dtype: str = "float32") -> Path:
    """Build the module coe itself builds, initialise it HF-style (N(0, initializer_range) matrices,
    so the output is not one repeated token) and save config.json + model.safetensors."""
    import torch
    from safetensors.torch import save_file

    from coe.backends.torch import ModelArgs, build_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(ModelArgs.from_hf(cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith(".bias"):
                param.normal_(0.0, cfg.get("initializer_range", 0.02))
    state = {
        name: tensor.detach().to(getattr(torch, dtype)).contiguous()
        for name, tensor in model.state_dict().items()
    }
    if cfg.get("tie_word_embeddings"):
        del state["lm_head.weight"]  # tied to model.embed_tokens.weight, as HF saves it
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
