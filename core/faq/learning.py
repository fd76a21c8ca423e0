"""FAQ wordings learned from customers.

A customer who picks an FAQ entry from the fallback's numbered suggestions has shown how customers ask
for that entry. :meth:`LearnedPhrasings.record_pick` keeps their wording (one row per wording and entry,
counting picks); an operator reviews the list (``kefu faq learned``) and accepts a wording, which then
becomes one of the entry's alternative phrasings, or rejects it. Nothing is added to the FAQ without
that review: a customer can pick the wrong entry, and a wording can carry personal details.

Wordings with an order number, a phone number or an e-mail address are never kept: they are about one
customer, not about the question. Alternative phrasings are what raises the fallback's answer rate most
(``bench/faq_eval.py`` prints the effect of accepting the dev customers' picks).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import col, select

from core.db.database import Database
from core.db.models import FaqEntry, FaqLearned, utcnow
from core.errors import DatabaseError
from core.faq.normalize import EMAIL_TOKEN, ORDER_TOKEN, PHONE_TOKEN, mask_entities, normalize_question
from core.faq.repository import FaqRepository

__all__ = ["MAX_WORDING_CHARS", "LearnedPhrasing", "LearnedPhrasings", "learnable"]

log = logging.getLogger(__name__)

MAX_WORDING_CHARS: Final = 200
_PERSONAL: Final = frozenset({ORDER_TOKEN, PHONE_TOKEN, EMAIL_TOKEN})


def learnable(question: str) -> str | None:
    """The wording to keep from a customer's question (whitespace collapsed), or None when it is empty,
    longer than :data:`MAX_WORDING_CHARS`, holds a "|" (the alternatives separator of FAQ files) or
    names an order, a phone number or an e-mail address."""
    wording = " ".join(question.split())
    if not wording or len(wording) > MAX_WORDING_CHARS or "|" in wording:
        return None
    if _PERSONAL & set(mask_entities(wording).split()):
        return None
    return wording


def _key(wording: str) -> str:
    return hashlib.sha256(normalize_question(wording).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class LearnedPhrasing:
    """A kept wording with the entry it led to."""

    id: int
    entry_id: int
    entry_question: str
    language: str
    phrasing: str
    picks: int
    status: str


class LearnedPhrasings:
    """The ``faq_learned`` table: record picks, list them, accept or reject wordings."""

    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def record_pick(self, *, entry_id: int, question: str, pick_id: str | None = None) -> bool:
        """Count a pick of ``entry_id`` after ``question``; False when the wording is not kept.

        ``pick_id`` names the pick (the picking message): the same pick counted again, as when a message
        is re-processed after a crash, does not add to the count.
        """
        wording = learnable(question)
        if wording is None:
            return False
        key = _key(wording)
        last = hashlib.sha256(pick_id.encode("utf-8")).hexdigest() if pick_id is not None else None
        try:
            for _ in range(2):  # a concurrent first pick of the same wording: count on the row it made
                async with self._db.session() as session:
                    row = (
                        await session.exec(
                            select(FaqLearned).where(
                                FaqLearned.entry_id == entry_id, FaqLearned.phrasing_key == key
                            )
                        )
                    ).first()
                    if row is not None:
                        if last is not None and row.last_pick == last:
                            return True  # this pick was counted already
                        await session.exec(
                            update(FaqLearned)
                            .where(col(FaqLearned.id) == row.id)
                            .values(picks=col(FaqLearned.picks) + 1, last_pick=last, updated_at=utcnow())
                        )
                        await session.commit()
                        return True
                    if await session.get(FaqEntry, entry_id) is None:
                        return False  # the entry was deleted since the suggestion was shown
                    session.add(
                        FaqLearned(entry_id=entry_id, phrasing=wording, phrasing_key=key, last_pick=last)
                    )
                    try:
                        await session.commit()
                    except IntegrityError:
                        await session.rollback()
                        continue
                    return True
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not record an FAQ pick: {exc}") from exc
        return False

    async def wordings(self, *, status: str | None = "pending", min_picks: int = 1) -> list[LearnedPhrasing]:
        """Kept wordings (``status`` None: all), most picked first."""
        query = (
            select(FaqLearned, FaqEntry)
            .join(FaqEntry, col(FaqEntry.id) == col(FaqLearned.entry_id))
            .where(col(FaqLearned.picks) >= min_picks)
            .order_by(col(FaqLearned.picks).desc(), col(FaqLearned.id))
        )
        if status is not None:
            query = query.where(col(FaqLearned.status) == status)
        try:
            async with self._db.session() as session:
                rows = (await session.exec(query)).all()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not list learned FAQ wordings: {exc}") from exc
        return [
            LearnedPhrasing(
                id=learned.id or 0,
                entry_id=learned.entry_id,
                entry_question=entry.question,
                language=entry.language,
                phrasing=learned.phrasing,
                picks=learned.picks,
                status=learned.status,
            )
            for learned, entry in rows
        ]

    async def accept(self, ids: Sequence[int] = (), *, min_picks: int | None = None) -> list[LearnedPhrasing]:
        """Add pending wordings (by id, and/or all with at least ``min_picks`` picks) to their entries'
        alternatives; returns the accepted ones. A wording the entry already has is only marked."""
        wanted = set(ids)
        pending = await self.wordings()
        chosen = [p for p in pending if p.id in wanted or (min_picks is not None and p.picks >= min_picks)]
        repository = FaqRepository(db=self._db)
        for item in chosen:
            entry = await repository.get(item.entry_id)
            if entry is None:
                continue
            known = {normalize_question(t) for t in (entry.question, *entry.alternatives)}
            if normalize_question(item.phrasing) not in known:
                await repository.update(entry.id or 0, alternatives=[*entry.alternatives, item.phrasing])
            await self._set_status([item.id], "accepted")
            log.info("learned FAQ wording %d accepted for entry %d", item.id, item.entry_id)
        return chosen

    async def reject(self, ids: Sequence[int]) -> int:
        """Mark pending wordings rejected (they are not proposed again); returns how many changed."""
        return await self._set_status(ids, "rejected")

    async def _set_status(self, ids: Sequence[int], status: str) -> int:
        try:
            async with self._db.session() as session:
                result = await session.exec(
                    update(FaqLearned)
                    .where(col(FaqLearned.id).in_(list(ids)), col(FaqLearned.status) == "pending")
                    .values(status=status, updated_at=utcnow())
                )
                await session.commit()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"could not update learned FAQ wordings: {exc}") from exc
        return int(result.rowcount or 0)
