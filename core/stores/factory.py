"""Pick the :class:`StateStore` for a deployment from its settings."""

from __future__ import annotations

from core.stores.base import StateStore
from core.stores.memory import MemoryStore


def build_store(*, redis_url: str | None, prefix: str = "kefu:") -> StateStore:
    """A :class:`RedisStore` on ``redis_url``, or an in-process :class:`MemoryStore` when it is unset."""
    # An empty KEFU_REDIS_URL means "unset", as it does for the other settings.
    if not redis_url:
        return MemoryStore()
    # Imported here so the embedded default never loads the redis package.
    from core.stores.redis import RedisStore

    return RedisStore(url=redis_url, prefix=prefix)
