"""Intake and worker: every accepted message is answered once, in order per conversation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import FaqEntry
from core.delivery import ReplySender, SenderRegistry
from core.engine import Engine
from core.errors import DeliveryError
from core.faq.cache import FaqCache
from core.handoff import AGENT
from core.inbox.memory import MemoryInbox
from core.intake import Accepted, Intake
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage, Reply, ReplySource
from core.stores.memory import MemoryStore
from core.texts import text as fixed_text
from core.worker import Worker, sent_key
from tests.core.outages import OutageConversations
from tools.registry import ToolRegistry


class RecordingSender(ReplySender):
    channel = "test"

    def __init__(self, *, failures: int = 0) -> None:
        self.sent: list[Reply] = []
        self.failures = failures
        self.model_calls = 0

    async def send(self, reply: Reply) -> None:
        if self.failures and reply.source != "system":
            self.failures -= 1
            raise DeliveryError("platform said no")
        self.sent.append(reply)


def message(chat: str, n: int) -> InboundMessage:
    return InboundMessage(
        key=ConversationKey(channel="test", chat_id=chat),
        user_id=chat,
        message_id=f"{chat}-{n}",
        text=f"{chat} {n}",
        language="en",
    )


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as s:
        yield s


def build(
    database: Database,
    store: MemoryStore,
    sender: RecordingSender,
    *,
    delay: float = 0.0,
    conversations: ConversationStore | None = None,
    outage_wait: float = 300.0,
    faq_cache: FaqCache | None = None,
) -> tuple[Intake, Worker]:
    def answer(request: ChatRequest) -> str:
        sender.model_calls += 1
        return f"answer to {request.messages[-1].content}"

    model = FunctionModel(answer, delay=delay)
    engine = Engine(
        conversations=conversations or ConversationStore(db=database),
        store=store,
        model=model,
        tools=ToolRegistry(),
        system_prompt="S",
        context=ContextBuilder(counter=model.count_tokens, budget=ContextBudget()),
        faq_cache=faq_cache,
    )
    inbox = MemoryInbox()
    worker = Worker(
        inbox=inbox,
        engine=engine,
        senders=SenderRegistry([sender]),
        store=store,
        consumer="w1",
        max_deliveries=3,
        reclaim_idle=0.05,
        outage_wait=outage_wait,
    )
    return Intake(store=store, inbox=inbox), worker


async def run_until_empty(worker: Worker, intake: Intake) -> None:
    task = asyncio.create_task(worker.run())
    for _ in range(400):
        if await intake.inbox.depth() == 0:
            break
        await asyncio.sleep(0.02)
    await worker.stop()
    await asyncio.wait_for(task, 10)


async def test_each_message_answered_once_and_in_order(database: Database, store: MemoryStore) -> None:
    sender = RecordingSender()
    intake, worker = build(database, store, sender, delay=0.005)
    for n in range(5):
        for chat in ("alice", "bob", "carol"):
            for _retry in range(3):  # the platform delivers every message three times
                await intake.accept(message(chat, n))
    await run_until_empty(worker, intake)
    assert len(sender.sent) == 15
    for chat in ("alice", "bob", "carol"):
        texts = [r.text for r in sender.sent if r.key.chat_id == chat]
        assert texts == [f"answer to {chat} {n}" for n in range(5)]


async def test_duplicates_are_recognised(database: Database, store: MemoryStore) -> None:
    intake, _ = build(database, store, RecordingSender())
    assert await intake.accept(message("alice", 1)) is Accepted.NEW
    assert await intake.accept(message("alice", 1)) is Accepted.DUPLICATE
    assert await intake.inbox.depth() == 1


async def test_a_failed_delivery_is_retried_then_sent_once(database: Database, store: MemoryStore) -> None:
    sender = RecordingSender(failures=1)
    intake, worker = build(database, store, sender)
    await intake.accept(message("alice", 1))
    await run_until_empty(worker, intake)
    assert [r.text for r in sender.sent] == ["answer to alice 1"]


async def test_a_message_that_keeps_failing_is_dead_lettered_with_an_apology(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender(failures=100)
    intake, worker = build(database, store, sender)
    await intake.accept(message("alice", 1))
    await run_until_empty(worker, intake)
    dead = await intake.inbox.dead_letters()
    assert [d.message.message_id for d in dead] == ["alice-1"]
    assert "DeliveryError" in dead[0].reason
    assert [r.text for r in sender.sent] == [fixed_text("apology", "en")]


async def test_a_reprocessed_message_is_not_sent_twice(database: Database, store: MemoryStore) -> None:
    sender = RecordingSender()
    intake, worker = build(database, store, sender)
    await intake.accept(message("alice", 1))
    await run_until_empty(worker, intake)
    # The same entry comes back (a worker died after sending but before acknowledging).
    await intake.inbox.put(message("alice", 1))
    worker2 = Worker(
        inbox=intake.inbox,
        engine=worker._engine,
        senders=SenderRegistry([sender]),
        store=store,
        consumer="w2",
    )
    await run_until_empty(worker2, intake)
    assert await intake.inbox.depth() == 0
    assert len(sender.sent) == 1


async def test_a_message_for_a_channel_without_sender_is_dead_lettered(
    database: Database, store: MemoryStore
) -> None:
    intake, worker = build(database, store, RecordingSender())
    other = InboundMessage(
        key=ConversationKey(channel="fax", chat_id="1"), user_id="1", message_id="1", text="hi"
    )
    await intake.accept(other)
    await run_until_empty(worker, intake)
    assert [d.message.key.channel for d in await intake.inbox.dead_letters()] == ["fax"]


async def test_messages_in_and_out_are_counted(database: Database, store: MemoryStore) -> None:
    from core import metrics

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    received = sample("kefu_messages_received_total", channel="test", outcome="new")
    duplicates = sample("kefu_messages_received_total", channel="test", outcome="duplicate")
    sent = sample("kefu_messages_sent_total", channel="test", source="model")
    sender = RecordingSender()
    intake, worker = build(database, store, sender)
    await intake.accept(message("metrics", 1))
    await intake.accept(message("metrics", 1))
    await run_until_empty(worker, intake)
    assert sample("kefu_messages_received_total", channel="test", outcome="new") == received + 1
    assert sample("kefu_messages_received_total", channel="test", outcome="duplicate") == duplicates + 1
    assert sample("kefu_messages_sent_total", channel="test", source="model") == sent + 1


async def test_a_database_outage_is_waited_out_and_the_real_answer_sent_once_in_order(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender()
    # As many failed attempts as max_deliveries: counted as deliveries, they would dead-letter it.
    conversations = OutageConversations(db=database, outages=3)
    intake, worker = build(database, store, sender, conversations=conversations)
    for n in (1, 2):
        await intake.accept(message("alice", n))
    await run_until_empty(worker, intake)
    assert [r.text for r in sender.sent] == ["answer to alice 1", "answer to alice 2"]
    assert await intake.inbox.dead_letters() == []
    conversation = await conversations.get(ConversationKey(channel="test", chat_id="alice"))
    assert conversation is not None and conversation.id is not None
    stored = [(m.role, m.content) for m in await conversations.messages(conversation.id)]
    assert stored == [
        ("user", "alice 1"),
        ("assistant", "answer to alice 1"),
        ("user", "alice 2"),
        ("assistant", "answer to alice 2"),
    ]


async def test_an_outage_longer_than_outage_wait_counts_as_a_failed_delivery(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender()
    conversations = OutageConversations(db=database, outages=100)
    intake, worker = build(database, store, sender, conversations=conversations, outage_wait=0.0)
    await intake.accept(message("alice", 1))
    await run_until_empty(worker, intake)
    dead = await intake.inbox.dead_letters()
    assert [d.message.message_id for d in dead] == ["alice-1"]
    assert "DatabaseError" in dead[0].reason
    assert [r.text for r in sender.sent] == [fixed_text("apology", "en")]


async def test_a_worker_claims_nothing_until_its_process_is_ready(
    database: Database, store: MemoryStore
) -> None:
    """A process that just started answers nothing before its FAQ cache and index are built."""
    sender = RecordingSender()
    intake, worker = build(database, store, sender)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(after=ready))
    await intake.accept(message("alice", 0))
    await asyncio.sleep(0.3)
    assert sender.sent == [] and await intake.inbox.depth() == 1
    ready.set()
    for _ in range(200):
        if sender.sent:
            break
        await asyncio.sleep(0.02)
    assert [r.text for r in sender.sent] == ["answer to alice 0"]
    await worker.stop()
    await asyncio.wait_for(task, 10)


async def test_a_worker_still_waiting_to_start_stops_at_once(database: Database, store: MemoryStore) -> None:
    _intake, worker = build(database, store, RecordingSender())
    task = asyncio.create_task(worker.run(after=asyncio.Event()))
    await asyncio.sleep(0.05)
    await worker.stop()
    await asyncio.wait_for(task, 2)


# --- FAQ cache answers go out before their turn is stored ------------------------------------------

RESET_ANSWER = "Use 'Forgot password' on the sign-in page."


async def reset_cache(store: MemoryStore) -> FaqCache:
    cache = FaqCache(store=store)
    entry = FaqEntry(
        id=7, question="How do I reset my password?", answer=RESET_ANSWER, alternatives=[], language="en"
    )
    await cache.rebuild([entry])
    return cache


async def faq_worker(
    database: Database, store: MemoryStore, sender: RecordingSender, conversations: ConversationStore
) -> tuple[Intake, Worker]:
    """A worker whose FAQ cache knows the password question."""
    cache = await reset_cache(store)
    return build(database, store, sender, conversations=conversations, faq_cache=cache)


def question(chat: str, n: int, text: str = "how do i reset my password") -> InboundMessage:
    return message(chat, n).model_copy(update={"text": text})


async def transcript(conversations: ConversationStore, chat: str) -> list[tuple[str, str, str | None]]:
    conversation = await conversations.get(ConversationKey(channel="test", chat_id=chat))
    if conversation is None or conversation.id is None:
        return []
    return [(m.role, m.content, m.source) for m in await conversations.messages(conversation.id)]


class TranscriptAtSend(RecordingSender):
    """Notes how much of the conversation was stored when each reply went out."""

    def __init__(self, conversations: ConversationStore) -> None:
        super().__init__()
        self.conversations = conversations
        self.stored_at_send: list[int] = []

    async def send(self, reply: Reply) -> None:
        self.stored_at_send.append(len(await transcript(self.conversations, reply.key.chat_id)))
        await super().send(reply)


async def test_a_faq_cache_answer_is_sent_before_its_turn_is_stored(
    database: Database, store: MemoryStore
) -> None:
    conversations = ConversationStore(db=database)
    sender = TranscriptAtSend(conversations)
    intake, worker = await faq_worker(database, store, sender, conversations)
    await intake.accept(question("dora", 1))
    await intake.accept(message("dora", 2))  # not a FAQ question: the model answers, in order
    await run_until_empty(worker, intake)
    assert [(r.text, r.source) for r in sender.sent] == [
        (RESET_ANSWER, ReplySource.FAQ_CACHE),
        ("answer to dora 2", ReplySource.MODEL),
    ]
    # Nothing of the conversation was stored when the cache answer went out; the model's answer goes
    # out once its whole turn is stored (both turns: four rows).
    assert sender.stored_at_send == [0, 4]
    assert sender.model_calls == 1
    assert await transcript(conversations, "dora") == [
        ("user", "how do i reset my password", None),
        ("assistant", RESET_ANSWER, "faq_cache"),
        ("user", "dora 2", None),
        ("assistant", "answer to dora 2", "model"),
    ]


async def test_a_database_outage_after_a_cache_answer_stores_the_turn_once_and_sends_nothing_more(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender()
    conversations = OutageConversations(db=database, outages=2)
    intake, worker = await faq_worker(database, store, sender, conversations)
    await intake.accept(question("erin", 1))
    await run_until_empty(worker, intake)
    assert [r.text for r in sender.sent] == [RESET_ANSWER]
    assert await intake.inbox.dead_letters() == []
    assert await transcript(conversations, "erin") == [
        ("user", "how do i reset my password", None),
        ("assistant", RESET_ANSWER, "faq_cache"),
    ]


async def test_a_cache_answer_sent_by_a_crashed_worker_is_stored_by_the_next_not_sent_again(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender()
    conversations = ConversationStore(db=database)
    intake, worker = await faq_worker(database, store, sender, conversations)
    await intake.accept(question("fred", 1))
    # The first worker sent the answer and recorded it, then died before storing the turn.
    (entry,) = await intake.inbox.claim("dead-worker", count=1, block=0.01)
    await store.set(sent_key(entry), json.dumps({"faq_entry": 7, "answer": RESET_ANSWER}))
    await asyncio.sleep(0.1)  # its entry is idle long enough to be reclaimed by the next worker
    await run_until_empty(worker, intake)
    assert sender.sent == []
    assert await transcript(conversations, "fred") == [
        ("user", "how do i reset my password", None),
        ("assistant", RESET_ANSWER, "faq_cache"),
    ]


async def test_no_cache_answer_while_a_person_has_the_conversation(
    database: Database, store: MemoryStore
) -> None:
    sender = RecordingSender()
    conversations = ConversationStore(db=database)
    intake, worker = await faq_worker(database, store, sender, conversations)
    conversation = await conversations.get_or_create(
        ConversationKey(channel="test", chat_id="gail"), user_id="gail", language="en"
    )
    assert conversation.id is not None
    await conversations.update(conversation.id, state=AGENT)
    await intake.accept(question("gail", 1))
    await run_until_empty(worker, intake)
    assert sender.sent == []
    assert await transcript(conversations, "gail") == [("user", "how do i reset my password", None)]
