"""Helpers for the reliability tests: a private redis-server, a recording sender, engines and workers."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.delivery import ReplySender, SenderRegistry
from core.engine import Engine, EngineLimits
from core.inbox.base import Inbox
from core.inbox.redis import RedisInbox
from core.llm.base import ChatModel, ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage, Reply
from core.stores.base import StateStore
from core.stores.redis import RedisStore
from core.worker import Worker
from tools.registry import ToolRegistry

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own, persisting to an append-only file so data survives restarts."""

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--save", "", "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always"),
            *("--daemonize", "no"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        probe = Redis(host="127.0.0.1", port=self.port, retry=Retry(NoBackoff(), 0))
        try:
            for _ in range(200):
                try:
                    await probe.ping()
                    return
                except (redis_errors.ConnectionError, redis_errors.BusyLoadingError):
                    await asyncio.sleep(0.05)
        finally:
            await probe.aclose()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    async def kill(self) -> None:
        """SIGKILL: no clean shutdown, only what the append-only file already holds survives."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries installed the Debian way, if any."""
    found = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if path.parent.name.isdigit() and (path / "postgres").exists()
    ]
    return max(found, key=lambda path: int(path.parent.name), default=None)


class PostgresServer:
    """A PostgreSQL server of the test's own (trust auth, no fsync) that the test may stop and start.

    PostgreSQL refuses to run as root: under root, initdb and the server run as the ``postgres`` user in
    a private directory it owns (pytest's tmp_path is not reachable by other users).
    """

    def __init__(self, directory: Path, bindir: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.bindir = bindir
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    async def init(self) -> None:
        initdb = await asyncio.create_subprocess_exec(
            str(self.bindir / "initdb"),
            *("-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"),
            *("-E", "UTF8", "--locale=C"),
            cwd=self.directory,
            user=self._user,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await initdb.communicate()
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {err.decode(errors='replace')}")

    async def start(self) -> None:
        with (self.directory / "postgres.log").open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                str(self.bindir / "postgres"),
                *("-D", str(self.data), "-p", str(self.port)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="),
                *("-c", "fsync=off", "-c", "full_page_writes=off"),
                cwd=self.directory,
                user=self._user,
                stdout=log_file,
                stderr=log_file,
            )
        dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        for _ in range(200):
            if self.proc.returncode is not None:
                break
            try:
                conn = await asyncpg.connect(dsn, timeout=1.0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.05)  # not listening yet, or "the database system is starting up"
                continue
            await conn.close()
            return
        raise RuntimeError(f"postgres did not start on port {self.port}; see {self.directory}/postgres.log")

    async def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, clients are disconnected."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def postgres_server(tmp_path: Path) -> AsyncIterator[PostgresServer]:
    """A private, running PostgreSQL server, from the binaries of the one the tests already use."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql: install postgresql")
    if os.geteuid() == 0:
        directory = Path(tempfile.mkdtemp(prefix="kefu-pg-"))
        shutil.chown(directory, "postgres", "postgres")
    else:
        directory = tmp_path
    server = PostgresServer(directory, bindir)
    try:
        await server.init()
        await server.start()
        yield server
    finally:
        await server.stop()
        if directory != tmp_path:
            shutil.rmtree(directory, ignore_errors=True)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A migrated PostgreSQL database that exists for this test only."""
    name = f"kefu_rel_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        await upgrade_async(url)
        yield url
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RecordingSender(ReplySender):
    """Records every reply a customer would see, in delivery order."""

    channel = "test"

    def __init__(self, sent: list[Reply] | None = None) -> None:
        self.sent: list[Reply] = [] if sent is None else sent

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)

    def texts(self, chat: str) -> list[str]:
        return [r.text for r in self.sent if r.key.chat_id == chat]


def message(chat: str, n: int, *, user: str | None = None) -> InboundMessage:
    return InboundMessage(
        key=ConversationKey(channel="test", chat_id=chat),
        user_id=user or chat,
        message_id=f"{chat}-{n}",
        text=f"{chat} {n}",
        language="en",
    )


def answer(request: ChatRequest) -> str:
    return f"answer to {request.messages[-1].content}"


def jittery_model(max_delay: float = 0.02) -> FunctionModel:
    """Answers after a random delay, so concurrent answers finish in a shuffled order."""

    async def respond(request: ChatRequest) -> str:
        await asyncio.sleep(random.uniform(0, max_delay))
        return answer(request)

    return FunctionModel(respond)


def make_engine(database: Database, store: StateStore, model: ChatModel) -> Engine:
    return Engine(
        conversations=ConversationStore(db=database),
        store=store,
        model=model,
        tools=ToolRegistry(),
        system_prompt="S",
        context=ContextBuilder(counter=model.count_tokens, budget=ContextBudget()),
        # A crashed holder's conversation lock frees itself quickly in tests.
        limits=EngineLimits(lock_ttl=1.0),
    )


def make_worker(
    *,
    inbox: Inbox,
    store: StateStore,
    engine: Engine,
    sender: ReplySender,
    consumer: str,
    **options: float,
) -> Worker:
    settings: dict[str, float] = {"reclaim_idle": 0.5, "max_deliveries": 3, "lock_ttl": 1.0}
    settings.update(options)
    return Worker(
        inbox=inbox,
        engine=engine,
        senders=SenderRegistry([sender]),
        store=store,
        consumer=consumer,
        max_deliveries=int(settings.pop("max_deliveries")),
        **settings,
    )


class RedisNames:
    """Unique stream and key names for one test on a shared Redis, removed afterwards."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex
        self.prefix = f"kefu-test:{tag}:"
        self.stream = f"kefu-test:{tag}:inbox"
        self.dead_stream = f"kefu-test:{tag}:inbox:dead"

    def inbox(self, url: str = REDIS_URL, **options: float) -> RedisInbox:
        return RedisInbox(url=url, stream=self.stream, dead_stream=self.dead_stream, **options)  # type: ignore[arg-type]

    def store(self, url: str = REDIS_URL, **options: float) -> RedisStore:
        return RedisStore(url=url, prefix=self.prefix, **options)  # type: ignore[arg-type]

    async def cleanup(self, url: str = REDIS_URL) -> None:
        client = Redis.from_url(url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture
async def names() -> AsyncIterator[RedisNames]:
    names = RedisNames()
    try:
        yield names
    finally:
        await names.cleanup()


async def wait_for(condition: object, *, within: float = 20.0, every: float = 0.02) -> None:
    """Poll ``condition()`` (sync or async) until true; fail the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = condition()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(every)
