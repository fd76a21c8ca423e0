"""Fixtures for the operations tests: a RedisStore under a prefix of its own, and the database on SQLite
and PostgreSQL (the fixtures of tests/db)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from core.stores.redis import RedisStore
from tests.core.conftest import REDIS_URL, drop_keys, unique_prefix
from tests.db.conftest import database, db_url, pg_database  # noqa: F401 - fixtures for this folder


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture
async def open_store(prefix: str) -> AsyncIterator[Callable[[], RedisStore]]:
    """Opens RedisStores sharing ``prefix``: each one stands for a separate kefu process."""
    opened: list[RedisStore] = []

    def open_one() -> RedisStore:
        store = RedisStore(url=REDIS_URL, prefix=prefix)
        opened.append(store)
        return store

    yield open_one
    if opened:
        await drop_keys(opened[0].client, prefix)
    for store in opened:
        await store.aclose()


@pytest.fixture
async def redis_store(open_store: Callable[[], RedisStore]) -> RedisStore:
    return open_store()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, step: float = 0.05
) -> None:
    """Wait until ``check()`` is true; fail after ``within`` seconds (a hang guard, not a timing claim)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)
