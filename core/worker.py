"""The worker: takes messages from the inbox, answers them, delivers the replies, acknowledges.

Messages of one conversation are answered one after another in arrival order (a lane per
conversation); different conversations run concurrently up to ``concurrency``. A reply that was already
delivered (recorded in the shared store) is never sent again when a message is processed a second time
(a reclaimed entry, a crash between sending and acknowledging). An entry that fails ``max_deliveries``
times goes to the dead-letter list and the customer gets an apology instead of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from core.delivery import SenderRegistry
from core.engine import Engine
from core.inbox.base import Inbox, InboxEntry
from core.messages import Reply, ReplySource
from core.stores.base import StateStore
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

SENT_TTL = 7 * 24 * 3600.0


def sent_key(entry: InboxEntry) -> str:
    return f"sent:{entry.message.key.channel}:{entry.message.message_id}"


class Worker:
    """Processes inbox entries until stopped."""

    def __init__(
        self,
        *,
        inbox: Inbox,
        engine: Engine,
        senders: SenderRegistry,
        store: StateStore,
        consumer: str,
        concurrency: int = 8,
        max_deliveries: int = 5,
        reclaim_idle: float = 120.0,
    ) -> None:
        self._inbox = inbox
        self._engine = engine
        self._senders = senders
        self._store = store
        self.consumer = consumer
        self._slots = asyncio.Semaphore(concurrency)
        self._max_deliveries = max_deliveries
        self._reclaim_idle = reclaim_idle
        self._lanes: dict[str, deque[InboxEntry]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        self._stopping = asyncio.Event()
        self.processed = 0

    async def run(self) -> None:
        """Claim and process entries until :meth:`stop`; then finish what was claimed."""
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time()
        while not self._stopping.is_set():
            try:
                entries = await self._inbox.claim(self.consumer, count=16, block=0.5)
                if loop.time() >= next_reclaim:
                    entries += await self._inbox.reclaim(self.consumer, min_idle=self._reclaim_idle)
                    next_reclaim = loop.time() + self._reclaim_idle / 4
            except Exception:
                log.error("inbox unavailable; retrying", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
                continue
            for entry in entries:
                self._enqueue(entry)
        await self.drain()

    async def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once the claimed entries are finished."""
        self._stopping.set()

    async def drain(self) -> None:
        while self._lane_tasks:
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)

    def _enqueue(self, entry: InboxEntry) -> None:
        if entry.entry_id in self._in_flight:
            return  # reclaimed from ourselves while still being worked on
        self._in_flight.add(entry.entry_id)
        lane_key = str(entry.message.key)
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(entry)
            return
        self._lanes[lane_key] = deque([entry])
        task = asyncio.create_task(self._run_lane(lane_key), name=f"lane:{lane_key}")
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    async def _run_lane(self, lane_key: str) -> None:
        lane = self._lanes[lane_key]
        try:
            while lane:
                entry = lane[0]
                async with self._slots:
                    await self.process(entry)
                lane.popleft()
                self._in_flight.discard(entry.entry_id)
        finally:
            del self._lanes[lane_key]

    async def process(self, entry: InboxEntry) -> None:
        """Answer one entry and acknowledge it; failures leave it for a retry or dead-letter it."""
        message = entry.message
        extra = {"conversation": str(message.key), "message_id": message.message_id}
        try:
            if await self._store.get(sent_key(entry)) is None:
                sender = self._senders.get(message.key.channel)
                if sender is None:
                    await self._inbox.dead_letter(entry, f"no sender for channel {message.key.channel!r}")
                    log.error("no sender for channel; message dead-lettered", extra=extra)
                    return
                await sender.deliver(message, self._engine.stream(message))
                await self._store.set(sent_key(entry), "1", ttl=SENT_TTL)
            await self._inbox.ack(entry.entry_id)
            self.processed += 1
        except Exception as exc:
            log.error("processing failed (delivery %d)", entry.deliveries, exc_info=True, extra=extra)
            if entry.deliveries >= self._max_deliveries:
                await self._give_up(entry, f"{type(exc).__name__}: {exc}")

    async def _give_up(self, entry: InboxEntry, reason: str) -> None:
        message = entry.message
        extra = {"conversation": str(message.key), "message_id": message.message_id}
        try:
            await self._inbox.dead_letter(entry, reason)
        except Exception:
            log.error("could not dead-letter entry", exc_info=True, extra=extra)
            return
        sender = self._senders.get(message.key.channel)
        if sender is None:
            return
        apology = Reply(
            key=message.key,
            text=fixed_text("apology", message.language),
            language=message.language,
            in_reply_to=message.message_id,
            source=ReplySource.SYSTEM,
            extras=dict(message.extras),
        )
        try:
            await sender.send(apology)
        except Exception:
            log.error("could not send the apology for a dead-lettered message", exc_info=True, extra=extra)
