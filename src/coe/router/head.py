"""The trained classifier over sentence embeddings, and its artifact on disk.

An artifact is a folder: ``head.safetensors`` (weights) + ``router.json`` (categories,
temperature, threshold, encoder, metrics) + ``encoder.safetensors`` when the encoder's top layers
were tuned (``router.json``'s ``encoder.tuned_layers``). Loading checks both and names the file and field
that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coe.config import is_number
from coe.errors import RouterUnavailable

WEIGHTS_FILE = "head.safetensors"
LAYERS_FILE = "encoder.safetensors"  # the encoder's tuned top layers, when training tuned them
META_FILE = "router.json"
FORMAT_VERSION = 1


NGRAM_BUCKETS = 1 << 15
MAX_NGRAM_CHARS = 4000
_WORD = re.compile(r"[^\W\d_][\w']*")


@dataclass
class Features:
    """What the head reads for a batch of prompts: sentence embeddings plus hashed word
    uni- and bigrams (log term frequency, L2-normalised) as a flat bag with offsets."""

    embeddings: torch.Tensor
    ngrams: list[tuple[list[int], list[float]]]

    def __len__(self) -> int:
        return len(self.ngrams)

    def select(self, index: list[int]) -> Features:
        return Features(self.embeddings[index], [self.ngrams[i] for i in index])

    def bag(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        offsets: list[int] = []
        weights: list[float] = []
        for bucket_ids, bucket_weights in self.ngrams:
            offsets.append(len(ids))
            ids.extend(bucket_ids)
            weights.extend(bucket_weights)
        return (
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(offsets, dtype=torch.long),
            torch.tensor(weights, dtype=torch.float32),
        )


def ngram_bag(text: str) -> tuple[list[int], list[float]]:
    words = _WORD.findall(text[:MAX_NGRAM_CHARS].lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    counts = Counter(
        int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
        % NGRAM_BUCKETS
        for g in grams
    )
    weights = [1.0 + math.log(c) for c in counts.values()]
    norm = math.sqrt(sum(w * w for w in weights)) or 1.0
    return list(counts), [w / norm for w in weights]


class HeadNet(nn.Module):
    """Logits = (softmax regression or one-hidden-layer MLP over the embedding)
    + a linear layer over the hashed n-gram bag."""

    def __init__(self, dim: int, hidden_size: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if hidden_size:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_classes),
            )
        else:
            self.net = nn.Sequential(nn.Linear(dim, num_classes))
        self.ngrams = nn.EmbeddingBag(NGRAM_BUCKETS, num_classes, mode="sum")
        nn.init.zeros_(self.ngrams.weight)

    def forward(self, features: Features) -> torch.Tensor:
        ids, offsets, weights = features.bag()
        return self.net(features.embeddings) + self.ngrams(ids, offsets, per_sample_weights=weights)


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-category loss weights that give every category the same total weight."""
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).float()
    return counts.sum() / (num_classes * counts)


def balanced_loss(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, prompt_weights: torch.Tensor
) -> torch.Tensor:
    """Class-balanced cross-entropy (label smoothing 0.05) in which each prompt counts
    ``prompt_weights`` times."""
    each = F.cross_entropy(logits, y, weight=weights, label_smoothing=0.05, reduction="none")
    return (each * prompt_weights).sum() / (weights[y] * prompt_weights).sum()


@dataclass(frozen=True)
class HeadMeta:
    categories: tuple[str, ...]
    dim: int
    hidden_size: int
    temperature: float
    threshold: float
    encoder: dict
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "categories": list(self.categories)}, indent=2)


@dataclass
class Head:
    net: HeadNet
    meta: HeadMeta

    def probabilities(self, features: Features) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.net(features) / self.meta.temperature, dim=-1)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / (WEIGHTS_FILE + ".tmp")))
        (folder / (META_FILE + ".tmp")).write_text(self.meta.to_json())
        (folder / (WEIGHTS_FILE + ".tmp")).replace(folder / WEIGHTS_FILE)
        (folder / (META_FILE + ".tmp")).replace(folder / META_FILE)
        return folder


def load_head(folder: str | Path) -> Head:
    folder = Path(folder)
    meta = _read_meta(folder / META_FILE)
    net = HeadNet(meta.dim, meta.hidden_size, len(meta.categories))
    weights = folder / WEIGHTS_FILE
    state = _read_tensors(weights, "the router's weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:  # missing tensors or another shape
        raise RouterUnavailable(
            f"{weights}: the router's weights are corrupt ({exc}); run `coe router train`"
        ) from exc
    return Head(net.eval(), meta)


def save_layers(folder: Path, layers: dict[str, torch.Tensor]) -> None:
    """The tuned encoder layers, written before ``router.json`` names them."""
    from safetensors.torch import save_file

    tmp = folder / (LAYERS_FILE + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in layers.items()}, str(tmp))
    tmp.replace(folder / LAYERS_FILE)


def read_layers(folder: Path) -> dict[str, torch.Tensor]:
    return _read_tensors(folder / LAYERS_FILE, "the router's tuned encoder layers")


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RouterUnavailable(f"{path}: {what} are missing; run `coe router train`") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise RouterUnavailable(
            f"{path}: {what} are corrupt ({exc}); run `coe router train`"
        ) from exc


def read_meta_quietly(folder: Path) -> HeadMeta | None:
    """The artifact's metadata, or None when it is missing or unreadable."""
    try:
        return _read_meta(Path(folder) / META_FILE)
    except RouterUnavailable:
        return None


def _read_meta(path: Path) -> HeadMeta:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RouterUnavailable(f"{path}: no trained router here; run `coe router train`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouterUnavailable(
            f"{path}: corrupt router metadata ({exc}); run `coe router train`"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise RouterUnavailable(
            f"{path}: field 'format_version' must be {FORMAT_VERSION}; "
            f"retrain with `coe router train`"
        )
    try:
        meta = HeadMeta(**{**raw, "categories": tuple(raw["categories"])})
    except (KeyError, TypeError) as exc:
        raise RouterUnavailable(f"{path}: missing or unexpected field ({exc})") from exc
    _check_meta(meta, path)
    return meta


def _check_meta(meta: HeadMeta, path: Path) -> None:
    problems = []
    if len(meta.categories) < 2 or len(set(meta.categories)) != len(meta.categories):
        problems.append("'categories' must list at least two distinct names")
    if not (
        is_number(meta.temperature) and math.isfinite(meta.temperature) and meta.temperature > 0
    ):
        problems.append("'temperature' must be a positive finite number")
    if not (is_number(meta.threshold) and 0 <= meta.threshold <= 1):
        problems.append("'threshold' must be between 0 and 1")
    if not (
        _integer(meta.dim) and meta.dim > 0 and _integer(meta.hidden_size) and meta.hidden_size >= 0
    ):
        problems.append("'dim' must be a positive integer and 'hidden_size' a non-negative one")
    if problems:
        raise RouterUnavailable(f"{path}: " + "; ".join(problems))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
