"""What the customer gets while the model is down: the best FAQ answer, or an honest apology.

Above the retriever's confidence threshold the FAQ answer is sent with a short note that the assistant
is in limited mode. Below it the customer gets a fixed apology offering a ticket or a person, and the
caller keeps the message for follow-up with :func:`keep_for_followup`: an open ticket of category
``followup`` (idempotent per message), because tickets are durable, visible to the support team and
already carry the conversation, whereas a list in the shared store would vanish with an in-process store.
Retrieval runs in a thread: dense embedding of the query is CPU work.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from core.db.database import Database
from core.faq.service import RetrieverHolder
from core.handoff import OpenedTicket, idempotency_key, open_ticket
from core.messages import ConversationKey, Language
from core.texts import text as fixed_text

__all__ = ["FallbackAnswer", "FaqFallback", "keep_for_followup"]

log = logging.getLogger(__name__)

FOLLOWUP_CATEGORY = "followup"


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    """The reply to send: ``kind`` "faq" (an FAQ answer) or "unknown" (the apology; keep the message)."""

    kind: Literal["faq", "unknown"]
    text: str
    entry_id: int | None = None
    confidence: float | None = None

    @property
    def needs_followup(self) -> bool:
        return self.kind == "unknown"


class FaqFallback:
    """FAQ retrieval as the answer of last resort."""

    def __init__(self, *, retriever_holder: RetrieverHolder, threshold: float | None = None) -> None:
        self._holder = retriever_holder
        self._threshold = threshold

    async def answer(self, text: str, language: Language) -> FallbackAnswer:
        """The best FAQ answer in ``language`` with the limited-mode note, else the apology."""
        retriever = self._holder.retriever
        if retriever is not None:
            try:
                hit = await asyncio.to_thread(
                    retriever.best, text, threshold=self._threshold, language=language
                )
            except Exception:
                log.error("FAQ retrieval failed in the fallback", exc_info=True)
                hit = None
            if hit is not None:
                answer = retriever.doc(hit.doc_id).answer
                note = fixed_text("limited_mode_note", language)
                return FallbackAnswer(
                    kind="faq",
                    text=f"{answer}\n\n{note}",
                    entry_id=hit.doc_id,
                    confidence=hit.confidence,
                )
        return FallbackAnswer(kind="unknown", text=fixed_text("limited_mode_unknown", language))


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
