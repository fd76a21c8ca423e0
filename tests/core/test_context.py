"""Context management: the order number survives summaries, prompts fit the budget, prefixes are stable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from core.context import TRUNCATED, ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Message
from core.engine import Engine
from core.llm.base import ChatRequest, ChatResponse, ToolCall, Usage
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage
from core.stores.memory import MemoryStore
from core.summary import INSTRUCTIONS, Summarizer
from core.texts import text as fixed_text
from core.tokens import count_prompt, qwen_token_counter
from tools.context import ToolContext
from tools.registry import ToolRegistry

KEY = ConversationKey(channel="telegram", chat_id="42")
ORDER = "KF20251103001"


def inbound(text: str, n: int, language: str = "zh") -> InboundMessage:
    return InboundMessage(key=KEY, user_id="u42", message_id=str(n), text=text, language=language)  # type: ignore[arg-type]


def is_summary_request(request: ChatRequest) -> bool:
    return request.messages[0].content == INSTRUCTIONS


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as s:
        yield s


def engine_for(
    database: Database,
    store: MemoryStore,
    model: FunctionModel,
    *,
    budget: ContextBudget,
    tools: ToolRegistry | None = None,
) -> Engine:
    conversations = ConversationStore(db=database)
    return Engine(
        conversations=conversations,
        store=store,
        model=model,
        tools=tools or ToolRegistry(),
        system_prompt="你是客服。You are a support assistant.",
        context=ContextBuilder(counter=qwen_token_counter, budget=budget),
        summarizer=Summarizer(
            model=model,
            conversations=conversations,
            counter=qwen_token_counter,
            prompt_limit=budget.prompt_limit,
        ),
    )


def customer_turn(n: int) -> str:
    if n % 2:
        return f"第{n}个问题：我想问一下退货政策和运费怎么算，包装拆了还能退吗？"
    return f"Question {n}: how long does a refund take once the parcel is back at your warehouse?"


async def test_fifty_turns_later_the_turn_one_order_number_is_still_in_the_prompt(
    database: Database, store: MemoryStore
) -> None:
    def answer(request: ChatRequest) -> str:
        if is_summary_request(request):
            return "The customer asked about returns, shipping fees and refunds."  # no order number
        return "好的，我来帮您查询。Sure, let me check."

    model = FunctionModel(answer)
    engine = engine_for(database, store, model, budget=ContextBudget(num_ctx=2048, history_turns=6))
    await engine.handle(inbound(f"你好，我的订单号是{ORDER}，还没发货", 1))
    for n in range(2, 51):
        await engine.handle(inbound(customer_turn(n), n))
        await engine.wait_idle()
    prompts = [r for r in model.requests if not is_summary_request(r)]
    last = prompts[-1].messages
    assert ORDER in last[1].content and "[MEMORY]" in last[1].content
    assert "[SUMMARY]" in last[1].content
    history_users = [m for m in last[2:-1] if m.role == "user"]
    assert 6 <= len(history_users) <= 12
    assert customer_turn(50) == last[-1].content
    conversation = await ConversationStore(db=database).get(KEY)
    assert conversation is not None and conversation.pinned["order_ids"] == [ORDER]
    assert "refunds" in conversation.summary


async def test_prompts_never_exceed_the_budget_with_long_inputs_and_tool_results(
    database: Database, store: MemoryStore
) -> None:
    budget = ContextBudget(num_ctx=1024, answer_tokens=128, history_turns=3, block_turns=3)
    registry = ToolRegistry()

    async def lookup(ctx: ToolContext, query: str) -> str:
        """Returns a very long result."""
        return "物流记录：包裹已到达分拣中心，正在安排派送。Parcel scanned at hub. " * 200

    registry.tool(lookup)
    calls = iter(range(1000))

    def answer(request: ChatRequest) -> ChatResponse | str:
        if is_summary_request(request):
            return "Summary of earlier turns."
        if request.tools and request.messages[-1].role == "user":
            return ChatResponse(
                tool_calls=(ToolCall(id=f"c{next(calls)}", name="lookup", arguments={"query": "x"}),)
            )
        return "您的包裹正在派送中。" * 10

    model = FunctionModel(answer)
    engine = engine_for(database, store, model, budget=budget, tools=registry)
    long_zh = "我上周买的衣服尺码不对，想换大一号，" * 60
    long_en = "The jacket I bought last week is the wrong size and I would like to exchange it. " * 40
    for n in range(1, 16):
        await engine.handle(inbound(long_zh if n % 2 else long_en, n))
        await engine.wait_idle()
    assert len(model.requests) > 20
    for request in model.requests:
        assert count_prompt(request.messages, request.tools, qwen_token_counter) <= budget.prompt_limit


async def test_a_single_oversized_message_is_cut_and_the_customer_is_told(
    database: Database, store: MemoryStore
) -> None:
    model = FunctionModel(lambda r: "收到。")
    engine = engine_for(database, store, model, budget=ContextBudget(num_ctx=1024, answer_tokens=128))
    reply = await engine.handle(inbound("请帮我看看这段描述：" + "质量问题" * 900, 1))
    assert reply.text.startswith(fixed_text("input_cut", "zh"))
    assert model.requests[0].messages[-1].content.endswith(TRUNCATED)


async def test_the_customer_never_waits_for_the_summary(database: Database, store: MemoryStore) -> None:
    release = asyncio.Event()
    summary_started = asyncio.Event()

    async def answer(request: ChatRequest) -> str:
        if is_summary_request(request):
            summary_started.set()
            await release.wait()
            return "Customer asked several questions about refunds."
        return "ok"

    model = FunctionModel(answer)
    engine = engine_for(database, store, model, budget=ContextBudget(history_turns=2, block_turns=2))
    for n in range(1, 5):
        await engine.handle(inbound(customer_turn(n), n))
    await asyncio.wait_for(summary_started.wait(), 5)
    # A summary is being written; the next customer message is answered meanwhile.
    reply = await asyncio.wait_for(engine.handle(inbound("还在吗？", 5)), 5)
    assert reply.text == "ok"
    release.set()
    await engine.wait_idle()
    conversation = await ConversationStore(db=database).get(KEY)
    assert conversation is not None and conversation.summary.startswith("Customer asked")
    assert conversation.summarized_upto > 0


async def test_a_failing_summary_model_does_not_stop_the_conversation(
    database: Database, store: MemoryStore
) -> None:
    from core.errors import ModelUnavailable

    def answer(request: ChatRequest) -> str:
        if is_summary_request(request):
            raise ModelUnavailable("summary model down")
        return "ok"

    model = FunctionModel(answer)
    budget = ContextBudget(num_ctx=1024, answer_tokens=128, history_turns=2, block_turns=2)
    engine = engine_for(database, store, model, budget=budget)
    await engine.handle(inbound(f"订单{ORDER}怎么还没到", 1))
    for n in range(2, 30):
        assert (await engine.handle(inbound(customer_turn(n), n))).text == "ok"
        await engine.wait_idle()
    last = [r for r in model.requests if not is_summary_request(r)][-1]
    assert ORDER in last.messages[1].content
    assert count_prompt(last.messages, (), qwen_token_counter) <= budget.prompt_limit


async def test_server_side_truncation_is_reported(
    database: Database, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    model = FunctionModel(
        lambda r: ChatResponse(content="ok", truncated=True, usage=Usage(prompt_tokens=8192))
    )
    engine = engine_for(database, store, model, budget=ContextBudget())
    with caplog.at_level(logging.WARNING):
        await engine.handle(inbound("hello", 1, "en"))
    assert any("cut the prompt" in r.getMessage() for r in caplog.records)
    assert any("raise the safety margin" in r.getMessage() for r in caplog.records)
    rows = await ConversationStore(db=database).messages(1)
    assert rows[-1].meta["truncated"] is True


def _turns(count: int) -> list[Message]:
    rows: list[Message] = []
    for n in range(count):
        rows.append(Message(id=2 * n + 1, conversation_id=1, role="user", content=f"问题 {n} " + "内容" * 40))
        rows.append(
            Message(id=2 * n + 2, conversation_id=1, role="assistant", content=f"回答 {n} " + "说明" * 40)
        )
    return rows


def test_history_is_dropped_in_blocks_so_prompts_share_their_prefix() -> None:
    budget = ContextBudget(num_ctx=1400, answer_tokens=100, history_turns=3, block_turns=4)
    builder = ContextBuilder(counter=qwen_token_counter, budget=budget)
    starts = []
    previous = None
    shared_prefix_turns = 0
    for count in range(1, 30):
        built = builder.build(
            system_prompt="SYSTEM",
            tools=(),
            pinned={"order_ids": [ORDER]},
            summary="",
            history=_turns(count),
            user_text="新问题",
        )
        assert built.tokens <= budget.prompt_limit
        assert built.turns_included >= min(3, count)
        starts.append(built.turns_dropped)
        if previous is not None and built.turns_dropped == previous.turns_dropped:
            # Same first turn: the previous prompt (minus its new question) is a prefix of this one.
            assert built.messages[: len(previous.messages) - 1] == previous.messages[:-1]
            shared_prefix_turns += 1
        previous = built
    assert all(start % 4 == 0 or start == max(0, n - 3) for n, start in enumerate(starts, 1))
    assert len(set(starts)) > 2  # history was dropped several times...
    assert shared_prefix_turns >= len(starts) * 0.6  # ...but only every few turns
