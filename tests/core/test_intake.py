"""Accepting messages: the same outcome in-process and on Redis, where it is one atomic script."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from core.errors import StoreError
from core.inbox.base import Inbox
from core.inbox.memory import MemoryInbox
from core.inbox.redis import RedisInbox
from core.intake import NOTICE_FIELD, SEQ_FIELD, Accepted, Intake, RateLimits
from core.messages import ConversationKey, InboundMessage
from core.stores.base import StateStore
from core.stores.memory import MemoryStore
from core.stores.redis import RedisStore
from tests.core.conftest import REDIS_URL, drop_keys, unique_prefix


def message(n: int, user: str = "ada") -> InboundMessage:
    return InboundMessage(
        key=ConversationKey(channel="test", chat_id=user),
        user_id=user,
        message_id=f"{user}-{n}",
        text=f"question {n}",
        extras={"thread": "t1"},
    )


@contextlib.asynccontextmanager
async def on_redis() -> AsyncIterator[tuple[RedisStore, RedisInbox]]:
    """A store and an inbox on one Redis, under a prefix of their own, removed afterwards."""
    prefix = unique_prefix()
    store = RedisStore(url=REDIS_URL, prefix=prefix)
    inbox = RedisInbox(url=REDIS_URL, stream=f"{prefix}inbox", dead_stream=f"{prefix}inbox:dead")
    try:
        yield store, inbox
    finally:
        await drop_keys(store.client, prefix)
        await inbox.aclose()
        await store.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StateStore, Inbox]]:
    if request.param == "memory":
        async with MemoryStore() as store:
            yield store, MemoryInbox()
        return
    async with on_redis() as (redis_store, redis_inbox):
        yield redis_store, redis_inbox


async def test_messages_are_numbered_deduped_and_limited_alike_on_both_backends(
    backends: tuple[StateStore, Inbox],
) -> None:
    store, inbox = backends
    intake = Intake(store=store, inbox=inbox, rate_limits=RateLimits(per_user=2, per_conversation=0))
    outcomes = [await intake.accept(message(n)) for n in (1, 1, 2, 3, 4)]
    assert outcomes == [Accepted.NEW, Accepted.DUPLICATE, Accepted.NEW, Accepted.NEW, Accepted.LIMITED]
    entries = await inbox.claim("w1", count=10, block=0.1)
    assert [e.message.message_id for e in entries] == ["ada-1", "ada-2", "ada-3"]
    assert [e.message.extras[SEQ_FIELD] for e in entries] == [1, 2, 3]
    # The first message over the limit is queued to carry the polite notice; its own extras are kept.
    assert [e.message.extras.get(NOTICE_FIELD) for e in entries] == [None, None, "rate_limited"]
    assert all(e.message.extras["thread"] == "t1" for e in entries)
    # Another user has limits of their own.
    assert await intake.accept(message(1, user="bo")) is Accepted.NEW


@pytest.mark.redis
async def test_on_redis_a_failed_admission_leaves_no_trace_and_the_retry_is_accepted() -> None:
    async with on_redis() as (store, inbox):
        intake = Intake(store=store, inbox=inbox)
        # Something else holds the stream's key: XADD fails inside the script.
        await store.client.set(inbox.stream, "not a stream")
        with pytest.raises(StoreError):
            await intake.accept(message(1))
        await store.client.delete(inbox.stream)
        # The platform's retry is not taken for a duplicate, and gets number 1, not 2.
        assert await intake.accept(message(1)) is Accepted.NEW
        (entry,) = await inbox.claim("w1", count=10, block=0.1)
        assert entry.message.extras[SEQ_FIELD] == 1
        # One script wrote the entry: the number travels beside the message in the stream.
        ((_id, fields),) = await store.client.xrange(inbox.stream)
        assert fields["seq"] == "1"
