"""Tool tests: the SQLite ``database`` of tests/conftest.py, and ``any_database`` on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.db.database import Database
from core.db.migrate import upgrade_async
from tests.db.conftest import db_url, pg_database

__all__ = ["any_database", "db_url", "pg_database"]


@pytest.fixture
async def any_database(db_url: str) -> AsyncIterator[Database]:
    """A migrated database, once per backend (races behave differently on each)."""
    await upgrade_async(db_url)
    async with Database(url=db_url) as db:
        yield db
