"""The shared-state contract.

Everything that must be seen by every kefu process — dedupe marks, conversation locks, counters,
cached FAQ answers, the WeChat access token — goes through a :class:`StateStore`. ``MemoryStore`` keeps it
in this process (embedded default); ``RedisStore`` shares it between processes. One contract test suite
(``tests/core/test_stores.py``) runs against both.

Values are ``str``; callers serialise. TTLs are seconds (float allowed).

Publish/subscribe (:meth:`StateStore.publish`, :meth:`StateStore.subscribe`) carries live notices
between processes, such as the web chat's answer frames from the worker that wrote them to the gateway
holding the browser's socket. It is fire and forget, as in Redis: a message reaches the subscriptions
open when it is published and nobody else, so anything that must survive a disconnect is also stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from core.errors import LockError

log = logging.getLogger(__name__)

RENEWER_STOP_SECONDS = 2.0


class StoreLock(ABC):
    """A named lock with an owner token and an expiry, extendable while held.

    ``async with store.lock(name, ttl=30):`` acquires (waiting up to ``wait`` seconds, else LockError),
    renews the expiry every ``ttl / 3`` seconds in the background until released, and releases only if
    this holder still owns it. The expiry exists so a crashed holder cannot block a conversation forever;
    the renewal keeps a slow holder (a long model call) exclusive.
    """

    def __init__(self, name: str, *, ttl: float, wait: float | None) -> None:
        self.name = name
        self.ttl = ttl
        self.wait = wait
        self._renewer: asyncio.Task[None] | None = None
        self.lost = False

    @abstractmethod
    async def acquire(self) -> bool:
        """Take the lock, waiting up to ``wait`` seconds (None = forever). False when it timed out."""

    @abstractmethod
    async def release(self) -> None:
        """Release if still owned by this holder; a lock already expired or taken over is left alone."""

    @abstractmethod
    async def extend(self, ttl: float | None = None) -> bool:
        """Reset the expiry to ``ttl`` (default: the lock's ttl) from now. False when no longer owned."""

    @abstractmethod
    async def owned(self) -> bool:
        """True while this holder owns the lock."""

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                still_ours = await self.extend()
            except Exception:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # The holder is leaving and cancelled us mid-call; redis-py may turn that
                    # cancellation into a connection error, which must not keep this loop (and the
                    # holder's __aexit__, which awaits it) alive forever.
                    raise asyncio.CancelledError from None
                log.warning("could not renew lock %s", self.name, exc_info=True)
                continue
            if not still_ours:
                self.lost = True
                log.error("lock %s was lost while held", self.name)
                return

    async def __aenter__(self) -> StoreLock:
        if not await self.acquire():
            raise LockError(f"could not acquire lock {self.name!r} within {self.wait}s")
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"renew-lock:{self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            renewer, self._renewer = self._renewer, None
            renewer.cancel()
            # A renewal stuck in a Redis call must not keep the holder (and the conversation behind it)
            # waiting: give it a moment to stop, then release anyway; the release checks ownership.
            done, _ = await asyncio.wait({renewer}, timeout=RENEWER_STOP_SECONDS)
            if done:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    renewer.result()
            else:
                log.warning("renewal of lock %s did not stop in time; releasing anyway", self.name)
        await self.release()


class Subscription(ABC):
    """Messages published on some channels after the subscription opened, in the order published.

    ``async with store.subscribe("a", "b") as sub:`` subscribes on entry (a message published after
    ``__aenter__`` returned is delivered) and unsubscribes on exit, freeing the connection or queue.
    ``async for message in sub`` yields the messages until the subscription is closed; :meth:`get` waits
    for one with a time limit. Read it from one task; close it from that task, or after cancelling it.
    """

    def __init__(self, channels: Sequence[str]) -> None:
        if not channels:
            raise ValueError("subscribe to at least one channel")
        self.channels = tuple(dict.fromkeys(channels))
        self._state: Literal["new", "open", "closed"] = "new"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    @abstractmethod
    async def _open(self) -> None:
        """Subscribe; return only once the subscription is in place."""

    @abstractmethod
    async def _receive(self, wait: float | None) -> str | None:
        """The next message, or None when ``wait`` seconds passed (or the subscription was closed)."""

    @abstractmethod
    async def _close(self) -> None:
        """Unsubscribe and free what the subscription holds."""

    async def open(self) -> Subscription:
        """Subscribe now (``async with`` does this); messages published from here on are delivered."""
        if self._state == "closed":
            raise RuntimeError("subscription already closed")
        if self._state == "new":
            await self._open()
            self._state = "open"
        return self

    async def get(self, *, wait: float | None = None) -> str | None:
        """The next message, waiting up to ``wait`` seconds (None: until one comes).

        None when the time passed without a message or the subscription is closed.
        """
        if self._state == "new":
            raise RuntimeError("subscription not open: use 'async with store.subscribe(...)'")
        if self._state == "closed":
            return None
        return await self._receive(wait)

    async def aclose(self) -> None:
        """Unsubscribe; further reads return nothing. Closing twice is harmless."""
        if self._state == "closed":
            return
        opened = self._state == "open"
        self._state = "closed"
        if opened:
            await self._close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def __aenter__(self) -> Subscription:
        try:
            return await self.open()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(frozen=True)
class Counter:
    """A counter :meth:`StateStore.admit` increments, and the limit it checks it against."""

    key: str
    limit: int
    ttl: float


@dataclass(frozen=True)
class AdmissionRequest:
    """What :meth:`StateStore.admit` marks, counts and numbers for one item."""

    mark: str
    mark_ttl: float
    sequence: str
    sequence_ttl: float
    clear_prefix: str
    """The key ``clear_prefix + str(number)`` is deleted when the item takes a number."""
    counters: Sequence[Counter] = ()


@dataclass(frozen=True)
class Admission:
    """What :meth:`StateStore.admit` decided for a new mark."""

    sequence: int | None
    """The sequence's new value; None when a counter was over its limit (the sequence is left alone)."""
    first_over: bool = False
    """A counter just went one over its limit (the first refusal of its window)."""


class StateStore(ABC):
    """Key/value with TTL, set-if-absent, counters and locks, shared by all processes of a deployment."""

    @abstractmethod
    async def get(self, key: str) -> str | None: ...

    @abstractmethod
    async def set(self, key: str, value: str, *, ttl: float | None = None) -> None: ...

    @abstractmethod
    async def set_if_absent(self, key: str, value: str, *, ttl: float | None = None) -> bool:
        """Store only when ``key`` does not exist; True when this call stored it (dedupe)."""

    @abstractmethod
    async def delete(self, *keys: str) -> int:
        """Delete keys; returns how many existed."""

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add to an integer counter (created at 0); ``ttl`` is set when the counter is created."""

    async def admit(self, request: AdmissionRequest) -> Admission | None:
        """Admit a new item once: None when its mark exists already.

        Otherwise sets the mark, increments every counter (created with its ttl), and unless a counter
        is over its limit without one being exactly one over (the first refusal, which is admitted to
        carry a notice), increments the sequence and deletes the key ``clear_prefix + str(value)``.
        Stores that can run this atomically in one round trip override it (Redis: one Lua script).
        """
        if not await self.set_if_absent(request.mark, "1", ttl=request.mark_ttl):
            return None
        try:
            first_over = over = False
            for counter in request.counters:
                count = await self.incr(counter.key, ttl=counter.ttl)
                first_over |= count == counter.limit + 1
                over |= count > counter.limit
            if over and not first_over:
                return Admission(sequence=None)
            value = await self.incr(request.sequence, ttl=request.sequence_ttl)
            await self.delete(request.clear_prefix + str(value))
        except BaseException:
            await self.delete(request.mark)
            raise
        return Admission(sequence=value, first_over=first_over)

    @abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; None when it has no expiry or does not exist."""

    @abstractmethod
    def lock(self, name: str, *, ttl: float = 30.0, wait: float | None = 60.0) -> StoreLock:
        """A lock named ``name`` (not yet acquired): use ``async with``."""

    @abstractmethod
    async def publish(self, channel: str, message: str) -> int:
        """Send ``message`` to the open subscriptions of ``channel``; returns how many got it.

        Nothing is stored: with no subscriber the message is dropped and the result is 0.
        """

    @abstractmethod
    def subscribe(self, *channels: str) -> Subscription:
        """A subscription to ``channels`` (not yet open): ``async with store.subscribe(...) as sub``."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Close connections."""

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
