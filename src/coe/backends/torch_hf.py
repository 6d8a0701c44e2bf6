"""torch backend for safetensors checkpoints of Llama / Qwen2 / Mistral shaped decoders.

The model is a compact re-implementation with Hugging Face parameter names, so real HF
checkpoints and coe's synthetic experts load the same way: built on the ``meta`` device and
filled with ``load_state_dict(assign=True)``, which keeps allocation (``read``) and the copy to
the device (``materialize``) separate and measurable.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from coe.backends.base import Backend, Decoder, HostWeights, Runner, Vocab
from coe.backends.memory import HostBufferPool, anon_rss_bytes, read_sequential
from coe.config import ExpertConfig
from coe.errors import LoadError, MissingExtra
from coe.models.info import describe, read_json
from coe.models.safetensors_info import checkpoint_files
from coe.types import SamplingParams

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
BYTE_VOCAB_SIZE = 258  # 256 bytes + BOS + EOS, for checkpoints without a tokenizer.json
DEFAULT_CONTEXT = 4096
DEFAULT_SEQUENCES = 8


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtra("torch", "torch") from None
    return torch


# ---- model -------------------------------------------------------------------------------------

def build_model(cfg: dict):
    """A decoder-only transformer module (created on whatever device is current), its weights
    left uninitialised: every caller assigns or fills them (on meta, the default init was half
    the build time: 40 ms of a 1.5B expert's 110 ms host -> device switch on an H200)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Linear(nn.Linear):
        def reset_parameters(self):
            pass

    class Embedding(nn.Embedding):
        def reset_parameters(self):
            pass

    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    head_dim = cfg.get("head_dim") or hidden // num_heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    qkv_bias = cfg.get("attention_bias", cfg.get("model_type") == "qwen2")

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            variance = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * self.weight

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = Linear(hidden, num_heads * head_dim, bias=qkv_bias)
            self.k_proj = Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
            self.v_proj = Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
            self.o_proj = Linear(num_heads * head_dim, hidden, bias=False)

        def forward(self, x, cos, sin, cache_k, cache_v, positions, kv_len: int, mask):
            batch, num_tokens = x.shape[:2]  # x: [B, T, H]
            q = _heads(self.q_proj(x), num_heads, head_dim)  # [B, h, T, d]
            k = _heads(self.k_proj(x), num_kv_heads, head_dim)
            v = _heads(self.v_proj(x), num_kv_heads, head_dim)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            _store(cache_k, k, positions)
            _store(cache_v, v, positions)
            out = F.scaled_dot_product_attention(
                q, cache_k[:, :, :kv_len], cache_v[:, :, :kv_len], attn_mask=mask,
                is_causal=mask is None and num_tokens > 1, enable_gqa=num_kv_heads != num_heads)
            return self.o_proj(out.transpose(1, 2).reshape(batch, num_tokens, num_heads * head_dim))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            inner = cfg["intermediate_size"]
            self.gate_proj = Linear(hidden, inner, bias=False)
            self.up_proj = Linear(hidden, inner, bias=False)
            self.down_proj = Linear(inner, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attention(), MLP()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()

        def forward(self, x, cos, sin, cache_k, cache_v, positions, kv_len: int, mask):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, positions, kv_len, mask)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = Embedding(cfg["vocab_size"], hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))
            self.norm = RMSNorm()

    class CausalLM(nn.Module):
        num_layers, kv_heads, dim = cfg["num_hidden_layers"], num_kv_heads, head_dim
        rope_theta = float(cfg.get("rope_theta", 10000.0))

        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = Linear(hidden, cfg["vocab_size"], bias=False)

        def forward(self, input_ids, cache, start, last=None):
            """Logits of each sequence's last token.

            input_ids: [B, T], right-padded; cache: per layer (k, v) [B, h_kv, L, d], a token's keys
            stored in the column of its position; start: position of input_ids[:, 0], an int or one
            per sequence; last: [B] index in T of each row's last real token (default T - 1).
            Returns [B, V]. One sequence (input_ids [T], cache [h_kv, L, d]) gives [V].
            """
            if input_ids.dim() == 1:
                return self._batch(input_ids[None], [(k[None], v[None]) for k, v in cache], start, last)[0]
            return self._batch(input_ids, cache, start, last)

        def _batch(self, input_ids, cache, start, last):
            batch, num_tokens = input_ids.shape
            starts = [start] * batch if isinstance(start, int) else list(start)
            positions = _positions(starts, num_tokens, input_ids.device)  # [B, T]
            kv_len = max(starts) + num_tokens
            uniform = isinstance(start, int) and (start == 0 or num_tokens == 1)
            mask = None if uniform else _visible(positions, kv_len)  # None: plain causal from column 0
            x = self.model.embed_tokens(input_ids)  # [B, T, H]
            cos, sin = _rope(positions, head_dim, self.rope_theta, x.dtype)
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]: the same rotation for every head
            for layer, (cache_k, cache_v) in zip(self.model.layers, cache):
                x = layer(x, cos, sin, cache_k, cache_v, positions, kv_len, mask)
            x = x[:, -1] if last is None else x[torch.arange(batch, device=x.device), last]  # [B, H]
            return self.lm_head(self.model.norm(x))  # logits only where a token is sampled

    return CausalLM()


def _rope(positions, head_dim: int, theta: float, dtype):
    """cos and sin [..., T, d] of the rotary angles at ``positions`` [..., T]."""
    torch = _torch()
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [..., T, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., T, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x, cos, sin):
    torch = _torch()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(x, num_heads: int, head_dim: int):
    """[B, T, h * d] -> [B, h, T, d]."""
    return x.view(*x.shape[:2], num_heads, head_dim).transpose(1, 2)


def _positions(starts: list[int], num_tokens: int, device):
    """[B, T]: row b holds positions starts[b] .. starts[b] + T - 1."""
    torch = _torch()
    return torch.tensor(starts, device=device)[:, None] + torch.arange(num_tokens, device=device)


def _store(cache, new, positions) -> None:
    """Write ``new`` [B, h, T, d] into ``cache`` [B, h, L, d] at the columns ``positions`` [B, T]."""
    cache.scatter_(2, positions[:, None, :, None].expand_as(new), new)


def _visible(positions, kv_len: int):
    """Attention mask [B, 1, T, kv_len]: a token at position p sees the cache columns 0..p."""
    torch = _torch()
    columns = torch.arange(kv_len, device=positions.device)
    return columns[None, None, None, :] <= positions[:, None, :, None]


def read_model_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path / 'config.json'}: cannot read model config ({exc})") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LoadError(f"{path}: model_type {model_type!r} is not supported by torch_hf "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("rope_scaling"):
        raise LoadError(f"{path}: rope_scaling is not supported by torch_hf yet")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise LoadError(f"{path / 'config.json'}: missing {', '.join(missing)}")
    return cfg


# ---- tokenizers --------------------------------------------------------------------------------

class ByteVocab(Vocab):
    """Token i < 256 is byte i; 256 is BOS, 257 EOS. For synthetic checkpoints without a tokenizer."""

    BOS, EOS = 256, 257

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

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
        self._add_bos = bool(tokenizer_config.get("add_bos_token", False)) and bool(self.bos_text)
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
            ids = [self._tok.token_to_id(self.bos_text), *ids]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if token_id < len(self._bytes) else b""

    def is_end(self, token_id: int) -> bool:
        return token_id in self._end_ids


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _gpt2_byte_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
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
        raise LoadError(f"{path}: no tokenizer.json, and vocab_size {vocab_size} is too small for "
                        f"the byte tokenizer ({BYTE_VOCAB_SIZE})")
    return ByteVocab(tokenizer_config.get("chat_template"))


# ---- backend -----------------------------------------------------------------------------------

class TorchRunner(Runner):
    """Expert param ``max_sequences`` (default 8): sequences decoded together in one forward pass."""

    def __init__(self, expert: ExpertConfig, vocab: Vocab, model, cfg: dict, device, num_bytes: int,
                 context_length: int):
        super().__init__(expert, vocab, context_length, num_bytes)
        self.model, self.cfg, self.device = model, cfg, device
        self.max_batch_size = max(1, int(expert.params.get("max_sequences", DEFAULT_SEQUENCES)))

    def _new_cache(self, length: int, batch: int | None = None):
        """Per layer (k, v) of [h_kv, length, d], or [batch, h_kv, length, d] for a batch.

        A batch's rows attend over columns that are masked but not all written yet: they must
        hold finite numbers (a masked NaN still makes the attention output NaN), so zeros.
        """
        torch = _torch()
        dtype = next(self.model.parameters()).dtype
        shape = (self.model.kv_heads, length, self.model.dim)
        shape, allocate = (shape, torch.empty) if batch is None else ((batch, *shape), torch.zeros)
        return [(allocate(shape, dtype=dtype, device=self.device),
                 allocate(shape, dtype=dtype, device=self.device)) for _ in range(self.model.num_layers)]

    def _sample(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[int]:
        torch = _torch()
        generator = _generator(sampling)
        cache = self._new_cache(len(prompt_ids) + sampling.max_tokens)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        start = 0
        with torch.inference_mode():
            while True:
                logits = self.model(ids, cache, start)  # [V]
                start += ids.shape[0]
                token_id = _pick(logits.float().cpu(), sampling, generator)
                yield token_id
                ids = torch.tensor([token_id], dtype=torch.long, device=self.device)

    def next_token_logprobs(self, prompt_ids: list[int]) -> list[float]:
        torch = _torch()
        self._check_context(len(prompt_ids), 1)
        cache = self._new_cache(len(prompt_ids) + 1)
        with torch.inference_mode():
            logits = self.model(torch.tensor(prompt_ids, dtype=torch.long, device=self.device), cache, 0)  # [V]
            return torch.log_softmax(logits.float(), dim=-1).cpu().tolist()

    def _open_decoder(self, prompts: list[list[int]], samplings: list[SamplingParams]) -> Decoder:
        return _TorchDecoder(self, prompts, samplings)

    def _batch_token_capacity(self) -> int:
        return self.context_length * self.max_batch_size  # every sequence has a cache row of its own

    def close(self) -> None:
        self.model = None


class _TorchDecoder(Decoder):
    """One KV cache [B, h_kv, L, d] per layer; row r holds sequence ``rows[r]`` with its token at
    position p in column p (prompts right-padded). A finished sequence's row is dropped."""

    def __init__(self, runner: TorchRunner, prompts: list[list[int]], samplings: list[SamplingParams]):
        self.runner, self.prompts, self.samplings = runner, prompts, samplings
        self.generators = [_generator(s) for s in samplings]
        self.cache_length_tokens = max(len(p) + s.max_tokens for p, s in zip(prompts, samplings))
        self.cache = None
        self.rows: list[int] = []      # sequence index of each batch row
        self.num_cached: list[int] = []  # tokens in each row's cache = position of its next token
        self.last: dict[int, int] = {}

    def step(self, active: Sequence[int]) -> dict[int, int]:
        torch = _torch()
        with torch.inference_mode():
            logits = self._prefill(list(active)) if self.cache is None else self._decode(list(active))
        logits = logits.float().cpu()  # [B, V]
        self.last = {i: _pick(logits[row], self.samplings[i], self.generators[i]) for row, i in enumerate(self.rows)}
        return dict(self.last)

    def _prefill(self, active: list[int]):
        torch = _torch()
        lengths = [len(self.prompts[i]) for i in active]
        ids = torch.zeros((len(active), max(lengths)), dtype=torch.long)  # right-padded with token 0
        for row, i in enumerate(active):
            ids[row, :lengths[row]] = torch.tensor(self.prompts[i])
        self.rows, self.num_cached = active, lengths
        self.cache = self.runner._new_cache(self.cache_length_tokens, batch=len(active))
        last = torch.tensor(lengths, device=self.runner.device) - 1
        return self.runner.model(ids.to(self.runner.device), self.cache, 0, last=last)

    def _decode(self, active: list[int]):
        torch = _torch()
        if active != self.rows:
            self._keep(active)
        ids = torch.tensor([[self.last[i]] for i in active], dtype=torch.long, device=self.runner.device)
        logits = self.runner.model(ids, self.cache, self.num_cached)
        self.num_cached = [n + 1 for n in self.num_cached]
        return logits

    def _keep(self, active: list[int]) -> None:
        """Drop the rows of finished sequences (their cache rows too)."""
        torch = _torch()
        kept = [self.rows.index(i) for i in active]
        index = torch.tensor(kept, device=self.runner.device)
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
        self.rows, self.num_cached = active, [self.num_cached[row] for row in kept]

    def close(self) -> None:
        self.cache = None


def _generator(sampling: SamplingParams):
    """A CPU generator of its own for one sequence: seeded, or with a fresh random seed (never the global RNG)."""
    torch = _torch()
    generator = torch.Generator(device="cpu")
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()  # a fresh random seed for this generator only; torch.seed() would reseed the global RNG
    return generator


def _pick(logits, sampling: SamplingParams, generator) -> int:
    torch = _torch()
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def tensors_in(buffer, path: Path) -> dict:
    """Views into ``buffer`` (a uint8 tensor holding one safetensors file) for every tensor in it.

    No copy: the host tier keeps one allocation per expert. A tensor whose offset does not suit
    its dtype's alignment is copied out instead.
    """
    torch = _torch()
    header_bytes = int.from_bytes(bytes(buffer[:8].numpy()), "little")
    try:
        header = json.loads(bytes(buffer[8:8 + header_bytes].numpy()))
    except ValueError as exc:
        raise LoadError(f"{path}: not a readable safetensors file ({exc})") from None
    data_start = 8 + header_bytes
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _SAFETENSORS_DTYPES.get(entry["dtype"], ""), None)
        if dtype is None:
            raise LoadError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        expected_bytes = math.prod(entry["shape"]) * dtype.itemsize
        if not data_start <= begin <= end <= buffer.numel() or end - begin != expected_bytes:
            raise LoadError(f"{path}: tensor {name} should hold {expected_bytes} bytes at {begin}..{end} of a "
                            f"{buffer.numel()}-byte file: the file is truncated or corrupt")
        raw = buffer[begin:end]
        if raw.storage_offset() % dtype.itemsize:  # where it lies in the whole buffer (shards follow each other)
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


@dataclass(frozen=True)
class WarmCheckpoint:
    """What the host tier holds of a torch expert: its config, tokenizer, and tensors viewing
    ``buffer`` (the checkpoint files' bytes, back to back; pinned on CUDA)."""
    cfg: dict
    state: dict
    buffer: object  # uint8 tensor
    vocab: Vocab

    def to_device(self, device) -> dict:
        """The tensors on ``device``: on CPU the host tensors themselves; on CUDA the whole buffer
        in one non-blocking copy (one transfer runs at the link's bandwidth, hundreds of small
        ones do not), viewed back into tensors at the same offsets."""
        if device.type != "cuda":
            return dict(self.state)
        torch = _torch()
        on_device = torch.empty(self.buffer.numel(), dtype=torch.uint8, device=device)
        on_device.copy_(self.buffer, non_blocking=True)
        return views_at_same_offsets(self.state, self.buffer, on_device)


def views_at_same_offsets(state: dict, buffer, copy) -> dict:
    """``state``'s tensors that view ``buffer``, as views of ``copy`` (a copy of ``buffer``, maybe
    on another device) at the same offsets; the others (converted to another dtype, or copied for
    alignment, at read) are copied to ``copy``'s device on their own."""
    base, moved = buffer.data_ptr(), {}
    for name, tensor in state.items():
        offset = tensor.data_ptr() - base
        if 0 <= offset and offset + tensor.nbytes <= buffer.numel():
            moved[name] = copy[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        else:
            moved[name] = tensor.to(copy.device, non_blocking=True)
    return moved


class TorchHFBackend(Backend):
    """Expert params: dtype (float32 | bfloat16 | float16), device (cpu | cuda | cuda:N), n_ctx,
    max_sequences (sequences decoded together in one forward pass, default 8).

    Warm: the checkpoint's files read into one reusable host buffer (pinned on CUDA) and viewed as
    tensors in place. Hot: the module built on ``meta`` and given those tensors with
    ``assign=True`` (CPU: no copy) or copied to the device with non-blocking transfers (CUDA).
    """

    name = "torch_hf"

    def read(self, expert: ExpertConfig, path: Path, pool: HostBufferPool) -> HostWeights:
        cfg = read_model_config(path)
        dtype = _dtype(expert)
        files = checkpoint_files(path)
        sizes = [file.stat().st_size for file in files]
        buffer = pool.acquire(sum(sizes))
        state, offset, converted_bytes = {}, 0, 0
        started = time.perf_counter()
        try:
            for file, size in zip(files, sizes):
                view = buffer[offset:offset + size]
                read_sequential(file, memoryview(view.numpy()))
                state.update(tensors_in(view, file))
                offset += size
        except BaseException:
            pool.release(buffer)
            raise
        read_s = time.perf_counter() - started
        for name, tensor in state.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                state[name] = tensor.to(dtype)  # a checkpoint in another dtype costs one copy here
                converted_bytes += state[name].nbytes
        warm = WarmCheckpoint(cfg, state, buffer[:offset], load_vocab(path, cfg["vocab_size"]))
        return HostWeights(expert=expert, info=describe(path), payload=warm,
                           footprint_bytes=buffer.numel() + converted_bytes, read_s=read_s,
                           on_release=lambda: pool.release(buffer))

    def materialize(self, host: HostWeights) -> Runner:
        torch = _torch()
        warm: WarmCheckpoint = host.payload
        cfg = warm.cfg
        device = _device(host.expert)
        with torch.device("meta"):
            model = build_model(cfg)  # no memory; but the first one in a process imports torch._dynamo (~70 MB)
        before = _allocated_bytes(torch, device)
        state = warm.to_device(device)
        if "lm_head.weight" not in state and cfg.get("tie_word_embeddings", True):
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        try:
            model.load_state_dict(state, assign=True, strict=True)
        except (RuntimeError, TypeError) as exc:
            raise LoadError(f"{host.info.path}: weights do not match config.json ({exc})") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host buffer may be reused once this returns
        model.eval()
        context = min(int(host.expert.params.get("n_ctx", DEFAULT_CONTEXT)),
                      int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT))
        runner = TorchRunner(host.expert, warm.vocab, model, cfg, device, host.num_bytes, context)
        runner.footprint_bytes = max(0, _allocated_bytes(torch, device) - before)
        return runner


def _allocated_bytes(torch, device) -> int:
    """Device memory held by torch (CUDA), or this process's anonymous RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return anon_rss_bytes() or 0


def _dtype(expert: ExpertConfig):
    torch = _torch()
    name = expert.params.get("dtype", "float32")
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LoadError(f"expert {expert.name}: params.dtype {name!r} is not a torch float dtype")
    return dtype


def _device(expert: ExpertConfig):
    torch = _torch()
    name = str(expert.params.get("device", "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"expert {expert.name}: params.device is {name!r} but CUDA is not available")
    return torch.device(name)

