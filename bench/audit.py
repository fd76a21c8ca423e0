"""Audit log and encryption-at-rest throughput on a real database.

Prints records appended per second (one writer, then several concurrent writers sharing the chain
lock), how long ``verify`` and ``export`` take, and what encrypting message history costs per
``ConversationStore.append`` / ``messages`` compared with plaintext.

    python bench/audit.py [--records 2000] [--writers 8] [--postgres postgresql://postgres@127.0.0.1/test]

Without ``--postgres`` a temporary SQLite file is used. With it, the benchmark creates a scratch
database on that server (``kefu_bench_<random>``) and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from core.audit import AuditLog
from core.conversations import ConversationStore
from core.crypto import KeyRing
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.db.models import Message
from core.messages import ConversationKey

TEXT = "您好，我的订单KF20251103001还没有发货，请帮我查一下物流，电话13812345678。" * 2


async def _appends(log: AuditLog, count: int, writers: int) -> float:
    async def writer(w: int) -> None:
        for i in range(count // writers):
            await log.record("inbound", conversation_id=i % 50, actor=f"w{w}", data={"text": TEXT, "i": i})

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return time.perf_counter() - started


async def _history(store: ConversationStore, turns: int) -> tuple[float, float]:
    key = ConversationKey(channel="bench", chat_id=f"{id(store)}")
    conversation = await store.get_or_create(key, user_id="u", language="zh")
    assert conversation.id is not None
    cid = conversation.id
    started = time.perf_counter()
    for _ in range(turns):
        await store.append(
            cid,
            [
                Message(conversation_id=cid, role="user", content=TEXT),
                Message(conversation_id=cid, role="assistant", content=TEXT),
            ],
        )
    write = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(20):
        await store.messages(cid)
    return write / turns * 1000, (time.perf_counter() - started) / 20 * 1000


@asynccontextmanager
async def _scratch_url(postgres: str | None) -> AsyncIterator[str]:
    if postgres is None:
        with tempfile.TemporaryDirectory() as scratch:
            yield f"sqlite+aiosqlite:///{Path(scratch) / 'bench.db'}"
        return
    name = f"kefu_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
            yield f"{base}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--postgres", help="admin DSN of a PostgreSQL server to create a scratch db on")
    args = parser.parse_args()
    async with _scratch_url(args.postgres) as url:
        await upgrade_async(url)
        ring = KeyRing.from_spec(f"k1:{KeyRing.generate_key()}")
        async with Database(url=url) as db:
            log = AuditLog(db=db, keyring=ring)
            half = args.records // 2
            one = await _appends(log, half, 1)
            many = await _appends(log, half, args.writers)
            started = time.perf_counter()
            report = await log.verify()
            verify = time.perf_counter() - started
            started = time.perf_counter()
            exported = await log.export(7)
            export = time.perf_counter() - started
            plain = await _history(ConversationStore(db=db), args.turns)
            sealed = await _history(ConversationStore(db=db, keyring=ring), args.turns)

    print(f"database: {db.backend}")
    print(f"append, 1 writer:         {half / one:8.0f} records/s")
    print(f"append, {args.writers} writers:        {half / many:8.0f} records/s")
    rate = report.checked / verify
    print(
        f"verify {report.checked} records:   {verify * 1000:8.0f} ms ({rate:.0f} records/s), ok={report.ok}"
    )
    print(f"export {len(exported)} records:     {export * 1000:8.1f} ms")
    print(f"history append (2 rows):  plaintext {plain[0]:.2f} ms, encrypted {sealed[0]:.2f} ms")
    print(f"history read ({args.turns * 2} rows): plaintext {plain[1]:.2f} ms, encrypted {sealed[1]:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
