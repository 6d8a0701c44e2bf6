"""describe() and the safetensors header reader on a tiny checkpoint folder."""
import json
import struct

import pytest

from coe.errors import ModelNotAvailable
from coe.models import describe
from coe.models.safetensors_info import read_checkpoint_info, read_safetensors_header


def test_describe_a_checkpoint_folder(tiny_checkpoint):
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    info = describe(tiny_checkpoint)
    assert info.format == "safetensors"
    assert info.num_params == sum(t.numel() for t in state.values())
    assert info.num_bytes == (tiny_checkpoint / "model.safetensors").stat().st_size
    assert info.architecture == "LlamaForCausalLM"
    assert info.quantization == "F32"
    assert info.context_length == 512
    assert info.chat_template is None and not info.chat_tuned


def test_sharded_checkpoint_is_summed(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(4, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    info = describe(tmp_path)
    assert info.num_params == 10
    assert info.quantization == "BF16/F32"
    assert info.architecture == "qwen2"
    assert info.chat_tuned
    assert read_checkpoint_info(tmp_path).tensors["b"] == ("BF16", (4,))


def test_folder_without_safetensors(tmp_path):
    with pytest.raises(ModelNotAvailable, match="no \\*.safetensors"):
        describe(tmp_path)


@pytest.mark.parametrize("data", [b"", b"\x01", struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 5) + b"{nope"])
def test_unreadable_safetensors_header(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelNotAvailable, match="not a readable safetensors"):
        read_safetensors_header(path)


def test_unreadable_config_json(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ModelNotAvailable, match="unreadable JSON"):
        describe(folder)


def test_header_facts_are_kept_on_disk_between_runs_and_follow_file_changes(tmp_path, monkeypatch):
    from test_gguf import gguf_bytes

    from coe.models import info

    model, cache = tmp_path / "m.gguf", tmp_path / "headers"
    model.write_bytes(gguf_bytes())
    first = describe(model, cache)
    assert len(list(cache.glob("*.json"))) == 1
    info._describe_cached.cache_clear()  # a new process: only the disk cache is left

    def unread(path):
        raise AssertionError("the header was parsed again")

    monkeypatch.setattr(info, "read_gguf_header", unread)
    assert describe(model, cache) == first
    monkeypatch.undo()
    model.write_bytes(gguf_bytes(version=2))  # changed: its stamp differs, so it is read again
    assert describe(model, cache).num_params == first.num_params
    assert len(list(cache.glob("*.json"))) == 2
    (cache / next(cache.glob("*.json")).name).write_text("{not json")  # a damaged entry is re-read
    info._describe_cached.cache_clear()
    assert describe(model, cache).architecture == "llama"


def test_the_header_cache_keeps_its_newest_entries_when_it_outgrows_its_bound(tmp_path, monkeypatch):
    from test_gguf import gguf_bytes

    from coe.models import info

    monkeypatch.setattr(info, "_MAX_CACHED_HEADERS", 4)
    cache = tmp_path / "headers"
    for k in range(5):
        model = tmp_path / f"m{k}.gguf"
        model.write_bytes(gguf_bytes())
        describe(model, cache)
    kept = list(cache.glob("*.json"))
    assert 2 <= len(kept) <= 4
    assert describe(tmp_path / "m4.gguf", cache).architecture == "llama"


def test_a_large_fleets_new_headers_are_parsed_in_one_process_per_core(tmp_path, monkeypatch):
    import os

    from test_gguf import gguf_bytes

    from coe.models import info

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cache = tmp_path / "headers"
    models = [tmp_path / f"m{k}.gguf" for k in range(20)]
    for model in models:
        model.write_bytes(gguf_bytes())
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    assert info.parse_headers([*models, broken, tmp_path / "missing.gguf"], cache) == 21
    assert len(list(cache.glob("*.json"))) == 20  # the other process wrote its half too
    expected = info._describe_cached(models[0], info._stamp(models[0]))
    info._describe_cached.cache_clear()

    def unread(path):
        raise AssertionError("the header was parsed again")

    monkeypatch.setattr(info, "read_gguf_header", unread)
    assert [describe(m, cache) for m in models] == [
        info.ModelInfo(**{**info.asdict(expected), "path": m}) for m in models
    ]
    assert info.parse_headers(models, cache) == 0  # all cached: nothing to do
    assert info.parse_headers(models[:3] + [broken], tmp_path / "other") == 0  # too few to fork
