"""Conversation history in SQL: find or open a conversation, read its recent turns, append to it.

Every read and write of message content goes through here, so storage concerns (encryption at rest,
retries on a briefly unavailable database) live in one place.

Encryption at rest: given a :class:`~core.crypto.KeyRing`, the store encrypts message ``content`` and
``tool_calls`` and the conversation's ``summary`` and ``pinned`` facts on every write and decrypts them
on every read; callers only ever see plaintext. Text columns hold the token itself, JSON columns hold
``{"enc": token}`` (``tool_calls``: ``[{"enc": token}]``). The associated data names the conversation,
the column and (for messages) the role, so a ciphertext copied into another conversation or column
fails to decrypt (:class:`~core.errors.CryptoError`) instead of showing another customer's words.
Rows written before a key ring was configured are plaintext and are read as they are. Empty values
(a new conversation's blank summary) stay empty: they reveal nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.crypto import KeyRing, is_token
from core.db.database import Database
from core.db.models import Conversation, Message, utcnow
from core.errors import CryptoError
from core.messages import ConversationKey, Language


class _Sealer:
    """Encrypts the secret columns on the way in and decrypts them on the way out."""

    def __init__(self, keyring: KeyRing | None) -> None:
        self._keyring = keyring

    def _seal(self, plaintext: str, aad: str) -> str:
        assert self._keyring is not None
        return self._keyring.encrypt_text(plaintext, aad)

    def _open(self, token: str, aad: str) -> str:
        if self._keyring is None:
            raise CryptoError("conversation data is encrypted but no key ring is configured")
        return self._keyring.decrypt_text(token, aad)

    @staticmethod
    def _sealed_json(value: Any) -> str | None:
        """The token inside ``{"enc": token}`` (or ``[{"enc": token}]``), None for plaintext JSON."""
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and len(value) == 1 and is_token(str(value.get("enc", ""))):
            return str(value["enc"])
        return None

    # conversations

    def seal_field(self, conversation_id: int, name: str, value: Any) -> Any:
        """``value`` as stored in column ``name`` (only ``summary`` and ``pinned`` are secret)."""
        if self._keyring is None or not value:
            return value
        aad = f"kefu:conversation:{conversation_id}:{name}"
        if name == "summary":
            return self._seal(str(value), aad)
        if name == "pinned":
            return {"enc": self._seal(json.dumps(value, ensure_ascii=False), aad)}
        return value

    def open_conversation(self, conversation: Conversation) -> Conversation:
        """Decrypt a conversation that is no longer attached to a session (in place)."""
        cid = conversation.id
        if is_token(conversation.summary):
            conversation.summary = self._open(conversation.summary, f"kefu:conversation:{cid}:summary")
        token = self._sealed_json(conversation.pinned)
        if token is not None:
            conversation.pinned = json.loads(self._open(token, f"kefu:conversation:{cid}:pinned"))
        return conversation

    # messages

    def seal_message(self, row: Message) -> Message:
        """The row to store: ``row`` itself without a key ring, else an encrypted copy."""
        if self._keyring is None:
            return row
        stored = Message(**row.model_dump())
        aad = f"kefu:message:{row.conversation_id}:{row.role}"
        if row.content:
            stored.content = self._seal(row.content, f"{aad}:content")
        if row.tool_calls:
            sealed = self._seal(json.dumps(row.tool_calls, ensure_ascii=False), f"{aad}:tool_calls")
            stored.tool_calls = [{"enc": sealed}]
        return stored

    def open_message(self, row: Message) -> Message:
        """Decrypt a message that is no longer attached to a session (in place)."""
        aad = f"kefu:message:{row.conversation_id}:{row.role}"
        if is_token(row.content):
            row.content = self._open(row.content, f"{aad}:content")
        token = self._sealed_json(row.tool_calls)
        if token is not None:
            row.tool_calls = json.loads(self._open(token, f"{aad}:tool_calls"))
        return row


class ConversationStore:
    """Conversations and their messages; encrypted at rest when given a key ring."""

    def __init__(self, *, db: Database, keyring: KeyRing | None = None) -> None:
        self._db = db
        self._sealer = _Sealer(keyring)

    @property
    def db(self) -> Database:
        return self._db

    async def get_or_create(self, key: ConversationKey, *, user_id: str, language: Language) -> Conversation:
        """The conversation for ``key``, created on first contact."""
        async with self._db.session() as session:
            found = (await session.exec(select(Conversation).where(Conversation.key == str(key)))).first()
            if found is None:
                conversation = Conversation(
                    key=str(key), channel=key.channel, user_id=user_id, language=language
                )
                session.add(conversation)
                try:
                    await session.commit()
                except IntegrityError:
                    # Another process opened it at the same moment: use theirs.
                    await session.rollback()
                    found = (
                        await session.exec(select(Conversation).where(Conversation.key == str(key)))
                    ).one()
                else:
                    await session.refresh(conversation)
                    found = conversation
        # Decrypted only once the session is closed, so plaintext can never be flushed back.
        return self._sealer.open_conversation(found)

    async def get_by_id(self, conversation_id: int) -> Conversation | None:
        async with self._db.session() as session:
            found = await session.get(Conversation, conversation_id)
        return self._sealer.open_conversation(found) if found is not None else None

    async def get(self, key: ConversationKey) -> Conversation | None:
        async with self._db.session() as session:
            found = (await session.exec(select(Conversation).where(Conversation.key == str(key)))).first()
        return self._sealer.open_conversation(found) if found is not None else None

    async def state(self, key: ConversationKey) -> str | None:
        """The conversation's hand-off state, None before its first message: one narrow read on the
        worker's hot path: no transaction around it, nothing to decrypt."""
        async with self._db.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            result = await conn.execute(select(Conversation.state).where(Conversation.key == str(key)))
            return result.scalar_one_or_none()

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
            rows = list((await session.exec(query.order_by(col(Message.id)))).all())
        return [self._sealer.open_message(row) for row in rows]

    async def answer_to(self, conversation_id: int, platform_message_id: str) -> Message | None:
        """The stored final answer to a customer message, if it was answered before (re-processing)."""
        _asked, answer = await self.previous_turn(conversation_id, platform_message_id)
        return answer

    async def previous_turn(
        self, conversation_id: int, platform_message_id: str
    ) -> tuple[int | None, Message | None]:
        """What an earlier attempt at a customer message stored: the id of the customer's message and
        its final answer. ``(None, None)`` for a new message; ``(id, None)`` when an attempt stored the
        message but no answer (it failed half-way and the message is being answered again)."""
        async with self._db.session() as session:
            asked = (
                await session.exec(
                    select(Message.id).where(
                        Message.conversation_id == conversation_id,
                        Message.role == "user",
                        Message.platform_message_id == platform_message_id,
                    )
                )
            ).first()
            if asked is None:
                return None, None
            after = select(Message).where(Message.conversation_id == conversation_id, col(Message.id) > asked)
            rows = (await session.exec(after.order_by(col(Message.id)).limit(64))).all()
        answer = None
        for row in rows:
            if row.role == "user":
                break
            if row.role == "assistant" and not row.tool_calls:
                answer = row
        return asked, self._sealer.open_message(answer) if answer is not None else None

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
                .values(
                    summary=self._sealer.seal_field(conversation_id, "summary", summary),
                    summarized_upto=upto,
                    updated_at=utcnow(),
                )
            )
            await session.commit()
            return bool(result.rowcount)

    async def append(self, conversation_id: int, messages: Sequence[Message]) -> list[Message]:
        """Store messages in order and touch the conversation; returns them with their ids."""
        rows = list(messages)
        for row in rows:
            row.conversation_id = conversation_id
        # With a key ring, encrypted copies are stored and the caller's rows stay plaintext.
        stored = [self._sealer.seal_message(row) for row in rows]
        async with self._db.session() as session:
            session.add_all(stored)
            await session.exec(
                update(Conversation)
                .where(col(Conversation.id) == conversation_id)
                .values(updated_at=utcnow())
            )
            # Ids come back from the INSERT and created_at is set in Python: nothing to read back.
            await session.commit()
        for row, saved in zip(rows, stored, strict=True):
            if row is not saved:
                row.id, row.created_at = saved.id, saved.created_at
        return rows

    async def update(self, conversation_id: int, **fields: Any) -> None:
        """Set columns of a conversation (summary, pinned facts, state...)."""
        async with self._db.session() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None:
                raise KeyError(conversation_id)
            for name, value in fields.items():
                setattr(conversation, name, self._sealer.seal_field(conversation_id, name, value))
            conversation.updated_at = utcnow()
            session.add(conversation)
            await session.commit()

    async def messages(self, conversation_id: int) -> list[Message]:
        """The whole transcript, oldest first."""
        async with self._db.session() as session:
            query = select(Message).where(Message.conversation_id == conversation_id)
            rows = list((await session.exec(query.order_by(col(Message.id)))).all())
        return [self._sealer.open_message(row) for row in rows]
