"""In-process inbox for the embedded default: same contract, nothing survives the process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Sequence

from core.inbox.base import DeadLetter, Inbox, InboxEntry
from core.messages import InboundMessage


class MemoryInbox(Inbox):
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: OrderedDict[str, InboxEntry] = OrderedDict()
        self._pending: dict[str, tuple[InboxEntry, str, float]] = {}
        self._dead: list[DeadLetter] = []
        self._arrived = asyncio.Event()

    async def put(self, message: InboundMessage) -> str:
        entry_id = f"{next(self._ids)}"
        self._waiting[entry_id] = InboxEntry(entry_id=entry_id, message=message, deliveries=0)
        self._arrived.set()
        return entry_id

    async def claim(self, consumer: str, *, count: int = 16, block: float = 1.0) -> list[InboxEntry]:
        if not self._waiting:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=block)
            except TimeoutError:
                return []
        claimed: list[InboxEntry] = []
        while self._waiting and len(claimed) < count:
            _, entry = self._waiting.popitem(last=False)
            entry = entry.model_copy(update={"deliveries": entry.deliveries + 1})
            self._pending[entry.entry_id] = (entry, consumer, time.monotonic())
            claimed.append(entry)
        return claimed

    async def ack(self, entry_id: str) -> None:
        self._pending.pop(entry_id, None)
        self._waiting.pop(entry_id, None)

    async def reclaim(self, consumer: str, *, min_idle: float, count: int = 16) -> list[InboxEntry]:
        now = time.monotonic()
        taken: list[InboxEntry] = []
        for entry_id, (entry, _owner, since) in list(self._pending.items()):
            if len(taken) >= count:
                break
            if now - since >= min_idle:
                entry = entry.model_copy(update={"deliveries": entry.deliveries + 1})
                self._pending[entry_id] = (entry, consumer, now)
                taken.append(entry)
        return taken

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        now = time.monotonic()
        for entry_id in entry_ids:
            held = self._pending.get(entry_id)
            if held is not None and held[1] == consumer:
                self._pending[entry_id] = (held[0], consumer, now)

    async def dead_letter(self, entry: InboxEntry, reason: str) -> None:
        self._dead.append(DeadLetter(entry_id=entry.entry_id, message=entry.message, reason=reason))
        await self.ack(entry.entry_id)

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        return self._dead[-limit:]

    async def depth(self) -> int:
        return len(self._waiting) + len(self._pending)
