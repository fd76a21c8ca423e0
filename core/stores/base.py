"""The shared-state contract.

Everything that must be seen by every kefu process — dedupe marks, conversation locks, counters,
cached FAQ answers, the WeChat access token — goes through a :class:`StateStore`. ``MemoryStore`` keeps it
in this process (embedded default); ``RedisStore`` shares it between processes. One contract test suite
(``tests/core/test_stores.py``) runs against both.

Values are ``str``; callers serialise. TTLs are seconds (float allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from types import TracebackType

from core.errors import LockError

log = logging.getLogger(__name__)


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
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self.release()


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

    @abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; None when it has no expiry or does not exist."""

    @abstractmethod
    def lock(self, name: str, *, ttl: float = 30.0, wait: float | None = 60.0) -> StoreLock:
        """A lock named ``name`` (not yet acquired): use ``async with``."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Close connections."""

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
