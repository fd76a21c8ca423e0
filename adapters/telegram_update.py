"""The parts of a Bot API ``Update`` that kefu reads, as plain pydantic models.

aiogram's :class:`~aiogram.types.Update` models every field of every object and runs Python validators
on each nested object; parsing one webhook body that way cost more than the rest of accepting it (about
70 µs against 6 µs here). Inbound updates are only read, never sent back, so the webhook and the poller
parse them with these models instead; aiogram remains the client for every Bot API call.

Unknown fields are ignored, so new Bot API fields never make an update unreadable. A body without
``update_id`` or with a message missing its ``message_id`` or ``chat`` is refused (ValidationError).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MEDIA_KINDS = (
    "photo",
    "sticker",
    "voice",
    "audio",
    "video",
    "video_note",
    "animation",
    "document",
    "location",
    "venue",
    "contact",
    "poll",
    "dice",
    "game",
    "story",
    "paid_media",
    "checklist",
)
"""Message fields that carry media; the first one present names the media kind."""


class _Object(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class User(_Object):
    id: int
    is_bot: bool = False
    first_name: str = ""
    last_name: str | None = None
    username: str | None = None
    language_code: str | None = None

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}" if self.last_name else self.first_name


class Chat(_Object):
    id: int
    type: str


class MessageEntity(_Object):
    type: str
    offset: int
    length: int
    user: User | None = None

    def extract_from(self, text: str) -> str:
        """The entity's text: Telegram counts offsets in UTF-16 code units."""
        units = text.encode("utf-16-le")
        return units[self.offset * 2 : (self.offset + self.length) * 2].decode("utf-16-le", errors="ignore")


class RepliedMessage(_Object):
    """The message a message replies to: only who wrote it matters."""

    from_user: User | None = Field(default=None, alias="from")


class Message(_Object):
    message_id: int
    chat: Chat
    from_user: User | None = Field(default=None, alias="from")
    text: str | None = None
    entities: list[MessageEntity] | None = None
    caption: str | None = None
    caption_entities: list[MessageEntity] | None = None
    reply_to_message: RepliedMessage | None = None
    is_automatic_forward: bool | None = None
    is_topic_message: bool | None = None
    message_thread_id: int | None = None
    photo: Any = None
    sticker: Any = None
    voice: Any = None
    audio: Any = None
    video: Any = None
    video_note: Any = None
    animation: Any = None
    document: Any = None
    location: Any = None
    venue: Any = None
    contact: Any = None
    poll: Any = None
    dice: Any = None
    game: Any = None
    story: Any = None
    paid_media: Any = None
    checklist: Any = None

    def media_kind(self) -> str | None:
        """The kind of media the message carries, None for none."""
        for kind in MEDIA_KINDS:
            if getattr(self, kind):
                return kind
        return None


class Update(_Object):
    update_id: int
    message: Message | None = None
