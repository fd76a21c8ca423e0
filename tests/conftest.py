"""Shared fixtures: a migrated database (SQLite by default) and clean settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.db.database import Database
from core.db.migrate import upgrade_async


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    """A freshly migrated SQLite database in a temporary folder."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"
    await upgrade_async(url)
    async with Database(url=url) as db:
        yield db


@pytest.fixture(autouse=True)
def _no_kefu_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up the developer's KEFU_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("KEFU_"):
            monkeypatch.delenv(name)
    # Dense FAQ embeddings cost seconds of CPU per index build; the tests that need them ask for them.
    monkeypatch.setenv("KEFU_FAQ_EMBEDDINGS", "false")
