"""Hand-off to people: follow-up tickets, and conversations paused while a person takes over.

``Conversation.state`` is ``bot`` (the bot answers), ``waiting`` (a person was asked for; the bot stays
quiet) or ``agent`` (a person is answering). The engine asks :func:`is_bot_paused` before anything else;
the hand-off console (or :func:`release`) hands the conversation back to the bot.

Tickets are created exactly once per cause: :func:`open_ticket` takes an idempotency key (unique in the
``tickets`` table), so a platform retry or a re-processed message finds the first ticket instead of
opening a second one, even when several workers race.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Conversation, CustomerIdentity, Ticket, utcnow
from core.errors import DatabaseError
from core.messages import ConversationKey

__all__ = [
    "BOT",
    "PAUSED_STATES",
    "WAITING",
    "OpenedTicket",
    "idempotency_key",
    "is_bot_paused",
    "open_ticket",
    "release",
    "request_human",
]

log = logging.getLogger(__name__)

BOT = "bot"
WAITING = "waiting"
AGENT = "agent"
PAUSED_STATES = frozenset({WAITING, AGENT})


def idempotency_key(*parts: str) -> str:
    """sha256 over the parts (NUL-separated, so ("ab", "c") and ("a", "bc") differ), hex."""
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class OpenedTicket:
    """The ticket for an idempotency key; ``created`` is False when it already existed."""

    id: int
    created: bool
    status: str


async def open_ticket(
    db: Database,
    *,
    idempotency_key: str,
    summary: str,
    category: str = "general",
    priority: str = "normal",
    contact: str | None = None,
    conversation_id: int | None = None,
    channel: str | None = None,
    user_id: str | None = None,
) -> OpenedTicket:
    """Open a ticket unless one with ``idempotency_key`` exists; either way return that ticket.

    ``channel`` + ``user_id`` link the ticket to the customer when that platform identity is known.
    """
    try:
        async with db.session() as session:
            existing = await _ticket_by_key(session, idempotency_key)
            if existing is not None:
                return existing
            customer_id = None
            if channel is not None and user_id is not None:
                customer_id = (
                    await session.exec(
                        select(CustomerIdentity.customer_id).where(
                            CustomerIdentity.channel == channel,
                            CustomerIdentity.platform_user_id == user_id,
                        )
                    )
                ).first()
            ticket = Ticket(
                conversation_id=conversation_id,
                customer_id=customer_id,
                summary=summary,
                category=category,
                priority=priority,
                contact=contact,
                idempotency_key=idempotency_key,
            )
            session.add(ticket)
            try:
                await session.commit()
            except IntegrityError:
                # Another worker inserted the same key between our read and our insert: use theirs.
                await session.rollback()
                raced = await _ticket_by_key(session, idempotency_key)
                if raced is None:  # the integrity error was about something else
                    raise
                return raced
            assert ticket.id is not None
            log.info("ticket %d opened (%s)", ticket.id, category, extra={"conversation_id": conversation_id})
            return OpenedTicket(id=ticket.id, created=True, status=ticket.status)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"could not open a ticket: {exc}") from exc


async def _ticket_by_key(session: AsyncSession, key: str) -> OpenedTicket | None:
    row = (await session.exec(select(Ticket).where(Ticket.idempotency_key == key))).first()
    if row is None or row.id is None:
        return None
    return OpenedTicket(id=row.id, created=False, status=row.status)


async def is_bot_paused(conversations: ConversationStore, key: ConversationKey) -> bool:
    """True when a person was asked for or is answering: the bot must not answer this conversation.

    Reads the state column only (no decryption of the conversation), one indexed query.
    """
    async with conversations.db.session() as session:
        state = (await session.exec(select(Conversation.state).where(Conversation.key == str(key)))).first()
    return state in PAUSED_STATES


async def request_human(
    conversations: ConversationStore,
    *,
    conversation_id: int,
    reason: str,
    idempotency_key: str,
    priority: str = "normal",
    contact: str | None = None,
) -> OpenedTicket:
    """Pause the bot for this conversation (``bot`` → ``waiting``) and record why in a hand-off ticket.

    A conversation a person already holds (``agent``) stays with that person. The open ``handoff``
    ticket is the agents' queue entry and keeps the reason.
    """
    conversation = await conversations.get_by_id(conversation_id)
    if conversation is None:
        raise KeyError(conversation_id)
    ticket = await open_ticket(
        conversations.db,
        idempotency_key=idempotency_key,
        summary=reason,
        category="handoff",
        priority=priority,
        contact=contact,
        conversation_id=conversation_id,
        channel=conversation.channel,
        user_id=conversation.user_id,
    )
    await _set_state(conversations.db, conversation_id, to=WAITING, only_from=(BOT,))
    return ticket


async def release(conversations: ConversationStore, key: ConversationKey) -> bool:
    """Hand a paused conversation back to the bot; False when it was not paused (or does not exist)."""
    async with conversations.db.session() as session:
        conversation_id = (
            await session.exec(select(Conversation.id).where(Conversation.key == str(key)))
        ).first()
    if conversation_id is None:
        return False
    return await _set_state(conversations.db, conversation_id, to=BOT, only_from=tuple(PAUSED_STATES))


async def _set_state(db: Database, conversation_id: int, *, to: str, only_from: tuple[str, ...]) -> bool:
    # A conditional UPDATE, so a console taking the conversation ("agent") at the same moment wins.
    async with db.session() as session:
        result = await session.exec(
            update(Conversation)
            .where(col(Conversation.id) == conversation_id, col(Conversation.state).in_(only_from))
            .values(state=to, updated_at=utcnow())
        )
        await session.commit()
    changed = bool(result.rowcount)
    if changed:
        log.info("conversation state -> %s", to, extra={"conversation_id": conversation_id})
    return changed
