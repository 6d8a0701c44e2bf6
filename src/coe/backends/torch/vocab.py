"""Tokenizers of safetensors checkpoints: a ``tokenizer.json`` through the `tokenizers` library,
or bytes for synthetic checkpoints that have none."""

from __future__ import annotations

from pathlib import Path

from coe.backends.base import Vocab
from coe.errors import LoadError, MissingExtra
from coe.models.info import read_json

BYTE_VOCAB_SIZE = 258  # 256 bytes + BOS + EOS, for checkpoints without a tokenizer.json


class ByteVocab(Vocab):
    """Token i < 256 is byte i; 256 is BOS, 257 EOS. For synthetic checkpoints without a tokenizer."""

    BOS, EOS = 256, 257

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def is_end(self, token_id: int) -> bool:
        return token_id == self.EOS


class HFTokenizerVocab(Vocab):
    """A tokenizer.json (byte-level BPE or sentencepiece-style) via the `tokenizers` library."""

    def __init__(self, path: Path, tokenizer_config: dict, generation_config: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingExtra("tokenizers", "torch") from None
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.chat_template = tokenizer_config.get("chat_template")
        self.bos_text = _token_text(tokenizer_config.get("bos_token"))
        self.eos_text = _token_text(tokenizer_config.get("eos_token"))
        bos_id = self._tok.token_to_id(self.bos_text) if self.bos_text else None
        self._add_bos = bool(tokenizer_config.get("add_bos_token", False)) and bos_id is not None
        self._bos_id = bos_id if bos_id is not None else -1
        self._end_ids = self._end_token_ids(generation_config)
        self._bytes = _byte_table(self._tok)

    def _end_token_ids(self, generation_config: dict) -> frozenset[int]:
        ids = generation_config.get("eos_token_id", [])
        ids = set(ids if isinstance(ids, list) else [ids])
        for text in (self.eos_text, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
            token_id = self._tok.token_to_id(text) if text else None
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._add_bos and not text.startswith(self.bos_text):
            ids = [self._bos_id, *ids]
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if token_id < len(self._bytes) else b""

    def is_end(self, token_id: int) -> bool:
        return token_id in self._end_ids


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _gpt2_byte_decoder() -> dict[str, int]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(0xA1, 0xAC + 1))
        + list(range(0xAE, 0xFF + 1))
    )
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _byte_table(tok) -> list[bytes]:
    """Bytes of every token id, for byte-exact incremental decoding."""
    size = tok.get_vocab_size(with_added_tokens=True)
    decoder = _gpt2_byte_decoder()
    byte_level = "ByteLevel" in tok.to_str()[:20000]
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    table = []
    for token_id in range(size):
        piece = tok.id_to_token(token_id) or ""
        if piece in special:
            table.append(b"")
        elif byte_level and all(ch in decoder for ch in piece):
            table.append(bytes(decoder[ch] for ch in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def load_vocab(path: Path, vocab_size: int) -> Vocab:
    tokenizer_config = read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").exists():
        return HFTokenizerVocab(path, tokenizer_config, read_json(path / "generation_config.json"))
    if vocab_size < BYTE_VOCAB_SIZE:
        raise LoadError(
            f"{path}: no tokenizer.json, and vocab_size {vocab_size} is too small for "
            f"the byte tokenizer ({BYTE_VOCAB_SIZE})"
        )
    return ByteVocab(tokenizer_config.get("chat_template"))
