"""What the console does, separate from HTTP: read conversations, act on hand-offs, tickets and the FAQ.

Every message content is read and written through :class:`~core.conversations.ConversationStore`
(encrypted at rest); every action is recorded in the audit log (kind ``admin``, or ``handoff`` for
state changes) with the agent as actor. Customer notices and agent replies go out through the
platform sender of the conversation's channel, the same adapter the bot answers with.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import func, update
from sqlmodel import col, select

from bots.admin.auth import Agent
from core import handoff
from core.db.database import Database
from core.db.models import Conversation, Message, Ticket, utcnow
from core.delivery import SenderRegistry
from core.errors import DeliveryError, KefuError
from core.faq.cache import FaqCache
from core.faq.learning import LearnedPhrasings
from core.faq.service import FaqService, RetrieverHolder
from core.messages import ConversationKey, Language, Reply, ReplySource
from core.runtime import Runtime
from core.stores.base import StateStore
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

STATES = ("bot", "waiting", "agent")
TICKET_STATUSES = ("open", "closed")


class ConsoleError(KefuError):
    """An action the console refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ConversationRow:
    """One line of the live list."""

    id: int
    key: str
    channel: str
    user_id: str
    language: str
    state: str
    updated_at: datetime
    last_role: str | None
    last_text: str
    pinned: dict[str, Any]
    summary: str


def _language(conversation: Conversation) -> Language:
    return cast(Language, conversation.language if conversation.language in ("zh", "en") else "zh")


class _ConsoleFaq(FaqService):
    """FaqService whose refresh rebuilds through this process's own cache object.

    ``refresh_faq_cache`` builds with a fresh FaqCache; the engine's instance would keep the replaced
    generation id for up to its ``generation_ttl`` and miss meanwhile, so an edited answer would not be
    served at once in the process that made the edit.
    """

    def __init__(
        self, *, db: Database, store: StateStore, retriever_holder: RetrieverHolder, cache: FaqCache
    ) -> None:
        super().__init__(db=db, store=store, retriever_holder=retriever_holder)
        self._holder_ = retriever_holder
        self._cache = cache

    async def refresh(self) -> int:
        fingerprint = await self.repository.fingerprint()
        entries = await self.repository.list(enabled_only=True)
        await self._cache.rebuild(entries, fingerprint=fingerprint)
        await self._holder_.rebuild(entries, fingerprint=fingerprint)
        return len(entries)


class Console:
    """The console's actions on one runtime; ``senders`` deliver to the customers' platforms."""

    def __init__(self, runtime: Runtime, senders: SenderRegistry) -> None:
        self.runtime = runtime
        self.senders = senders
        self.conversations = runtime.conversations
        self.faq = _ConsoleFaq(
            db=runtime.db, store=runtime.store, retriever_holder=runtime.faq_index, cache=runtime.faq_cache
        )
        self.learned = LearnedPhrasings(db=runtime.db)

    # --- reading ----------------------------------------------------------------------------------

    async def list_conversations(self, *, state: str | None = None, limit: int = 50) -> list[ConversationRow]:
        """The most recently active conversations of every platform, newest first."""
        query = select(Conversation.id).order_by(col(Conversation.updated_at).desc()).limit(limit)
        if state in STATES:
            query = query.where(Conversation.state == state)
        async with self.runtime.db.session() as session:
            ids = list((await session.exec(query)).all())
        rows = []
        for conversation_id in ids:
            assert conversation_id is not None
            conversation = await self.conversations.get_by_id(conversation_id)
            if conversation is None:
                continue
            # The last turn only: decrypting whole transcripts for a list would not scale.
            recent = await self.conversations.recent_messages(conversation_id, turns=1)
            shown = [m for m in recent if m.content and m.role in ("user", "assistant", "agent")]
            last = shown[-1] if shown else None
            rows.append(
                ConversationRow(
                    id=conversation_id,
                    key=conversation.key,
                    channel=conversation.channel,
                    user_id=conversation.user_id,
                    language=conversation.language,
                    state=conversation.state,
                    updated_at=conversation.updated_at,
                    last_role=last.role if last else None,
                    last_text=last.content[:200] if last else "",
                    pinned=dict(conversation.pinned),
                    summary=conversation.summary,
                )
            )
        return rows

    async def conversation(self, conversation_id: int) -> Conversation:
        conversation = await self.conversations.get_by_id(conversation_id)
        if conversation is None:
            raise ConsoleError(f"no conversation {conversation_id}", status=404)
        return conversation

    async def transcript(self, conversation_id: int, *, after_id: int = 0) -> list[Message]:
        rows = await self.conversations.messages(conversation_id)
        return [row for row in rows if (row.id or 0) > after_id]

    async def tickets(
        self, *, status: str | None = None, conversation_id: int | None = None, limit: int = 200
    ) -> list[Ticket]:
        query = select(Ticket).order_by(col(Ticket.id).desc()).limit(limit)
        if status in TICKET_STATUSES:
            query = query.where(Ticket.status == status)
        if conversation_id is not None:
            query = query.where(Ticket.conversation_id == conversation_id)
        async with self.runtime.db.session() as session:
            return list((await session.exec(query)).all())

    async def audit(self, conversation_id: int) -> list[dict[str, Any]]:
        return await self.runtime.audit.export(conversation_id)

    async def version(self, conversation_id: int | None = None) -> str:
        """Changes whenever something the console shows changes (for the live updates)."""
        async with self.runtime.db.session() as session:
            if conversation_id is None:
                row = (
                    await session.exec(
                        select(func.count(), func.max(Conversation.updated_at)).select_from(Conversation)
                    )
                ).one()
                last_message = (await session.exec(select(func.max(Message.id)))).one()
                tickets = (await session.exec(select(func.max(Ticket.updated_at)))).one()
                return f"{row[0]}:{row[1]}:{last_message}:{tickets}"
            state = (
                await session.exec(
                    select(Conversation.state, Conversation.updated_at).where(
                        Conversation.id == conversation_id
                    )
                )
            ).first()
            last_message = (
                await session.exec(
                    select(func.max(Message.id)).where(Message.conversation_id == conversation_id)
                )
            ).one()
        return f"{state}:{last_message}"

    # --- hand-off -----------------------------------------------------------------------------------

    async def take_over(self, conversation_id: int, agent: Agent) -> bool:
        """The agent takes the conversation; the customer is told a person joined."""
        conversation = await self.conversation(conversation_id)
        changed = await handoff.take_over(self.conversations, conversation_id)
        if not changed:
            return False
        await self._audit(
            "handoff", conversation_id, agent, {"action": "taken_over", "from": conversation.state}
        )
        await self._notify(conversation, "handoff_agent_joined", meta={"handoff": "agent_joined"})
        return True

    async def hand_back(self, conversation_id: int, agent: Agent) -> bool:
        """Give the conversation back to the bot; the customer is told the person left."""
        conversation = await self.conversation(conversation_id)
        changed = await handoff.return_to_bot(self.conversations, conversation_id)
        if not changed:
            return False
        await self._audit(
            "handoff", conversation_id, agent, {"action": "returned_to_bot", "from": conversation.state}
        )
        await self._notify(conversation, "handoff_agent_left", meta={"handoff": "agent_left"})
        return True

    async def reply(self, conversation_id: int, agent: Agent, text: str) -> Message:
        """Send the agent's words to the customer and keep them in the transcript as role ``agent``.

        Taking over is implied: a conversation the bot still answers is taken first, so bot and
        person never answer side by side.
        """
        text = text.strip()
        if not text:
            raise ConsoleError("empty reply")
        if len(text) > 4000:
            raise ConsoleError("reply over 4000 characters")
        conversation = await self.conversation(conversation_id)
        if conversation.state != handoff.AGENT:
            await self.take_over(conversation_id, agent)
            conversation = await self.conversation(conversation_id)
        reply = Reply(
            key=ConversationKey.parse(conversation.key),
            text=text,
            language=_language(conversation),
            source=ReplySource.AGENT,
        )
        try:
            await self._send(reply)
        except DeliveryError as exc:
            await self._audit(
                "admin",
                conversation_id,
                agent,
                {"action": "reply", "text": text, "delivered": False, "error": str(exc)},
            )
            raise ConsoleError(f"the platform did not accept the reply: {exc}", status=502) from exc
        row = Message(
            conversation_id=conversation_id,
            role="agent",
            content=text,
            source=ReplySource.AGENT.value,
            meta={"agent": agent.name},
        )
        await self.conversations.append(conversation_id, [row])
        await self._audit(
            "admin", conversation_id, agent, {"action": "reply", "text": text, "delivered": True}
        )
        return row

    # --- tickets ------------------------------------------------------------------------------------

    async def open_ticket(
        self,
        agent: Agent,
        *,
        summary: str,
        conversation_id: int | None = None,
        category: str = "general",
        priority: str = "normal",
        contact: str | None = None,
    ) -> handoff.OpenedTicket:
        summary = summary.strip()
        if not summary:
            raise ConsoleError("a ticket needs a summary")
        channel = user_id = None
        if conversation_id is not None:
            conversation = await self.conversation(conversation_id)
            channel, user_id = conversation.channel, conversation.user_id
        ticket = await handoff.open_ticket(
            self.runtime.db,
            idempotency_key=handoff.idempotency_key("console", agent.name, secrets.token_hex(16)),
            summary=summary[:2000],
            category=category.strip()[:32] or "general",
            priority=priority if priority in ("low", "normal", "high", "urgent") else "normal",
            contact=(contact or "").strip()[:200] or None,
            conversation_id=conversation_id,
            channel=channel,
            user_id=user_id,
        )
        await self._audit(
            "admin",
            conversation_id,
            agent,
            {"action": "ticket_opened", "ticket": ticket.id, "category": category},
        )
        return ticket

    async def close_ticket(self, ticket_id: int, agent: Agent) -> bool:
        async with self.runtime.db.session() as session:
            ticket = await session.get(Ticket, ticket_id)
            if ticket is None:
                raise ConsoleError(f"no ticket {ticket_id}", status=404)
            conversation_id = ticket.conversation_id
            result = await session.exec(
                update(Ticket)
                .where(col(Ticket.id) == ticket_id, col(Ticket.status) != "closed")
                .values(status="closed", updated_at=utcnow())
            )
            await session.commit()
        closed = bool(result.rowcount)
        if closed:
            await self._audit(
                "admin", conversation_id, agent, {"action": "ticket_closed", "ticket": ticket_id}
            )
        return closed

    # --- FAQ ----------------------------------------------------------------------------------------

    async def decide_wording(self, wording_id: int, agent: Agent, *, accept: bool) -> bool:
        """Accept a learned customer wording (it becomes an alternative phrasing of its entry, served at
        once) or reject it; False when it is not waiting for review."""
        pending = {w.id: w for w in await self.learned.wordings()}
        wording = pending.get(wording_id)
        if wording is None:
            return False
        if accept:
            done = bool(await self.learned.accept([wording_id]))
            if done:
                await self.faq.refresh()
        else:
            done = bool(await self.learned.reject([wording_id]))
        if done:
            await self._audit(
                "admin",
                None,
                agent,
                {
                    "action": "faq_wording_accepted" if accept else "faq_wording_rejected",
                    "entry": wording.entry_id,
                    "wording": wording.phrasing,
                },
            )
        return done

    async def drop_phrasing(self, entry_id: int, number: int, agent: Agent) -> bool:
        """Remove phrasing ``number`` (1-based) the model wrote for an entry, from the index at once; False
        when the entry or the number does not exist."""
        entry = await self.faq.repository.get(entry_id)
        if entry is None or not 1 <= number <= len(entry.generated):
            return False
        phrasing = entry.generated[number - 1]
        try:
            await self.faq.repository.drop_generated(entry_id, [number])
        except (KeyError, ValueError):  # deleted or changed meanwhile
            return False
        await self.faq.refresh()
        await self._audit(
            "admin", None, agent, {"action": "faq_phrasing_dropped", "entry": entry_id, "phrasing": phrasing}
        )
        return True

    async def note(self, agent: Agent, action: str, **data: Any) -> None:
        await self._audit("admin", None, agent, {"action": action, **data})

    # --- helpers ------------------------------------------------------------------------------------

    async def _send(self, reply: Reply) -> None:
        sender = self.senders.get(reply.key.channel)
        if sender is None:
            raise DeliveryError(f"no sender for channel {reply.key.channel!r} (platform switched off?)")
        await sender.send(reply)

    async def _notify(self, conversation: Conversation, name: str, *, meta: dict[str, Any]) -> None:
        """Tell the customer about a hand-off change; stored in the transcript even if delivery fails."""
        assert conversation.id is not None
        language = _language(conversation)
        notice = fixed_text(name, language)
        key = ConversationKey.parse(conversation.key)
        try:
            await self._send(Reply(key=key, text=notice, language=language, source=ReplySource.SYSTEM))
            delivered = True
        except Exception:
            delivered = False
            log.error(
                "could not deliver the %s notice", name, exc_info=True, extra={"conversation": str(key)}
            )
        await self.conversations.append(
            conversation.id,
            [
                Message(
                    conversation_id=conversation.id,
                    role="assistant",
                    content=notice,
                    source=ReplySource.SYSTEM.value,
                    meta={**meta, "delivered": delivered},
                )
            ],
        )

    async def _audit(
        self, kind: str, conversation_id: int | None, agent: Agent, data: dict[str, Any]
    ) -> None:
        await self.runtime.audit.record(kind, conversation_id=conversation_id, actor=agent.actor, data=data)
