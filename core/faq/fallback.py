"""What the customer gets while the model is down: the best FAQ answer, or an honest apology.

Above the retriever's confidence threshold the FAQ answer is sent with a short note that the assistant
is in limited mode. Below it the customer gets a fixed apology offering a ticket or a person, and the
caller keeps the message for follow-up with :func:`keep_for_followup`: an open ticket of category
``followup`` (idempotent per message), because tickets are durable, visible to the support team and
already carry the conversation, whereas a list in the shared store would vanish with an in-process store.

Between the two, when the best entry is plausible but not sure (confidence at least
:data:`SUGGEST_FLOOR`), the apology lists the closest FAQ questions (at most :data:`MAX_SUGGESTIONS`)
and the customer can reply with a number: :meth:`FaqFallback.pick` turns "2" into that entry's answer,
and the engine closes the message's follow-up ticket with :func:`close_followup`. On the public
paraphrase sets the right entry is among the suggestions for most of the questions the threshold
declines (README, "FAQ fallback"). The suggestion list lives in the stored answer's ``meta``, so any
worker can resolve the pick. Retrieval runs in a thread: dense embedding of the query is CPU work.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from core.db.database import Database
from core.db.models import Ticket, utcnow
from core.errors import DatabaseError
from core.faq.retriever import FaqHit
from core.faq.service import RetrieverHolder
from core.handoff import OpenedTicket, idempotency_key, open_ticket
from core.messages import ConversationKey, Language
from core.texts import text as fixed_text

__all__ = [
    "MAX_SUGGESTIONS",
    "SUGGEST_FLOOR",
    "FallbackAnswer",
    "FaqFallback",
    "close_followup",
    "keep_for_followup",
    "parse_pick",
    "triage",
]

log = logging.getLogger(__name__)

FOLLOWUP_CATEGORY = "followup"

# Suggestions are offered when the best entry's confidence is at least this (and below the answer
# threshold). Chosen on the dev splits of bench/faq_eval.py: at 0.1 the right entry was among three
# suggestions for 0.58 (zh) / 0.49 (en) of all in-scope dev questions; at 0.3 for 0.51 / 0.42.
SUGGEST_FLOOR: Final = 0.1
MAX_SUGGESTIONS: Final = 3

_CN_DIGITS: Final = {c: i for i, c in enumerate("一二三四五六七八九", start=1)}
_PICK = re.compile(
    r"(?:第|no\.?|number|option|#)?\s*([1-9一二三四五六七八九])\s*(?:个|条|项|号)?\s*[.。!！)）]?",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    """The reply to send. ``kind``: "faq" (an FAQ answer), "suggest" (the apology with numbered FAQ
    questions in ``suggested``), "unknown" (the apology) or "picked" (the answer to a picked suggestion).
    After "suggest" and "unknown" the caller keeps the message for follow-up."""

    kind: Literal["faq", "suggest", "unknown", "picked"]
    text: str
    entry_id: int | None = None
    confidence: float | None = None
    suggested: tuple[int, ...] = ()

    @property
    def needs_followup(self) -> bool:
        return self.kind in ("suggest", "unknown")


def triage(
    hits: Sequence[FaqHit], *, threshold: float, suggest_floor: float = SUGGEST_FLOOR
) -> tuple[Literal["faq", "suggest", "unknown"], Sequence[FaqHit]]:
    """What the fallback does with ranked ``hits``: answer with the first, offer them all, or neither."""
    if hits and hits[0].confidence >= threshold:
        return "faq", hits[:1]
    if hits and hits[0].confidence >= suggest_floor:
        return "suggest", hits[:MAX_SUGGESTIONS]
    return "unknown", ()


def parse_pick(text: str) -> int | None:
    """The number of a reply that only picks a list item ("2", "２", "#2", "第二个", "option 2"), or None."""
    match = _PICK.fullmatch(unicodedata.normalize("NFKC", text).strip())
    if match is None:
        return None
    digit = match.group(1)
    return _CN_DIGITS.get(digit) or int(digit)


class FaqFallback:
    """FAQ retrieval as the answer of last resort."""

    def __init__(
        self,
        *,
        retriever_holder: RetrieverHolder,
        threshold: float | None = None,
        suggest_floor: float = SUGGEST_FLOOR,
    ) -> None:
        self._holder = retriever_holder
        self._threshold = threshold
        self._suggest_floor = suggest_floor

    async def answer(self, text: str, language: Language) -> FallbackAnswer:
        """The best FAQ answer in ``language`` with the limited-mode note; else the apology, with the
        closest FAQ questions to pick from when the best one is plausible."""
        retriever = self._holder.retriever
        if retriever is None:
            return FallbackAnswer(kind="unknown", text=fixed_text("limited_mode_unknown", language))
        try:
            hits = await asyncio.to_thread(retriever.search, text, k=MAX_SUGGESTIONS, language=language)
        except Exception:
            log.error("FAQ retrieval failed in the fallback", exc_info=True)
            hits = []
        threshold = retriever.threshold if self._threshold is None else self._threshold
        kind, chosen = triage(hits, threshold=threshold, suggest_floor=self._suggest_floor)
        if kind == "faq":
            answer = retriever.doc(chosen[0].doc_id).answer
            note = fixed_text("limited_mode_note", language)
            return FallbackAnswer(
                kind="faq",
                text=f"{answer}\n\n{note}",
                entry_id=chosen[0].doc_id,
                confidence=chosen[0].confidence,
            )
        if kind == "suggest":
            lines = [fixed_text("limited_mode_suggest", language)]
            lines += [f"{n}. {retriever.doc(h.doc_id).question}" for n, h in enumerate(chosen, start=1)]
            lines.append(fixed_text("limited_mode_suggest_none", language))
            return FallbackAnswer(
                kind="suggest",
                text="\n".join(lines),
                confidence=chosen[0].confidence,
                suggested=tuple(h.doc_id for h in chosen),
            )
        return FallbackAnswer(kind="unknown", text=fixed_text("limited_mode_unknown", language))

    def pick(self, text: str, suggested: Sequence[int]) -> FallbackAnswer | None:
        """The answer of the entry a reply like "2" picks from ``suggested``; None when the reply is no
        pick, the number is not on the list, or the entry is gone from the index."""
        number = parse_pick(text)
        retriever = self._holder.retriever
        if number is None or number > len(suggested) or retriever is None:
            return None
        try:
            doc = retriever.doc(suggested[number - 1])
        except KeyError:
            return None
        return FallbackAnswer(kind="picked", text=doc.answer, entry_id=doc.id)


async def keep_for_followup(
    db: Database,
    *,
    key: ConversationKey,
    conversation_id: int | None,
    message_id: str,
    text: str,
    user_id: str | None = None,
) -> OpenedTicket:
    """Open (once per message) a ``followup`` ticket holding the question nobody answered."""
    return await open_ticket(
        db,
        idempotency_key=idempotency_key(FOLLOWUP_CATEGORY, str(key), message_id),
        summary=text[:2000],
        category=FOLLOWUP_CATEGORY,
        conversation_id=conversation_id,
        channel=key.channel,
        user_id=user_id,
    )


async def close_followup(db: Database, *, key: ConversationKey, message_id: str) -> bool:
    """Close the open follow-up ticket of ``message_id`` (the customer picked an answer); True if closed."""
    try:
        async with db.session() as session:
            result = await session.exec(
                update(Ticket)
                .where(
                    col(Ticket.idempotency_key) == idempotency_key(FOLLOWUP_CATEGORY, str(key), message_id),
                    col(Ticket.status) == "open",
                )
                .values(status="closed", updated_at=utcnow())
            )
            await session.commit()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"could not close a follow-up ticket: {exc}") from exc
    return bool(result.rowcount)
