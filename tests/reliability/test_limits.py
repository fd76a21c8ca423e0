"""Back-pressure: per-user and per-conversation rate limits, and a bound on parallel model calls."""

from __future__ import annotations

import asyncio

from core.db.database import Database
from core.inbox.memory import MemoryInbox
from core.intake import Accepted, Intake, RateLimits
from core.llm.base import ChatMessage, ChatRequest
from core.llm.bounded import BoundedModel
from core.llm.testing import FunctionModel
from core.messages import ReplySource
from core.stores.memory import MemoryStore
from core.texts import text as fixed_text
from tests.reliability.conftest import RecordingSender, answer, make_engine, make_worker, message, wait_for


async def test_a_user_over_the_limit_gets_one_notice_and_no_model_answer(database: Database) -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    intake = Intake(store=store, inbox=inbox, rate_limits=RateLimits(per_user=3, per_conversation=0))
    results = [await intake.accept(message("alice", n)) for n in range(6)]
    assert results == [Accepted.NEW] * 4 + [Accepted.LIMITED] * 2
    # Another user is not affected.
    assert await intake.accept(message("bob", 0)) is Accepted.NEW

    model = FunctionModel(answer)
    sender = RecordingSender()
    worker = make_worker(
        inbox=inbox, store=store, engine=make_engine(database, store, model), sender=sender, consumer="w1"
    )
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(sender.sent) >= 5)
    await worker.stop()
    await task

    assert sender.texts("alice") == [
        "answer to alice 0",
        "answer to alice 1",
        "answer to alice 2",
        fixed_text("rate_limited", "en"),
    ]
    assert [r.source for r in sender.sent if r.key.chat_id == "alice"][-1] is ReplySource.SYSTEM
    assert sender.texts("bob") == ["answer to bob 0"]
    assert len(model.requests) == 4  # the notice never reached the model


async def test_a_busy_conversation_is_limited_across_its_users() -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    intake = Intake(store=store, inbox=inbox, rate_limits=RateLimits(per_user=0, per_conversation=2))
    results = [await intake.accept(message("group", n, user=f"u{n}")) for n in range(4)]
    assert results == [Accepted.NEW, Accepted.NEW, Accepted.NEW, Accepted.LIMITED]
    entries = await inbox.claim("w1", block=0.1)
    assert [e.message.extras.get("_notice") for e in entries] == [None, None, "rate_limited"]


async def test_a_retried_message_does_not_count_against_the_limit() -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    intake = Intake(store=store, inbox=inbox, rate_limits=RateLimits(per_user=1, per_conversation=0))
    assert await intake.accept(message("alice", 0)) is Accepted.NEW
    for _ in range(3):
        assert await intake.accept(message("alice", 0)) is Accepted.DUPLICATE
    entries = await inbox.claim("w1", block=0.1)
    assert [e.message.extras.get("_notice") for e in entries] == [None]


async def test_bounded_model_runs_at_most_limit_calls_at_once() -> None:
    running = 0
    peak = 0
    release = asyncio.Event()

    async def slow(request: ChatRequest) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return "ok"

    model = BoundedModel(FunctionModel(slow), limit=2)
    request = ChatRequest(messages=(ChatMessage.user("hi"),))
    calls = [asyncio.create_task(model.complete(request)) for _ in range(6)]
    await wait_for(lambda: running == 2)
    await asyncio.sleep(0.05)  # give the other four every chance to start
    assert running == 2 and model.in_flight == 2
    release.set()
    answers = await asyncio.gather(*calls)
    assert [a.content for a in answers] == ["ok"] * 6
    assert peak == 2
    assert model.in_flight == 0
