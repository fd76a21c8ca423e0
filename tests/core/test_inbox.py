"""One contract for every Inbox: the in-process inbox and Redis Streams must behave the same."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from core.errors import StoreError
from core.inbox.base import Inbox
from core.inbox.factory import build_inbox
from core.inbox.memory import MemoryInbox
from core.inbox.redis import RedisInbox
from core.messages import ConversationKey, InboundMessage
from tests.core.conftest import REDIS_URL

RECEIVED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def message(n: int, chat: str = "alice") -> InboundMessage:
    return InboundMessage(
        key=ConversationKey(channel="test", chat_id=chat),
        user_id=chat,
        message_id=f"{chat}-{n}",
        text=f"问题 {n}",
        received_at=RECEIVED,
        extras={"thread": "t1", "_seq": n},
    )


def stream_names() -> dict[str, str]:
    stream = f"kefu-test:{uuid.uuid4().hex}:inbox"
    return {"stream": stream, "dead_stream": f"{stream}:dead"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def inboxes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Inbox, Inbox]]:
    """Two handles on one inbox, as two processes hold them (the same object in memory)."""
    if request.param == "memory":
        memory = MemoryInbox()
        yield memory, memory
        return
    names = stream_names()
    first = RedisInbox(url=REDIS_URL, **names)
    second = RedisInbox(url=REDIS_URL, **names)
    try:
        yield first, second
    finally:
        await first.client.delete(names["stream"], names["dead_stream"])
        await first.aclose()
        await second.aclose()


@pytest.fixture
def inbox(inboxes: tuple[Inbox, Inbox]) -> Inbox:
    return inboxes[0]


class TestInboxContract:
    async def test_put_claim_ack(self, inbox: Inbox) -> None:
        first = await inbox.put(message(1))
        second = await inbox.put(message(2))
        assert await inbox.depth() == 2

        claimed = await inbox.claim("w1", count=10, block=0.1)
        assert [e.entry_id for e in claimed] == [first, second]
        assert [e.message for e in claimed] == [message(1), message(2)]
        assert [e.deliveries for e in claimed] == [1, 1]
        assert await inbox.depth() == 2  # claimed is not done

        await inbox.ack(first)
        assert await inbox.depth() == 1
        await inbox.ack(second)
        assert await inbox.depth() == 0
        assert await inbox.claim("w1", block=0.05) == []

    async def test_claim_respects_count(self, inbox: Inbox) -> None:
        for n in range(5):
            await inbox.put(message(n))
        assert len(await inbox.claim("w1", count=2, block=0.1)) == 2
        assert len(await inbox.claim("w1", count=10, block=0.1)) == 3

    async def test_claim_waits_for_a_put_then_gives_up_empty(self, inbox: Inbox) -> None:
        assert await inbox.claim("w1", block=0.1) == []

        waiting = asyncio.create_task(inbox.claim("w1", block=3.0))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await inbox.put(message(1))
        claimed = await asyncio.wait_for(waiting, 3.0)
        assert [e.message.message_id for e in claimed] == ["alice-1"]

    async def test_an_idle_entry_is_reclaimed_by_another_consumer(self, inbox: Inbox) -> None:
        entry_id = await inbox.put(message(1))
        [claimed] = await inbox.claim("w1", block=0.1)
        # Still fresh: nobody may take it.
        assert await inbox.reclaim("w2", min_idle=5.0) == []

        await asyncio.sleep(0.15)
        [again] = await inbox.reclaim("w2", min_idle=0.1)
        assert again.entry_id == entry_id
        assert again.message == claimed.message
        assert again.deliveries == 2
        # Now it is w2's and fresh again.
        assert await inbox.reclaim("w3", min_idle=0.1) == []
        await asyncio.sleep(0.15)
        [third] = await inbox.reclaim("w3", min_idle=0.1)
        assert third.deliveries == 3

    async def test_a_touched_entry_is_not_reclaimed(self, inbox: Inbox) -> None:
        await inbox.put(message(1))
        [entry] = await inbox.claim("w1", block=0.1)
        await asyncio.sleep(0.25)
        await inbox.touch("w1", [entry.entry_id])
        assert await inbox.reclaim("w2", min_idle=0.2) == []

    async def test_an_acked_entry_is_never_reclaimed(self, inbox: Inbox) -> None:
        await inbox.put(message(1))
        [entry] = await inbox.claim("w1", block=0.1)
        await inbox.ack(entry.entry_id)
        await asyncio.sleep(0.1)
        assert await inbox.reclaim("w2", min_idle=0.0) == []
        assert await inbox.claim("w2", block=0.05) == []

    async def test_dead_letter_moves_the_entry_out_and_lists_it(self, inbox: Inbox) -> None:
        await inbox.put(message(1))
        await inbox.put(message(2))
        entries = await inbox.claim("w1", block=0.1)
        await inbox.dead_letter(entries[0], "DeliveryError: platform said no")
        await inbox.dead_letter(entries[1], "no sender")

        assert await inbox.depth() == 0
        await asyncio.sleep(0.05)
        assert await inbox.reclaim("w2", min_idle=0.0) == []
        dead = await inbox.dead_letters()
        assert [(d.entry_id, d.message, d.reason) for d in dead] == [
            (entries[0].entry_id, message(1), "DeliveryError: platform said no"),
            (entries[1].entry_id, message(2), "no sender"),
        ]
        assert [d.message.message_id for d in await inbox.dead_letters(limit=1)] == ["alice-2"]

    async def test_depth_counts_waiting_and_claimed_entries(self, inbox: Inbox) -> None:
        assert await inbox.depth() == 0
        for n in range(3):
            await inbox.put(message(n))
        await inbox.claim("w1", count=1, block=0.1)
        assert await inbox.depth() == 3

    async def test_two_processes_never_claim_the_same_entry(self, inboxes: tuple[Inbox, Inbox]) -> None:
        first, second = inboxes
        put = {await first.put(message(n, chat=f"c{n % 7}")) for n in range(120)}

        async def drain(inbox: Inbox, consumer: str) -> list[str]:
            got: list[str] = []
            while True:
                entries = await inbox.claim(consumer, count=7, block=0.05)
                if not entries:
                    return got
                got.extend(e.entry_id for e in entries)
                await asyncio.sleep(0)  # let the other process take its turn

        a, b = await asyncio.gather(drain(first, "p1"), drain(second, "p2"))
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(put)
        assert a and b


# --- Redis only --------------------------------------------------------------------------------------


@pytest.fixture
async def redis_inbox() -> AsyncIterator[RedisInbox]:
    names = stream_names()
    inbox = RedisInbox(url=REDIS_URL, **names)
    try:
        yield inbox
    finally:
        await inbox.client.delete(names["stream"], names["dead_stream"])
        await inbox.aclose()


@pytest.mark.redis
async def test_a_vanished_group_is_created_again_without_losing_entries(redis_inbox: RedisInbox) -> None:
    await redis_inbox.put(message(1))
    [first] = await redis_inbox.claim("w1", block=0.1)
    await redis_inbox.ack(first.entry_id)

    # Redis restarted without persistence: stream and group are gone; the next put recreates only the
    # stream, and the group must still see that entry.
    await redis_inbox.client.delete(redis_inbox.stream)
    await redis_inbox.put(message(2))
    claimed = await redis_inbox.claim("w1", block=0.1)
    assert [e.message.message_id for e in claimed] == ["alice-2"]
    await redis_inbox.ack(claimed[0].entry_id)
    assert await redis_inbox.depth() == 0


@pytest.mark.redis
async def test_maxlen_refuses_new_messages_instead_of_dropping_old_ones(redis_inbox: RedisInbox) -> None:
    bounded = RedisInbox(client=redis_inbox.client, stream=redis_inbox.stream, maxlen=2)
    await bounded.put(message(1))
    await bounded.put(message(2))
    with pytest.raises(StoreError, match="full"):
        await bounded.put(message(3))
    assert [e.message.message_id for e in await bounded.claim("w1", block=0.1)] == ["alice-1", "alice-2"]


@pytest.mark.redis
async def test_an_unreadable_entry_does_not_block_the_queue(redis_inbox: RedisInbox) -> None:
    await redis_inbox.client.xadd(redis_inbox.stream, {"message": "{not json"})
    await redis_inbox.put(message(1))
    claimed = await redis_inbox.claim("w1", block=0.1)
    assert [e.message.message_id for e in claimed] == ["alice-1"]
    assert await redis_inbox.depth() == 1  # the broken entry went to the dead stream
    assert await redis_inbox.client.xlen(redis_inbox.dead_stream) == 1


@pytest.mark.redis
async def test_a_redis_outage_is_a_store_error() -> None:
    inbox = RedisInbox(url="redis://127.0.0.1:1/0", retries=0, socket_timeout=0.5)
    try:
        with pytest.raises(StoreError):
            await inbox.put(message(1))
        with pytest.raises(StoreError):
            await inbox.claim("w1", block=0.1)
    finally:
        await inbox.aclose()


@pytest.mark.redis
async def test_build_inbox_picks_the_backend_from_the_redis_url() -> None:
    assert isinstance(build_inbox(redis_url=None), MemoryInbox)
    inbox = build_inbox(redis_url=REDIS_URL)
    assert isinstance(inbox, RedisInbox)
    await inbox.aclose()


def test_a_redis_inbox_needs_exactly_one_connection() -> None:
    with pytest.raises(Exception, match="exactly one"):
        RedisInbox()
    with pytest.raises(Exception, match="exactly one"):
        RedisInbox(url=REDIS_URL, client=Redis())
