"""What a tool knows about the conversation that called it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.messages import ConversationKey, Language

if TYPE_CHECKING:
    from core.db.database import Database
    from core.stores.base import StateStore


@dataclass(frozen=True)
class ToolContext:
    """Passed as the first argument of every tool call.

    ``message_id`` is the platform id of the inbound message being answered: together with ``key`` it
    makes idempotency keys, so a re-processed message never repeats a side effect.
    """

    key: ConversationKey
    conversation_id: int
    user_id: str
    message_id: str
    language: Language
    db: Database
    store: StateStore
    extras: dict[str, Any] = field(default_factory=dict)
