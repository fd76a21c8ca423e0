"""Conversation history in SQL: find or open a conversation, read its recent turns, append to it.

Every read and write of message content goes through here, so storage concerns (encryption at rest,
retries on a briefly unavailable database) live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db.database import Database
from core.db.models import Conversation, Message, utcnow
from core.messages import ConversationKey, Language


class ConversationStore:
    """Conversations and their messages."""

    def __init__(self, *, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        return self._db

    async def get_or_create(self, key: ConversationKey, *, user_id: str, language: Language) -> Conversation:
        """The conversation for ``key``, created on first contact."""
        async with self._db.session() as session:
            found = (await session.exec(select(Conversation).where(Conversation.key == str(key)))).first()
            if found is not None:
                return found
            conversation = Conversation(key=str(key), channel=key.channel, user_id=user_id, language=language)
            session.add(conversation)
            try:
                await session.commit()
            except IntegrityError:
                # Another process opened it at the same moment: use theirs.
                await session.rollback()
                return (await session.exec(select(Conversation).where(Conversation.key == str(key)))).one()
            await session.refresh(conversation)
            return conversation

    async def get_by_id(self, conversation_id: int) -> Conversation | None:
        async with self._db.session() as session:
            return await session.get(Conversation, conversation_id)

    async def get(self, key: ConversationKey) -> Conversation | None:
        async with self._db.session() as session:
            return (await session.exec(select(Conversation).where(Conversation.key == str(key)))).first()

    async def recent_messages(self, conversation_id: int, *, turns: int, after_id: int = 0) -> list[Message]:
        """At most the last ``turns`` customer turns after message ``after_id`` (each customer message
        and everything after it), oldest first."""
        async with self._db.session() as session:
            start = (
                await session.exec(
                    select(Message.id)
                    .where(Message.conversation_id == conversation_id, Message.role == "user")
                    .order_by(col(Message.id).desc())
                    .offset(turns - 1)
                    .limit(1)
                )
            ).first()
            query = select(Message).where(
                Message.conversation_id == conversation_id, col(Message.id) > after_id
            )
            if start is not None:
                query = query.where(col(Message.id) >= start)
            return list((await session.exec(query.order_by(col(Message.id)))).all())

    async def advance_summary(
        self, conversation_id: int, *, expected_upto: int, summary: str, upto: int
    ) -> bool:
        """Store a new summary covering messages up to ``upto``, unless another process already
        advanced it since ``expected_upto`` was read (then nothing changes and False is returned)."""
        async with self._db.session() as session:
            result = await session.exec(
                update(Conversation)
                .where(
                    col(Conversation.id) == conversation_id,
                    col(Conversation.summarized_upto) == expected_upto,
                )
                .values(summary=summary, summarized_upto=upto, updated_at=utcnow())
            )
            await session.commit()
            return bool(result.rowcount)

    async def append(self, conversation_id: int, messages: Sequence[Message]) -> list[Message]:
        """Store messages in order and touch the conversation; returns them with their ids."""
        rows = list(messages)
        for row in rows:
            row.conversation_id = conversation_id
        async with self._db.session() as session:
            session.add_all(rows)
            conversation = await session.get(Conversation, conversation_id)
            if conversation is not None:
                conversation.updated_at = utcnow()
                session.add(conversation)
            await session.commit()
            for row in rows:
                await session.refresh(row)
        return rows

    async def update(self, conversation_id: int, **fields: Any) -> None:
        """Set columns of a conversation (summary, pinned facts, state...)."""
        async with self._db.session() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None:
                raise KeyError(conversation_id)
            for name, value in fields.items():
                setattr(conversation, name, value)
            conversation.updated_at = utcnow()
            session.add(conversation)
            await session.commit()

    async def messages(self, conversation_id: int) -> list[Message]:
        """The whole transcript, oldest first."""
        async with self._db.session() as session:
            query = select(Message).where(Message.conversation_id == conversation_id)
            return list((await session.exec(query.order_by(col(Message.id)))).all())
