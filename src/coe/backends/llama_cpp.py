"""llama.cpp backend for GGUF experts (llama-cpp-python's low-level wrappers).

Tiers: **warm** (``read``) is the file's bytes in the page cache, mapped by a loaded llama.cpp
model (mmap, no weight repacking), so the weights stay shared with the page cache and the model's
vocabulary and tensors are already parsed; **hot** (``materialize``) adds a context (KV cache and
compute buffers). Making a warm expert hot therefore costs one context creation, not a model load.
(A warm-up decode after it was measured to buy nothing: the first request's time to first token
and the footprint are the same without it, and it cost 18-85 ms per switch.) The GGUF file
carries the tokenizer and chat template.

Expert params: n_ctx, n_threads, n_batch, use_mmap (default true), repack (llama.cpp's extra
buffer types: weights copied into repacked CPU buffers; default false, see `coe bench switch`),
top_k, min_p, repeat_penalty.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from coe.backends.base import Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.memory import (HostBufferPool, anon_rss_bytes, drop_file_cache, read_sequential,
                                 resident_file_bytes)
from coe.config import ExpertConfig
from coe.errors import LoadError
from coe.models.info import describe
from coe.types import SamplingParams

DEFAULT_CONTEXT = 4096
DEFAULT_BATCH = 512
DEFAULT_SEQUENCES = 8
# llama.cpp's own server defaults; OpenAI requests carry only temperature and top_p.
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
PENALTY_LAST_N = 64
NO_KV_SLOT = 1  # llama_decode: no room in the KV cache for the batch (nothing was written)


def _llama_cpp():
    from coe.backends.llama_lib import load_llama_cpp

    return load_llama_cpp()


def model_params(params: dict):
    """llama.cpp model parameters from an expert's params (mmap, repacking)."""
    lib = _llama_cpp()
    model = lib.llama_model_default_params()
    model.n_gpu_layers = int(params.get("n_gpu_layers", 0))
    model.load_mode = lib.LLAMA_LOAD_MODE_MMAP if params.get("use_mmap", True) else lib.LLAMA_LOAD_MODE_NONE
    model.use_extra_bufts = bool(params.get("repack", False))
    return model


def context_params(params: dict, context_length: int | None):
    lib = _llama_cpp()
    ctx = lib.llama_context_default_params()
    ctx.n_ctx = int(params.get("n_ctx", min(DEFAULT_CONTEXT, context_length or DEFAULT_CONTEXT)))
    ctx.n_batch = ctx.n_ubatch = int(params.get("n_batch", DEFAULT_BATCH))
    ctx.n_threads = ctx.n_threads_batch = int(params.get("n_threads", os.cpu_count() or 1))
    ctx.n_seq_max = max_sequences(params)
    ctx.kv_unified = True  # the sequences of a batch share one KV buffer of n_ctx cells
    return ctx


def max_sequences(params: dict) -> int:
    """Sequences decoded together in one forward pass (expert param ``max_sequences``)."""
    return max(1, int(params.get("max_sequences", DEFAULT_SEQUENCES)))


class LlamaVocab(Vocab):
    """Tokenizer of a loaded llama.cpp model (``_internals.LlamaModel``)."""

    def __init__(self, model, chat_template: str | None):
        lib = _llama_cpp()
        self._model = model
        self._vocab = model.vocab
        self.chat_template = chat_template
        self._bos_id = model.token_bos()
        self._add_bos = bool(model.add_bos_token()) and self._bos_id >= 0
        self.bos_text = self._special_text(self._bos_id)
        self.eos_text = self._special_text(model.token_eos())
        self._is_eog = lib.llama_vocab_is_eog

    def _special_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._model.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        ids = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._model.detokenize([token_id])

    def is_end(self, token_id: int) -> bool:
        return bool(self._is_eog(self._vocab, token_id))


class LlamaRunner(Runner):
    """A llama.cpp context on a warm model. Contract: ``close`` frees the context only; the model
    belongs to the host weights."""

    def __init__(self, expert: ExpertConfig, model, ctx, num_bytes: int, chat_template: str | None):
        lib = _llama_cpp()
        from llama_cpp import _internals

        super().__init__(expert, LlamaVocab(model, chat_template), ctx.n_ctx(), num_bytes)
        self.max_batch_size = max_sequences(expert.params)
        self.joins_running_batch = self.max_batch_size > 1
        self.model, self.ctx = model, ctx
        self._n_batch = int(ctx.params.n_batch)
        self.batch = _internals.LlamaBatch(n_tokens=self._n_batch, embd=0, n_seq_max=1, verbose=False)
        self._lib = lib
        params = expert.params
        self._top_k = int(params.get("top_k", DEFAULT_TOP_K))
        self._min_p = float(params.get("min_p", DEFAULT_MIN_P))
        self._repeat_penalty = float(params.get("repeat_penalty", 1.0))
        self._n_swa = int(lib.llama_model_n_swa(model.model))
        self._held: dict[int, list[int]] = {}  # llama.cpp sequence id -> tokens its KV cells hold, from position 0
        self._busy: set[int] = set()  # sequence ids of running sequences
        self._used_at: dict[int, int] = {}  # sequence id -> when its cells were last used (a counter)
        self._clock = 0
        self._cache_prompt = bool(params.get("cache_prompt", True))

    def _eval(self, ids: list[int], n_past: int, seq_id: int = 0) -> int:
        """Prefill ``ids`` for one sequence; logits are kept for its last token (batch index -1)."""
        for i in range(0, len(ids), self._n_batch):
            chunk = ids[i:i + self._n_batch]
            self._decode([(token, n_past + k, seq_id) for k, token in enumerate(chunk)], last_only=True)
            n_past += len(chunk)
        return n_past

    def _decode(self, entries: list[tuple[int, int, int]], last_only: bool) -> None:
        """One forward pass over (token, position, sequence) entries, with logits for the last or
        for all; the tokens join what their sequences' KV cells hold."""
        batch = self.batch.batch
        batch.n_tokens = len(entries)
        for k, (token, pos, seq_id) in enumerate(entries):
            batch.token[k], batch.pos[k] = token, pos
            batch.seq_id[k][0], batch.n_seq_id[k] = seq_id, 1
            batch.logits[k] = not last_only
        batch.logits[len(entries) - 1] = True
        in_batch = {seq_id for _, _, seq_id in entries}
        code = self._lib.llama_decode(self.ctx.ctx, batch)
        while code == NO_KV_SLOT and self._evict_idle(in_batch):
            code = self._lib.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            self.forget_all()  # what the cells hold is unknown now
            raise RuntimeError(f"llama_decode returned {code}")
        for token, pos, seq_id in entries:
            held = self._held.setdefault(seq_id, [])
            del held[pos:]
            held.append(token)

    def _start(self, prompt_ids: list[int], free_ids: list[int]) -> int:
        """Prefill a new sequence in one of ``free_ids`` (the id is taken from the list), reusing
        the longest prefix of the prompt that any sequence's KV cells hold (prefix caching: the
        chat template's system prompt, a conversation's earlier turns, few-shot examples). Cells
        of finished sequences stay until their id is taken or the context needs the room."""
        source, reused = self._longest_prefix(prompt_ids)
        others = [s for s in free_ids if s != source]
        extends = source is not None and reused == len(self._held[source])
        if source in free_ids and (extends or not others):
            seq_id = source  # the prompt continues what these cells hold, or no other id is free
        else:  # copy the prefix into another id: an empty one first, else the least recently used
            seq_id = min(others, key=lambda s: (s in self._held, self._used_at.get(s, 0)))
        free_ids.remove(seq_id)
        self._busy.add(seq_id)
        if source != seq_id:
            self._drop(seq_id)
            if reused:
                self.ctx.kv_cache_seq_cp(source, seq_id, 0, reused)
                self._touch(source)
        if not self.ctx.kv_cache_seq_rm(seq_id, reused, -1):
            self._drop(seq_id)
            reused = 0
        self._held[seq_id] = prompt_ids[:reused]  # the common prefix, whichever id held it
        self._touch(seq_id)
        self.last_cached_tokens = reused
        self._eval(prompt_ids[reused:], reused, seq_id)
        return seq_id

    def _finish(self, seq_id: int) -> None:
        """The sequence in ``seq_id`` ended: its cells stay, for a later prompt to reuse."""
        self._busy.discard(seq_id)

    def _touch(self, seq_id: int) -> None:
        self._clock += 1
        self._used_at[seq_id] = self._clock

    def _evict_idle(self, keep: set[int]) -> bool:
        """Free the cells of the least recently used finished sequence; False if there is none."""
        idle = [s for s in self._held if s not in self._busy and s not in keep]
        if not idle:
            return False
        self._drop(min(idle, key=lambda s: self._used_at.get(s, 0)))
        return True

    def _longest_prefix(self, prompt_ids: list[int]) -> tuple[int | None, int]:
        """(sequence id, tokens) of the longest cached prefix of the prompt that can be reused:
        never the whole prompt (its last token is evaluated for the first token's logits), and
        not where a sliding-window cache already dropped cells the rest of the prompt attends to."""
        best, best_len = None, 0
        for seq_id, held in self._held.items() if self._cache_prompt else ():
            n = _common_prefix(held, prompt_ids, len(prompt_ids) - 1)
            if n > best_len and self._window_kept(seq_id, n):
                best, best_len = seq_id, n
        return best, best_len

    def _window_kept(self, seq_id: int, reused: int) -> bool:
        pos_min = self._lib.llama_memory_seq_pos_min(self.ctx.memory, seq_id)
        return pos_min <= 0 or (self._n_swa > 0 and pos_min <= reused - self._n_swa)

    def _drop(self, seq_id: int) -> None:
        if self._held.pop(seq_id, None) is not None:
            self.ctx.kv_cache_seq_rm(seq_id, -1, -1)

    def forget_all(self) -> None:
        """Drop every sequence from the KV cache. Only the cells' metadata: llama.cpp's own
        ``kv_cache_clear`` also zeroes the whole buffer (n_ctx cells, 94 MB for SmolLM2 at 4096),
        which cost 8-10 ms before every request; empty cells are masked out, never read."""
        self._held.clear()
        self._busy.clear()
        if self.ctx.memory is not None:
            self._lib.llama_memory_clear(self.ctx.memory, False)

    def _sampler(self, sampling: SamplingParams):
        from llama_cpp import _internals

        sampler = _internals.LlamaSampler()
        if self._repeat_penalty != 1.0:
            sampler.add_penalties(self.model.n_vocab(), PENALTY_LAST_N, self._repeat_penalty, 0.0, 0.0)
        if sampling.temperature == 0.0:
            sampler.add_greedy()
            return sampler
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
        sampler.add_top_k(self._top_k)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(self._min_p, 1)
        sampler.add_temp(sampling.temperature)
        sampler.add_dist(seed % 2**32)  # llama.cpp takes a uint32 seed
        return sampler

    def _pick(self, sampler, index: int) -> int:
        return self._lib.llama_sampler_sample(sampler.sampler, self.ctx.ctx, index)

    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        sampler = self._sampler(sampling)
        try:
            seq_id = self._start(prompt_ids, list(range(self.max_batch_size)))
            n_past = len(prompt_ids)
            while True:
                token_id = self._pick(sampler, -1)
                yield token_id
                n_past = self._eval([token_id], n_past, seq_id)
        finally:
            sampler.close()
            self._busy.clear()

    def next_token_logprobs(self, prompt_ids: list[int]) -> list[float]:
        import numpy as np

        self._check_context(len(prompt_ids), 1)
        self._finish(self._start(prompt_ids, list(range(self.max_batch_size))))
        n_vocab = self.model.n_vocab()
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx.ctx, -1), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        top = logits.max()
        return (logits - top - np.log(np.exp(logits - top).sum())).tolist()

    def _open_decoder(self, prompts: list[list[int]], samplings: list[SamplingParams]) -> Decoder:
        return _LlamaDecoder(self, prompts, samplings)

    def _batch_token_capacity(self) -> int:
        return self.context_length  # kv_unified: all sequences share the context's cells

    def close(self) -> None:
        if self.ctx is not None:
            self.batch.close()
            self.ctx.close()
            self.ctx = None


class _LlamaDecoder(Decoder):
    """Each sequence of the batch holds one of the context's llama.cpp sequence ids while it runs;
    a finished sequence's id goes to the next sequence that joins. A new sequence starts from the
    longest prefix of its prompt that any cells hold (``LlamaRunner._start``); a finished
    sequence's cells stay for later prompts until its id is taken or the context needs the room."""

    def __init__(self, runner: LlamaRunner, prompts: list[list[int]], samplings: list[SamplingParams]):
        self.runner, self.prompts = runner, []
        self.samplers: list = []
        self.n_past: list[int] = []
        self.seq_ids: dict[int, int] = {}  # sequence index -> llama.cpp sequence id, while it runs
        self.free_ids = list(range(runner.max_batch_size))
        self.last: dict[int, int] = {}  # index -> the token sampled last (prefilled sequences only)
        self.reused: dict[int, int] = {}  # index -> prompt tokens taken from cached cells
        for prompt, sampling in zip(prompts, samplings):
            self.add(prompt, sampling)

    def add(self, prompt_ids: list[int], sampling: SamplingParams) -> int:
        self.prompts.append(prompt_ids)
        self.samplers.append(self.runner._sampler(sampling))
        self.n_past.append(0)
        return len(self.prompts) - 1

    def step(self, active: Sequence[int]) -> dict[int, int]:
        runner = self.runner
        for i in [i for i in self.seq_ids if i not in active]:
            seq_id = self.seq_ids.pop(i)
            runner._finish(seq_id)
            self.free_ids.append(seq_id)
            self.last.pop(i, None)
        running = [i for i in active if i in self.last]
        if running:  # one token for every sequence already prefilled, in one forward pass
            runner._decode([(self.last[i], self.n_past[i], self.seq_ids[i]) for i in running], last_only=False)
            for k, i in enumerate(running):
                self.n_past[i] += 1
                self.last[i] = runner._pick(self.samplers[i], k)
        for i in [i for i in active if i not in self.last]:  # new: prefill, first token from its last logits
            self.seq_ids[i] = runner._start(self.prompts[i], self.free_ids)
            self.reused[i] = runner.last_cached_tokens
            self.n_past[i] = len(self.prompts[i])
            self.last[i] = runner._pick(self.samplers[i], -1)
        return {i: self.last[i] for i in active}

    def cached_tokens(self, index: int) -> int:
        return self.reused.get(index, 0)

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.close()
        self.samplers = []
        for seq_id in self.seq_ids.values():
            self.runner._finish(seq_id)
        self.seq_ids = {}


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        """Fill the page cache from disk (if needed) and load the model over it."""
        from llama_cpp import _internals

        info = describe(path)
        if info.format != "gguf":
            raise LoadError(f"expert {expert.name}: llama_cpp needs a .gguf file, got {path}")
        if expert.params.get("repack", False):
            _check_repack(expert, path)
        read_s = 0.0
        if (resident_file_bytes(path) or 0) < info.num_bytes:
            started = time.perf_counter()
            read_sequential(path)
            read_s = time.perf_counter() - started
        anon_before = anon_rss_bytes()
        try:
            model = _internals.LlamaModel(path_model=str(path), params=model_params(expert.params), verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LoadError(f"expert {expert.name}: llama.cpp could not load {path}: {exc}") from None
        owned_bytes = _delta(anon_before)
        mapped_bytes = (resident_file_bytes(path) or info.num_bytes) if expert.params.get("use_mmap", True) else 0
        return HostWeights(expert=expert, info=info, payload=model, footprint_bytes=mapped_bytes + owned_bytes,
                           read_s=read_s, on_release=lambda: _release(model, path))

    def materialize(self, host: HostWeights) -> Runner:
        from llama_cpp import _internals

        anon_before = anon_rss_bytes()
        try:
            ctx = _internals.LlamaContext(model=host.payload, params=context_params(
                host.expert.params, host.info.context_length), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise LoadError(f"expert {host.expert.name}: llama.cpp could not create a context: {exc}") from None
        runner = LlamaRunner(host.expert, host.payload, ctx, host.num_bytes, host.info.chat_template)
        runner.footprint_bytes = _delta(anon_before)
        return runner


_repack_checked: dict[Path, str | None] = {}


def _check_repack(expert: ExpertConfig, path: Path) -> None:
    """``repack: true`` runs llama.cpp's repacked (and, on AMX CPUs, AMX) kernels: tried once per
    file in a child process first, so a build or CPU where they crash refuses the expert with the
    reason instead of taking the server down."""
    from coe.backends.llama_lib import probe_default_load

    if path not in _repack_checked:
        _repack_checked[path] = probe_default_load(path, repack=True)
    problem = _repack_checked[path]
    if problem is not None:
        raise LoadError(f"expert {expert.name}: params.repack: true does not work with this llama.cpp "
                        f"build on this CPU ({problem}); set repack: false")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit]):
        if x != y:
            break
        n += 1
    return n


def _release(model, path: Path) -> None:
    """Leaving the host tier: free the model and give the file's pages back, so the bytes the
    tier stops counting are really free (the next read comes from disk)."""
    model.close()
    drop_file_cache(path)


def _delta(anon_before: int | None) -> int:
    after = anon_rss_bytes()
    return max(0, after - anon_before) if after is not None and anon_before is not None else 0
