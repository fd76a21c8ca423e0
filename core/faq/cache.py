"""Answers to FAQ questions served from the shared store before the model is called.

Every phrasing of every enabled entry (its question and alternatives) is stored under the hash of
``normalize_question(phrasing)`` and the entry's language, so "怎麼退貨？", "怎么退货" and "怎么 退货啊"
hit the same answer. Only exact matches after normalisation are served: anything looser goes to the
model (or, when the model is down, to retrieval), because a wrong canned answer is worse than a slower
right one.

Layout in the store (all under ``prefix``)::

    gen                      the live generation id
    meta                     JSON: generation, entry count, source fingerprint, build time
    <gen>:<lang>:<hash>      JSON: entry id and answer (expires after ``ttl``)
    <gen>:manifest           JSON list of that generation's answer keys
    hits:<entry id>          how often the entry was served from the cache

A rebuild writes a whole new generation, then moves ``gen`` to it (one SET: readers see the old answers
or the new ones, never a mix), then deletes the old generation's keys, so an edited answer is gone at
once. Keys of a rebuild that died half-way were never live and expire. A lookup is one GET: the live
generation is remembered for ``generation_ttl`` seconds and re-read after that, or at once after a miss,
so a rebuild by another process never turns its hits into misses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from core.db.models import FaqEntry
from core.faq.normalize import normalize_question
from core.stores.base import StateStore

__all__ = ["CachedAnswer", "FaqCache"]

log = logging.getLogger(__name__)

# Writes in flight at once: well below redis-py's default pool of 100 connections, shared with traffic.
_WRITE_BATCH = 32


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A cache hit: the FAQ entry it came from and its answer."""

    entry_id: int
    answer: str


class FaqCache:
    """The FAQ answer cache in a :class:`StateStore` (in-process or Redis)."""

    def __init__(
        self,
        *,
        store: StateStore,
        prefix: str = "faq:",
        ttl: float = 7 * 24 * 3600.0,
        generation_ttl: float = 2.0,
        max_question_chars: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._ttl = ttl
        self._generation_ttl = generation_ttl
        self._max_chars = max_question_chars
        self._clock = clock
        self._generation: str | None = None
        self._generation_read_at = float("-inf")
        self._background: set[asyncio.Task[None]] = set()

    # -- reading -------------------------------------------------------------------------------------

    async def lookup(self, text: str, language: str, *, count: bool = True) -> CachedAnswer | None:
        """The cached answer to ``text`` in ``language``, or None. One store GET in the common case.

        ``count`` adds one to the entry's hit counter in the background (the answer never waits for it).
        """
        if len(text) > self._max_chars * 2:
            return None  # a long message is not a FAQ question; do not even normalise it
        normalized = normalize_question(text)
        if not normalized or len(normalized) > self._max_chars:
            return None
        generation, fresh = await self._live_generation()
        if generation is None:
            return None
        raw = await self._store.get(self._answer_key(generation, language, normalized))
        if raw is None and not fresh:
            # Another process may have rebuilt the cache since the generation was read (its old keys
            # are gone): a miss re-reads it. A miss goes to the model or retrieval anyway, so the
            # extra GET costs nothing a customer notices; a hit never pays it.
            self._generation_read_at = float("-inf")
            latest, _ = await self._live_generation()
            if latest is not None and latest != generation:
                raw = await self._store.get(self._answer_key(latest, language, normalized))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            hit = CachedAnswer(entry_id=int(data["id"]), answer=str(data["answer"]))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable FAQ cache value; ignoring it")
            return None
        if count:
            self._count_later(hit.entry_id)
        return hit

    async def record_hit(self, entry_id: int) -> int:
        """Count one cache hit of ``entry_id``; returns the new count."""
        return await self._store.incr(f"{self._prefix}hits:{entry_id}")

    async def hit_counts(self, entry_ids: Iterable[int]) -> dict[int, int]:
        """How often each entry was served from the cache (0 when never)."""
        ids = list(entry_ids)
        values = await asyncio.gather(*(self._store.get(f"{self._prefix}hits:{i}") for i in ids))
        return {i: int(v) if v else 0 for i, v in zip(ids, values, strict=True)}

    async def generation(self) -> str | None:
        """The live generation id (None before the first rebuild)."""
        return await self._store.get(f"{self._prefix}gen")

    async def meta(self) -> dict[str, object] | None:
        """What the live generation was built from (for ``kefu check``, metrics and refresh decisions)."""
        raw = await self._store.get(f"{self._prefix}meta")
        if raw is None:
            return None
        value = json.loads(raw)
        return value if isinstance(value, dict) else None

    async def wait_idle(self) -> None:
        """Wait for background hit counting (at shutdown and in tests)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- writing -------------------------------------------------------------------------------------

    async def rebuild(self, entries: Sequence[FaqEntry], *, fingerprint: str | None = None) -> int:
        """Replace the cached answers by those of the enabled ``entries``; returns how many keys.

        Rebuilds are serialised across processes by a store lock.
        """
        answers: dict[str, str] = {}
        generation = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        ordered = sorted((e for e in entries if e.enabled and e.id is not None), key=lambda e: e.id or 0)
        # Questions first, then alternatives: an entry's own question wins over another's alternative.
        phrasings = [(e, e.question) for e in ordered]
        phrasings += [(e, alt) for e in ordered for alt in e.alternatives]
        for entry, phrase in phrasings:
            normalized = normalize_question(phrase)
            if not normalized:
                continue
            value = json.dumps({"id": entry.id, "answer": entry.answer}, ensure_ascii=False)
            key = self._answer_key(generation, entry.language, normalized)
            if key in answers:
                if answers[key] != value:
                    log.warning(
                        "FAQ phrasing %r of entry %s repeats an earlier entry's; keeping the first",
                        phrase,
                        entry.id,
                    )
                continue
            answers[key] = value
        async with self._store.lock(f"{self._prefix}rebuild", ttl=60.0, wait=120.0):
            items = list(answers.items())
            for start in range(0, len(items), _WRITE_BATCH):
                batch = items[start : start + _WRITE_BATCH]
                await asyncio.gather(*(self._store.set(k, v, ttl=self._ttl) for k, v in batch))
            manifest = f"{self._prefix}{generation}:manifest"
            await self._store.set(manifest, json.dumps(list(answers)), ttl=self._ttl)
            previous = await self._store.get(f"{self._prefix}gen")
            # The swap: one SET moves every reader to the new answers.
            await self._store.set(f"{self._prefix}gen", generation, ttl=self._ttl)
            meta = {
                "generation": generation,
                "entries": len(ordered),
                "keys": len(answers),
                "fingerprint": fingerprint,
                "built_at": time.time(),
            }
            await self._store.set(f"{self._prefix}meta", json.dumps(meta), ttl=self._ttl)
            self._generation, self._generation_read_at = generation, self._clock()
            if previous and previous != generation:
                await self._drop_generation(previous)
        log.info("FAQ cache rebuilt: %d entries, %d phrasings", len(ordered), len(answers))
        return len(answers)

    async def clear(self) -> None:
        """Remove every cached answer (hit counters stay)."""
        async with self._store.lock(f"{self._prefix}rebuild", ttl=60.0, wait=120.0):
            previous = await self._store.get(f"{self._prefix}gen")
            await self._store.delete(f"{self._prefix}gen", f"{self._prefix}meta")
            self._generation, self._generation_read_at = None, float("-inf")
            if previous:
                await self._drop_generation(previous)

    # -- internals -----------------------------------------------------------------------------------

    def _answer_key(self, generation: str, language: str, normalized: str) -> str:
        # Hashed: keys stay short and safe whatever the customer typed.
        digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()
        return f"{self._prefix}{generation}:{language}:{digest}"

    async def _live_generation(self) -> tuple[str | None, bool]:
        """The live generation, and whether it was just read from the store (not remembered)."""
        now = self._clock()
        if self._generation is None or now - self._generation_read_at >= self._generation_ttl:
            self._generation = await self._store.get(f"{self._prefix}gen")
            self._generation_read_at = now
            return self._generation, True
        return self._generation, False

    async def _drop_generation(self, generation: str) -> None:
        manifest = f"{self._prefix}{generation}:manifest"
        raw = await self._store.get(manifest)
        keys: list[str] = json.loads(raw) if raw else []
        for start in range(0, len(keys), _WRITE_BATCH):
            await self._store.delete(*keys[start : start + _WRITE_BATCH])
        await self._store.delete(manifest)

    def _count_later(self, entry_id: int) -> None:
        async def count() -> None:
            try:
                await self.record_hit(entry_id)
            except Exception:
                log.warning("could not count a FAQ cache hit", exc_info=True)

        task = asyncio.create_task(count(), name=f"faq-hit:{entry_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
