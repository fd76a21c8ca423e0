"""A conversation store whose database goes away when an answer is to be stored (engine and worker
tests of database outages)."""

from __future__ import annotations

from collections.abc import Sequence

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Message


class OutageConversations(ConversationStore):
    """A conversation store whose database is unreachable whenever an answer is to be stored, the
    first ``outages`` times: the outage strikes after the model answered (asyncpg's error for a
    server that is down)."""

    def __init__(self, *, db: Database, outages: int) -> None:
        super().__init__(db=db)
        self.outages = outages

    async def append(self, conversation_id: int, messages: Sequence[Message]) -> list[Message]:
        if self.outages and any(m.role == "assistant" for m in messages):
            self.outages -= 1
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        return await super().append(conversation_id, messages)
