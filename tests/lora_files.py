"""LoRA files for the tests: ``train_lora`` trains a PEFT LoRA on a synthetic checkpoint; the
writers put a synthetic torch checkpoint and its PEFT LoRA into GGUF files with the ``gguf`` package's
writer, laid out as llama.cpp's own converters lay them out (convert_hf_to_gguf.py and
convert_lora_to_gguf.py): llama tensor names, Q/K rows permuted for llama.cpp's rotary layout,
F32 tensors, coe's byte vocabulary as an SPM vocabulary of byte tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def train_lora(base_folder: Path, out_folder: Path, seed: int = 0, **lora_options):
    """A few optimiser steps of a PEFT LoRA on random text (B moves away from zero), saved as
    PEFT saves it (adapter_config.json + adapter_model.safetensors); returns the PEFT model."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0,
                   target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**{**options, **lora_options}))
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 256, (4, 24))
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    peft_model.save_pretrained(str(out_folder))
    return peft_model


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj(.weight) -> blk.3.attn_q(.weight)."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, _, suffix = hf_name.rpartition(".") if hf_name.endswith((".weight", ".bias")) else (hf_name, "", "")
    if stem in top:
        name = top[stem]
    else:
        _, _, index, *rest = stem.split(".")
        name = f"blk.{index}.{_LAYER['.'.join(rest)]}"
    return f"{name}.{suffix}" if suffix else name


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows to llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _heads_of(hf_name: str, cfg: dict) -> int | None:
    if ".q_proj" in hf_name:
        return cfg["num_attention_heads"]
    if ".k_proj" in hf_name:
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return None


def _arch_metadata(writer, cfg: dict) -> None:
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    # transformers 5 writes rope_theta inside rope_parameters
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e4))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])


def write_base(checkpoint: Path, out: Path) -> Path:
    """A llama-architecture GGUF of a synthetic checkpoint (byte vocabulary: 256 bytes, BOS, EOS)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("synthetic")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _arch_metadata(writer, cfg)
    writer.add_tokenizer_model("llama")
    tokens = [f"<0x{b:02X}>".encode() for b in range(256)] + [b"<s>", b"</s>"]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 2)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_add_bos_token(True)
    for name, value in tensors.items():
        heads = _heads_of(name, cfg)
        value = permute(value, heads) if heads else value
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(value, dtype=np.float32))
    _finish(writer)
    return out


def write_lora(adapter: Path, checkpoint: Path, out: Path) -> Path:
    """A GGUF LoRA of a PEFT adapter folder: lora_a = A [r, in], lora_b = B [out, r] (B's rows
    permuted like the Q/K weights they update), alpha in the metadata."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    lora_cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_cfg["lora_alpha"]))
    for name, value in tensors.items():
        module, part = name.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        heads = _heads_of(module, cfg)
        if part == "lora_B" and heads:
            value = permute(value, heads)
        suffix = "lora_a" if part == "lora_A" else "lora_b"
        writer.add_tensor(f"{gguf_name(module)}.weight.{suffix}", np.ascontiguousarray(value, dtype=np.float32))
    _finish(writer)
    return out


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
