"""Shared fixtures of the core tests: the state store, once in-process and once on Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from core.stores.base import StateStore
from core.stores.memory import MemoryStore
from core.stores.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"kefu-test:{uuid.uuid4().hex}:"


async def drop_keys(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        async with MemoryStore() as memory:
            yield memory
        return
    prefix = unique_prefix()
    redis_store = RedisStore(url=REDIS_URL, prefix=prefix)
    try:
        yield redis_store
    finally:
        await drop_keys(redis_store.client, prefix)
        await redis_store.aclose()
