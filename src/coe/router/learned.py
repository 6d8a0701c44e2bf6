"""The trained router: sentence encoder + hashed n-grams -> head -> calibrated probabilities."""

from __future__ import annotations

from pathlib import Path

from coe.errors import RouterUnavailable
from coe.router.base import Router
from coe.router.encoder import (
    ENCODER_DIST,
    ENCODER_IMPL,
    ENCODER_VERSION,
    SentenceEncoder,
)
from coe.router.head import Features, Head, load_head, ngram_bag, read_layers


class LearnedRouter(Router):
    def __init__(
        self,
        encoder: SentenceEncoder,
        head: Head,
        fallback_category: str,
        threshold: float | None = None,
    ):
        meta = head.meta
        super().__init__(
            meta.categories, meta.threshold if threshold is None else threshold, fallback_category
        )
        self.encoder = encoder
        self.head = head

    @classmethod
    def load(
        cls,
        folder: str | Path,
        fallback_category: str,
        threshold: float | None = None,
        encoder: SentenceEncoder | None = None,
    ) -> LearnedRouter:
        head = load_head(folder)
        wanted = head.meta.encoder
        ours = (ENCODER_DIST, ENCODER_VERSION, ENCODER_IMPL)
        if (wanted.get("dist"), wanted.get("version"), wanted.get("impl", 1)) != ours:
            raise RouterUnavailable(
                f"{folder}: trained with encoder {wanted}, this coe has "
                f"{ENCODER_DIST}=={ENCODER_VERSION} (implementation "
                f"{ENCODER_IMPL}); run `coe router train`"
            )
        encoder = encoder or SentenceEncoder(
            max_tokens=int(wanted.get("max_tokens", 128)),
            precision=str(wanted.get("precision", "int8")),
            layers=read_layers(Path(folder)) if wanted.get("tuned_layers") else None,
        )
        return cls(encoder, head, fallback_category, threshold)

    def embeddings(self, texts: list[str]) -> list[list[float]] | None:
        return self.encoder.encode(texts).tolist()

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        features = Features(self.encoder.encode(texts), [ngram_bag(t) for t in texts])
        return self.head.probabilities(features).tolist()
