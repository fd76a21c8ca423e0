"""Platform-neutral message types: what adapters hand to the core and what the core hands back.

Adapters translate a platform event into an :class:`InboundMessage` and deliver a :class:`Reply`;
nothing in ``core`` knows which platform a message came from beyond the ``channel`` string.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConversationKey(Frozen):
    """Identifies one conversation: a chat on a channel, optionally a thread inside it.

    Slack: (channel id, thread root ts); Telegram: (chat id, None); WeChat: (openid, None);
    web chat: (browser session id, None).
    """

    channel: str
    chat_id: str
    thread_id: str | None = None

    def __str__(self) -> str:
        base = f"{self.channel}:{self.chat_id}"
        return f"{base}:{self.thread_id}" if self.thread_id else base

    @classmethod
    def parse(cls, value: str) -> ConversationKey:
        """Inverse of ``str(key)``."""
        channel, _, rest = value.partition(":")
        chat_id, _, thread_id = rest.partition(":")
        if not channel or not chat_id:
            raise ValueError(f"not a conversation key: {value!r}")
        return cls(channel=channel, chat_id=chat_id, thread_id=thread_id or None)


Language = Literal["zh", "en"]


class InboundMessage(Frozen):
    """One customer message, normalised by an adapter."""

    key: ConversationKey
    user_id: str
    message_id: str
    """The platform's id for this message (Slack event_id, Telegram update_id, WeChat MsgId...)."""
    text: str
    language: Language = "zh"
    received_at: datetime = Field(default_factory=utcnow)
    user_name: str | None = None
    extras: dict[str, Any] = Field(default_factory=dict)
    """Platform leftovers the adapter needs again when replying (never read by the core)."""

    @property
    def channel(self) -> str:
        return self.key.channel


class ReplySource(StrEnum):
    MODEL = "model"
    FAQ_CACHE = "faq_cache"
    FAQ_FALLBACK = "faq_fallback"
    AGENT = "agent"
    SYSTEM = "system"
    """Fixed texts: notices, apologies, greetings."""


class Button(Frozen):
    """A quick-reply button; platforms without buttons render its label as text."""

    label: str
    value: str


class Reply(Frozen):
    """The core's answer to one inbound message (or an unsolicited message, e.g. from an agent).

    An empty ``text`` means there is no bot answer to deliver (a person has the conversation).
    """

    key: ConversationKey
    text: str
    language: Language = "zh"
    in_reply_to: str | None = None
    source: ReplySource = ReplySource.MODEL
    buttons: tuple[Button, ...] = ()
    extras: dict[str, Any] = Field(default_factory=dict)


class ReplyDelta(Frozen):
    """A piece of a reply while it is being generated (for streaming platforms)."""

    type: Literal["delta"] = "delta"
    text: str


class ReplyDone(Frozen):
    """The end of a streamed reply, carrying the full, final (moderated) reply."""

    type: Literal["done"] = "done"
    reply: Reply


ReplyEvent = ReplyDelta | ReplyDone
