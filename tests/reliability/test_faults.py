"""Dependency faults and shutdown: nothing accepted is lost, nothing is answered twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from core.db.database import Database
from core.errors import StoreError
from core.intake import Intake
from core.llm.testing import FunctionModel
from core.texts import text as fixed_text
from tests.reliability.conftest import (
    RecordingSender,
    RedisNames,
    RedisServer,
    answer,
    jittery_model,
    make_engine,
    make_worker,
    message,
    wait_for,
)


@pytest.mark.redis
@pytest.mark.parametrize("grace", [0.05, 10.0], ids=["grace-expires", "grace-suffices"])
async def test_entries_unfinished_at_shutdown_are_answered_by_the_next_worker(
    database: Database, names: RedisNames, grace: float
) -> None:
    store, inbox = names.store(), names.inbox()
    intake = Intake(store=store, inbox=inbox)
    for n in range(3):
        for chat in ("alice", "bob"):
            await intake.accept(message(chat, n))
    sender = RecordingSender()
    slow = FunctionModel(answer, delay=0.4)
    first = make_worker(
        inbox=inbox,
        store=store,
        engine=make_engine(database, store, slow),
        sender=sender,
        consumer="old",
        concurrency=1,
        shutdown_grace=grace,
    )
    task = asyncio.create_task(first.run())
    await wait_for(lambda: len(slow.requests) >= 1)  # mid-answer
    await first.stop()
    await asyncio.wait_for(task, grace + 5)
    finished = len(sender.sent)
    assert finished == (0 if grace < 0.4 else 1)
    assert await inbox.depth() == 6 - finished  # claimed but unfinished entries are still there

    second = make_worker(
        inbox=inbox,
        store=store,
        engine=make_engine(database, store, jittery_model()),
        sender=sender,
        consumer="new",
        reclaim_idle=0.3,
    )
    task = asyncio.create_task(second.run())
    await wait_for(lambda: len(sender.sent) >= 6)

    async def empty() -> bool:
        return await inbox.depth() == 0

    await wait_for(empty)
    await second.stop()
    await task
    await store.aclose()
    await inbox.aclose()
    for chat in ("alice", "bob"):
        assert sender.texts(chat) == [f"answer to {chat} {n}" for n in range(3)]


@pytest.mark.redis
async def test_a_redis_restart_loses_nothing_and_the_worker_carries_on(
    database: Database, redis_server: RedisServer
) -> None:
    names = RedisNames()
    url = redis_server.url
    gateway_store, gateway_inbox = names.store(url, retries=1), names.inbox(url, retries=1)
    worker_store, worker_inbox = names.store(url, retries=1), names.inbox(url, retries=1)
    intake = Intake(store=gateway_store, inbox=gateway_inbox)
    sender = RecordingSender()
    worker = make_worker(
        inbox=worker_inbox,
        store=worker_store,
        engine=make_engine(database, worker_store, FunctionModel(answer, delay=0.05)),
        sender=sender,
        consumer="w1",
        reclaim_idle=1.0,
        max_deliveries=50,
    )
    chats = [f"c{i}" for i in range(5)]
    for n in range(4):
        for chat in chats:
            await intake.accept(message(chat, n))
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(sender.sent) >= 3)

    # Redis dies mid-run (SIGKILL) and stays down for two seconds.
    await redis_server.kill()
    with pytest.raises(StoreError):
        await intake.accept(message("c0", 4))  # the gateway answers 5xx; the platform retries
    await asyncio.sleep(2.0)
    assert not task.done()  # the worker loop survived the outage
    await redis_server.start()

    for n in range(4, 6):
        for chat in chats:
            await intake.accept(message(chat, n))
    await wait_for(lambda: len(sender.sent) >= 30, within=40)

    async def empty() -> bool:
        return await gateway_inbox.depth() == 0

    await wait_for(empty)
    await asyncio.sleep(1.5)  # time enough for a wrongful second answer to show up
    await worker.stop()
    await task
    for resource in (gateway_store, gateway_inbox, worker_store, worker_inbox):
        await resource.aclose()

    # Every accepted message has exactly one reply, in order. A turn caught mid-answer by the outage may
    # have been answered with the apology (the engine cannot reach the store) — at most one per
    # conversation, since each conversation has one turn in flight — and never twice.
    assert Counter(r.in_reply_to for r in sender.sent) == {f"{c}-{n}": 1 for c in chats for n in range(6)}
    apology = fixed_text("apology", "en")
    for chat in chats:
        assert [r.in_reply_to for r in sender.sent if r.key.chat_id == chat] == [
            f"{chat}-{n}" for n in range(6)
        ]
        for n, text in enumerate(sender.texts(chat)):
            assert text in (f"answer to {chat} {n}", apology)
    assert sum(r.text == apology for r in sender.sent) <= len(chats)
