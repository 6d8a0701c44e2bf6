"""Scripted parts shared by unit tests (each has a real counterpart in the integration tests)."""
from coe.backends.base import Vocab


class LetterVocab(Vocab):
    """Token i is the i-th lowercase letter. A chat template, so no stop string holds text back."""

    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def encode(self, text: str) -> list[int]:
        return [0] * len(text)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([ord("a") + token_id])

    def is_end(self, token_id: int) -> bool:
        return False
