"""Helpers for the reliability tests: a private redis-server, a recording sender, engines and workers."""

from __future__ import annotations

import asyncio
import random
import socket
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
