"""Choose the inbox for a deployment."""

from __future__ import annotations

from core.inbox.base import Inbox
from core.inbox.memory import MemoryInbox


def build_inbox(*, redis_url: str | None) -> Inbox:
    """In-process on the embedded default; Redis Streams when KEFU_REDIS_URL is set."""
    if redis_url:
        from core.inbox.redis import RedisInbox

        return RedisInbox(url=redis_url)
    return MemoryInbox()
