"""The engine answers every message: history, the tool loop, bad input and failures."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Order
from core.engine import DEFAULT_LIMITS, Engine, EngineLimits
from core.errors import DatabaseError, ModelTimeout, ModelUnavailable
from core.llm.base import ChatRequest, ChatResponse, ToolCall
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage, ReplyDelta, ReplyDone, ReplySource
from core.stores.memory import MemoryStore
from core.texts import text as fixed_text
from tests.core.outages import OutageConversations
from tools import default_registry
from tools.context import ToolContext
from tools.registry import ToolRegistry

KEY = ConversationKey(channel="web", chat_id="session-0001")


def inbound(text: str, n: int = 1, *, key: ConversationKey = KEY, language: str = "zh") -> InboundMessage:
    return InboundMessage(key=key, user_id="u1", message_id=f"m{n}", text=text, language=language)  # type: ignore[arg-type]


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as s:
        yield s


def make_engine(
    database: Database,
    store: MemoryStore,
    model: FunctionModel,
    *,
    tools: ToolRegistry | None = None,
    limits: EngineLimits = DEFAULT_LIMITS,
    budget: ContextBudget | None = None,
    conversations: ConversationStore | None = None,
) -> Engine:
    return Engine(
        conversations=conversations or ConversationStore(db=database),
        store=store,
        model=model,
        tools=tools if tools is not None else ToolRegistry(),
        system_prompt="SYSTEM",
        context=ContextBuilder(counter=model.count_tokens, budget=budget or ContextBudget()),
        limits=limits,
    )


async def transcript(database: Database) -> list[tuple[str, str]]:
    conversations = ConversationStore(db=database)
    conversation = await conversations.get(KEY)
    assert conversation is not None and conversation.id is not None
    return [(m.role, m.content) for m in await conversations.messages(conversation.id)]


async def test_answers_and_persists_both_turns(database: Database, store: MemoryStore) -> None:
    engine = make_engine(database, store, FunctionModel(lambda r: "您好，请问有什么可以帮您？"))
    reply = await engine.handle(inbound("你好"))
    assert reply.text == "您好，请问有什么可以帮您？"
    assert reply.source is ReplySource.MODEL
    assert reply.in_reply_to == "m1"
    assert await transcript(database) == [("user", "你好"), ("assistant", "您好，请问有什么可以帮您？")]


async def test_stream_deltas_join_to_the_final_reply(database: Database, store: MemoryStore) -> None:
    engine = make_engine(database, store, FunctionModel(lambda r: "Your order ships tomorrow."))
    events = [e async for e in engine.stream(inbound("when does it ship?", language="en"))]
    deltas = "".join(e.text for e in events if isinstance(e, ReplyDelta))
    assert isinstance(events[-1], ReplyDone)
    assert deltas == events[-1].reply.text == "Your order ships tomorrow."


async def test_prompt_carries_history_in_order(database: Database, store: MemoryStore) -> None:
    model = FunctionModel(lambda r: f"answer {len(r.messages)}")
    engine = make_engine(database, store, model)
    for n in range(1, 5):
        await engine.handle(inbound(f"question {n}", n))
    last = model.requests[-1].messages
    assert last[0].role == "system" and last[0].content == "SYSTEM"
    users = [m.content for m in last if m.role == "user"]
    assert users == ["question 1", "question 2", "question 3", "question 4"]
    assert [m.role for m in last[1:]] == ["user", "assistant"] * 3 + ["user"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\x00\x01"])
async def test_empty_input_gets_a_prompt_not_the_model(
    database: Database, store: MemoryStore, text: str
) -> None:
    model = FunctionModel(lambda r: "unused")
    reply = await make_engine(database, store, model).handle(inbound(text))
    assert reply.text == fixed_text("empty_input", "zh")
    assert model.requests == []


async def test_oversized_input_gets_a_notice_and_never_reaches_the_model(
    database: Database, store: MemoryStore
) -> None:
    model = FunctionModel(lambda r: "unused")
    engine = make_engine(database, store, model, limits=EngineLimits(max_input_chars=100))
    reply = await engine.handle(inbound("x" * 101, language="en"))
    assert reply.text == fixed_text("input_too_long", "en", limit=100)
    assert "100" in reply.text
    assert model.requests == []


async def test_control_characters_and_surrogates_are_cleaned(database: Database, store: MemoryStore) -> None:
    model = FunctionModel(lambda r: "ok")
    await make_engine(database, store, model).handle(inbound("查\x00订单\ud800状态\x1b"))
    sent = model.requests[0].messages[-1].content
    assert "\x00" not in sent and "\x1b" not in sent and "\ud800" not in sent
    assert sent.startswith("查订单")


@pytest.mark.parametrize("error", [ModelUnavailable("connection refused"), ModelTimeout("60s")])
async def test_model_failure_gets_an_apology_and_keeps_the_message(
    database: Database, store: MemoryStore, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    def down(request: ChatRequest) -> str:
        raise error

    engine = make_engine(database, store, FunctionModel(down))
    with caplog.at_level(logging.WARNING):
        reply = await engine.handle(inbound("我的订单到哪了", language="zh"))
    assert reply.text == fixed_text("apology", "zh")
    assert reply.source is ReplySource.SYSTEM
    assert await transcript(database) == [("user", "我的订单到哪了"), ("assistant", reply.text)]
    assert any(getattr(r, "conversation", None) == str(KEY) for r in caplog.records)


@pytest.mark.parametrize("garbage", ["", "   ", "...", "\ufffd\ufffd"])
async def test_empty_or_garbage_answers_become_an_apology(
    database: Database, store: MemoryStore, garbage: str
) -> None:
    engine = make_engine(database, store, FunctionModel(lambda r: garbage))
    reply = await engine.handle(inbound("hello", language="en"))
    assert reply.text == fixed_text("apology", "en")


async def test_unexpected_error_is_contained_and_logged(
    database: Database, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: ChatRequest) -> str:
        raise RuntimeError("bug")

    engine = make_engine(database, store, FunctionModel(broken))
    with caplog.at_level(logging.ERROR):
        reply = await engine.handle(inbound("hello", language="en"))
    assert reply.text == fixed_text("apology", "en")
    assert any(r.exc_info and getattr(r, "conversation", None) == str(KEY) for r in caplog.records)
    # the next message still works
    engine._model = FunctionModel(lambda r: "back")
    assert (await engine.handle(inbound("again", 2, language="en"))).text == "back"


async def test_database_failure_is_contained(tmp_path: object, store: MemoryStore) -> None:
    broken = Database(url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    engine = make_engine(broken, store, FunctionModel(lambda r: "unused"))
    reply = await engine.handle(inbound("hello", language="en"))
    assert reply.text == fixed_text("apology", "en")
    await broken.aclose()


async def test_an_unreachable_database_is_raised_for_the_worker_to_retry(store: MemoryStore) -> None:
    broken = Database(url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    engine = make_engine(broken, store, FunctionModel(lambda r: "unused"))
    with pytest.raises(DatabaseError):
        async for _ in engine.stream(inbound("hello", language="en"), raise_on_outage=True):
            pass
    await broken.aclose()


async def test_other_failures_still_get_the_apology_when_outages_are_raised(
    database: Database, store: MemoryStore
) -> None:
    def broken(request: ChatRequest) -> str:
        raise RuntimeError("bug")

    engine = make_engine(database, store, FunctionModel(broken))
    events = [e async for e in engine.stream(inbound("hello", language="en"), raise_on_outage=True)]
    assert isinstance(events[-1], ReplyDone)
    assert events[-1].reply.text == fixed_text("apology", "en")


async def test_a_turn_cut_short_by_the_database_is_answered_again_storing_the_message_once(
    database: Database, store: MemoryStore
) -> None:
    model = FunctionModel(lambda r: "it left the warehouse today")
    engine = make_engine(database, store, model, conversations=OutageConversations(db=database, outages=1))
    question = inbound("where is my order?", 3, language="en")
    with pytest.raises(DatabaseError):
        async for _ in engine.stream(question, raise_on_outage=True):
            pass
    reply = await engine.handle(question)
    assert reply.text == "it left the warehouse today"
    assert await transcript(database) == [
        ("user", "where is my order?"),
        ("assistant", "it left the warehouse today"),
    ]
    # The second attempt's prompt holds the question once, not also as an earlier turn.
    assert [m.content for m in model.requests[-1].messages].count("where is my order?") == 1


def scripted(*responses: ChatResponse | str) -> FunctionModel:
    queue = list(responses)
    return FunctionModel(lambda r: queue.pop(0))


def call(name: str, **arguments: object) -> ChatResponse:
    return ChatResponse(tool_calls=(ToolCall(id=f"call_{name}", name=name, arguments=arguments),))


async def test_tool_loop_answers_from_the_order_table(database: Database, store: MemoryStore) -> None:
    async with database.session() as session:
        session.add(Order(id="KF20251103001", status="shipped", carrier="SF", tracking_number="SF123"))
        await session.commit()
    model = scripted(call("query_order_status", order_id="kf20251103001"), "已发货，顺丰 SF123。")
    engine = make_engine(database, store, model, tools=default_registry())
    reply = await engine.handle(inbound("订单KF20251103001到哪了"))
    assert reply.text == "已发货，顺丰 SF123。"
    second = model.requests[1].messages
    assert second[-2].tool_calls[0].name == "query_order_status"
    result = json.loads(second[-1].content)
    assert second[-1].role == "tool" and second[-1].tool_name == "query_order_status"
    assert result["found"] is True and result["tracking_number"] == "SF123"
    roles = [role for role, _ in await transcript(database)]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert model.requests[0].tools[0].parameters["required"] == ["order_id"]


async def _slow_tool(ctx: ToolContext, seconds: float) -> str:
    """Sleeps."""
    await asyncio.sleep(seconds)
    return "done"


async def _failing_tool(ctx: ToolContext, what: str) -> str:
    """Fails."""
    raise RuntimeError(what)


@pytest.mark.parametrize(
    ("request_", "expected_error"),
    [
        (call("no_such_tool"), "unknown tool"),
        (call("failing_tool"), "invalid arguments"),
        (call("failing_tool", what="boom"), "failing_tool failed: RuntimeError"),
        (call("slow_tool", seconds=5), "timed out"),
    ],
)
async def test_tool_errors_go_back_to_the_model(
    database: Database, store: MemoryStore, request_: ChatResponse, expected_error: str
) -> None:
    registry = ToolRegistry()
    registry.tool(_failing_tool, name="failing_tool")
    registry.tool(_slow_tool, name="slow_tool", timeout=0.05)
    model = scripted(request_, "Sorry, I could not check that.")
    reply = await make_engine(database, store, model, tools=registry).handle(inbound("x", language="en"))
    assert reply.text == "Sorry, I could not check that."
    tool_message = model.requests[1].messages[-1]
    assert expected_error in json.loads(tool_message.content)["error"]


async def test_endless_tool_calls_stop_at_the_bound(database: Database, store: MemoryStore) -> None:
    model = FunctionModel(lambda r: call("query_order_status", order_id="KF1") if r.tools else "final")
    engine = make_engine(
        database, store, model, tools=default_registry(), limits=EngineLimits(max_tool_rounds=2)
    )
    reply = await engine.handle(inbound("loop", language="en"))
    assert reply.text == "final"
    assert len(model.requests) == 3
    assert model.requests[-1].tools == ()


async def test_one_conversation_is_answered_one_message_at_a_time(
    database: Database, store: MemoryStore
) -> None:
    active: dict[str, int] = {}
    overlap: list[str] = []

    async def slow(request: ChatRequest) -> str:
        who = request.messages[-1].content.split()[0]
        active[who] = active.get(who, 0) + 1
        if active[who] > 1:
            overlap.append(who)
        await asyncio.sleep(0.02)
        active[who] -= 1
        return "ok"

    engine = make_engine(database, store, FunctionModel(slow))
    other = ConversationKey(channel="web", chat_id="session-0002")
    await asyncio.gather(
        *(engine.handle(inbound(f"a {n}", n)) for n in range(5)),
        *(engine.handle(inbound(f"b {n}", 10 + n, key=other)) for n in range(5)),
    )
    assert overlap == []
    assert len(await transcript(database)) == 10


async def test_reprocessing_an_answered_message_returns_the_same_answer(
    database: Database, store: MemoryStore
) -> None:
    answers = iter(["first answer", "second answer"])
    model = FunctionModel(lambda r: next(answers))
    engine = make_engine(database, store, model)
    first = await engine.handle(inbound("where is my order?", 7, language="en"))
    again = await engine.handle(inbound("where is my order?", 7, language="en"))
    assert first.text == again.text == "first answer"
    assert len(model.requests) == 1
    assert await transcript(database) == [("user", "where is my order?"), ("assistant", "first answer")]


async def test_a_repeated_tool_call_is_answered_from_the_results(
    database: Database, store: MemoryStore
) -> None:
    def answer(request: ChatRequest) -> ChatResponse | str:
        if request.tools:
            return call("query_order_status", order_id="KF1")
        return "Your order was not found."

    model = FunctionModel(answer)
    engine = make_engine(database, store, model, tools=default_registry())
    reply = await engine.handle(inbound("where is KF1", language="en"))
    assert reply.text == "Your order was not found."
    roles = [role for role, _ in await transcript(database)]
    assert roles == ["user", "assistant", "tool", "assistant"]  # the tool ran once


async def test_a_tool_call_written_as_text_is_not_shown_to_the_customer(
    database: Database, store: MemoryStore
) -> None:
    model = FunctionModel(lambda r: '{"tool": "query_order_status", "arguments": {"order_id": "KF1"}}')
    reply = await make_engine(database, store, model).handle(inbound("where is KF1", language="en"))
    assert reply.text == fixed_text("apology", "en")
