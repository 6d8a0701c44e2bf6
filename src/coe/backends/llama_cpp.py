"""llama.cpp backend for GGUF experts (llama-cpp-python).

The GGUF file carries the tokenizer and chat template. ``read`` asks the kernel to bring the
file into the page cache (the host tier); ``materialize`` creates the llama.cpp model and context.
Expert params: n_ctx, n_threads, n_batch, use_mmap, top_k, min_p, repeat_penalty.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from coe.backends.base import Backend, HostWeights, Runner, Vocab
from coe.config import ExpertConfig
from coe.errors import LoadError, MissingExtra
from coe.models.info import describe
from coe.types import SamplingParams

DEFAULT_CONTEXT = 4096
# llama.cpp's own server defaults; OpenAI requests carry only temperature and top_p.
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtra("llama_cpp", "llama") from None
    return llama_cpp


class LlamaVocab(Vocab):
    def __init__(self, llm, chat_template: str | None):
        lib = _llama_cpp()
        self._llm = llm
        self._vocab = llm._model.vocab
        self.chat_template = chat_template
        self._bos_id = llm.token_bos()
        self._add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab)) and self._bos_id >= 0
        self.bos_text = self._special_text(self._bos_id)
        self.eos_text = self._special_text(llm.token_eos())
        self._is_eog = lib.llama_vocab_is_eog

    def _special_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._llm.detokenize([token_id])

    def is_end(self, token_id: int) -> bool:
        return bool(self._is_eog(self._vocab, token_id))


class LlamaRunner(Runner):
    def __init__(self, expert: ExpertConfig, llm, num_bytes: int, chat_template: str | None):
        super().__init__(expert, LlamaVocab(llm, chat_template), llm.n_ctx(), num_bytes)
        self.llm = llm
        params = expert.params
        self._top_k = int(params.get("top_k", DEFAULT_TOP_K))
        self._min_p = float(params.get("min_p", DEFAULT_MIN_P))
        self._repeat_penalty = float(params.get("repeat_penalty", 1.0))

    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        self.llm.set_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little"))
        return self.llm.generate(prompt_ids, top_k=self._top_k, top_p=sampling.top_p, min_p=self._min_p,
                                 temp=sampling.temperature, repeat_penalty=self._repeat_penalty, reset=True)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def read(self, expert: ExpertConfig, path: Path) -> HostWeights:
        info = describe(path)
        if info.format != "gguf":
            raise LoadError(f"expert {expert.name}: llama_cpp needs a .gguf file, got {path}")
        _advise_willneed(path)
        return HostWeights(expert=expert, info=info)

    def materialize(self, host: HostWeights) -> Runner:
        lib = _llama_cpp()
        params = host.expert.params
        n_ctx = int(params.get("n_ctx", min(DEFAULT_CONTEXT, host.info.context_length or DEFAULT_CONTEXT)))
        n_threads = int(params.get("n_threads", os.cpu_count() or 1))
        try:
            llm = lib.Llama(model_path=str(host.info.path), n_ctx=n_ctx, n_threads=n_threads,
                            n_threads_batch=n_threads, n_batch=int(params.get("n_batch", 512)),
                            use_mmap=bool(params.get("use_mmap", True)), verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LoadError(f"expert {host.expert.name}: llama.cpp could not load {host.info.path}: {exc}") from None
        return LlamaRunner(host.expert, llm, host.num_bytes, host.info.chat_template)


def _advise_willneed(path: Path) -> None:
    """Start reading the file into the page cache in the background (Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
