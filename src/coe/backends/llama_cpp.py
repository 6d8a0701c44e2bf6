"""llama.cpp backend for GGUF experts (llama-cpp-python's low-level wrappers).

Tiers: **warm** (``read``) is the file's bytes in the page cache, mapped by a loaded llama.cpp
model (mmap, no weight repacking by default), so the weights stay shared with the page cache and
the model's vocabulary and tensors are already parsed; **hot** (``materialize``) adds a context
(KV cache and compute buffers). Making a warm expert hot therefore costs one context creation,
not a model load. The GGUF file carries the tokenizer and chat template.

A context holds ``max_sequences`` llama.cpp sequence ids sharing one unified KV buffer of n_ctx
cells; the decoder runs one forward pass per step over every live sequence. Which id a new
sequence takes and which cached prefix it reuses is ``PrefixSlots`` (pure bookkeeping); this
module applies its plans to the context.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coe.backends.base import Adapter, Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.llama_lib import load_llama_cpp, probe_default_load
from coe.backends.memory import (
    HostBufferPool,
    anon_rss_bytes,
    drop_file_cache,
    read_sequential,
    resident_file_bytes,
)
from coe.backends.prefix_cache import PrefixSlots, SlotPlan
from coe.backends.sampling import SamplerDefaults, Token, TokenSampler
from coe.config import ExpertConfig, LlamaCppParams
from coe.errors import ConfigError, GenerationError, LoadError, ModelNotAvailable
from coe.models.gguf import read_gguf_header
from coe.models.info import describe
from coe.types import Profile, SamplingParams

NO_KV_SLOT = 1  # llama_decode: no room in the KV cache for the batch (nothing was written)


def model_params(params: LlamaCppParams) -> Any:
    """llama.cpp model parameters (mmap, repacking)."""
    lib = load_llama_cpp()
    model = lib.llama_model_default_params()
    model.n_gpu_layers = params.n_gpu_layers
    model.load_mode = lib.LLAMA_LOAD_MODE_MMAP if params.use_mmap else lib.LLAMA_LOAD_MODE_NONE
    model.use_extra_bufts = params.repack
    return model


def context_params(params: LlamaCppParams, context_length: int | None, threads: int) -> Any:
    lib = load_llama_cpp()
    ctx = lib.llama_context_default_params()
    ctx.n_ctx = params.n_ctx or min(
        LlamaCppParams.DEFAULT_CONTEXT, context_length or LlamaCppParams.DEFAULT_CONTEXT
    )
    ctx.n_batch = ctx.n_ubatch = params.n_batch
    ctx.n_threads = ctx.n_threads_batch = threads
    ctx.n_seq_max = params.max_sequences
    ctx.kv_unified = True  # the sequences of a batch share one KV buffer of n_ctx cells
    return ctx


# loaded model -> llguidance's tokenizer of it
_grammar_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LlamaVocab(Vocab):
    """Tokenizer of a loaded llama.cpp model (``_internals.LlamaModel``)."""

    def __init__(self, model: Any, chat_template: str | None):
        lib = load_llama_cpp()
        self._model = model
        self._vocab = model.vocab
        self.chat_template = chat_template
        self._bos_id = model.token_bos()
        self._add_bos = bool(model.add_bos_token()) and self._bos_id >= 0
        self.bos_text = self._special_text(self._bos_id)
        self.eos_text = self._special_text(model.token_eos())
        self._is_eog = lib.llama_vocab_is_eog
        self.n_vocab = model.n_vocab()

    def _special_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._model.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        ids = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _build_grammar_tokenizer(self) -> Any:
        """Built once per loaded model (a runner's context comes and goes with the device tier).
        Tokens as llama.cpp writes them: a user-defined token like Qwen's ``<tool_call>`` is its
        text, so a grammar's ``"<tool_call>"`` matches it (llguidance's own llama.cpp builder marks
        it special, and then a grammar allows it but cannot consume it)."""
        tokenizer = _grammar_tokenizers.get(self._model)
        if tokenizer is None:
            tokenizer = _grammar_tokenizers[self._model] = super()._build_grammar_tokenizer()
        return tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        return self._model.detokenize([token_id])

    def is_end(self, token_id: int) -> bool:
        return bool(self._is_eog(self._vocab, token_id))


class LlamaRunner(Runner):
    """A llama.cpp context on a warm model. Contract: ``close`` frees the context only; the model
    belongs to the host weights. The prefix slots outlive decoders: a later request reuses the
    cells an earlier one left."""

    def __init__(
        self,
        expert: ExpertConfig,
        params: LlamaCppParams,
        model: Any,
        ctx: Any,
        num_bytes: int,
        chat_template: str | None,
    ):
        from llama_cpp import _internals

        super().__init__(
            expert,
            LlamaVocab(model, chat_template),
            ctx.n_ctx(),
            num_bytes,
            params.max_sequences,
            SamplerDefaults.of(params),
        )
        self.lib = load_llama_cpp()
        self.shares_context = True
        self.model, self.ctx = model, ctx
        self.n_batch = int(ctx.params.n_batch)
        self.n_vocab = model.n_vocab()
        self.batch = _internals.LlamaBatch(
            n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False
        )
        self.slots = PrefixSlots(params.max_sequences, enabled=params.cache_prompt)
        self._n_swa = int(self.lib.llama_model_n_swa(model.model))
        self.adapter: Adapter | None = None  # the LoRA set on the context

    def use_adapter(self, adapter: Adapter | None) -> None:
        """Set the context's LoRA adapter (None: the base alone). Cached prefixes were computed
        through the previous one, so they are forgotten."""
        if adapter is self.adapter:
            return
        import ctypes

        if adapter is None:
            code = self.lib.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            handles = (self.lib.llama_adapter_lora_p_ctypes * 1)(adapter.payload)
            scales = (ctypes.c_float * 1)(adapter.scale)
            code = self.lib.llama_set_adapters_lora(self.ctx.ctx, handles, 1, scales)
        if code != 0:
            raise GenerationError(
                f"{self.expert.name}: llama.cpp could not set the adapter ({code})"
            )
        self.adapter = adapter
        self.forget_all()

    def open_decoder(self) -> Decoder:
        return LlamaDecoder(self)

    # -- the context (the decoder's calls) ------------------------------------------------------
    def decode(self, entries: list[tuple[int, int, int]], all_logits: bool) -> None:
        """One forward pass over (token, position, slot) entries, with logits for every entry or
        only the last; the tokens join what their slots' cells hold. When the context has no room,
        the least recently used idle slots' cells go first."""
        batch = self.batch.batch
        batch.n_tokens = len(entries)
        for k, (token, pos, slot) in enumerate(entries):
            batch.token[k], batch.pos[k] = token, pos
            batch.seq_id[k][0], batch.n_seq_id[k] = slot, 1
            batch.logits[k] = all_logits
        batch.logits[len(entries) - 1] = True
        in_batch = {slot for _, _, slot in entries}
        code = self.lib.llama_decode(self.ctx.ctx, batch)
        while code == NO_KV_SLOT and self._drop_victim(in_batch):
            code = self.lib.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            self.forget_all()  # what the cells hold is unknown now
            raise RuntimeError(f"llama_decode returned {code}")
        for slot in in_batch:
            tokens = [(pos, token) for token, pos, s in entries if s == slot]
            self.slots.record(slot, tokens[0][0], [token for _, token in tokens])

    def prefill(self, prompt_ids: list[int]) -> SlotPlan:
        """Start a new sequence in a free slot from the longest cached prefix of its prompt and
        evaluate the rest; the logits of its last token are at batch index -1."""
        plan = self.slots.plan(prompt_ids, self._window_kept)
        if plan.source is not None and plan.source != plan.slot:
            self._drop(plan.slot)
            self.ctx.kv_cache_seq_cp(plan.source, plan.slot, 0, plan.reused)
        elif plan.source is None:
            self._drop(plan.slot)
        if not self.ctx.kv_cache_seq_rm(
            plan.slot, plan.reused, -1
        ):  # a recurrent or windowed cache
            self._drop(plan.slot)
            plan = SlotPlan(plan.slot, None, 0)
        self.slots.start(plan, prompt_ids)
        position = plan.reused
        for i in range(plan.reused, len(prompt_ids), self.n_batch):
            chunk = prompt_ids[i : i + self.n_batch]
            self.decode(
                [(token, position + k, plan.slot) for k, token in enumerate(chunk)],
                all_logits=False,
            )
            position += len(chunk)
        return plan

    def logits(self, index: int) -> np.ndarray:
        """The logits at batch ``index`` of the last decode: a view of llama.cpp's buffer [V]."""
        pointer = self.lib.llama_get_logits_ith(self.ctx.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _window_kept(self, slot: int, reused: int) -> bool:
        """A sliding-window cache keeps the cells the rest of the prompt attends to."""
        pos_min = self.lib.llama_memory_seq_pos_min(self.ctx.memory, slot)
        return pos_min <= 0 or (self._n_swa > 0 and pos_min <= reused - self._n_swa)

    def _drop_victim(self, keep: set[int]) -> bool:
        victim = self.slots.victim(keep)
        if victim is None:
            return False
        self._drop(victim)
        return True

    def _drop(self, slot: int) -> None:
        if self.slots.drop(slot):
            self.ctx.kv_cache_seq_rm(slot, -1, -1)

    def forget_all(self) -> None:
        """Drop every sequence from the KV cache. Only the cells' metadata: llama.cpp's own
        ``kv_cache_clear`` also zeroes the whole buffer (n_ctx cells, 94 MB for SmolLM2 at 4096),
        which cost 8-10 ms before every request; empty cells are masked out, never read."""
        self.slots.clear()
        if self.ctx.memory is not None:
            self.lib.llama_memory_clear(self.ctx.memory, False)

    def close(self) -> None:
        if self.ctx is not None:
            self.batch.close()
            self.ctx.close()
            self.ctx = None


@dataclass
class _Live:
    """A sequence in the decoder: its slot once prefilled, and the token to feed next."""

    prompt_ids: list[int]
    sampler: TokenSampler
    need_tokens: int
    slot: int = -1
    position: int = 0  # where its next token goes
    last: int | None = None  # the token sampled last (None: not prefilled yet)


class LlamaDecoder(Decoder):
    """Each live sequence holds one of the context's slots; all of them share its n_ctx cells, so
    a new sequence fits while the cells the live ones may need (prompt + max_tokens each) do."""

    def __init__(self, runner: LlamaRunner):
        self.runner = runner
        self.max_sequences = runner.max_sequences
        self.live: dict[int, _Live] = {}

    def has_room(self, need_tokens: int) -> bool:
        held = sum(s.need_tokens for s in self.live.values())
        return self.runner.fits(len(self.live), held, need_tokens)

    def add(
        self,
        seq: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: Adapter | None = None,
    ) -> None:
        """A context applies one adapter to every sequence: the engine batches by adapter."""
        if adapter is not self.runner.adapter:
            if self.live:
                raise GenerationError(
                    f"{self.runner.expert.name}: llama.cpp applies one adapter per batch; "
                    f"{adapter.name if adapter else 'the base'} cannot join this one"
                )
            self.runner.use_adapter(adapter)
        self.live[seq] = _Live(
            prompt_ids,
            self.runner.sampler(sampling),
            len(prompt_ids) + sampling.max_tokens,
        )

    def step(self) -> dict[int, Token]:
        runner, tokens = self.runner, {}
        running = [(seq, s, s.last) for seq, s in self.live.items() if s.last is not None]
        if running:  # one token for every prefilled sequence, in one forward pass
            runner.decode([(last, s.position, s.slot) for _, s, last in running], all_logits=True)
            for index, (seq, s, _) in enumerate(running):
                s.position += 1
                token = s.sampler.pick(runner.logits(index))
                s.last, tokens[seq] = token.id, token
        for seq, s in self.live.items():
            if s.last is None:  # new: prefill, the first token from its last logits
                plan = runner.prefill(s.prompt_ids)
                s.slot, s.position = plan.slot, len(s.prompt_ids)
                token = s.sampler.pick(runner.logits(-1), cached_prompt_tokens=plan.reused)
                s.last, tokens[seq] = token.id, token
        return tokens

    def remove(self, seq: int) -> None:
        s = self.live.pop(seq)
        if s.last is not None:
            self.runner.slots.finish(s.slot)

    def close(self) -> None:
        for seq in list(self.live):
            self.remove(seq)


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        """Fill the page cache from disk (if needed) and load the model over it."""
        from llama_cpp import _internals

        params = LlamaCppParams.of(expert)
        info = describe(path)
        if info.format != "gguf":
            raise LoadError(f"expert {expert.name}: llama_cpp needs a .gguf file, got {path}")
        if params.repack:
            _check_repack(expert, path)
        read_s = 0.0
        if (resident_file_bytes(path) or 0) < info.num_bytes:
            started = time.perf_counter()
            read_sequential(path)
            read_s = time.perf_counter() - started
        anon_before = anon_rss_bytes()
        try:
            model = _internals.LlamaModel(
                path_model=str(path), params=model_params(params), verbose=False
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise LoadError(
                f"expert {expert.name}: llama.cpp could not load {path}: {exc}"
            ) from None
        owned_bytes = _delta(anon_before)
        mapped_bytes = (resident_file_bytes(path) or info.num_bytes) if params.use_mmap else 0
        return HostWeights(
            expert=expert,
            info=info,
            payload=model,
            footprint_bytes=mapped_bytes + owned_bytes,
            read_s=read_s,
            on_release=lambda: _release(model, path),
        )

    def check_adapter(self, base_path: Path, profile: Profile) -> int:
        """A GGUF LoRA (llama.cpp's convert_lora_to_gguf.py writes them) for the base's
        architecture, each lora_a/lora_b pair shaped for the base tensor it adapts."""
        path = _adapter_path(profile)
        try:
            lora, base = read_gguf_header(path), read_gguf_header(base_path)
        except ModelNotAvailable as exc:
            raise ConfigError(f"adapter: {exc.message} ({ADAPTER_HINT})", param="adapter") from None
        kind = (lora.metadata.get("general.type"), lora.metadata.get("adapter.type"))
        if kind != ("adapter", "lora"):
            raise ConfigError(
                f"adapter: {path} is not a GGUF LoRA adapter ({ADAPTER_HINT})", param="adapter"
            )
        if lora.architecture != base.architecture:
            raise ConfigError(
                f"adapter: {path} is a LoRA for {lora.architecture}, the base is {base.architecture}",
                param="adapter",
            )
        for name, shape in lora.tensor_shapes.items():
            target = base.tensor_shapes.get(name.rsplit(".", 1)[0])
            suffix = name.rsplit(".", 1)[-1]
            fits = target is not None and (
                (suffix == "lora_a" and shape[0] == target[0])
                or (suffix == "lora_b" and shape[-1] == target[-1])
            )
            if not fits:
                raise ConfigError(
                    f"adapter: {path}: tensor {name} {list(shape)} does not fit the base "
                    f"({'no such tensor' if target is None else list(target)})",
                    param="adapter",
                )
        return lora.num_params

    def read_adapter(self, host: HostWeights, profile: Profile) -> Adapter:
        lib, path = load_llama_cpp(), _adapter_path(profile)
        anon_before = anon_rss_bytes()
        handle = lib.llama_adapter_lora_init(host.payload.model, str(path).encode())
        if not handle:
            raise LoadError(f"expert {profile.name}: llama.cpp could not load the adapter {path}")
        return Adapter(
            profile.name,
            path,
            profile.adapter_scale,
            read_gguf_header(path).num_params,
            _delta(anon_before),
            handle,
            on_release=lambda: lib.llama_adapter_lora_free(handle),
        )

    def vocab_of(self, host: HostWeights) -> Vocab:
        return LlamaVocab(host.payload, host.info.chat_template)

    def materialize(self, host: HostWeights) -> Runner:
        from llama_cpp import _internals

        params = LlamaCppParams.of(host.expert)
        anon_before = anon_rss_bytes()
        try:
            ctx = _internals.LlamaContext(
                model=host.payload,
                params=context_params(params, host.info.context_length, params.threads()),
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise LoadError(
                f"expert {host.expert.name}: llama.cpp could not create a context: {exc}"
            ) from None
        runner = LlamaRunner(
            host.expert, params, host.payload, ctx, host.num_bytes, host.info.chat_template
        )
        runner.footprint_bytes = _delta(anon_before)
        return runner


_repack_checked: dict[Path, str | None] = {}


def _check_repack(expert: ExpertConfig, path: Path) -> None:
    """``repack: true`` runs llama.cpp's repacked (and, on AMX CPUs, AMX) kernels: tried once per
    file in a child process first, so a build or CPU where they crash refuses the expert with the
    reason instead of taking the server down."""
    if path not in _repack_checked:
        _repack_checked[path] = probe_default_load(path, repack=True)
    problem = _repack_checked[path]
    if problem is not None:
        raise LoadError(
            f"expert {expert.name}: params.repack: true does not work with this llama.cpp "
            f"build on this CPU ({problem}); set repack: false"
        )


ADAPTER_HINT = "convert a PEFT adapter with llama.cpp's convert_lora_to_gguf.py"


def _adapter_path(profile: Profile) -> Path:
    assert profile.adapter is not None
    return Path(profile.adapter).expanduser()


def _release(model: Any, path: Path) -> None:
    """Leaving the host tier: free the model and give the file's pages back, so the bytes the
    tier stops counting are really free (the next read comes from disk)."""
    model.close()
    drop_file_cache(path)


def _delta(anon_before: int | None) -> int:
    after = anon_rss_bytes()
    return max(0, after - anon_before) if after is not None and anon_before is not None else 0
