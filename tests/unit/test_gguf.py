"""GGUF header reading on files written by hand (format: ggml docs/gguf.md, little-endian v3)."""
import struct

import pytest

from coe.errors import ModelNotAvailable
from coe.models import describe, read_gguf_header

U8, U32, I32, F32, BOOL, STRING, ARRAY, U64 = 0, 4, 5, 6, 7, 8, 9, 10
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TENSORS = {"token_embd.weight": (64, 258), "blk.0.attn_q.weight": (64, 64), "output_norm.weight": (64,)}


def gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def array(item_type: int, items: list[bytes]) -> bytes:
    return struct.pack("<IQ", item_type, len(items)) + b"".join(items)


def gguf_bytes(version: int = 3, header_only: bool = False) -> bytes:
    pairs = [
        kv("general.architecture", STRING, gguf_string("llama")),
        kv("general.name", STRING, gguf_string("tiny ünïcode")),
        kv("general.file_type", U32, struct.pack("<I", 15)),
        kv("llama.context_length", U32, struct.pack("<I", 2048)),
        kv("llama.rope.freq_base", F32, struct.pack("<f", 10000.0)),
        kv("general.flag", BOOL, struct.pack("<?", True)),
        kv("tokenizer.ggml.tokens", ARRAY, array(STRING, [gguf_string(f"tok{i}") for i in range(100)])),
        kv("tokenizer.ggml.token_type", ARRAY, array(I32, [struct.pack("<i", 1)] * 100)),
        kv("tokenizer.ggml.small", ARRAY, array(U8, [bytes([1]), bytes([2]), bytes([3])])),
        kv("tokenizer.ggml.nested", ARRAY, array(ARRAY, [array(U8, [bytes([i])]) for i in range(70)])),
        kv("tokenizer.chat_template", STRING, gguf_string(CHATML)),
        kv("general.alignment", U64, struct.pack("<Q", 32)),
    ]
    infos = b""
    offset = 0
    for name, dims in TENSORS.items():
        infos += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", 0, offset)  # ggml type F32, data offset
        offset += 4 * _count(dims)
    header = b"GGUF" + struct.pack("<IQQ", version, len(TENSORS), len(pairs)) + b"".join(pairs) + infos
    if header_only:
        return header
    padding = b"\0" * (-len(header) % 32)
    return header + padding + b"\0" * offset


def _count(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_bytes())
    return path


def test_header_metadata_and_shapes(gguf_file):
    header = read_gguf_header(gguf_file)
    assert header.version == 3
    assert header.architecture == "llama"
    assert header.metadata["general.name"] == "tiny ünïcode"
    assert header.metadata["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert header.metadata["general.flag"] is True
    assert header.metadata["general.alignment"] == 32
    assert header.metadata["tokenizer.ggml.tokens"] == 100  # long arrays are skipped, their length kept
    assert header.metadata["tokenizer.ggml.token_type"] == 100
    assert header.metadata["tokenizer.ggml.nested"] == 70
    assert header.metadata["tokenizer.ggml.small"] == [1, 2, 3]
    assert header.tensor_shapes == TENSORS
    assert header.num_params == 64 * 258 + 64 * 64 + 64
    assert header.quantization == "Q4_K_M"
    assert header.chat_template == CHATML
    assert header.context_length == 2048
    header_bytes = len(gguf_bytes(header_only=True))
    assert header.data_offset == header_bytes + (-header_bytes % 32)  # where the tensor data starts


def test_a_header_larger_than_the_first_read_is_read_whole(tmp_path, monkeypatch):
    from coe.models import gguf

    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_bytes())
    whole = read_gguf_header(path)
    monkeypatch.setattr(gguf, "_FIRST_READ_BYTES", 16)  # strings and arrays cross the window's end
    assert read_gguf_header(path) == whole


def test_version_2_is_read(tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(gguf_bytes(version=2))
    assert read_gguf_header(path).version == 2


def test_describe_a_gguf_file(gguf_file):
    info = describe(gguf_file)
    assert info.format == "gguf"
    assert info.path == gguf_file
    assert info.num_bytes == gguf_file.stat().st_size
    assert info.num_params == 64 * 258 + 64 * 64 + 64
    assert info.architecture == "llama"
    assert info.quantization == "Q4_K_M"
    assert info.chat_template == CHATML
    assert info.chat_tuned
    assert info.context_length == 2048


def test_missing_metadata_gives_unknowns(tmp_path):
    path = tmp_path / "bare.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    header = read_gguf_header(path)
    assert (header.architecture, header.quantization, header.chat_template, header.context_length,
            header.num_params) == ("unknown", "unknown", None, None, 0)
    assert not describe(path).chat_tuned


@pytest.mark.parametrize("cut", [3, 10, 30, 200, 600, -30, -5])
def test_truncated_file_is_not_available(tmp_path, cut):
    """Cut in the magic, the counts, a key, a skipped array, and the last tensor's info."""
    data = gguf_bytes(header_only=True)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelNotAvailable, match="not a readable GGUF"):
        read_gguf_header(path)


def test_wrong_magic_is_not_available(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + gguf_bytes()[4:])
    with pytest.raises(ModelNotAvailable, match="bad magic"):
        describe(path)


def test_unsupported_version_is_not_available(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(gguf_bytes(version=9))
    with pytest.raises(ModelNotAvailable, match="version 9"):
        read_gguf_header(path)


def test_corrupt_string_length_is_not_available(tmp_path):
    """A garbage length must not make the reader try to allocate it."""
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"key")
    with pytest.raises(ModelNotAvailable):
        read_gguf_header(path)


def test_missing_file_is_not_available(tmp_path):
    with pytest.raises(ModelNotAvailable, match="no such file"):
        describe(tmp_path / "absent.gguf")
    with pytest.raises(ModelNotAvailable):
        read_gguf_header(tmp_path / "absent.gguf")
