"""Redis :class:`StateStore`: state shared by every kefu process of a deployment.

Locks are redis-py's ``Lock`` (a random owner token set with ``SET NX PX``; release and extend are Lua
scripts that compare the token first), so a holder whose lock expired can never release or extend the
lock somebody else has taken since. Every redis-py error leaves this module as a
:class:`~core.errors.StoreError` (:class:`~core.errors.LockError` for lock failures).

Publish/subscribe is Redis ``PUBLISH``/``SUBSCRIBE`` with the key prefix on the channel names. Redis
channels are global to the server, not per database number: the prefix is what keeps two deployments
sharing one Redis apart. Each open :class:`RedisSubscription` holds one connection of the pool; after a
dropped connection redis-py reconnects and subscribes again (messages published in between are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from core.errors import ConfigError, LockError, StoreError
from core.stores.base import Admission, AdmissionRequest, StateStore, StoreLock, Subscription
from core.stores.pipelining import Pipeliner

log = logging.getLogger(__name__)

# INCRBY and "expire only if we created it" must be one step, or a crash in between leaves a counter
# that never expires (a rate limit that never resets).
_INCR_SCRIPT = """
local existed = redis.call('exists', KEYS[1])
local value = redis.call('incrby', KEYS[1], ARGV[1])
if existed == 0 and ARGV[2] ~= '' then
    redis.call('pexpire', KEYS[1], ARGV[2])
end
return value
"""


# StateStore.admit in one round trip. KEYS: mark, sequence, counters...; ARGV: mark ttl ms, sequence ttl
# ms, the clear key's prefix, then limit and ttl ms per counter. The clear key is computed here, so it is
# not in KEYS: fine on a single Redis (kefu does not run on Redis Cluster).
_ADMIT_SCRIPT = """
if not redis.call('set', KEYS[1], '1', 'px', ARGV[1], 'nx') then
    return false
end
local first_over, over = 0, 0
for i = 3, #KEYS do
    local limit = tonumber(ARGV[2 * i - 2])
    local count = redis.call('incr', KEYS[i])
    if count == 1 then
        redis.call('pexpire', KEYS[i], ARGV[2 * i - 1])
    end
    if count == limit + 1 then
        first_over = 1
    end
    if count > limit then
        over = 1
    end
end
if over == 1 and first_over == 0 then
    return {0, 0}
end
local value = redis.call('incr', KEYS[2])
if value == 1 then
    redis.call('pexpire', KEYS[2], ARGV[2])
end
redis.call('del', ARGV[3] .. value)
return {value, first_over}
"""


def counter_args(request: AdmissionRequest) -> list[int]:
    """Limit and ttl (ms) of each of ``request``'s counters, the admission scripts' last arguments."""
    return [value for c in request.counters for value in (c.limit, milliseconds(c.ttl))]


def admission_of(result: Any) -> Admission | None:
    """An admission script's answer: nil (a duplicate) or {sequence number or 0, first over 0/1}."""
    if result is None:
        return None
    value, first_over = (int(part) for part in result)
    return Admission(sequence=value or None, first_over=bool(first_over))


def milliseconds(seconds: float) -> int:
    """A TTL for Redis's PX arguments."""
    if seconds <= 0:
        raise ValueError(f"ttl must be positive, got {seconds}")
    # Round up: a sub-millisecond TTL must not become 0, which Redis rejects.
    return max(1, math.ceil(seconds * 1000))


def _text(value: bytes | str | None) -> str | None:
    # A caller-supplied client may not decode responses.
    return value.decode() if isinstance(value, bytes) else value


@contextlib.contextmanager
def _mapped(action: str) -> Iterator[None]:
    """Turn redis-py errors raised by ``action`` into kefu's store errors."""
    try:
        yield
    except redis_errors.LockError as exc:
        raise LockError(f"redis lock {action} failed: {exc}") from exc
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise StoreError(f"redis unreachable during {action}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise StoreError(f"redis {action} failed: {exc}") from exc


class RedisLock(StoreLock):
    """A :class:`StoreLock` backed by redis-py's token lock."""

    def __init__(self, client: Redis, key: str, name: str, *, ttl: float, wait: float | None) -> None:
        milliseconds(ttl)
        super().__init__(name, ttl=ttl, wait=wait)
        # thread_local=False: the renewal task and the holder share one token; asyncio tasks run in
        # one thread anyway, and a thread-local token would hide it from ``asyncio.to_thread`` callers.
        self._lock = Lock(client, key, timeout=ttl, sleep=min(0.1, ttl / 10), thread_local=False)

    async def acquire(self) -> bool:
        """Take the lock, waiting up to ``wait`` seconds (None = forever). False when it timed out."""
        with _mapped(f"acquire of {self.name!r}"):
            # blocking_timeout=None waits forever; 0 tries exactly once.
            return bool(await self._lock.acquire(blocking=True, blocking_timeout=self.wait))

    async def release(self) -> None:
        """Release if still owned by this holder; a lock already expired or taken over is left alone.

        A Redis failure here is logged, not raised: the work under the lock is done, and the lock's
        expiry frees it anyway.
        """
        if self._lock.local.token is None:
            return
        try:
            await self._lock.release()
        except redis_errors.LockNotOwnedError:
            log.warning("lock %s had expired or been taken over before release", self.name)
        except redis_errors.RedisError:
            log.warning("could not release lock %s; it frees itself on expiry", self.name, exc_info=True)

    async def extend(self, ttl: float | None = None) -> bool:
        """Reset the expiry to ``ttl`` (default: the lock's ttl) from now. False when no longer owned."""
        ttl = self.ttl if ttl is None else ttl
        milliseconds(ttl)
        if self._lock.local.token is None:
            return False
        with _mapped(f"extend of {self.name!r}"):
            try:
                await self._lock.extend(ttl, replace_ttl=True)
            except redis_errors.LockNotOwnedError:
                return False
        return True

    async def owned(self) -> bool:
        """True while this holder owns the lock."""
        with _mapped(f"owner check of {self.name!r}"):
            return await self._lock.owned()


# A blocked read wakes this often, so the connection's health check runs and a silently dead
# connection is noticed instead of waiting forever.
_READ_SLICE = 5.0


class RedisSubscription(Subscription):
    """A :class:`Subscription` on a Redis ``PubSub`` connection; channel names carry the store's prefix."""

    def __init__(self, store: RedisStore, channels: Sequence[str]) -> None:
        super().__init__(channels)
        self._keys = {store.key(channel): channel for channel in self.channels}
        self._pubsub: PubSub = store.client.pubsub()
        self._early: deque[str] = deque()

    async def _open(self) -> None:
        with _mapped("SUBSCRIBE"):
            await self._pubsub.subscribe(*self._keys)
            # SUBSCRIBE returns once sent; a message published before Redis processed it would be
            # missed. Its confirmations come first on this connection, so wait for them.
            confirmed: set[str] = set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30.0
            while confirmed != set(self._keys):
                if loop.time() > deadline:
                    raise StoreError(f"redis did not confirm the subscription to {sorted(self._keys)}")
                reply = await self._pubsub.get_message(timeout=1.0)
                if reply is None:
                    continue
                if reply["type"] == "subscribe":
                    confirmed.add(_text(reply["channel"]) or "")
                elif reply["type"] == "message":
                    # Published on a channel already confirmed: it is the subscriber's.
                    self._early.append(_text(reply["data"]) or "")

    async def _receive(self, wait: float | None) -> str | None:
        if self._early:
            return self._early.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        while not self.closed:
            read_for = _READ_SLICE if deadline is None else min(_READ_SLICE, max(0.0, deadline - loop.time()))
            with _mapped("pub/sub read"):
                reply: dict[str, Any] | None = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=read_for
                )
            if reply is not None and reply["type"] == "message":
                return _text(reply["data"])
            if deadline is not None and loop.time() >= deadline:
                return None
        return None

    async def _close(self) -> None:
        self._early.clear()
        # Dropping the connection ends its subscriptions in Redis; no UNSUBSCRIBE round trip needed.
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]


def connect(url: str, *, health_check_interval: int, retries: int, socket_timeout: float) -> Redis:
    """A client that health-checks idle connections and retries a dropped one with backoff, so a Redis
    restart is invisible to later calls."""
    return Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=health_check_interval,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )


class RedisStore(StateStore):
    """Key/value with TTL, counters and locks in Redis, under a key prefix.

    Build it from ``url`` (the store owns the connection pool and closes it in :meth:`aclose`) or from an
    existing ``client`` (the caller owns and closes it). A store built from ``url`` checks idle
    connections every ``health_check_interval`` seconds and retries a command ``retries`` times with
    exponential backoff on connection errors, so calls made after a Redis restart succeed.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        prefix: str = "kefu:",
        health_check_interval: int = 30,
        retries: int = 3,
        socket_timeout: float = 5.0,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigError("RedisStore needs exactly one of url= or client=")
        self.prefix = prefix
        self._owns_client = client is None
        if client is None:
            assert url is not None
            client = connect(
                url,
                health_check_interval=health_check_interval,
                retries=retries,
                socket_timeout=socket_timeout,
            )
        self.client = client
        self._incr = client.register_script(_INCR_SCRIPT)
        self._admit = client.register_script(_ADMIT_SCRIPT)
        # Admissions come from many concurrent webhook requests: they share round trips.
        self._pipeliner = Pipeliner(client)

    def key(self, key: str) -> str:
        """The Redis key that holds ``key``."""
        return self.prefix + key

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it is missing or expired."""
        with _mapped("GET"):
            return _text(await self.client.get(self.key(key)))

    async def set(self, key: str, value: str, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and expiry."""
        px = None if ttl is None else milliseconds(ttl)
        with _mapped("SET"):
            await self.client.set(self.key(key), value, px=px)

    async def set_if_absent(self, key: str, value: str, *, ttl: float | None = None) -> bool:
        """Store only when ``key`` does not exist; True when this call stored it (dedupe)."""
        px = None if ttl is None else milliseconds(ttl)
        with _mapped("SET NX"):
            return bool(await self.client.set(self.key(key), value, px=px, nx=True))

    async def delete(self, *keys: str) -> int:
        """Delete keys; returns how many existed."""
        if not keys:
            return 0
        with _mapped("DEL"):
            return int(await self.client.delete(*(self.key(k) for k in keys)))

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add to an integer counter (created at 0); ``ttl`` is set when the counter is created."""
        px = "" if ttl is None else str(milliseconds(ttl))
        with _mapped("INCRBY"):
            return int(await self._incr(keys=[self.key(key)], args=[amount, px]))

    async def admit(self, request: AdmissionRequest) -> Admission | None:
        """:meth:`StateStore.admit` atomically, in one round trip (the intake's hot path)."""
        keys = [self.key(request.mark), self.key(request.sequence), *self.counter_keys(request)]
        args = [milliseconds(request.mark_ttl), milliseconds(request.sequence_ttl)]
        with _mapped("admit"):
            result = await self._pipeliner.run_script(
                self._admit, keys, [*args, self.key(request.clear_prefix), *counter_args(request)]
            )
        return admission_of(result)

    def counter_keys(self, request: AdmissionRequest) -> list[str]:
        """The Redis keys of ``request``'s counters, in order."""
        return [self.key(counter.key) for counter in request.counters]

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; None when it has no expiry or does not exist."""
        with _mapped("PTTL"):
            ms = int(await self.client.pttl(self.key(key)))
        # -1: no expiry, -2: no such key.
        return None if ms < 0 else ms / 1000

    def lock(self, name: str, *, ttl: float = 30.0, wait: float | None = 60.0) -> RedisLock:
        """A lock named ``name`` (not yet acquired): use ``async with``."""
        return RedisLock(self.client, self.key(f"lock:{name}"), name, ttl=ttl, wait=wait)

    async def publish(self, channel: str, message: str) -> int:
        """Send ``message`` to the subscriptions of ``channel`` in every process; returns how many got it."""
        with _mapped("PUBLISH"):
            return int(await self.client.publish(self.key(channel), message))

    def subscribe(self, *channels: str) -> RedisSubscription:
        """A subscription to ``channels`` (not yet open): ``async with store.subscribe(...) as sub``."""
        return RedisSubscription(self, channels)

    async def ping(self) -> bool:
        """True when Redis answers; False (logged) when it cannot be reached."""
        try:
            return bool(await self.client.ping())
        except redis_errors.RedisError:
            log.warning("redis ping failed", exc_info=True)
            return False

    async def aclose(self) -> None:
        """Close the connection pool, if this store opened it."""
        await self._pipeliner.aclose()
        if self._owns_client:
            await self.client.aclose(close_connection_pool=True)
