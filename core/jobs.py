"""The scheduled maintenance jobs, as plain async functions the :class:`~core.scheduler.Scheduler` runs.

Each job does one piece of upkeep and returns a small JSON-able dict saying what it did (shown by
``kefu jobs`` and kept in the shared store):

- :func:`prune_idle_sessions`: delete the short-lived per-conversation state in the shared store (the
  message sequence counter, the "message n is done" ordering marks, a stale summarising marker) of
  conversations idle longer than ``KEFU_SESSION_IDLE_MINUTES``. Nothing is lost: history, summary and
  pinned facts are written to SQL on every turn, and a pruned conversation starts again at message 1.
- :func:`refresh_faq`: rebuild the FAQ cache and this process's retrieval index from the FAQ table, then
  warm the most-asked entries (by the cache's hit counters) and report any that are no longer served;
  stored vectors of phrasings no longer indexed are deleted (``core.faq.vectors``).
- :func:`expand_faq_entries`: have the model write customer phrasings for FAQ entries that have none
  for their current text (``core.faq.phrasings``), a few entries per run, so the fallback matches
  customers' own words when the model is down. Scheduled with Ollama or an OpenAI-compatible server
  and ``KEFU_FAQ_PHRASINGS`` > 0; the embedded 135M model cannot paraphrase.
- :func:`purge_audit`: delete audit records past ``KEFU_AUDIT_RETENTION_DAYS``.
- :func:`release_stale_handoffs`: hand conversations nobody picked up (``waiting`` longer than
  ``KEFU_HANDOFF_TIMEOUT_MINUTES``) back to the bot; the hand-off ticket stays open, the customer is told.
- :func:`inbox_stats`: depth and dead letters of the inbox, for ``kefu jobs`` and ``/metrics``. Stale
  entries are not reclaimed here: every worker reclaims them itself.

:func:`standard_jobs` binds them to a :class:`~core.runtime.Runtime` with their intervals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

from sqlalchemy import and_, exists, func, or_, select, update
from sqlmodel import col

from core.audit import AuditLog
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Conversation, FaqEntry, Message, Ticket, UTCDateTime, utcnow
from core.delivery import SenderRegistry
from core.errors import DeliveryError, LockError
from core.faq.cache import FaqCache
from core.faq.phrasings import PhrasingWriter, expand_faq
from core.faq.repository import FaqRepository
from core.faq.service import RetrieverHolder
from core.handoff import BOT, WAITING
from core.inbox.base import Inbox
from core.intake import DONE_TTL, SEQ_TTL, done_key, seq_key
from core.messages import ConversationKey, Language, Reply, ReplySource
from core.scheduler import Job, JobResult
from core.stores.base import StateStore
from core.texts import text as fixed_text

if TYPE_CHECKING:
    from core.runtime import Runtime

__all__ = [
    "Job",
    "JobIntervals",
    "Notifier",
    "expand_faq_entries",
    "inbox_stats",
    "notify_through",
    "prune_idle_sessions",
    "purge_audit",
    "refresh_faq",
    "release_stale_handoffs",
    "standard_jobs",
]

log = logging.getLogger(__name__)

Notifier = Callable[[Reply], Awaitable[None]]
"""Sends a reply the customer did not ask for (the hand-off timeout notice) through its platform."""

PRUNE_MARK = "scheduler:prune:upto"
"""Idle cut-off of the last completed prune: the next run only looks at conversations idle since."""

_BATCH = 200
_CONCURRENCY = 32
_DELETE_CHUNK = 500


# --- sessions ---------------------------------------------------------------------------------------


async def prune_idle_sessions(
    *,
    db: Database,
    store: StateStore,
    idle_after: timedelta,
    now: datetime | None = None,
    first_lookback: timedelta = timedelta(seconds=SEQ_TTL),
) -> JobResult:
    """Delete the store state of conversations idle longer than ``idle_after``.

    Candidates come from SQL (``conversations.updated_at``, touched on every stored message) and only
    those that became idle since the previous run are read. A conversation whose latest accepted
    message is not answered yet, or was answered less than ``idle_after`` ago, is left alone.
    """
    now = now or utcnow()
    cutoff = now - idle_after
    mark = await store.get(PRUNE_MARK)
    since = datetime.fromisoformat(mark) if mark else cutoff - first_lookback
    checked = pruned = busy = deleted = 0
    after: tuple[datetime, int] | None = None
    while since < cutoff:
        query = (
            select(col(Conversation.id), col(Conversation.key), col(Conversation.updated_at))
            .where(col(Conversation.updated_at) >= since, col(Conversation.updated_at) <= cutoff)
            .order_by(col(Conversation.updated_at), col(Conversation.id))
            .limit(_BATCH)
        )
        if after is not None:
            query = query.where(
                or_(
                    col(Conversation.updated_at) > after[0],
                    and_(col(Conversation.updated_at) == after[0], col(Conversation.id) > after[1]),
                )
            )
        async with db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        for start in range(0, len(rows), _CONCURRENCY):
            outcomes = await asyncio.gather(
                *(
                    _prune_one(store, row.id, row.key, row.updated_at, now=now, idle_after=idle_after)
                    for row in rows[start : start + _CONCURRENCY]
                )
            )
            for outcome in outcomes:
                checked += 1
                if outcome is None:
                    busy += 1
                elif outcome:
                    pruned += 1
                    deleted += outcome
        if len(rows) < _BATCH:
            break
        after = (rows[-1].updated_at, rows[-1].id)
        # Progress survives a run cut short by its timeout (a first run over a month of conversations).
        await store.set(PRUNE_MARK, after[0].isoformat(), ttl=SEQ_TTL)
    if since < cutoff:
        await store.set(PRUNE_MARK, cutoff.isoformat(), ttl=SEQ_TTL)
    if pruned:
        log.info("pruned the idle state of %d conversations (%d keys)", pruned, deleted)
    return {"checked": checked, "pruned": pruned, "keys_deleted": deleted, "busy": busy}


async def _prune_one(
    store: StateStore,
    conversation_id: int,
    key_text: str,
    updated_at: datetime,
    *,
    now: datetime,
    idle_after: timedelta,
) -> int | None:
    """Keys deleted for one conversation; None when it is still busy and must keep its state."""
    key = ConversationKey.parse(key_text)
    keys = [f"summarizing:{conversation_id}"]
    raw = await store.get(seq_key(key))
    if raw is not None:
        last = int(raw)
        remaining = await store.ttl(done_key(key, last))
        if remaining is None:
            # Accepted but not answered yet (queued; SQL has not seen it). After DONE_TTL the marks
            # of even the slowest message have expired, so a missing one says nothing any more.
            if now - updated_at < timedelta(seconds=DONE_TTL):
                return None
        elif DONE_TTL - remaining < idle_after.total_seconds():
            return None  # answered recently: the store saw activity the SQL clock missed
        keys.append(seq_key(key))
        keys.extend(done_key(key, n) for n in range(1, last + 1))
    deleted = 0
    for start in range(0, len(keys), _DELETE_CHUNK):
        deleted += await store.delete(*keys[start : start + _DELETE_CHUNK])
    return deleted


# --- FAQ --------------------------------------------------------------------------------------------


async def refresh_faq(
    *, db: Database, retriever_holder: RetrieverHolder, cache: FaqCache, warm: int = 20
) -> JobResult:
    """Rebuild the FAQ cache and index, then look up the ``warm`` most-asked entries through the cache.

    What :func:`~core.faq.service.refresh_faq_cache` does, through this process's ``cache``: its
    remembered generation moves at once, where another instance would serve misses for up to its
    ``generation_ttl``. A rebuild writes every phrasing, so warming is a check that the questions
    customers ask most are served from the cache; one that is not (disabled, or its phrasing now
    belongs to another entry) is logged and reported as ``cold``.
    """
    repository = FaqRepository(db=db)
    fingerprint = await repository.fingerprint()
    entries = await repository.list(enabled_only=True)
    await cache.rebuild(entries, fingerprint=fingerprint)
    await retriever_holder.rebuild(entries, fingerprint=fingerprint)
    hits: dict[int, int] = {}
    ids = [e.id for e in entries if e.id is not None]
    for start in range(0, len(ids), _CONCURRENCY):
        hits.update(await cache.hit_counts(ids[start : start + _CONCURRENCY]))
    asked = sorted(
        (e for e in entries if e.id is not None and hits.get(e.id)), key=lambda e: -hits[e.id or 0]
    )
    top = asked[:warm]
    served = await asyncio.gather(*(_served(cache, entry) for entry in top))
    cold = [entry.id for entry, ok in zip(top, served, strict=True) if not ok]
    if cold:
        log.warning("most-asked FAQ entries not served from the cache: %s", cold)
    pruned = await retriever_holder.prune_vectors()
    return {
        "entries": len(entries),
        "warmed": len(top) - len(cold),
        "cold": cold,
        "top": [e.id for e in top],
        "vectors_pruned": pruned,
    }


async def _served(cache: FaqCache, entry: FaqEntry) -> bool:
    hit = await cache.lookup(entry.question, entry.language, count=False)
    return hit is not None and hit.entry_id == entry.id


async def expand_faq_entries(
    *, db: Database, writer: PhrasingWriter, retriever_holder: RetrieverHolder, per_run: int = 10
) -> JobResult:
    """Write phrasings for up to ``per_run`` entries that need them (:func:`core.faq.phrasings.expand_faq`).

    The run stops at the first model failure; those entries are tried again next run. Stored phrasings
    move the FAQ fingerprint, so every process re-indexes within its FAQ refresh interval.
    """
    report = await expand_faq(
        repository=FaqRepository(db=db), writer=writer, retriever_holder=retriever_holder, limit=per_run
    )
    return report.as_dict()


# --- audit ------------------------------------------------------------------------------------------


async def purge_audit(*, audit: AuditLog, retention_days: int, now: datetime | None = None) -> JobResult:
    """Delete audit records older than ``retention_days`` (the chain stays verifiable)."""
    purged = await audit.purge_expired(retention_days=retention_days, now=now)
    return {"purged": purged, "retention_days": retention_days}


# --- hand-offs --------------------------------------------------------------------------------------


async def release_stale_handoffs(
    *,
    conversations: ConversationStore,
    store: StateStore,
    waited_longer_than: timedelta,
    notify: Notifier | None = None,
    audit: AuditLog | None = None,
    now: datetime | None = None,
    limit: int = 100,
) -> JobResult:
    """Give conversations waiting for a person longer than ``waited_longer_than`` back to the bot.

    The wait is counted from the conversation's latest hand-off ticket (a customer writing "hello?"
    while waiting does not restart it). The ticket stays open for a follow-up. The customer gets the
    ``handoff_timeout`` text: stored in the transcript, and sent through ``notify`` when given
    (without it the text only shows in the transcript). A person taking the conversation at the same
    moment wins: the state changes only from ``waiting``, in one conditional UPDATE.
    """
    now = now or utcnow()
    cutoff = now - waited_longer_than
    db = conversations.db
    latest_ticket = (
        select(func.max(col(Ticket.created_at)))
        .where(col(Ticket.conversation_id) == col(Conversation.id), col(Ticket.category) == "handoff")
        .scalar_subquery()
    )
    waiting_since = func.coalesce(latest_ticket, col(Conversation.updated_at), type_=UTCDateTime)
    query = (
        select(col(Conversation.id), col(Conversation.key), col(Conversation.language))
        .where(col(Conversation.state) == WAITING, waiting_since < cutoff)
        .order_by(col(Conversation.id))
        .limit(limit)
    )
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    released = notified = notify_failed = 0
    for row in rows:
        key = ConversationKey.parse(row.key)
        language = cast(Language, row.language if row.language in ("zh", "en") else "zh")
        notice = fixed_text("handoff_timeout", language)
        try:
            # Under the conversation's lock: the notice lands after a message being stored right now.
            async with store.lock(f"lock:conversation:{key}", ttl=30.0, wait=10.0):
                if not await _release(db, row.id, cutoff):
                    continue
                await conversations.append(row.id, [_notice_row(row.id, notice)])
        except LockError:
            log.warning(
                "conversation busy; its hand-off is released next run", extra={"conversation": str(key)}
            )
            continue
        released += 1
        log.info("hand-off not picked up in time; back to the bot", extra={"conversation": str(key)})
        if audit is not None:
            await audit.record(
                "handoff",
                conversation_id=row.id,
                actor="system:scheduler",
                data={
                    "action": "released",
                    "reason": "timeout",
                    "timeout_minutes": waited_longer_than.total_seconds() / 60,
                },
            )
        if notify is None:
            continue
        try:
            await notify(Reply(key=key, text=notice, language=language, source=ReplySource.SYSTEM))
            notified += 1
        except Exception:
            notify_failed += 1
            log.error(
                "could not tell the customer the hand-off timed out",
                exc_info=True,
                extra={"conversation": str(key)},
            )
    return {"released": released, "notified": notified, "notify_failed": notify_failed}


def _notice_row(conversation_id: int, notice: str) -> Message:
    return Message(
        conversation_id=conversation_id,
        role="assistant",
        content=notice,
        source=ReplySource.SYSTEM.value,
        meta={"handoff": "timeout"},
    )


async def _release(db: Database, conversation_id: int, cutoff: datetime) -> bool:
    newer_request = exists().where(
        col(Ticket.conversation_id) == conversation_id,
        col(Ticket.category) == "handoff",
        col(Ticket.created_at) >= cutoff,
    )
    async with db.engine.connect() as conn:
        result = await conn.execute(
            update(Conversation)
            .where(
                col(Conversation.id) == conversation_id, col(Conversation.state) == WAITING, ~newer_request
            )
            .values(state=BOT, updated_at=utcnow())
        )
        await conn.commit()
    return bool(result.rowcount)


# --- inbox ------------------------------------------------------------------------------------------


async def inbox_stats(*, inbox: Inbox, dead_letter_limit: int = 1000) -> JobResult:
    """Entries waiting or in progress, and dead letters, counted up to ``dead_letter_limit`` (the inbox
    can only list them, and reading thousands of messages every few seconds costs more than the exact
    number is worth; ``dead_letters_capped`` says the count stopped there)."""
    depth = await inbox.depth()
    dead = len(await inbox.dead_letters(limit=dead_letter_limit))
    if dead:
        log.warning("%d%s messages in the dead-letter list", dead, "+" if dead >= dead_letter_limit else "")
    return {"depth": depth, "dead_letters": dead, "dead_letters_capped": dead >= dead_letter_limit}


def notify_through(senders: SenderRegistry) -> Notifier:
    """A :data:`Notifier` sending through the platform sender of the reply's channel."""

    async def notify(reply: Reply) -> None:
        sender = senders.get(reply.key.channel)
        if sender is None:
            raise DeliveryError(f"no sender for channel {reply.key.channel!r} (platform switched off?)")
        await sender.send(reply)

    return notify


# --- wiring -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobIntervals:
    """Seconds between runs of each standard job."""

    prune_sessions: float = 300.0
    refresh_faq: float = 600.0
    expand_faq: float = 900.0
    purge_audit: float = 3600.0
    release_handoffs: float = 60.0
    inbox_stats: float = 30.0


def standard_jobs(
    runtime: Runtime, *, notify: Notifier | None = None, intervals: JobIntervals | None = None
) -> list[Job]:
    """The jobs every kefu deployment runs, bound to ``runtime`` and its settings."""
    settings = runtime.settings
    every = intervals or JobIntervals()

    async def prune() -> JobResult:
        return await prune_idle_sessions(
            db=runtime.db, store=runtime.store, idle_after=timedelta(minutes=settings.session_idle_minutes)
        )

    async def faq() -> JobResult:
        return await refresh_faq(db=runtime.db, retriever_holder=runtime.faq_index, cache=runtime.faq_cache)

    async def expand() -> JobResult:
        writer = PhrasingWriter(model=runtime.model, count=settings.faq_phrasings)
        return await expand_faq_entries(db=runtime.db, writer=writer, retriever_holder=runtime.faq_index)

    async def audit() -> JobResult:
        return await purge_audit(audit=runtime.audit, retention_days=settings.audit_retention_days)

    async def handoffs() -> JobResult:
        return await release_stale_handoffs(
            conversations=runtime.conversations,
            store=runtime.store,
            waited_longer_than=timedelta(minutes=settings.handoff_timeout_minutes),
            notify=notify,
            audit=runtime.audit,
        )

    async def inbox() -> JobResult:
        return await inbox_stats(inbox=runtime.inbox)

    jobs = [
        Job("prune_sessions", prune, every.prune_sessions, "delete the shared state of idle conversations"),
        # Not at start: every process syncs its FAQ cache and index when it opens (watch_faq).
        Job(
            "refresh_faq",
            faq,
            every.refresh_faq,
            "rebuild the FAQ cache and warm the most-asked entries",
            run_at_start=False,
        ),
        Job("purge_audit", audit, every.purge_audit, "delete audit records past retention"),
        Job(
            "release_handoffs", handoffs, every.release_handoffs, "give unanswered hand-offs back to the bot"
        ),
        Job("inbox_stats", inbox, every.inbox_stats, "inbox depth and dead letters"),
    ]
    if settings.faq_phrasings > 0 and settings.llm_backend != "llamacpp":
        jobs.append(
            Job(
                "expand_faq",
                expand,
                every.expand_faq,
                "have the model write customer phrasings for FAQ entries",
            )
        )
    return jobs
