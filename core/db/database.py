"""The async SQL engine and its sessions, plus a retry helper for connection-level failures.

``Database(url=...)`` takes an async URL (``sqlite+aiosqlite:///kefu.db`` or
``postgresql+asyncpg://user@host/db``). It is an async context manager; the engine connects lazily.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from core.errors import DatabaseError

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 5000
"""How long a SQLite writer waits for another process's write lock before failing."""

# SQLSTATEs that mean "the server is (re)starting or full", not "your statement is wrong":
# 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 53300 too_many_connections.
# Class 08 (connection exception) is matched by prefix.
_TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def is_sqlite(url: str | URL) -> bool:
    """Whether ``url`` points at SQLite."""
    return make_url(url).get_backend_name() == "sqlite"


def is_postgres(url: str | URL) -> bool:
    """Whether ``url`` points at PostgreSQL."""
    return make_url(url).get_backend_name() == "postgresql"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; ``None`` for an in-memory database or another backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while one process writes; SQLite leaves foreign keys off unless asked.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class Database:
    """The async engine and a session factory for one database URL."""

    ping_timeout: float = 5.0
    """Seconds :meth:`check` and :meth:`ping` wait for ``SELECT 1`` (an unreachable host can hang)."""

    def __init__(self, *, url: str, echo: bool = False, pool_size: int = 5) -> None:
        """``pool_size``: connections kept open (a server database); more are opened when needed
        but closed again on return, so it should cover what the process uses at once."""
        self.url = make_url(url)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.url.get_backend_name() == "sqlite":
            path = sqlite_path(self.url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        else:
            # No pre-ping (three round trips per checkout with asyncpg, a tenth of a turn's CPU): a
            # connection cut by a server restart fails its first statement, SQLAlchemy then discards
            # the whole pool, and callers retry connection errors (``retrying``, the worker's outage
            # retry). Recycling stops idle connections from outliving server or proxy idle timeouts.
            kwargs["pool_recycle"] = 1800
            kwargs["pool_size"] = pool_size
        self._engine = create_async_engine(self.url, **kwargs)
        if self.url.get_backend_name() == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _on_sqlite_connect)
        self._sessions = async_sessionmaker(self._engine, class_=AsyncSession, expire_on_commit=False)

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy async engine."""
        return self._engine

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.url.get_backend_name()

    def session(self) -> AsyncSession:
        """A new session (``async with db.session() as s:``); objects stay readable after commit."""
        return self._sessions()

    async def check(self) -> None:
        """Run ``SELECT 1``; raise :class:`~core.errors.DatabaseError` saying why it failed."""
        timeout = self.ping_timeout
        try:
            async with asyncio.timeout(timeout), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except TimeoutError as exc:
            raise DatabaseError(f"database {self.safe_url} did not answer within {timeout:g}s") from exc
        except (SQLAlchemyError, OSError) as exc:
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            raise DatabaseError(f"database {self.safe_url} is unreachable: {reason}") from exc

    async def ping(self) -> bool:
        """``True`` when the database answers ``SELECT 1`` within ``ping_timeout`` seconds (for /readyz)."""
        try:
            await self.check()
        except DatabaseError as exc:
            log.warning("database ping failed: %s", exc)
            return False
        return True

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, for logs and error messages."""
        return self.url.render_as_string(hide_password=True)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the database was briefly unreachable (worth retrying), not a bad query."""
    if isinstance(exc, OSError):  # refused/reset connections and timeouts (asyncpg raises these raw)
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if type(exc.orig).__name__ == "InternalClientError":
        # asyncpg, when the server's "terminating connection" notice arrived but the socket is not
        # seen closed yet (a server shutdown or restart): the connection is unusable, a new one works.
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("08") or sqlstate in _TRANSIENT_SQLSTATES
    if isinstance(exc, OperationalError):
        # SQLite reports a missing table as OperationalError too; only lock contention is transient.
        if type(exc.orig).__module__.startswith("sqlite3"):
            message = str(exc.orig).lower()
            return "locked" in message or "busy" in message
        return True
    return False


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached: a connection-level error itself, or a
    :class:`~core.errors.DatabaseError` raised from one (as :func:`retrying` and the engine raise it).

    Only kefu's DatabaseError is looked through: a StoreError or DeliveryError raised from a refused
    connection is another service's outage, not the database's.
    """
    for _ in range(8):  # a cause chain is short; the bound guards against a cycle
        if not isinstance(exc, DatabaseError) or exc.__cause__ is None:
            break
        exc = exc.__cause__
    return is_connection_error(exc)


async def retrying(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    initial_wait: float = 0.2,
    max_wait: float = 5.0,
) -> T:
    """Await ``fn()``, calling it again after connection-level failures with jittered backoff.

    ``fn`` must do the whole unit of work (open its own session, commit) so a retry starts clean.
    Other errors (integrity, bad SQL) propagate at once. When every attempt failed to reach the
    database, the last error is raised as :class:`~core.errors.DatabaseError`.
    """
    retryer = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        # Jitter keeps replicas that lost the database together from reconnecting in lockstep.
        wait=wait_exponential(multiplier=initial_wait, max=max_wait) + wait_random(0, initial_wait),
        retry=retry_if_exception(is_connection_error),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "database unavailable (attempt %d of %d), retrying: %s",
            state.attempt_number,
            attempts,
            state.outcome.exception() if state.outcome else None,
        ),
    )
    try:
        async for attempt in retryer:
            with attempt:
                return await fn()
    except Exception as exc:
        if is_connection_error(exc):
            raise DatabaseError(f"database unavailable after {attempts} attempts: {exc}") from exc
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
