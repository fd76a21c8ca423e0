"""The worker: takes messages from the inbox, answers them, delivers the replies, acknowledges.

Order: messages of one conversation are answered one after another in the order the intake accepted
them, across processes. Inside a process each conversation has a lane that works on its lowest-numbered
entry; message n starts only once the shared store says message n-1 is done (answered, dead-lettered or
skipped). A lane waiting for another process polls the store without holding a processing slot, and
gives up waiting after ``order_wait`` seconds so a lost predecessor can never stall a conversation.

Exactly once: a reply that was already delivered (recorded in the shared store) is never sent again when
a message is processed a second time (a reclaimed entry, a crash between sending and acknowledging).

FAQ cache answers go out first: a message the FAQ cache answers (:meth:`Engine.from_cache`) is sent
before its turn is stored, and its sent record holds the answer until the turn is stored from it. A
worker that finds such a record (the first one crashed, or the database was down) stores the turn
without sending anything.
Entries being worked on are touched every ``reclaim_idle / 3`` seconds, so only the entries of a dead or
stuck process are reclaimed by others. An entry that fails ``max_deliveries`` times goes to the
dead-letter list and the customer gets an apology instead of silence.

Database outages: a turn cut short because the SQL database could not be reached is not a failure of the
message. The worker answers it again after a short, growing pause (for up to ``outage_wait`` seconds)
while keeping the entry: it does not count towards ``max_deliveries``, the conversation's next message
waits behind it, and the sent record is checked again under the delivery lock before every attempt.

Shutdown: :meth:`stop` stops claiming; entries being answered are finished (for up to
``shutdown_grace`` seconds), entries not yet started stay in the inbox for another worker to reclaim.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import io
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from core import metrics
from core.db.database import is_outage
from core.delivery import ReplySender, SenderRegistry
from core.engine import Engine
from core.faq.cache import CachedAnswer
from core.inbox.base import Inbox, InboxEntry
from core.intake import DONE_TTL, NOTICE_FIELD, done_key, sequence_of
from core.messages import InboundMessage, Reply, ReplyDone, ReplyEvent, ReplySource
from core.stores.base import StateStore
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

SENT_TTL = 7 * 24 * 3600.0
SENT = "1"
"""The sent record of a reply whose turn is stored; a FAQ answer sent first is recorded as its JSON."""
_POLL_START = 0.02
_POLL_MAX = 0.1
_SETTLE_FOR = 300.0
_OUTAGE_PAUSE_START = 0.2
_OUTAGE_PAUSE_MAX = 2.0


def sent_key(entry: InboxEntry) -> str:
    return f"sent:{entry.message.key.channel}:{entry.message.message_id}"


async def _final(reply: Reply) -> AsyncIterator[ReplyEvent]:
    """An engine stream that is already finished: just the final reply."""
    yield ReplyDone(reply=reply)


async def _consume(events: AsyncIterator[ReplyEvent]) -> None:
    """Run an engine stream whose reply nobody is sent (it is stored, not delivered)."""
    async for _ in events:
        pass


def _extra(message: InboundMessage) -> dict[str, str]:
    return {"conversation": str(message.key), "message_id": message.message_id}


@dataclass
class _Lane:
    """The claimed entries of one conversation, lowest sequence number first."""

    entries: list[tuple[int, int, InboxEntry]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def head(self) -> InboxEntry:
        return self.entries[0][2]

    def remove(self, entry: InboxEntry) -> None:
        self.entries = [item for item in self.entries if item[2] is not entry]
        heapq.heapify(self.entries)


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
        order_wait: float = 600.0,
        shutdown_grace: float = 30.0,
        max_claimed: int | None = None,
        lock_ttl: float = 10.0,
        lock_wait: float = 300.0,
        outage_wait: float = 300.0,
    ) -> None:
        self._inbox = inbox
        self._engine = engine
        self._senders = senders
        self._store = store
        self.consumer = consumer
        self._slots = asyncio.Semaphore(concurrency)
        self._max_deliveries = max_deliveries
        self._reclaim_idle = reclaim_idle
        self._order_wait = order_wait
        self._shutdown_grace = shutdown_grace
        # The delivery lock of a crashed worker frees itself after lock_ttl; a live one renews it.
        self._lock_ttl = lock_ttl
        self._lock_wait = lock_wait
        self._outage_wait = outage_wait
        # Claim no more than this process can soon work on, so idle processes get the rest.
        self._max_claimed = max_claimed or 4 * concurrency
        self._lanes: dict[str, _Lane] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        self._arrivals = itertools.count()
        self._stopping = asyncio.Event()
        self.processed = 0

    async def run(self, *, after: asyncio.Event | None = None, wait: float = 120.0) -> None:
        """Claim and process entries until :meth:`stop`; then finish what is being answered.

        With ``after``, claiming starts once it is set (or after ``wait`` seconds): a process that just
        started claims nothing before its FAQ cache and index are built, so a FAQ question is not
        answered "I don't know" while another process could answer it.
        """
        if after is not None:
            waiting = [asyncio.ensure_future(after.wait()), asyncio.ensure_future(self._stopping.wait())]
            await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for future in waiting:
                future.cancel()
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"heartbeat:{self.consumer}")
        try:
            await self._claim_loop()
        finally:
            try:
                await self._finish()
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once the entries being answered are finished."""
        self._stopping.set()
        for lane in self._lanes.values():
            lane.changed.set()

    async def drain(self) -> None:
        """Wait until every lane is finished."""
        while self._lane_tasks:
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time()
        while not self._stopping.is_set():
            room = self._max_claimed - len(self._in_flight)
            try:
                # Reclaim even when full: the entries everyone waits for may be the abandoned ones.
                if loop.time() >= next_reclaim:
                    reclaimed = await self._inbox.reclaim(self.consumer, min_idle=self._reclaim_idle)
                    if reclaimed:
                        metrics.inbox_reclaimed(len(reclaimed))
                    for entry in reclaimed:
                        self._enqueue(entry)
                    next_reclaim = loop.time() + self._reclaim_idle / 4
                if room > 0:
                    for entry in await self._inbox.claim(self.consumer, count=min(16, room), block=0.5):
                        self._enqueue(entry)
                else:
                    await self._pause(0.05)
            except Exception:
                log.error("inbox unavailable; retrying", exc_info=True)
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _heartbeat(self) -> None:
        """Keep the entries this process holds from looking abandoned."""
        while True:
            await asyncio.sleep(max(0.01, self._reclaim_idle / 3))
            if not self._in_flight:
                continue
            try:
                await self._inbox.touch(self.consumer, sorted(self._in_flight))
            except Exception:
                log.warning("could not touch in-flight entries", exc_info=True)

    async def _finish(self) -> None:
        if not self._lane_tasks:
            return
        _done, pending = await asyncio.wait(set(self._lane_tasks), timeout=self._shutdown_grace)
        if not pending:
            return
        log.warning(
            "conversations %s unfinished after %.0fs; leaving them for another worker",
            sorted(self._lanes),
            self._shutdown_grace,
        )
        for task in pending:
            where = io.StringIO()
            task.print_stack(file=where)  # where it hangs: a lock, the model, the platform API
            log.warning("cancelling %s\n%s", task.get_name(), where.getvalue())
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _enqueue(self, entry: InboxEntry) -> None:
        if entry.entry_id in self._in_flight:
            return  # reclaimed from ourselves while still being worked on
        self._in_flight.add(entry.entry_id)
        item = (sequence_of(entry.message) or 0, next(self._arrivals), entry)
        lane_key = str(entry.message.key)
        lane = self._lanes.get(lane_key)
        if lane is not None:
            heapq.heappush(lane.entries, item)
            lane.changed.set()  # it may come before the entry the lane is waiting with
            return
        self._lanes[lane_key] = _Lane(entries=[item])
        task = asyncio.create_task(self._run_lane(lane_key), name=f"lane:{lane_key}")
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    async def _run_lane(self, lane_key: str) -> None:
        lane = self._lanes[lane_key]
        try:
            while lane.entries and not self._stopping.is_set():
                entry = lane.head()
                if not await self._wait_turn(entry, lane):
                    continue  # an earlier entry arrived, or the worker is stopping
                async with self._slots:
                    if self._stopping.is_set():
                        break
                    await self.process(entry)
                lane.remove(entry)
                self._in_flight.discard(entry.entry_id)
        finally:
            # Entries not started stay pending in the inbox; without touches another worker reclaims them.
            for _seq, _n, left in lane.entries:
                self._in_flight.discard(left.entry_id)
            del self._lanes[lane_key]

    async def _wait_turn(self, entry: InboxEntry, lane: _Lane) -> bool:
        """True once the conversation's previous message is done; False to re-pick or stop."""
        seq = sequence_of(entry.message)
        if seq is None or seq <= 1:
            return True
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = _POLL_START
        while not self._stopping.is_set():
            lane.changed.clear()
            try:
                if await self._store.get(done_key(entry.message.key, seq - 1)) is not None:
                    return True
            except Exception:
                log.warning(
                    "store unavailable while checking order", exc_info=True, extra=_extra(entry.message)
                )
                delay = _POLL_MAX
            if loop.time() - started >= self._order_wait:
                log.warning(
                    "message %d waited %.0fs for the previous one; answering it now",
                    seq,
                    self._order_wait,
                    extra=_extra(entry.message),
                )
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.changed.wait(), timeout=delay)
            if lane.head() is not entry:
                return False
            delay = min(delay * 1.5, _POLL_MAX)
        return False

    async def process(self, entry: InboxEntry) -> None:
        """Answer one entry and acknowledge it; failures leave it for a retry or dead-letter it.

        A database outage is waited out here (up to ``outage_wait`` seconds) instead of counting as a
        failed delivery.
        """
        extra = _extra(entry.message)
        loop = asyncio.get_running_loop()
        outage_until = loop.time() + self._outage_wait
        pause = _OUTAGE_PAUSE_START
        for attempt in itertools.count(1):
            try:
                await self._answer(entry)
                return
            except Exception as exc:
                if is_outage(exc) and loop.time() < outage_until:
                    # Answered again here rather than after a reclaim: sooner, in order, and without
                    # using up deliveries (a few seconds of outage must not dead-letter anything).
                    # The heartbeat keeps the entry ours; shutdown's grace period bounds the wait.
                    log.warning(
                        "database unavailable (attempt %d); answering again shortly",
                        attempt,
                        exc_info=attempt == 1,  # one traceback per message, not one per attempt
                        extra=extra,
                    )
                    await asyncio.sleep(random.uniform(pause / 2, pause))  # jitter: lanes not in step
                    pause = min(pause * 2, _OUTAGE_PAUSE_MAX)
                    continue
                log.error("processing failed (delivery %d)", entry.deliveries, exc_info=True, extra=extra)
                if entry.deliveries >= self._max_deliveries:
                    await self._give_up(entry, f"{type(exc).__name__}: {exc}")
                return

    async def _answer(self, entry: InboxEntry) -> None:
        """One attempt at an entry: answer and deliver it unless already sent, then acknowledge it."""
        message = entry.message
        extra = _extra(message)
        sender = self._senders.get(message.key.channel)
        if sender is None:
            await self._mark_done(message)
            await self._inbox.dead_letter(entry, f"no sender for channel {message.key.channel!r}")
            metrics.dead_lettered()
            log.error("no sender for channel; message dead-lettered", extra=extra)
            return
        # Check and send under the conversation's delivery lock: a second worker holding the same
        # entry (reclaimed from a stalled process) finds the sent record instead of sending again.
        lock = self._store.lock(f"deliver:{message.key}", ttl=self._lock_ttl, wait=self._lock_wait)
        async with lock:
            record = await self._store.get(sent_key(entry))
            if record is None:
                record = await self._deliver(message, sender)
                await self._record_sent(entry, record)
            if record != SENT:
                await self._store_sent_first(message, record)
        # Outside the lock, so the next message (maybe in another process) does not wait for it.
        await self._mark_done(message)
        await self._inbox.ack(entry.entry_id)
        self.processed += 1

    async def _deliver(self, message: InboundMessage, sender: ReplySender) -> str:
        """Answer ``message`` and send the reply; returns its sent record."""
        notice = message.extras.get(NOTICE_FIELD)
        if isinstance(notice, str):
            await sender.send(self._fixed_reply(message, notice))
            metrics.reply_sent(message.key.channel, "system", message.received_at)
            return SENT
        if await self._engine.is_paused(message.key):
            # A person has the conversation: the engine stores the message, nobody is sent a bot answer.
            await _consume(self._engine.stream(message, raise_on_outage=True))
            return SENT
        cached = await self._engine.from_cache(message)
        if cached is not None:
            reply = await sender.deliver(message, _final(self._engine.cached_reply(message, cached)))
            metrics.reply_sent(message.key.channel, reply.source.value, message.received_at)
            if reply.source is not ReplySource.FAQ_CACHE:
                return SENT  # the platform answered it with a fixed text of its own (a command, media)
            return json.dumps({"faq_entry": cached.entry_id, "answer": cached.answer}, ensure_ascii=False)
        events = self._engine.stream(message, raise_on_outage=True, cache_missed=True)
        reply = await sender.deliver(message, events)
        metrics.reply_sent(message.key.channel, reply.source.value, message.received_at)
        return SENT

    async def _store_sent_first(self, message: InboundMessage, record: str) -> None:
        """Store the turn of a FAQ answer that was sent before it was stored (once, however often)."""
        try:
            data = json.loads(record)
            cached = CachedAnswer(entry_id=int(data["faq_entry"]), answer=str(data["answer"]))
        except (ValueError, KeyError, TypeError):
            log.error("unreadable sent record %r; turn not stored", record[:80], extra=_extra(message))
            return
        await _consume(self._engine.stream(message, raise_on_outage=True, sent=cached))

    async def _record_sent(self, entry: InboxEntry, record: str) -> None:
        """Record a delivered reply, retrying through a short Redis outage.

        Not left to a reclaim: the reply is already out, and a reclaimed entry without its sent record
        would be answered a second time. The heartbeat keeps the entry ours meanwhile, and shutdown's
        grace period bounds the wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._reclaim_idle, _SETTLE_FOR)
        delay = _POLL_START
        while True:
            try:
                await self._store.set(sent_key(entry), record, ttl=SENT_TTL)
                return
            except Exception:
                if loop.time() >= deadline:
                    raise
                log.warning(
                    "could not record a delivered reply; retrying", exc_info=True, extra=_extra(entry.message)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _mark_done(self, message: InboundMessage) -> None:
        """Let the conversation's next message go ahead."""
        seq = sequence_of(message)
        if seq is not None:
            await self._store.set(done_key(message.key, seq), "1", ttl=DONE_TTL)

    def _fixed_reply(self, message: InboundMessage, name: str) -> Reply:
        return Reply(
            key=message.key,
            text=fixed_text(name, message.language),
            language=message.language,
            in_reply_to=message.message_id,
            source=ReplySource.SYSTEM,
            extras=dict(message.extras),
        )

    async def _give_up(self, entry: InboxEntry, reason: str) -> None:
        message = entry.message
        extra = _extra(message)
        try:
            # Done first: a conversation must not wait behind a message that will never be answered.
            await self._mark_done(message)
        except Exception:
            log.error("could not mark a failing message done", exc_info=True, extra=extra)
        try:
            await self._inbox.dead_letter(entry, reason)
            metrics.dead_lettered()
        except Exception:
            log.error("could not dead-letter entry", exc_info=True, extra=extra)
            return
        sender = self._senders.get(message.key.channel)
        if sender is None:
            return
        try:
            await sender.send(self._fixed_reply(message, "apology"))
        except Exception:
            log.error("could not send the apology for a dead-lettered message", exc_info=True, extra=extra)
