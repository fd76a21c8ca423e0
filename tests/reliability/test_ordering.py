"""Order across processes: workers in different processes share one inbox and store, and each
conversation is still answered message by message, in the order the messages were accepted."""

from __future__ import annotations

import asyncio

import pytest

from core.db.database import Database
from core.errors import DeliveryError
from core.inbox.memory import MemoryInbox
from core.intake import Accepted, Intake
from core.messages import Reply
from core.stores.memory import MemoryStore
from core.texts import text as fixed_text
from tests.reliability.conftest import (
    RecordingSender,
    RedisNames,
    jittery_model,
    make_engine,
    make_worker,
    message,
    wait_for,
)

CHATS = [f"c{i}" for i in range(10)]


@pytest.mark.redis
async def test_two_workers_answer_every_message_once_in_order(database: Database, names: RedisNames) -> None:
    sender = RecordingSender()
    gateway_store, gateway_inbox = names.store(), names.inbox()
    intake = Intake(store=gateway_store, inbox=gateway_inbox)
    for n in range(10):
        for chat in CHATS:
            assert await intake.accept(message(chat, n)) is Accepted.NEW

    # Two "processes": each with its own Redis connections, engine and worker.
    stores = [names.store(), names.store()]
    inboxes = [names.inbox(), names.inbox()]
    workers = [
        make_worker(
            inbox=inboxes[i],
            store=stores[i],
            engine=make_engine(database, stores[i], jittery_model()),
            sender=sender,
            consumer=f"p{i}",
            concurrency=4,
            reclaim_idle=3.0,
        )
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_for(lambda: len(sender.sent) >= 100, within=60)

        async def empty() -> bool:
            return await gateway_inbox.depth() == 0

        await wait_for(empty, within=10)
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks)
        for resource in (*stores, *inboxes, gateway_store, gateway_inbox):
            await resource.aclose()

    assert len(sender.sent) == 100
    for chat in CHATS:
        assert sender.texts(chat) == [f"answer to {chat} {n}" for n in range(10)]
    # Both processes did part of the work, so the order really was kept across them.
    assert all(w.processed >= 10 for w in workers)


class RefusesOne(RecordingSender):
    """A platform that always refuses the answer to one message."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused

    async def send(self, reply: Reply) -> None:
        if reply.in_reply_to == self.refused and reply.source != "system":
            raise DeliveryError("platform said no")
        await super().send(reply)


async def test_a_dead_lettered_message_does_not_block_the_next_one(database: Database) -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    sender = RefusesOne("alice-1")
    intake = Intake(store=store, inbox=inbox)
    for n in range(3):
        await intake.accept(message("alice", n))
    worker = make_worker(
        inbox=inbox,
        store=store,
        engine=make_engine(database, store, jittery_model()),
        sender=sender,
        consumer="w1",
        reclaim_idle=0.05,
        max_deliveries=2,
        order_wait=600,
    )
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(sender.sent) >= 3, within=20)
    await worker.stop()
    await task

    assert sender.texts("alice") == ["answer to alice 0", fixed_text("apology", "en"), "answer to alice 2"]
    assert [d.message.message_id for d in await inbox.dead_letters()] == ["alice-1"]


async def test_a_message_whose_predecessor_never_arrives_is_answered_after_the_order_wait(
    database: Database,
) -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    sender = RecordingSender()
    intake = Intake(store=store, inbox=inbox)
    await intake.accept(message("alice", 1))
    # Number 2 was taken by a gateway that died before queueing it and before marking it skipped.
    await store.incr("seq:test:alice")
    await intake.accept(message("alice", 3))
    worker = make_worker(
        inbox=inbox,
        store=store,
        engine=make_engine(database, store, jittery_model()),
        sender=sender,
        consumer="w1",
        order_wait=0.3,
    )
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(sender.sent) >= 2, within=20)
    await worker.stop()
    await task
    assert sender.texts("alice") == ["answer to alice 1", "answer to alice 3"]


class FailingInbox(MemoryInbox):
    async def put(self, message: object) -> str:  # type: ignore[override]
        raise OSError("disk full")


async def test_a_message_the_inbox_refused_does_not_hold_up_its_conversation(database: Database) -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    intake = Intake(store=store, inbox=inbox)
    await intake.accept(message("alice", 1))
    broken = Intake(store=store, inbox=FailingInbox())
    try:
        await broken.accept(message("alice", 2))
    except OSError:
        pass  # the gateway answers with an error; the platform retries later
    else:
        raise AssertionError("accept should have failed")
    await intake.accept(message("alice", 3))
    # The retry of message 2 arrives and is accepted as new, after 3.
    assert await intake.accept(message("alice", 2)) is Accepted.NEW

    sender = RecordingSender()
    worker = make_worker(
        inbox=inbox,
        store=store,
        engine=make_engine(database, store, jittery_model()),
        sender=sender,
        consumer="w1",
        order_wait=600,
    )
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(sender.sent) >= 3, within=20)
    await worker.stop()
    await task
    assert sender.texts("alice") == ["answer to alice 1", "answer to alice 3", "answer to alice 2"]
