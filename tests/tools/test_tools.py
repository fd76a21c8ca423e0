"""Business tools as the model calls them: tickets exactly once, orders only for their owner, hand-off."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlmodel import select

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Conversation, Customer, CustomerIdentity, FaqEntry, Order, Ticket
from core.faq.service import RetrieverHolder
from core.handoff import is_bot_paused, release
from core.llm.base import ToolCall
from core.messages import ConversationKey
from core.stores.memory import MemoryStore
from tools import default_registry
from tools.context import ToolContext

KEY = ConversationKey(channel="web", chat_id="session-42")


async def context(db: Database, *, user_id: str = "u1", message_id: str = "m1") -> ToolContext:
    conversation = await ConversationStore(db=db).get_or_create(KEY, user_id=user_id, language="zh")
    assert conversation.id is not None
    return ToolContext(
        key=KEY,
        conversation_id=conversation.id,
        user_id=user_id,
        message_id=message_id,
        language="zh",
        db=db,
        store=MemoryStore(),
    )


async def call(ctx: ToolContext, name: str, **arguments: Any) -> tuple[bool, dict[str, Any], dict[str, str]]:
    registry = default_registry()
    result = await registry.call(ToolCall(id=f"call_{name}", name=name, arguments=arguments), ctx)
    return result.ok, json.loads(result.content), result.facts


async def tickets(db: Database) -> list[Ticket]:
    async with db.session() as session:
        return list((await session.exec(select(Ticket))).all())


async def test_ticket_is_created_exactly_once_under_concurrent_replays(any_database: Database) -> None:
    ctx = await context(any_database)
    args = {"summary": "耳机左耳没有声音，需要换货", "category": "product", "contact": "13800138000"}
    results = await asyncio.gather(*(call(ctx, "create_ticket", **args) for _ in range(5)))
    assert all(ok for ok, _, _ in results)
    ids = {content["ticket_id"] for _, content, _ in results}
    assert len(ids) == 1
    assert [content["already_existed"] for _, content, _ in results].count(False) == 1
    stored = await tickets(any_database)
    assert len(stored) == 1
    ticket = stored[0]
    assert (ticket.category, ticket.priority, ticket.contact, ticket.status) == (
        "product",
        "normal",
        "13800138000",
        "open",
    )
    assert ticket.conversation_id == ctx.conversation_id
    assert results[0][2] == {"ticket": f"#{ticket.id} (product, open)"}


async def test_a_rerun_that_only_changes_punctuation_finds_the_same_ticket(database: Database) -> None:
    ctx = await context(database)
    _, first, _ = await call(ctx, "create_ticket", summary="Refund not received for order KF1.")
    _, again, _ = await call(ctx, "create_ticket", summary="refund not received for order KF1")
    assert first["ticket_id"] == again["ticket_id"]
    _, other, _ = await call(
        await context(database, message_id="m2"), "create_ticket", summary="Refund not received"
    )
    assert other["ticket_id"] != first["ticket_id"]
    assert len(await tickets(database)) == 2


async def test_ticket_arguments_are_validated_not_trusted(database: Database) -> None:
    ctx = await context(database)
    ok, content, _ = await call(ctx, "create_ticket", summary="help", category="vip-escalation")
    assert not ok
    assert "summary" in content["error"] and "category" in content["error"]
    ok, content, _ = await call(ctx, "create_ticket", summary="需要开发票的帮助", owner="admin")
    assert not ok and "owner" in content["error"]
    assert await tickets(database) == []


async def test_ticket_is_linked_to_the_known_customer(database: Database) -> None:
    async with database.session() as session:
        customer = Customer(name="张伟")
        session.add(customer)
        await session.flush()
        assert customer.id is not None
        session.add(CustomerIdentity(customer_id=customer.id, channel="web", platform_user_id="u1"))
        await session.commit()
    ctx = await context(database)
    await call(ctx, "create_ticket", summary="想修改收货地址到上海")
    assert [t.customer_id for t in await tickets(database)] == [customer.id]


async def seed_orders(db: Database) -> None:
    async with db.session() as session:
        mine, theirs = Customer(name="张伟"), Customer(name="李娜")
        session.add_all([mine, theirs])
        await session.flush()
        assert mine.id is not None and theirs.id is not None
        session.add(CustomerIdentity(customer_id=mine.id, channel="web", platform_user_id="u1"))
        session.add(
            Order(
                id="KF20251103001",
                customer_id=mine.id,
                status="shipped",
                carrier="顺丰",
                tracking_number="SF1",
            )
        )
        session.add(
            Order(
                id="KF20251117006",
                customer_id=theirs.id,
                status="shipped",
                carrier="圆通",
                tracking_number="YT7",
            )
        )
        await session.commit()


async def test_order_lookup_only_shows_the_customers_own_orders(database: Database) -> None:
    await seed_orders(database)
    ctx = await context(database)
    ok, own, facts = await call(ctx, "query_order_status", order_id=" ｋｆ20251103001 ")
    assert ok and own["found"] is True and own["tracking_number"] == "SF1"
    assert facts == {"order KF20251103001": "shipped, 顺丰 SF1"}

    ok, other, facts = await call(ctx, "query_order_status", order_id="KF20251117006")
    assert ok and other["found"] is False and facts == {}
    assert "YT7" not in json.dumps(other) and "圆通" not in json.dumps(other, ensure_ascii=False)
    # Someone else's order looks exactly like one that does not exist.
    _, missing, _ = await call(ctx, "query_order_status", order_id="KF99999999999")
    assert other["reason"] == missing["reason"]

    _, invalid, _ = await call(ctx, "query_order_status", order_id="'; drop table orders; --")
    assert invalid["found"] is False and "not a valid order number" in invalid["reason"]
    ok, content, _ = await call(ctx, "query_order_status", order_id="")
    assert not ok and "order_id" in content["error"]


async def test_request_human_pauses_the_bot_until_released(database: Database) -> None:
    conversations = ConversationStore(db=database)
    ctx = await context(database)
    assert not await is_bot_paused(conversations, KEY)
    ok, content, facts = await call(ctx, "request_human", reason="客户要求人工处理退款争议")
    assert ok and content["status"] == "waiting_for_agent"
    assert await is_bot_paused(conversations, KEY)
    conversation = await conversations.get(KEY)
    assert conversation is not None and conversation.state == "waiting"
    [ticket] = await tickets(database)
    assert (ticket.category, ticket.summary, ticket.id) == (
        "handoff",
        "客户要求人工处理退款争议",
        content["ticket_id"],
    )
    assert facts["handoff"].startswith("requested")

    # A replay of the same message neither opens a second ticket nor disturbs an agent's conversation.
    async with database.session() as session:
        row = (await session.exec(select(Conversation).where(Conversation.key == str(KEY)))).one()
        row.state = "agent"
        session.add(row)
        await session.commit()
    await call(ctx, "request_human", reason="客户要求人工处理退款争议")
    assert len(await tickets(database)) == 1
    assert (await conversations.get(KEY)).state == "agent"  # type: ignore[union-attr]

    assert await release(conversations, KEY)
    assert not await is_bot_paused(conversations, KEY)
    assert not await release(conversations, KEY)
    assert not await is_bot_paused(conversations, ConversationKey(channel="web", chat_id="unknown"))


async def test_search_faq_returns_ranked_answers_with_confidence(database: Database) -> None:
    async with database.session() as session:
        session.add(
            FaqEntry(question="退款多久到账？", answer="1-3 个工作日。", alternatives=["退款什么时候到"])
        )
        session.add(FaqEntry(question="支持货到付款吗？", answer="暂不支持。"))
        await session.commit()
    ctx = await context(database)
    ok, content, _ = await call(ctx, "search_faq", question="我的退款什么时候能到")
    assert ok
    top = content["results"][0]
    assert top["question"] == "退款多久到账？" and top["answer"] == "1-3 个工作日。"
    assert top["confidence"] > content["results"][-1]["confidence"]

    # With the process's shared index, the tool answers from it (no table read).
    holder = RetrieverHolder(embedder=None)
    await holder.rebuild([FaqEntry(id=9, question="可以开发票吗？", answer="可以。")])
    registry = default_registry(faq_index=holder)
    result = await registry.call(
        ToolCall(id="c", name="search_faq", arguments={"question": "能开发票吗"}), ctx
    )
    assert json.loads(result.content)["results"][0]["answer"] == "可以。"
