"""A send rate shared by every process of a deployment: one platform account, one limit.

Telegram lets a bot send about 30 messages per second in all. A sender that paces itself alone lets
N worker processes send N times that, and the surplus comes back as 429 answers whose waits hold
customers' replies up. :class:`SharedRate` counts the sends of each one-second window in the state store
(Redis between processes), so all workers together keep the limit. When the store cannot be reached the
sender does not stop: it falls back to spacing its own sends evenly at the same rate.
"""

from __future__ import annotations

import asyncio
import logging
import time

from core.errors import StoreError
from core.stores.base import StateStore

log = logging.getLogger(__name__)


class SharedRate:
    """At most ``per_second`` calls of :meth:`wait` are let through in each second of the clock,
    across processes (a burst may still straddle two seconds)."""

    def __init__(self, *, store: StateStore, name: str, per_second: int) -> None:
        if per_second < 1:
            raise ValueError("per_second must be at least 1")
        self._store = store
        self._name = name
        self._per_second = per_second
        self._local_next = 0.0
        self._alone = False  # the store failed: this process paces itself until it answers again

    async def wait(self) -> int:
        """Return when one more send fits in the current second, waiting for a later one if needed;
        returns the second (Unix time) it was counted in."""
        while True:
            now = time.time()
            window = int(now)
            try:
                taken = await self._store.incr(f"pace:{self._name}:{window}", ttl=2.0)
            except StoreError:
                if not self._alone:  # once per outage, not once per message
                    log.warning("send rate store unavailable; pacing this process alone", exc_info=True)
                    self._alone = True
                await self._wait_locally()
                return int(time.time())
            if self._alone:
                log.info("send rate store answers again; pacing %s with the other processes", self._name)
                self._alone = False
            if taken <= self._per_second:
                return window
            await asyncio.sleep(window + 1 - now)

    async def _wait_locally(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._local_next)
        self._local_next = slot + 1 / self._per_second
        if slot > now:
            await asyncio.sleep(slot - now)
