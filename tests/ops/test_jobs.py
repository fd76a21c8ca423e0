"""Each scheduled job doing its work on Redis and on SQLite/PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from core.audit import AuditLog
from core.conversations import ConversationStore
from core.crypto import KeyRing
from core.db.database import Database
from core.db.models import utcnow
from core.delivery import ReplySender, SenderRegistry
from core.faq.cache import FaqCache
from core.faq.repository import FaqRepository
from core.faq.service import RetrieverHolder
from core.handoff import idempotency_key, request_human
from core.inbox.memory import MemoryInbox
from core.intake import DONE_TTL, done_key, seq_key
from core.jobs import (
    inbox_stats,
    notify_through,
    prune_idle_sessions,
    purge_audit,
    refresh_faq,
    release_stale_handoffs,
)
from core.messages import ConversationKey, InboundMessage, Reply
from core.stores.redis import RedisStore
from core.texts import text as fixed_text

pytestmark = pytest.mark.redis

RING = KeyRing.from_spec(f"k1:{KeyRing.generate_key()}")


async def _sql(db: Database, statement: str, **params: Any) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(statement), params)


async def _conversation(
    conversations: ConversationStore, chat: str, *, language: str = "zh", channel: str = "telegram"
) -> int:
    found = await conversations.get_or_create(
        ConversationKey(channel=channel, chat_id=chat),
        user_id=chat,
        language=language,  # type: ignore[arg-type]
    )
    assert found.id is not None
    return found.id


async def _answered(store: RedisStore, key: ConversationKey, count: int, *, ago: timedelta) -> None:
    """State the intake and worker leave after answering ``count`` messages, the last one ``ago``."""
    await store.set(seq_key(key), str(count))
    for n in range(1, count + 1):
        await store.set(done_key(key, n), "1", ttl=DONE_TTL - ago.total_seconds())


async def test_prune_deletes_the_state_of_idle_conversations_only(
    database: Database, redis_store: RedisStore
) -> None:
    conversations = ConversationStore(db=database)
    idle, busy, fresh = (
        ConversationKey(channel="telegram", chat_id=name) for name in ("idle", "busy", "fresh")
    )
    idle_id = await _conversation(conversations, "idle")
    busy_id = await _conversation(conversations, "busy")
    await _conversation(conversations, "fresh")
    two_hours_ago = utcnow() - timedelta(hours=2)
    await _sql(
        database,
        "UPDATE conversations SET updated_at = :t WHERE id IN (:a, :b)",
        t=two_hours_ago,
        a=idle_id,
        b=busy_id,
    )

    await _answered(redis_store, idle, 3, ago=timedelta(hours=2))
    await redis_store.set(f"summarizing:{idle_id}", "1", ttl=300)  # left by a process that died mid-fold
    # busy: message 2 was accepted two hours after message 1 and still waits in the inbox
    await _answered(redis_store, busy, 1, ago=timedelta(hours=2))
    await redis_store.set(seq_key(busy), "2")
    await _answered(redis_store, fresh, 2, ago=timedelta(seconds=5))

    result = await prune_idle_sessions(db=database, store=redis_store, idle_after=timedelta(minutes=30))

    assert result == {"checked": 2, "pruned": 1, "keys_deleted": 5, "busy": 1}
    for gone in (seq_key(idle), done_key(idle, 1), done_key(idle, 3), f"summarizing:{idle_id}"):
        assert await redis_store.get(gone) is None, gone
    assert await redis_store.get(seq_key(busy)) == "2"
    assert await redis_store.get(done_key(busy, 1)) == "1"
    assert await redis_store.get(seq_key(fresh)) == "2"
    assert await redis_store.get(done_key(fresh, 2)) == "1"
    # The idle conversation starts again at message 1; its history stays in SQL.
    assert await redis_store.incr(seq_key(idle)) == 1

    # The next run only looks at conversations that went idle since.
    again = await prune_idle_sessions(db=database, store=redis_store, idle_after=timedelta(minutes=30))
    assert again["checked"] == 0


async def test_faq_refresh_picks_up_an_edit_and_warms_the_most_asked(
    database: Database, redis_store: RedisStore
) -> None:
    repository = FaqRepository(db=database)
    refund = await repository.add(question="怎么退货", answer="七天内可以无理由退货。")
    hours = await repository.add(question="客服几点上班", answer="每天 9:00-21:00。")
    cache = FaqCache(store=redis_store)
    holder = RetrieverHolder(embedder=None)

    first = await refresh_faq(db=database, retriever_holder=holder, cache=cache)
    assert first["entries"] == 2
    hit = await cache.lookup("怎么退货？", "zh")
    assert hit is not None and hit.answer == "七天内可以无理由退货。"
    for _ in range(3):
        await cache.record_hit(hours.id or 0)
    await cache.record_hit(refund.id or 0)

    await repository.update(refund.id or 0, answer="收货后十五天内可以退货。")
    stale = await cache.lookup("怎么退货", "zh", count=False)
    assert stale is not None and stale.answer == "七天内可以无理由退货。"  # until the job runs

    second = await refresh_faq(db=database, retriever_holder=holder, cache=cache)
    fresh = await cache.lookup("怎么退货", "zh", count=False)
    assert fresh is not None and fresh.answer == "收货后十五天内可以退货。"
    assert second["top"] == [hours.id, refund.id]  # most asked first
    assert second["warmed"] == 2 and second["cold"] == []
    assert holder.retriever is not None


async def test_audit_purge_removes_records_past_retention(database: Database) -> None:
    audit = AuditLog(db=database, keyring=RING)
    for n in range(3):
        await audit.record("inbound", conversation_id=1, actor="customer:alice", data={"n": n})
    boundary = utcnow()
    await audit.record("answer", conversation_id=1, actor="bot", data={"n": 3})

    # 30 days after the boundary: the first three records are past a 30-day retention.
    result = await purge_audit(audit=audit, retention_days=30, now=boundary + timedelta(days=30))

    assert result == {"purged": 3, "retention_days": 30}
    async with database.engine.connect() as conn:
        kinds = (await conn.execute(text("SELECT kind FROM audit_records ORDER BY id"))).scalars().all()
    assert kinds == ["anchor", "answer"]
    report = await audit.verify()
    assert report.ok, report.render()


async def test_stale_handoffs_go_back_to_the_bot_and_the_customer_is_told(
    database: Database, redis_store: RedisStore
) -> None:
    conversations = ConversationStore(db=database, keyring=RING)
    stale_id = await _conversation(conversations, "stale", language="en")
    recent_id = await _conversation(conversations, "recent")
    taken_id = await _conversation(conversations, "taken")
    for cid, name in ((stale_id, "stale"), (recent_id, "recent"), (taken_id, "taken")):
        await request_human(
            conversations, conversation_id=cid, reason="wants a person", idempotency_key=idempotency_key(name)
        )
    long_ago = utcnow() - timedelta(hours=2)
    await _sql(
        database,
        "UPDATE tickets SET created_at = :t WHERE conversation_id IN (:a, :b)",
        t=long_ago,
        a=stale_id,
        b=taken_id,
    )
    await _sql(database, "UPDATE conversations SET state = 'agent' WHERE id = :id", id=taken_id)
    sent: list[Reply] = []

    async def notify(reply: Reply) -> None:
        sent.append(reply)

    result = await release_stale_handoffs(
        conversations=conversations,
        store=redis_store,
        waited_longer_than=timedelta(minutes=30),
        notify=notify,
        audit=AuditLog(db=database, keyring=RING),
    )

    assert result == {"released": 1, "notified": 1, "notify_failed": 0}
    states = {cid: (await conversations.get_by_id(cid)).state for cid in (stale_id, recent_id, taken_id)}  # type: ignore[union-attr]
    assert states == {stale_id: "bot", recent_id: "waiting", taken_id: "agent"}
    notice = fixed_text("handoff_timeout", "en")
    assert [(r.key, r.text, r.language) for r in sent] == [
        (ConversationKey(channel="telegram", chat_id="stale"), notice, "en")
    ]
    transcript = await conversations.messages(stale_id)
    assert transcript[-1].role == "assistant" and transcript[-1].content == notice
    async with database.engine.connect() as conn:
        status = (
            await conn.execute(
                text("SELECT status FROM tickets WHERE conversation_id = :id"), {"id": stale_id}
            )
        ).scalar_one()
    assert status == "open"  # the follow-up still happens

    again = await release_stale_handoffs(
        conversations=conversations,
        store=redis_store,
        waited_longer_than=timedelta(minutes=30),
        notify=notify,
    )
    assert again["released"] == 0 and len(sent) == 1


async def test_inbox_stats_reports_depth_and_dead_letters() -> None:
    inbox = MemoryInbox()
    for n in range(3):
        await inbox.put(
            InboundMessage(
                key=ConversationKey(channel="webchat", chat_id="s"), user_id="u", message_id=str(n), text="hi"
            )
        )
    [entry] = await inbox.claim("worker-1", count=1, block=0.1)
    await inbox.dead_letter(entry, "kept failing")

    assert await inbox_stats(inbox=inbox) == {"depth": 2, "dead_letters": 1, "dead_letters_capped": False}
    assert (await inbox_stats(inbox=inbox, dead_letter_limit=1))["dead_letters_capped"] is True


class RecordingSender(ReplySender):
    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.sent: list[Reply] = []

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)


async def test_the_timeout_notice_goes_out_on_the_conversations_platform(
    database: Database, redis_store: RedisStore
) -> None:
    conversations = ConversationStore(db=database)
    telegram_id = await _conversation(conversations, "tg-user")
    slack_id = await _conversation(conversations, "slack-user", channel="slack")
    for cid in (telegram_id, slack_id):
        await request_human(
            conversations,
            conversation_id=cid,
            reason="person please",
            idempotency_key=idempotency_key(str(cid)),
        )
    await _sql(database, "UPDATE tickets SET created_at = :t", t=utcnow() - timedelta(hours=1))
    telegram = RecordingSender("telegram")  # Slack is switched off in this deployment

    result = await release_stale_handoffs(
        conversations=conversations,
        store=redis_store,
        waited_longer_than=timedelta(minutes=30),
        notify=notify_through(SenderRegistry([telegram])),
    )

    assert result == {"released": 2, "notified": 1, "notify_failed": 1}
    assert [r.key.chat_id for r in telegram.sent] == ["tg-user"]
