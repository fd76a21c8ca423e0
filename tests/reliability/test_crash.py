"""Crash test with real processes: workers are SIGKILLed in the middle of answers and restarted, and
still every accepted message is answered exactly once, in order per conversation."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.inbox.redis import RedisInbox
from core.intake import Accepted, Intake
from core.stores.redis import RedisStore
from tests.reliability.conftest import REDIS_URL, RedisNames, message, wait_for

ROOT = Path(__file__).resolve().parents[2]
DELAY = 0.05
CHATS = [f"c{i:02d}" for i in range(20)]
PER_CHAT = 10


class Fleet:
    """The worker processes, started and killed like an orchestrator would."""

    def __init__(self, names: RedisNames, db_url: str, logs: Path) -> None:
        self.names = names
        self.db_url = db_url
        self.logs = logs
        self.procs: list[asyncio.subprocess.Process] = []
        self.started = 0

    async def start(self) -> asyncio.subprocess.Process:
        self.started += 1
        log = (self.logs / f"worker-{self.started}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "tests.reliability.worker_proc", "--redis", REDIS_URL, "--prefix", self.names.prefix),
            *("--db", self.db_url, "--consumer", f"worker-{self.started}", "--delay", str(DELAY)),
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def alive(self) -> list[asyncio.subprocess.Process]:
        return [p for p in self.procs if p.returncode is None]

    async def stop_all(self) -> None:
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def kill_mid_answer(client: Redis, prefix: str, fleet: Fleet) -> bool:
    """SIGKILL a worker while its model call is under way (not while it sends or records)."""
    for _ in range(3000):
        for proc in fleet.alive():
            started = await client.get(f"{prefix}answering:{proc.pid}")
            if started is not None and time.time() - float(started) < DELAY / 2:
                proc.kill()
                await proc.wait()
                return True
        await asyncio.sleep(0.002)
    return False


@pytest.mark.redis
@pytest.mark.postgres
async def test_workers_killed_mid_answer_lose_nothing_and_repeat_nothing(
    names: RedisNames, pg_url: str, tmp_path: Path
) -> None:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    store = RedisStore(url=REDIS_URL, prefix=names.prefix)
    inbox = RedisInbox(url=REDIS_URL, stream=f"{names.prefix}inbox", dead_stream=f"{names.prefix}dead")
    intake = Intake(store=store, inbox=inbox)
    fleet = Fleet(names, pg_url, tmp_path)
    try:
        await fleet.start()
        await fleet.start()

        async def feed() -> None:
            for n in range(PER_CHAT):
                for chat in CHATS:
                    assert await intake.accept(message(chat, n)) is Accepted.NEW
                await asyncio.sleep(0.3)

        began = time.monotonic()
        feeding = asyncio.create_task(feed())
        kills = 0
        for _ in range(3):
            await asyncio.sleep(1.0)
            if await kill_mid_answer(client, names.prefix, fleet):
                kills += 1
            await fleet.start()
        await feeding
        assert kills == 3

        total = len(CHATS) * PER_CHAT

        async def all_answered() -> bool:
            return await client.llen(f"{names.prefix}deliveries") >= total and await inbox.depth() == 0

        await wait_for(all_answered, within=45, every=0.1)
        print(f"{total} messages answered in {time.monotonic() - began:.1f}s with {kills} workers killed")
        await asyncio.sleep(1.5)  # a wrongful second answer from a reclaim would show up by now
    finally:
        await fleet.stop_all()
        records = [json.loads(r) for r in await client.lrange(f"{names.prefix}deliveries", 0, -1)]
        await client.aclose()
        await store.aclose()
        await inbox.aclose()

    assert [p.returncode for p in fleet.procs].count(-signal.SIGKILL) == 3
    assert Counter(r["reply_to"] for r in records) == {f"{c}-{n}": 1 for c in CHATS for n in range(PER_CHAT)}
    for chat in CHATS:
        assert [r["text"] for r in records if r["chat"] == chat] == [
            f"answer to {chat} {n}" for n in range(PER_CHAT)
        ]
