"""PostgreSQL briefly down: the turns it interrupts are answered again once it is back, never apologised
for, dropped, dead-lettered or answered twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.intake import Intake
from core.llm.testing import FunctionModel
from core.messages import ConversationKey
from tests.reliability.conftest import (
    PostgresServer,
    RecordingSender,
    RedisNames,
    answer,
    make_engine,
    make_worker,
    message,
    wait_for,
)

CHATS = [f"c{i}" for i in range(6)]
ROUNDS = 8


@pytest.mark.redis
async def test_a_postgres_restart_mid_run_delays_answers_but_loses_none(
    postgres_server: PostgresServer, names: RedisNames
) -> None:
    await upgrade_async(postgres_server.url)
    store, inbox = names.store(), names.inbox()
    intake = Intake(store=store, inbox=inbox)
    sender = RecordingSender()
    async with Database(url=postgres_server.url) as database:
        # The model takes a while, so the outage catches turns between reading and storing the
        # conversation. max_deliveries stays at 3: an outage that cost deliveries would dead-letter.
        worker = make_worker(
            inbox=inbox,
            store=store,
            engine=make_engine(database, store, FunctionModel(answer, delay=0.05)),
            sender=sender,
            consumer="w1",
        )
        for n in range(4):
            for chat in CHATS:
                await intake.accept(message(chat, n))
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: len(sender.sent) >= 4)

        # PostgreSQL goes down (fast shutdown: connections are cut mid-turn) for three seconds while
        # customers keep writing; the gateway does not need the database to accept their messages.
        await postgres_server.stop()
        answered_at_stop = len(sender.sent)
        for n in (4, 5):
            for chat in CHATS:
                await intake.accept(message(chat, n))
            await asyncio.sleep(1.5)
        assert not task.done()  # the worker survived the outage
        await postgres_server.start()
        for n in range(6, ROUNDS):
            for chat in CHATS:
                await intake.accept(message(chat, n))

        await wait_for(lambda: len(sender.sent) >= len(CHATS) * ROUNDS, within=30)

        async def empty() -> bool:
            return await inbox.depth() == 0

        await wait_for(empty)
        await asyncio.sleep(1.5)  # time enough for a wrongful second answer to show up
        await worker.stop()
        await task
        dead = await inbox.dead_letters()
        conversations = ConversationStore(db=database)
        transcripts = {}
        for chat in CHATS:
            found = await conversations.get(ConversationKey(channel="test", chat_id=chat))
            assert found is not None and found.id is not None
            transcripts[chat] = [(m.role, m.content) for m in await conversations.messages(found.id)]
    await store.aclose()
    await inbox.aclose()

    assert answered_at_stop < 4 * len(CHATS)  # accepted messages were waiting when the database went
    # Every accepted message has exactly one reply, the real answer, in order; nothing dead-lettered.
    assert Counter(r.in_reply_to for r in sender.sent) == {
        f"{chat}-{n}": 1 for chat in CHATS for n in range(ROUNDS)
    }
    for chat in CHATS:
        assert sender.texts(chat) == [f"answer to {chat} {n}" for n in range(ROUNDS)]
    assert dead == []
    # The stored conversation has each question and answer once, even for turns that were retried.
    for chat in CHATS:
        assert transcripts[chat] == [
            turn
            for n in range(ROUNDS)
            for turn in (("user", f"{chat} {n}"), ("assistant", f"answer to {chat} {n}"))
        ]
