"""Database fixtures for both backends: SQLite in a temporary folder and PostgreSQL at 127.0.0.1:5432.

PostgreSQL tests run in a database created for this pytest run (``kefu_test_<random>``) and dropped
at the end; each test starts from an empty ``public`` schema.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from core.db.database import Database
from core.db.migrate import upgrade_async

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin_blocking(sql: str) -> None:
    # Own thread and loop: this may be first requested from inside a test's running event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _admin(sql)).result()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Name of a PostgreSQL database that exists for this test run only."""
    name = f"kefu_test_{uuid.uuid4().hex[:12]}"
    _admin_blocking(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _admin_blocking(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _empty_pg_url(name: str) -> str:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database (no tables), once per backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"
    return await _empty_pg_url(request.getfixturevalue("pg_database"))


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """A migrated database on each backend (overrides the SQLite-only fixture of tests/conftest.py)."""
    await upgrade_async(db_url)
    async with Database(url=db_url) as db:
        yield db
