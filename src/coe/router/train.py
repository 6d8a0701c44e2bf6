"""Train, calibrate and evaluate the router's head on labelled prompts.

Steps: embed every prompt once (embeddings are cached on disk per encoder), fit the head on the
train split with class-balanced cross-entropy, keep the epoch with the best validation accuracy,
fit a temperature on validation logits, pick the fallback threshold on validation, then report
accuracy, per-category precision/recall and the confusion matrix on the test split and on
MT-Bench.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coe.errors import ConfigError
from coe.router.data import CATEGORIES, CHAT_SOURCE, GENERALIST, Example, by_split, unit_hash
from coe.router.encoder import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PRECISION,
    ENCODER_DIST,
    ENCODER_IMPL,
    ENCODER_VERSION,
    SentenceEncoder,
)
from coe.router.head import (
    LAYERS_FILE,
    Features,
    Head,
    HeadMeta,
    HeadNet,
    balanced_loss,
    class_weights,
    ngram_bag,
    save_layers,
)
from coe.router.tune import Progress, tune_top_layers

FEATURES_VERSION = 1  # bump when the features the head reads change
CALIBRATION_MIN = 20  # chat-style validation prompts needed to calibrate the threshold on them
# prompts below a threshold needed to trust their accuracy: on the chat-style validation prompts
# (about 180) 10, 5% of them; on benchmark validation (about 1900, or a user's set) 20
CHAT_MIN_BELOW = 10
MIN_BELOW = 20


@dataclass(frozen=True)
class TrainSettings:
    hidden_size: int = 0
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    seed: int = 0
    min_steps: int = 1000  # small datasets train for more epochs
    min_fallback_accuracy: float = 0.5  # below the threshold, the top category is right less often
    chat_weight: float = 30.0  # a hand-written chat-style prompt counts this many times in the loss
    # The encoder's top layers tuned on every chat-style training prompt and this many benchmark
    # ones before the head is fitted (0 layers: the packaged encoder as it is); see router/tune.py.
    tune_layers: int = 2
    tune_epochs: int = 3
    tune_lr: float = 5e-5
    tune_benchmark_prompts: int = 4000
    tune_batch_size: int = 32


@dataclass(frozen=True)
class Evaluation:
    name: str
    n: int
    accuracy: float
    fallback_rate: float
    categories: tuple[str, ...]
    confusion: list[list[int]]  # rows: true category, columns: predicted

    def per_category(self) -> dict[str, dict[str, float]]:
        out = {}
        for i, cat in enumerate(self.categories):
            tp = self.confusion[i][i]
            predicted = sum(row[i] for row in self.confusion)
            actual = sum(self.confusion[i])
            out[cat] = {
                "precision": tp / predicted if predicted else 0.0,
                "recall": tp / actual if actual else 0.0,
                "n": actual,
            }
        return out

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "fallback_rate": self.fallback_rate,
            "per_category": self.per_category(),
            "confusion": self.confusion,
        }


# -- embeddings -----------------------------------------------------------------------------------
class EmbeddingStore:
    """Embeddings of training prompts kept on disk, keyed by text, so retraining skips the encoder."""

    def __init__(self, encoder: SentenceEncoder, folder: Path | None):
        self.encoder = encoder
        tag = (
            f"{ENCODER_DIST}-{ENCODER_VERSION}-{encoder.max_tokens}-{encoder.precision}"
            f"-impl{ENCODER_IMPL}"
        )
        self.path = folder / f"embeddings-{tag}.pt" if folder else None
        self.rows: dict[str, torch.Tensor] = {}
        if self.path and self.path.is_file():
            try:
                self.rows = torch.load(self.path, weights_only=True)
            except Exception:  # a damaged cache is rebuilt, never trusted
                self.rows = {}

    def embed(
        self, texts: Sequence[str], progress: Progress | None = None, chunk: int = 512
    ) -> torch.Tensor:
        keys = [
            hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            for t in texts
        ]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.rows}.items())
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            rows = self.encoder._encode_uncached([t for _, t in part])
            self.rows.update({k: row.clone() for (k, _), row in zip(part, rows)})
            if progress:
                progress("embed", min(start + chunk, len(todo)), len(todo))
        if self.path and (todo or len(self.rows) > len(set(keys))):
            self.rows = {k: self.rows[k] for k in keys}  # keep only what this data set uses
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.rows, self.path.with_suffix(".tmp"))
            self.path.with_suffix(".tmp").replace(self.path)
        return (
            torch.stack([self.rows[k] for k in keys]) if keys else torch.empty(0, self.encoder.dim)
        )


# -- fitting --------------------------------------------------------------------------------------
def fit_head(
    train: Features,
    y: torch.Tensor,
    val: Features,
    yv: torch.Tensor,
    num_classes: int,
    settings: TrainSettings,
    progress: Progress | None = None,
    sample_weights: torch.Tensor | None = None,
) -> HeadNet:
    """Class-balanced cross-entropy; ``sample_weights`` (one per training prompt) scale each
    prompt's share of the loss."""
    torch.manual_seed(settings.seed)
    net = HeadNet(train.embeddings.shape[1], settings.hidden_size, num_classes, settings.dropout)
    weights = class_weights(y, num_classes)
    per_prompt = sample_weights if sample_weights is not None else torch.ones(len(y))
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    best, best_state = -1.0, None
    batch_size = min(settings.batch_size, max(16, len(y) // 20))  # >= ~20 steps per epoch
    epochs = max(settings.epochs, math.ceil(settings.min_steps / math.ceil(len(y) / batch_size)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y)).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = balanced_loss(net(train.select(idx)), y[idx], weights, per_prompt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        accuracy = _accuracy(net, val, yv)
        if accuracy >= best:  # ties: the later, better-fitted epoch
            best, best_state = accuracy, {k: v.clone() for k, v in net.state_dict().items()}
        if progress:
            progress("train", epoch + 1, epochs)
    assert best_state is not None  # the first epoch's accuracy is >= the initial best
    net.load_state_dict(best_state)
    return net.eval()


def _accuracy(net: HeadNet, x: Features, y: torch.Tensor) -> float:
    net.eval()
    with torch.inference_mode():
        return (net(x).argmax(-1) == y).float().mean().item() if len(y) else 0.0


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature minimising validation NLL (grid over 0.05..20, log-spaced)."""
    grid = torch.logspace(math.log10(0.05), math.log10(20), 200)
    nll = [F.cross_entropy(logits / t, y).item() for t in grid]
    return float(grid[min(range(len(grid)), key=nll.__getitem__)])


def fit_threshold(
    confidence: torch.Tensor, correct: torch.Tensor, min_accuracy: float, min_count: int = MIN_BELOW
) -> float:
    """The highest confidence t such that predictions below t are right less than ``min_accuracy``
    of the time (measured on at least ``min_count`` validation prompts); 0 if none is."""
    best = 0.0
    for t in torch.arange(0.05, 0.96, 0.05).tolist():
        below = confidence < t
        if below.sum() >= min_count and correct[below].float().mean() < min_accuracy:
            best = t
    return round(best, 2)


def tune_encoder(
    encoder: SentenceEncoder,
    examples: list[Example],
    settings: TrainSettings,
    progress: Progress | None = None,
) -> SentenceEncoder:
    """The encoder with its top ``settings.tune_layers`` layers tuned on the training split: every
    chat-style prompt and the first ``tune_benchmark_prompts`` others in a stable hashed order."""
    categories = tuple(sorted({e.category for e in examples}, key=_category_order))
    splits = by_split(examples)
    _check_splits(splits, categories)
    train = splits["train"]
    chat = [e for e in train if e.source == CHAT_SOURCE]
    others = sorted(
        (e for e in train if e.source != CHAT_SOURCE), key=lambda e: unit_hash("tune:" + e.text)
    )
    chosen = chat + others[: settings.tune_benchmark_prompts]
    layers = tune_top_layers(
        encoder,
        [e.text for e in chosen],
        torch.tensor([categories.index(e.category) for e in chosen]),
        torch.tensor([settings.chat_weight] * len(chat) + [1.0] * (len(chosen) - len(chat))),
        len(categories),
        layers=settings.tune_layers,
        epochs=settings.tune_epochs,
        lr=settings.tune_lr,
        head_lr=settings.lr,
        head_weight_decay=settings.weight_decay,
        batch_size=settings.tune_batch_size,
        seed=settings.seed,
        progress=progress,
    )
    return encoder.with_layers(layers)


# -- evaluation -----------------------------------------------------------------------------------
def evaluate(
    name: str,
    probs: torch.Tensor,
    y: torch.Tensor,
    categories: tuple[str, ...],
    threshold: float,
    fallback: str,
) -> Evaluation:
    """Top-1 accuracy of the router's category (the fallback counts when it is the label)."""
    conf, pred = probs.max(-1)
    low = conf < threshold
    if fallback in categories:
        low &= pred != categories.index(fallback)
    confusion = [[0] * len(categories) for _ in categories]
    for t, p in zip(y.tolist(), pred.tolist()):
        confusion[t][p] += 1
    n = len(y)
    return Evaluation(
        name,
        n,
        (pred == y).float().mean().item() if n else 0.0,
        low.float().mean().item() if n else 0.0,
        categories,
        confusion,
    )


# -- the whole run --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    head: Head
    evaluations: dict[str, Evaluation]
    seconds: float


def train_router(
    examples: list[Example],
    heldout: list[Example],
    encoder: SentenceEncoder,
    cache_dir: Path | None,
    settings: TrainSettings = TrainSettings(),
    fallback: str = GENERALIST,
    progress: Progress | None = None,
) -> TrainResult:
    started = time.perf_counter()
    splits = by_split(examples)
    categories = tuple(sorted({e.category for e in examples}, key=_category_order))
    _check_splits(splits, categories)
    store = EmbeddingStore(encoder, cache_dir)
    every = [*examples, *heldout]
    embedded = store.embed([e.text for e in every], progress)
    index = {id(e): i for i, e in enumerate(every)}

    def xy(part: list[Example]) -> tuple[Features, torch.Tensor]:
        known = [e for e in part if e.category in categories]
        features = Features(
            embedded[[index[id(e)] for e in known]], [ngram_bag(e.text) for e in known]
        )
        return features, torch.tensor(
            [categories.index(e.category) for e in known], dtype=torch.long
        )

    def known(part: list[Example]) -> list[Example]:
        return [e for e in part if e.category in categories]

    (x, y), (xv, yv), (xt, yt) = (xy(splits.get(s, [])) for s in ("train", "val", "test"))
    chat = torch.tensor([e.source == CHAT_SOURCE for e in known(splits["train"])])
    net = fit_head(
        x, y, xv, yv, len(categories), settings, progress, 1.0 + chat * (settings.chat_weight - 1)
    )
    with torch.inference_mode():
        temperature = fit_temperature(net(xv), yv)
        val_probs = torch.softmax(net(xv) / temperature, -1)
    conf, pred = val_probs.max(-1)
    # The threshold is calibrated on the way people write (the chat-style validation prompts)
    # when there are enough of them; benchmark items are more confidently classified.
    chat_val = torch.tensor(
        [e.source == CHAT_SOURCE for e in known(splits["val"])], dtype=torch.bool
    )
    on_chat = int(chat_val.sum()) >= CALIBRATION_MIN
    calibrate = chat_val if on_chat else torch.ones_like(chat_val)
    threshold = fit_threshold(
        conf[calibrate],
        (pred == yv)[calibrate],
        settings.min_fallback_accuracy,
        CHAT_MIN_BELOW if on_chat else MIN_BELOW,
    )
    meta = HeadMeta(
        categories,
        x.embeddings.shape[1],
        settings.hidden_size,
        temperature,
        threshold,
        encoder={
            "dist": ENCODER_DIST,
            "version": ENCODER_VERSION,
            "max_tokens": encoder.max_tokens,
            "precision": encoder.precision,
            "impl": ENCODER_IMPL,
            "tuned_layers": encoder.tuned_layers,
        },
        data={
            "train": len(y),
            "val": len(yv),
            "test": len(yt),
            "heldout": len(heldout),
            "sources": sorted({e.source for e in examples}),
        },
    )
    head = Head(net, meta)
    evaluations = {"val": evaluate("val", val_probs, yv, categories, threshold, fallback)}
    held = {name: xy([e for e in heldout if e.source == name]) for name in heldout_names(heldout)}
    for name, (xe, ye) in (("test", (xt, yt)), *held.items()):
        if len(ye):
            evaluations[name] = evaluate(
                name, head.probabilities(xe), ye, categories, threshold, fallback
            )
    head.meta.metrics.update({k: v.to_dict() for k, v in evaluations.items()})
    return TrainResult(head, evaluations, time.perf_counter() - started)


def heldout_names(heldout: Sequence[Example]) -> list[str]:
    """The held-out test sets, by source, in the order they appear."""
    return list(dict.fromkeys(e.source for e in heldout))


def _category_order(name: str) -> tuple[int, str]:
    names = list(CATEGORIES)
    return (names.index(name), name) if name in names else (len(names), name)


def _check_splits(splits: dict[str, list[Example]], categories: tuple[str, ...]) -> None:
    if len(categories) < 2:
        raise ConfigError("training data: at least two categories are needed")
    for name in ("train", "val"):
        if not splits.get(name):
            raise ConfigError(
                f"training data: the {name} split is empty; give more prompts "
                f"(about 10% of groups go to validation, 10% to test)"
            )


# -- entry points for the CLI ---------------------------------------------------------------------
def train_and_save(
    out: Path,
    cache_dir: Path,
    data_file: str | None = None,
    settings: TrainSettings = TrainSettings(),
    fallback: str = GENERALIST,
    progress: Progress | None = None,
    precision: str = DEFAULT_PRECISION,
) -> TrainResult:
    """Train on the packaged datasets (or a user's labelled file) and write the artifact to ``out``.
    MT-Bench and the chat-style dev and test sets are held-out tests, for the categories trained."""
    from coe.router.data import (
        chat_test_examples,
        default_examples,
        load_labelled,
        mtbench_examples,
    )

    examples = load_labelled(data_file) if data_file else default_examples()
    version = (
        f"user:{Path(data_file).name}"
        if data_file
        else data_version()
        if precision == DEFAULT_PRECISION
        else f"{data_version()}-{precision}"
    )
    trained = {e.category for e in examples}
    heldout = [e for e in [*mtbench_examples(), *chat_test_examples()] if e.category in trained]
    encoder = SentenceEncoder(precision=precision)
    if settings.tune_layers:
        encoder = tune_encoder(encoder, examples, settings, progress)
    # a tuned encoder's embeddings are this run's alone: nothing to keep on disk for the next
    store_dir = None if encoder.tuned_layers else cache_dir
    result = train_router(examples, heldout, encoder, store_dir, settings, fallback, progress)
    result.head.meta.data["version"] = version
    out.mkdir(parents=True, exist_ok=True)
    if encoder.tuned_layers:  # written before router.json names it
        save_layers(out, encoder.layers)
    result.head.save(out)
    if not encoder.tuned_layers:  # an earlier tuned run's layers, no longer named
        (out / LAYERS_FILE).unlink(missing_ok=True)
    return result


def is_current(folder: Path) -> bool:
    from coe.router.head import read_meta_quietly

    meta = read_meta_quietly(folder)
    return meta is not None and meta.data.get("version") == data_version()


def data_version() -> str:
    """Changes whenever the default taxonomy, sources or training recipe change."""
    from coe.router import data

    recipe = repr(
        (
            sorted(data.CATEGORIES),
            [(s.name, s.category, s.cap, s.eval_shared) for s in data.default_sources()],
            data.EVAL_SHARE,
            data.RECIPE,
            TrainSettings(),
            FEATURES_VERSION,
            ENCODER_IMPL,
            DEFAULT_PRECISION,
            DEFAULT_MAX_TOKENS,
        )
    )
    return hashlib.blake2b(recipe.encode(), digest_size=6).hexdigest()


def format_evaluation(ev: Evaluation) -> str:
    short = [c[:5] for c in ev.categories]
    lines = [
        f"{ev.name}: accuracy {ev.accuracy:.1%} on {ev.n} prompts "
        f"(below the confidence threshold, {ev.fallback_rate:.1%} would go to the fallback)",
        f"  {'category':<12} {'precision':>9} {'recall':>7} {'n':>5}",
    ]
    for cat, row in ev.per_category().items():
        if row["n"]:
            lines.append(
                f"  {cat:<12} {row['precision']:>9.2f} {row['recall']:>7.2f} {row['n']:>5}"
            )
    lines.append("  confusion (rows: true, columns: predicted)")
    lines.append("  " + " " * 12 + " ".join(f"{s:>5}" for s in short))
    for cat, counts in zip(ev.categories, ev.confusion):
        if sum(counts):
            lines.append(f"  {cat:<12}" + " ".join(f"{v:>5}" for v in counts))
    return "\n".join(lines)
