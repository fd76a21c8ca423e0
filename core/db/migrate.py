"""Apply the Alembic migrations that ship inside the package (``core/db/migrations``).

No ``alembic.ini`` is needed: the configuration is built here. The upgrade runs in one transaction
holding a lock (a PostgreSQL advisory lock; SQLite's write lock), so several processes starting
together (``kefu serve`` replicas with ``KEFU_AUTO_MIGRATE``) upgrade one after the other; the later
ones find the schema at head and do nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from core.db.database import is_postgres, is_sqlite, sqlite_path
from core.errors import DatabaseError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

MIGRATION_LOCK_ID = 0x6B656675  # "kefu": the pg_advisory_xact_lock key every kefu process uses

# Alembic's ``context``/``op`` proxies are module globals: one migration at a time per process.
_process_lock = threading.Lock()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` pointing at the packaged migrations (and at ``url`` when given)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this version of kefu."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade_on(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _current_on(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _upgrade(url: str, revision: str) -> None:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    sqlite = is_sqlite(url)
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 60} if sqlite else {})
    try:
        async with engine.connect() as connection:
            # The whole upgrade is one transaction that first takes the database's migration lock,
            # so a failed migration leaves nothing half-done and a concurrent upgrader waits here,
            # then reads the already-updated alembic_version and does nothing.
            if is_postgres(url):
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID}
                )
            elif sqlite:
                # pysqlite does not open a transaction for DDL by itself; IMMEDIATE takes the
                # write lock now (waiting up to the timeout above for another writer).
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            await connection.run_sync(_upgrade_on, revision)
            await connection.commit()
    except (SQLAlchemyError, OSError) as exc:
        raise DatabaseError(f"database migration failed: {exc}") from exc
    finally:
        await engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (blocking; a no-op when already there).

    Runs its own event loop, so call it from a thread (or use :func:`upgrade_async`) when one is
    already running.
    """
    with _process_lock:
        asyncio.run(_upgrade(url, revision))


async def upgrade_async(url: str, revision: str = "head") -> None:
    """:func:`upgrade` in a worker thread, for callers inside an event loop."""
    await asyncio.to_thread(upgrade, url, revision)


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (``None`` for an empty database)."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_on)
    except (SQLAlchemyError, OSError) as exc:
        raise DatabaseError(f"cannot read the schema revision: {exc}") from exc
    finally:
        await engine.dispose()


def new_revision(message: str, rev_id: str) -> Path:
    """Write a migration for the difference between the models and the current head (for developers).

    Autogenerates against a scratch SQLite database upgraded to head; review the file it returns
    (for example ``new_revision("add audit records", "0002")``) before committing it.
    """
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite+aiosqlite:///{Path(scratch) / 'head.db'}"
        upgrade(url)
        script = command.revision(alembic_config(url), message=message, autogenerate=True, rev_id=rev_id)
    if script is None or isinstance(script, list):
        raise DatabaseError("alembic did not write exactly one revision")
    return Path(script.path)
