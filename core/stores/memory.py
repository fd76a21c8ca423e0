"""In-process :class:`StateStore`: the embedded default, shared only by the tasks of one process."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

from core.errors import StoreError
from core.stores.base import StateStore, StoreLock, Subscription

log = logging.getLogger(__name__)

# Expired entries are dropped lazily on access; a full sweep at most this often bounds the memory held
# by keys nobody reads again (dedupe marks, mostly).
_SWEEP_EVERY = 1.0


# A subscriber this far behind is not reading; newer messages are dropped for it (Redis would cut such a
# client off at its pub/sub output buffer limit) rather than letting its queue grow without bound.
MAX_PENDING = 10_000


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")


class MemoryLock(StoreLock):
    """A lock held in a :class:`MemoryStore`: owner token plus expiry, waiters woken on release."""

    def __init__(self, store: MemoryStore, name: str, *, ttl: float, wait: float | None) -> None:
        _check_ttl(ttl)
        super().__init__(name, ttl=ttl, wait=wait)
        self._store = store
        self._token: str | None = None

    async def acquire(self) -> bool:
        """Take the lock, waiting up to ``wait`` seconds (None = forever). False when it timed out."""
        store = self._store
        token = uuid.uuid4().hex
        deadline = None if self.wait is None else time.monotonic() + self.wait
        async with store._lock_changed:
            while True:
                now = time.monotonic()
                holder = store._live_lock(self.name, now)
                if holder is None:
                    store._locks[self.name] = (token, now + self.ttl)
                    self._token = token
                    return True
                # Wake on a release, or when the holder's expiry frees the lock, or at our deadline.
                sleep_for = holder[1] - now
                if deadline is not None:
                    if deadline <= now:
                        return False
                    sleep_for = min(sleep_for, deadline - now)
                try:
                    async with asyncio.timeout(sleep_for):
                        await store._lock_changed.wait()
                except TimeoutError:
                    pass

    async def release(self) -> None:
        """Release if still owned by this holder; a lock already expired or taken over is left alone."""
        if self._token is None:
            return
        token, self._token = self._token, None
        store = self._store
        async with store._lock_changed:
            holder = store._live_lock(self.name, time.monotonic())
            if holder is not None and holder[0] == token:
                del store._locks[self.name]
                store._lock_changed.notify_all()

    async def extend(self, ttl: float | None = None) -> bool:
        """Reset the expiry to ``ttl`` (default: the lock's ttl) from now. False when no longer owned."""
        ttl = self.ttl if ttl is None else ttl
        _check_ttl(ttl)
        now = time.monotonic()
        if not self._owned_at(now):
            return False
        assert self._token is not None
        self._store._locks[self.name] = (self._token, now + ttl)
        return True

    async def owned(self) -> bool:
        """True while this holder owns the lock."""
        return self._owned_at(time.monotonic())

    def _owned_at(self, now: float) -> bool:
        holder = self._store._live_lock(self.name, now)
        return self._token is not None and holder is not None and holder[0] == self._token


class MemorySubscription(Subscription):
    """A subscription to channels of a :class:`MemoryStore`: one queue, filled by ``publish``."""

    def __init__(self, store: MemoryStore, channels: Sequence[str]) -> None:
        super().__init__(channels)
        self._store = store
        # None wakes a reader when the subscription closes.
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=MAX_PENDING)
        self._dropped = 0

    def _deliver(self, message: str) -> bool:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning(
                    "subscriber to %s is not reading; %d messages dropped", self.channels, self._dropped
                )
            return False
        return True

    async def _open(self) -> None:
        for channel in self.channels:
            self._store._subscribers.setdefault(channel, set()).add(self)

    async def _receive(self, wait: float | None) -> str | None:
        try:
            async with asyncio.timeout(wait):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def _close(self) -> None:
        subscribers = self._store._subscribers
        for channel in self.channels:
            listeners = subscribers.get(channel)
            if listeners is not None:
                listeners.discard(self)
                if not listeners:
                    del subscribers[channel]
        # Unread messages go with the subscription.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class MemoryStore(StateStore):
    """Key/value with TTL, counters and locks in this process's memory.

    Every operation runs without awaiting between its read and its write, so it is atomic with respect
    to other tasks on the event loop. Nothing is shared with other processes: use ``RedisStore`` when
    more than one kefu process runs.
    """

    def __init__(self) -> None:
        # key -> (value, monotonic expiry or None)
        self._data: dict[str, tuple[str, float | None]] = {}
        # lock name -> (owner token, monotonic expiry)
        self._locks: dict[str, tuple[str, float]] = {}
        self._lock_changed = asyncio.Condition()
        self._last_sweep = time.monotonic()
        self._subscribers: dict[str, set[MemorySubscription]] = {}

    def _live(self, key: str, now: float) -> tuple[str, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            del self._data[key]
            return None
        return entry

    def _live_lock(self, name: str, now: float) -> tuple[str, float] | None:
        holder = self._locks.get(name)
        if holder is not None and holder[1] <= now:
            del self._locks[name]
            return None
        return holder

    def _write(self, key: str, value: str, ttl: float | None, now: float) -> None:
        self._data[key] = (value, None if ttl is None else now + ttl)
        if now - self._last_sweep >= _SWEEP_EVERY:
            self._last_sweep = now
            expired = [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]
            for k in expired:
                del self._data[k]

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it is missing or expired."""
        entry = self._live(key, time.monotonic())
        return None if entry is None else entry[0]

    async def set(self, key: str, value: str, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and expiry."""
        _check_ttl(ttl)
        self._write(key, value, ttl, time.monotonic())

    async def set_if_absent(self, key: str, value: str, *, ttl: float | None = None) -> bool:
        """Store only when ``key`` does not exist; True when this call stored it (dedupe)."""
        _check_ttl(ttl)
        now = time.monotonic()
        if self._live(key, now) is not None:
            return False
        self._write(key, value, ttl, now)
        return True

    async def delete(self, *keys: str) -> int:
        """Delete keys; returns how many existed."""
        now = time.monotonic()
        deleted = 0
        for key in keys:
            if self._live(key, now) is not None:
                del self._data[key]
                deleted += 1
        return deleted

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add to an integer counter (created at 0); ``ttl`` is set when the counter is created."""
        _check_ttl(ttl)
        now = time.monotonic()
        entry = self._live(key, now)
        if entry is None:
            self._write(key, str(amount), ttl, now)
            return amount
        try:
            value = int(entry[0]) + amount
        except ValueError as exc:
            raise StoreError(f"value of {key!r} is not an integer") from exc
        # An existing counter keeps its expiry, as Redis INCRBY does.
        self._data[key] = (str(value), entry[1])
        return value

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; None when it has no expiry or does not exist."""
        now = time.monotonic()
        entry = self._live(key, now)
        if entry is None or entry[1] is None:
            return None
        return entry[1] - now

    def lock(self, name: str, *, ttl: float = 30.0, wait: float | None = 60.0) -> MemoryLock:
        """A lock named ``name`` (not yet acquired): use ``async with``."""
        return MemoryLock(self, name, ttl=ttl, wait=wait)

    async def publish(self, channel: str, message: str) -> int:
        """Send ``message`` to the open subscriptions of ``channel``; returns how many got it."""
        listeners = self._subscribers.get(channel, ())
        return sum(subscription._deliver(message) for subscription in list(listeners))

    def subscribe(self, *channels: str) -> MemorySubscription:
        """A subscription to ``channels`` (not yet open): ``async with store.subscribe(...) as sub``."""
        return MemorySubscription(self, channels)

    async def ping(self) -> bool:
        """Always True: the store is this process."""
        return True
