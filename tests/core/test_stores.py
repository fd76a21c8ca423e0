"""One contract for every StateStore: the in-process store and Redis must behave the same."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.errors import LockError, StoreError
from core.stores.base import Admission, AdmissionRequest, Counter, StateStore
from core.stores.factory import build_store
from core.stores.memory import MemoryStore
from core.stores.redis import RedisStore
from tests.core.conftest import REDIS_URL, drop_keys, unique_prefix


class TestStateStoreContract:
    async def test_get_set_delete(self, store: StateStore) -> None:
        assert await store.get("greeting") is None
        await store.set("greeting", "你好")
        assert await store.get("greeting") == "你好"
        await store.set("greeting", "hello")
        assert await store.get("greeting") == "hello"
        await store.set("other", "x")

        assert await store.delete("greeting", "other", "missing") == 2
        assert await store.get("greeting") is None
        assert await store.delete() == 0

    async def test_admit_marks_once_counts_and_numbers(self, store: StateStore) -> None:
        def admit(mark: str, limit: int = 2) -> Any:
            return store.admit(
                AdmissionRequest(
                    mark=mark,
                    mark_ttl=60,
                    counters=[Counter(key="rate", limit=limit, ttl=60)],
                    sequence="seq",
                    sequence_ttl=60,
                    clear_prefix="done:",
                )
            )

        await store.set("done:2", "left by an earlier run of the counter")
        assert await admit("m1") == Admission(sequence=1)
        assert await admit("m1") is None  # the same item again: not admitted, nothing counted
        assert await admit("m2") == Admission(sequence=2)
        assert await store.get("done:2") is None  # the new number 2 starts clean
        # One over the limit: admitted with a flag (it carries the notice); further ones are refused
        # without taking a number, so the sequence has no gap.
        assert await admit("m3") == Admission(sequence=3, first_over=True)
        assert await admit("m4") == Admission(sequence=None)
        assert await admit("m5", limit=0) == Admission(sequence=None)
        assert await admit("m6", limit=100) == Admission(sequence=4)
        assert await store.ttl("seq") is not None and await store.ttl("rate") is not None

    async def test_value_expires_after_ttl(self, store: StateStore) -> None:
        await store.set("token", "abc", ttl=0.2)
        assert await store.get("token") == "abc"
        await asyncio.sleep(0.35)
        assert await store.get("token") is None
        assert await store.delete("token") == 0

    async def test_set_without_ttl_clears_previous_expiry(self, store: StateStore) -> None:
        await store.set("token", "old", ttl=0.2)
        await store.set("token", "new")
        await asyncio.sleep(0.35)
        assert await store.get("token") == "new"

    async def test_ttl_reports_remaining_time(self, store: StateStore) -> None:
        assert await store.ttl("missing") is None
        await store.set("forever", "1")
        assert await store.ttl("forever") is None
        await store.set("soon", "1", ttl=10)
        remaining = await store.ttl("soon")
        assert remaining is not None
        assert 0 < remaining <= 10

    async def test_set_if_absent_lets_exactly_one_concurrent_caller_win(self, store: StateStore) -> None:
        results = await asyncio.gather(
            *(store.set_if_absent("seen:msg-42", f"worker-{i}", ttl=60) for i in range(5))
        )
        assert results.count(True) == 1
        winner = results.index(True)
        assert await store.get("seen:msg-42") == f"worker-{winner}"
        assert await store.set_if_absent("seen:msg-42", "late") is False

    async def test_set_if_absent_succeeds_again_after_the_mark_expires(self, store: StateStore) -> None:
        assert await store.set_if_absent("seen:msg-7", "1", ttl=0.2)
        assert not await store.set_if_absent("seen:msg-7", "1", ttl=0.2)
        await asyncio.sleep(0.35)
        assert await store.set_if_absent("seen:msg-7", "1", ttl=0.2)

    async def test_incr_counts_and_expires_from_creation(self, store: StateStore) -> None:
        assert await store.incr("hits", ttl=0.3) == 1
        # The ttl only applies on creation: later calls neither reset nor remove it.
        assert await store.incr("hits", 2, ttl=60) == 3
        remaining = await store.ttl("hits")
        assert remaining is not None
        assert 0 < remaining <= 0.3
        assert await store.get("hits") == "3"
        await asyncio.sleep(0.45)
        assert await store.incr("hits") == 1
        assert await store.ttl("hits") is None

    async def test_incr_on_a_non_number_is_a_store_error(self, store: StateStore) -> None:
        await store.set("name", "alice")
        with pytest.raises(StoreError):
            await store.incr("name")

    async def test_lock_sections_never_overlap(self, store: StateStore) -> None:
        inside = 0
        overlaps = 0
        events: list[tuple[str, int]] = []

        async def worker(n: int) -> None:
            nonlocal inside, overlaps
            for _ in range(3):
                async with store.lock("conv:1", ttl=5, wait=5):
                    inside += 1
                    overlaps += inside > 1
                    events.append(("enter", n))
                    await asyncio.sleep(0.02)
                    events.append(("exit", n))
                    inside -= 1

        await asyncio.gather(*(worker(n) for n in range(3)))
        assert overlaps == 0
        assert len(events) == 18
        for enter, exit_ in zip(events[::2], events[1::2], strict=True):
            assert enter[0] == "enter"
            assert exit_ == ("exit", enter[1])

    async def test_lock_wait_timeout_raises_lock_error(self, store: StateStore) -> None:
        async with store.lock("conv:2", ttl=5, wait=0) as holder:
            with pytest.raises(LockError):
                async with store.lock("conv:2", ttl=5, wait=0.2):
                    pytest.fail("entered a lock that is held")
            assert await holder.owned()

    async def test_expired_lock_of_a_crashed_holder_lets_the_next_one_in(self, store: StateStore) -> None:
        crashed = store.lock("conv:3", ttl=0.3, wait=0)
        assert await crashed.acquire()
        # The holder "crashes": it never releases.
        successor = store.lock("conv:3", ttl=5, wait=3)
        assert await successor.acquire()
        assert await successor.owned()
        assert not await crashed.owned()
        assert not await crashed.extend()
        await successor.release()

    async def test_release_by_a_former_owner_leaves_the_new_owner_alone(self, store: StateStore) -> None:
        former = store.lock("conv:4", ttl=0.3, wait=0)
        assert await former.acquire()
        current = store.lock("conv:4", ttl=5, wait=3)
        assert await current.acquire()

        await former.release()

        assert await current.owned()
        assert not await store.lock("conv:4", ttl=5, wait=0).acquire()
        await current.release()
        assert not await current.owned()
        assert await store.lock("conv:4", ttl=5, wait=0).acquire()

    async def test_renewal_keeps_a_slow_holder_exclusive(self, store: StateStore) -> None:
        ttl = 0.4
        async with store.lock("conv:5", ttl=ttl, wait=0) as holder:
            await asyncio.sleep(ttl * 1.25)
            # Waits until past 3 x ttl after the holder took the lock.
            contender = store.lock("conv:5", ttl=5, wait=ttl * 2)
            assert not await contender.acquire()
            assert await holder.owned()
            assert not holder.lost
        assert not await holder.owned()
        assert await store.lock("conv:5", ttl=5, wait=0).acquire()

    async def test_ping(self, store: StateStore) -> None:
        assert await store.ping() is True

    async def test_a_subscriber_gets_what_is_published_after_it_subscribed_in_order(
        self, store: StateStore
    ) -> None:
        # Nobody listens yet: the message is dropped, not kept for a later subscriber.
        assert await store.publish("webchat:s1", "too early") == 0
        async with store.subscribe("webchat:s1") as subscription:
            sent = [f"frame {n} 你好" for n in range(20)]
            for message in sent:
                assert await store.publish("webchat:s1", message) == 1
            received = [await subscription.get(wait=5) for _ in sent]
            assert received == sent
            assert await subscription.get(wait=0.2) is None

    async def test_every_subscriber_of_a_channel_gets_each_message(self, store: StateStore) -> None:
        async with (
            store.subscribe("webchat:s1") as first,
            store.subscribe("webchat:s1") as second,
            store.subscribe("webchat:s2") as other,
        ):
            assert await store.publish("webchat:s1", "hello") == 2
            assert await first.get(wait=5) == "hello"
            assert await second.get(wait=5) == "hello"
            assert await other.get(wait=0.2) is None

    async def test_one_subscription_can_listen_on_several_channels(self, store: StateStore) -> None:
        async with store.subscribe("a", "b") as subscription:
            assert await store.publish("a", "1") == 1
            assert await store.publish("b", "2") == 1
            assert await store.publish("c", "3") == 0
            assert [await subscription.get(wait=5), await subscription.get(wait=5)] == ["1", "2"]

    async def test_async_iteration_yields_messages_until_closed(self, store: StateStore) -> None:
        async with store.subscribe("feed") as subscription:
            for n in range(3):
                await store.publish("feed", str(n))
            seen = []
            async for message in subscription:
                seen.append(message)
                if len(seen) == 3:
                    await subscription.aclose()
            assert seen == ["0", "1", "2"]

    async def test_closing_a_subscription_stops_delivery_and_frees_it(self, store: StateStore) -> None:
        async with store.subscribe("webchat:s1") as kept:
            for _ in range(25):  # many short-lived subscribers, as sockets come and go
                async with store.subscribe("webchat:s1") as gone:
                    assert await store.publish("webchat:s1", "both") == 2
                    assert await gone.get(wait=5) == "both"
                    assert await kept.get(wait=5) == "both"
            assert await store.publish("webchat:s1", "only kept") == 1
            assert await gone.get(wait=0.1) is None
            assert [message async for message in gone] == []
            assert await kept.get(wait=5) == "only kept"
            await gone.aclose()  # closing twice is harmless
        assert await store.publish("webchat:s1", "nobody") == 0

    async def test_a_subscription_must_be_opened_before_reading(self, store: StateStore) -> None:
        subscription = store.subscribe("feed")
        with pytest.raises(RuntimeError):
            await subscription.get(wait=0)
        await subscription.aclose()
        with pytest.raises(RuntimeError):
            await subscription.open()
        with pytest.raises(ValueError):
            store.subscribe()


@pytest.mark.redis
async def test_two_redis_stores_share_dedupe_and_locks() -> None:
    """Two RedisStore instances on one prefix behave like two kefu processes sharing Redis."""
    prefix = unique_prefix()
    raw = Redis.from_url(REDIS_URL, decode_responses=True)
    first = RedisStore(url=REDIS_URL, prefix=prefix)
    second = RedisStore(client=raw, prefix=prefix)
    stranger = RedisStore(url=REDIS_URL, prefix=unique_prefix())
    try:
        results = await asyncio.gather(
            first.set_if_absent("seen:evt-1", "first", ttl=60),
            second.set_if_absent("seen:evt-1", "second", ttl=60),
        )
        assert sorted(results) == [False, True]
        winner = "first" if results[0] else "second"
        assert await second.get("seen:evt-1") == winner
        # Every key lives under the prefix; another prefix is another deployment.
        assert await raw.get(f"{prefix}seen:evt-1") == winner
        assert await stranger.get("seen:evt-1") is None

        async with first.lock("conv:9", ttl=5, wait=0):
            with pytest.raises(LockError):
                async with second.lock("conv:9", ttl=5, wait=0.2):
                    pytest.fail("two processes held one conversation lock")
            assert await stranger.lock("conv:9", ttl=5, wait=0).acquire()
        async with second.lock("conv:9", ttl=5, wait=0) as taken:
            assert await taken.owned()
    finally:
        await drop_keys(raw, prefix)
        await drop_keys(raw, stranger.prefix)
        await first.aclose()
        await second.aclose()
        await stranger.aclose()
        await raw.aclose()


@pytest.mark.redis
async def test_concurrent_admissions_share_pipelines_and_each_gets_its_own_answer() -> None:
    """Webhook requests admit concurrently; their commands travel together but answer separately."""
    store = RedisStore(url=REDIS_URL, prefix=unique_prefix())

    def admit(mark: str, sequence: str = "seq:c") -> Any:
        return store.admit(
            AdmissionRequest(
                mark=f"seen:{mark}", mark_ttl=60, sequence=sequence, sequence_ttl=60, clear_prefix="d:"
            )
        )

    try:
        # Every mark twice (a platform retry), all at once.
        results = await asyncio.gather(*(admit(f"m{n % 150}") for n in range(300)))
        admitted = [r for r in results if r is not None]
        assert len(admitted) == 150
        assert sorted(r.sequence for r in admitted) == list(range(1, 151))
        # A command that fails (the counter key holds text) fails alone; the batch around it is answered.
        await store.set("seq:broken", "not a number")
        outcomes = await asyncio.gather(
            admit("x1"), admit("x2", sequence="seq:broken"), admit("x3"), return_exceptions=True
        )
        assert outcomes[0] == Admission(sequence=151)
        assert isinstance(outcomes[1], StoreError)
        assert outcomes[2] == Admission(sequence=152)
    finally:
        await drop_keys(store.client, store.prefix)
        await store.aclose()


@pytest.mark.redis
async def test_a_message_published_by_one_process_reaches_subscribers_in_another() -> None:
    prefix = unique_prefix()
    publisher = RedisStore(url=REDIS_URL, prefix=prefix)
    subscriber = RedisStore(url=REDIS_URL, prefix=prefix)
    stranger = RedisStore(url=REDIS_URL, prefix=unique_prefix())
    raw = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        async with subscriber.subscribe("webchat:s1") as subscription:
            assert await publisher.publish("webchat:s1", '{"type": "reply"}') == 1
            assert await subscription.get(wait=5) == '{"type": "reply"}'
            # The channel carries the prefix: another deployment on the same Redis does not hear it.
            assert await raw.pubsub_numsub(f"{prefix}webchat:s1") == [(f"{prefix}webchat:s1", 1)]
            assert await stranger.publish("webchat:s1", "other deployment") == 0
            assert await subscription.get(wait=0.2) is None
        assert await raw.pubsub_numsub(f"{prefix}webchat:s1") == [(f"{prefix}webchat:s1", 0)]
    finally:
        for store in (publisher, subscriber, stranger):
            await store.aclose()
        await raw.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_redis(port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--daemonize", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    probe = Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    try:
        for _ in range(100):
            try:
                await probe.ping()
                return proc
            except redis_errors.ConnectionError:
                await asyncio.sleep(0.05)
    finally:
        await probe.aclose()
    proc.kill()
    await proc.wait()
    raise RuntimeError(f"redis-server did not start on port {port}")


async def stop_redis(proc: asyncio.subprocess.Process) -> None:
    proc.kill()
    await proc.wait()


@pytest.mark.redis
async def test_redis_outage_is_a_store_error_and_a_restart_is_survived() -> None:
    port = free_port()
    proc = await start_redis(port)
    store = RedisStore(url=f"redis://127.0.0.1:{port}/0", prefix="kefu-test:", retries=2)
    try:
        await store.set("greeting", "hello")
        assert await store.get("greeting") == "hello"

        def admit() -> Any:
            request = AdmissionRequest(
                mark="seen:0", mark_ttl=60, sequence="seq", sequence_ttl=60, clear_prefix="d:"
            )
            return store.admit(request)

        assert await admit() == Admission(sequence=1)

        # Restart between two calls: the pooled connection is dead, the next call still works.
        await stop_redis(proc)
        proc = await start_redis(port)
        await store.set("greeting", "after restart")
        assert await store.get("greeting") == "after restart"
        # The restarted server has forgotten the admission script: it is loaded again.
        assert await admit() == Admission(sequence=1)

        await stop_redis(proc)
        with pytest.raises(StoreError) as outage:
            await store.get("greeting")
        assert isinstance(outage.value.__cause__, redis_errors.RedisError)
        with pytest.raises(StoreError):
            await store.set_if_absent("seen:1", "1")
        with pytest.raises(StoreError):
            await store.lock("conv:1", ttl=5, wait=0).acquire()
        # Admissions waiting in one pipeline all get the failure; none waits forever.
        failures = await asyncio.gather(admit(), admit(), return_exceptions=True)
        assert all(isinstance(failure, StoreError) for failure in failures)
        assert await store.ping() is False

        proc = await start_redis(port)
        assert await store.ping() is True
        assert await store.set_if_absent("seen:1", "1")
        async with store.subscribe("feed") as subscription:
            await stop_redis(proc)
            proc = await start_redis(port)
            # The subscription reconnects and subscribes again when it next reads; what was published
            # while it was away is lost (pub/sub keeps nothing).
            for _ in range(100):
                if await store.publish("feed", "after restart") == 1:
                    break
                assert await subscription.get(wait=0.05) is None
            assert await subscription.get(wait=5) == "after restart"
        assert await store.incr("hits") == 1
        async with store.lock("conv:1", ttl=5, wait=0) as lock:
            assert await lock.owned()
    finally:
        await store.aclose()
        if proc.returncode is None:
            await stop_redis(proc)


@pytest.mark.redis
async def test_build_store_picks_the_backend_from_the_redis_url() -> None:
    assert isinstance(build_store(redis_url=None), MemoryStore)

    prefix = unique_prefix()
    store = build_store(redis_url=REDIS_URL, prefix=prefix)
    assert isinstance(store, RedisStore)
    async with store:
        try:
            await store.set("k", "v")
            assert await store.client.get(f"{prefix}k") == "v"
        finally:
            await drop_keys(store.client, prefix)
