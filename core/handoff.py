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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Conversation, CustomerIdentity, Message, Ticket, utcnow
from core.errors import DatabaseError
from core.messages import ConversationKey

if TYPE_CHECKING:
    from core.audit import AuditLog
    from core.delivery import SenderRegistry
    from core.stores.base import StateStore

__all__ = [
    "AGENT",
    "BOT",
    "PAUSED_STATES",
    "WAITING",
    "OpenedTicket",
    "customer_request",
    "expire_handoffs",
    "idempotency_key",
    "is_bot_paused",
    "maybe_request_human",
    "open_ticket",
    "release",
    "request_human",
    "return_to_bot",
    "take_over",
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


# --- the agent console and the engine's hand-off triggers ------------------------------------------


async def take_over(conversations: ConversationStore, conversation_id: int) -> bool:
    """A person takes the conversation (``bot`` or ``waiting`` → ``agent``); False when already held."""
    return await _set_state(conversations.db, conversation_id, to=AGENT, only_from=(BOT, WAITING))


async def return_to_bot(conversations: ConversationStore, conversation_id: int) -> bool:
    """Hand the conversation back to the bot (``waiting``/``agent`` → ``bot``); False when not paused."""
    return await _set_state(conversations.db, conversation_id, to=BOT, only_from=tuple(PAUSED_STATES))


async def customer_request(
    conversations: ConversationStore,
    *,
    conversation_id: int,
    key: ConversationKey,
    message_id: str,
    text: str,
) -> OpenedTicket:
    """The customer asked for a person (:func:`core.handoff_intent.wants_human`): pause the bot.

    Idempotent per message, so a re-processed message finds the same ticket.
    """
    return await request_human(
        conversations,
        conversation_id=conversation_id,
        reason=f"customer asked for a person: {' '.join(text.split())[:200]}",
        idempotency_key=idempotency_key("handoff", str(key), message_id),
    )


def _final_answers(rows: Sequence[Message]) -> list[Message | None]:
    """Per customer turn (oldest first), the answer the customer saw; None where a person replied."""
    answers: list[Message | None] = []
    for row in rows:
        if row.role == "user":
            answers.append(None)
            current: Message | None = None
            person = False
            continue
        if not answers:
            continue
        if row.role == "agent":
            person = True
        elif row.role == "assistant" and not row.tool_calls:
            current = row
        answers[-1] = None if person else current
    return answers


def _blocked(answer: Message) -> bool:
    return "guard" in answer.meta


def _unsure(answer: Message, min_confidence: float) -> bool:
    if answer.meta.get("fallback") in ("unknown", "suggest"):
        return True
    confidence = answer.meta.get("confidence")
    return (
        answer.meta.get("fallback") == "faq"
        and isinstance(confidence, int | float)
        and (confidence < min_confidence)
    )


async def maybe_request_human(
    conversations: ConversationStore,
    *,
    conversation_id: int,
    key: ConversationKey,
    message_id: str,
    guard_blocks: int = 3,
    unsure_answers: int = 2,
    min_confidence: float = 0.5,
    latest: Message | None = None,
) -> str | None:
    """After a turn is stored: ask for a person when the bot keeps failing the customer.

    Looks at the latest answers in the transcript: ``guard_blocks`` input-guard refusals in a row, or
    ``unsure_answers`` fallback answers in a row that were the apology (with or without FAQ
    suggestions) or an FAQ answer below ``min_confidence``. A hand-off notice or a person's reply ends
    a streak, so a conversation handed back to the bot starts counting afresh. Returns the trigger
    (``"guard_blocks"`` or ``"low_confidence"``) when the conversation moved to ``waiting``, else None;
    the engine then adds the ``handoff_waiting`` text to its answer.

    Reading the stored transcript keeps no extra state, so it works the same in every process.
    ``latest`` is the answer just stored: when it was neither refused nor unsure no streak can have
    grown, and the transcript is not read (the common case costs nothing).
    """
    if latest is not None and not (_blocked(latest) or _unsure(latest, min_confidence)):
        return None
    conversation = await conversations.get_by_id(conversation_id)
    if conversation is None or conversation.state != BOT:
        return None
    window = max(guard_blocks, unsure_answers) + 1
    rows = await conversations.recent_messages(conversation_id, turns=window)
    answers = _final_answers(rows)
    blocked = unsure = 0
    for answer in reversed(answers):
        if answer is None or "handoff" in answer.meta:
            break
        if _blocked(answer) and unsure == 0:
            blocked += 1
        elif _unsure(answer, min_confidence) and blocked == 0:
            unsure += 1
        else:
            break
    trigger = None
    if blocked >= guard_blocks:
        trigger, reason = "guard_blocks", f"{blocked} messages in a row refused by the input guard"
    elif unsure >= unsure_answers:
        trigger, reason = "low_confidence", f"{unsure} answers in a row the bot was not sure of"
    if trigger is None:
        return None
    await request_human(
        conversations,
        conversation_id=conversation_id,
        reason=reason,
        idempotency_key=idempotency_key("handoff", str(key), message_id, trigger),
    )
    log.info("hand-off requested: %s", trigger, extra={"conversation": str(key)})
    return trigger


async def expire_handoffs(
    conversations: ConversationStore,
    *,
    store: StateStore,
    senders: SenderRegistry,
    waited_longer_than: timedelta,
    audit: AuditLog | None = None,
    now: datetime | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Give conversations nobody took within ``waited_longer_than`` back to the bot; tell each customer.

    The customer gets the ``handoff_timeout`` text through the platform sender of their channel (and in
    the transcript); the hand-off ticket stays open for a follow-up. Returns what it did (``released``,
    ``notified``, ``notify_failed``), for the scheduler. A thin front to
    :func:`core.jobs.release_stale_handoffs`, which the standard ``release_handoffs`` job runs.
    """
    # Imported here: core.jobs imports this module.
    from core.jobs import notify_through, release_stale_handoffs

    return await release_stale_handoffs(
        conversations=conversations,
        store=store,
        waited_longer_than=waited_longer_than,
        notify=notify_through(senders),
        audit=audit,
        now=now,
        limit=limit,
    )
