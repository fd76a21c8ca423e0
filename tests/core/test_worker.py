"""Intake and worker: every accepted message is answered once, in order per conversation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.delivery import ReplySender, SenderRegistry
from core.engine import Engine
from core.errors import DeliveryError
from core.inbox.memory import MemoryInbox
from core.intake import Accepted, Intake
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage, Reply
from core.stores.memory import MemoryStore
from core.texts import text as fixed_text
from core.worker import Worker
from tests.core.outages import OutageConversations
from tools.registry import ToolRegistry


class RecordingSender(ReplySender):
    channel = "test"

    def __init__(self, *, failures: int = 0) -> None:
        self.sent: list[Reply] = []
        self.failures = failures

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
) -> tuple[Intake, Worker]:
    def answer(request: ChatRequest) -> str:
        return f"answer to {request.messages[-1].content}"

    model = FunctionModel(answer, delay=delay)
    engine = Engine(
        conversations=conversations or ConversationStore(db=database),
        store=store,
        model=model,
        tools=ToolRegistry(),
        system_prompt="S",
        context=ContextBuilder(counter=model.count_tokens, budget=ContextBudget()),
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
