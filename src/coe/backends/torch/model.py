"""A decoder-only transformer (Llama / Qwen2 / Mistral shapes) with Hugging Face parameter names,
so real HF checkpoints and coe's synthetic experts load the same way.

Built on the ``meta`` device and filled with ``load_state_dict(assign=True)``: allocation and the
copy to the device stay separate and measurable. Linear and embedding layers skip their default
initialisation (every caller assigns or fills the weights; on CUDA the init was 40 ms of a 1.5B
expert's 110 ms host -> device switch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coe.errors import LoadError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a model, from its Hugging Face ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelArgs:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LoadError(
                f"{where}: model_type {model_type!r} is not supported by torch_hf "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("rope_scaling"):
            raise LoadError(f"{where}: rope_scaling is not supported by torch_hf yet")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise LoadError(f"{where}: missing {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            max_position_embeddings=cfg.get("max_position_embeddings"),
        )


def read_model_args(path: Path) -> ModelArgs:
    """The ModelArgs of a checkpoint folder; LoadError names the file."""
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{file}: cannot read model config ({exc})") from None
    return ModelArgs.from_hf(cfg, str(file))


class LoraRows:
    """The LoRA adapters of one forward pass, per batch row (Punica's batched gather-matmul on a
    CPU): for each adapted module, every row's A stacked [B, r, in] and its scale times B stacked
    [B, out, r] (zeros for a row whose adapter leaves the module alone, or that has none), so a
    layer adds the whole batch's updates with two batched matmuls. ``key`` names the batch's
    adapters (rebuilt only when they change: a decode step keeps them)."""

    def __init__(self) -> None:
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key: tuple | None = None


class Linear(nn.Linear):
    lora: LoraRows | None = None  # shared by every Linear of a model (``attach_lora``)
    lora_key: str = ""  # this module's name in the model (an adapter's weights are keyed by it)

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        ab = self.lora.stacked.get(self.lora_key) if self.lora is not None else None
        if ab is None:
            return y
        a, b = ab  # y[row] += (x[row] A_row^T) (scale_row B_row)^T, every row at once
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def attach_lora(model: nn.Module) -> LoraRows:
    """Let the model's linear layers apply per-row LoRA adapters: returns the shared LoraRows."""
    rows = LoraRows()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            module.lora, module.lora_key = rows, name
    return rows


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer by module name; adapters are checked against them."""
    q_dim, kv_dim = (
        args.num_attention_heads * args.head_dim,
        args.num_key_value_heads * args.head_dim,
    )
    per_layer = {
        "self_attn.q_proj": (q_dim, args.hidden_size),
        "self_attn.k_proj": (kv_dim, args.hidden_size),
        "self_attn.v_proj": (kv_dim, args.hidden_size),
        "self_attn.o_proj": (args.hidden_size, q_dim),
        "mlp.gate_proj": (args.intermediate_size, args.hidden_size),
        "mlp.up_proj": (args.intermediate_size, args.hidden_size),
        "mlp.down_proj": (args.hidden_size, args.intermediate_size),
    }
    shapes = {
        f"model.layers.{i}.{name}": shape
        for i in range(args.num_hidden_layers)
        for name, shape in per_layer.items()
    }
    shapes["lm_head"] = (args.vocab_size, args.hidden_size)
    return shapes


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(args.hidden_size, q_dim, bias=args.attention_bias)
        self.k_proj = Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
        self.v_proj = Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
        self.o_proj = Linear(q_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache_k, cache_v, positions, kv_len: int, mask):
        batch, num_tokens = x.shape[:2]  # x: [B, T, H]
        q = _heads(self.q_proj(x), self.num_heads, self.head_dim)  # [B, h, T, d]
        k = _heads(self.k_proj(x), self.num_kv_heads, self.head_dim)
        v = _heads(self.v_proj(x), self.num_kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        _store(cache_k, k, positions)
        _store(cache_v, v, positions)
        out = F.scaled_dot_product_attention(
            q,
            cache_k[:, :, :kv_len],
            cache_v[:, :, :kv_len],
            attn_mask=mask,
            is_causal=mask is None and num_tokens > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(
            out.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * self.head_dim)
        )


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn, self.mlp = Attention(args), MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, cache_k, cache_v, positions, kv_len: int, mask):
        x = x + self.self_attn(
            self.input_layernorm(x), cos, sin, cache_k, cache_v, positions, kv_len, mask
        )
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Body(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: list,
        start: int | list[int],
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, V] of each row's last token.

        input_ids: [B, T], right-padded; cache: per layer (k, v) [B, h_kv, L, d], a token's keys
        stored in the column of its position; start: position of input_ids[:, 0], an int or one
        per row; last: [B] index in T of each row's last real token (default T - 1).
        """
        batch, num_tokens = input_ids.shape
        starts = [start] * batch if isinstance(start, int) else list(start)
        positions = _positions(starts, num_tokens, input_ids.device)  # [B, T]
        kv_len = max(starts) + num_tokens
        uniform = isinstance(start, int) and (start == 0 or num_tokens == 1)
        mask = None if uniform else _visible(positions, kv_len)  # None: plain causal from column 0
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = _rope(positions, self.args.head_dim, self.args.rope_theta, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]: the same rotation for every head
        for layer, (cache_k, cache_v) in zip(self.model.layers, cache):
            x = layer(x, cos, sin, cache_k, cache_v, positions, kv_len, mask)
        x = x[:, -1] if last is None else x[torch.arange(batch, device=x.device), last]  # [B, H]
        return self.lm_head(self.model.norm(x))  # logits only where a token is sampled


def build_model(args: ModelArgs) -> CausalLM:
    """The module on whatever device is current (``with torch.device("meta")``), weights unset."""
    return CausalLM(args)


def _rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin [..., T, d] of the rotary angles at ``positions`` [..., T]."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    angles = positions.float()[..., None] * inv_freq  # [..., T, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., T, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, h * d] -> [B, h, T, d]."""
    return x.view(*x.shape[:2], num_heads, head_dim).transpose(1, 2)


def _positions(starts: list[int], num_tokens: int, device) -> torch.Tensor:
    """[B, T]: row b holds positions starts[b] .. starts[b] + T - 1."""
    return torch.tensor(starts, device=device)[:, None] + torch.arange(num_tokens, device=device)


def _store(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> None:
    """Write ``new`` [B, h, T, d] into ``cache`` [B, h, L, d] at the columns ``positions`` [B, T]."""
    cache.scatter_(2, positions[:, None, :, None].expand_as(new), new)


def _visible(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Attention mask [B, 1, T, kv_len]: a token at position p sees the cache columns 0..p."""
    columns = torch.arange(kv_len, device=positions.device)
    return columns[None, None, None, :] <= positions[:, None, :, None]
