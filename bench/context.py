"""Context strategies compared on a scripted 40-turn customer conversation.

Plays the conversation through kefu's real engine (SQLite, in-process store, a scripted model that calls
a logistics tool with long results and writes summaries), then replays the same transcript under two
baselines. For each strategy it prints mean and max prompt tokens per turn (Qwen2.5 tokenizer over the
ChatML text Qwen's template renders, tools included), the share of each prompt that is a prefix of the
previous turn's prompt (what Ollama/llama.cpp can reuse from their KV cache), and whether every pinned
fact is still in the last prompt.

    python bench/context.py [--turns 40] [--history-turns 6] [--num-ctx 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from core.context import ContextBudget, ContextBuilder, split_turns
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.db.models import Message
from core.engine import Engine
from core.llm.base import ChatMessage, ChatRequest, ChatResponse, ToolCall, ToolSpec
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage
from core.stores.memory import MemoryStore
from core.summary import INSTRUCTIONS, Summarizer
from core.tokens import qwen_encode, qwen_token_counter, render_chatml
from tools.context import ToolContext
from tools.registry import ToolRegistry

ORDER = "KF20251103001"
PHONE = "13812345678"
EMAIL = "li.lei@example.com"
SYSTEM = (Path(__file__).resolve().parents[1] / "core" / "prompts" / "system.txt").read_text("utf-8")

QUESTIONS = [
    "你好，我的订单还没到，帮我查一下物流吧",
    "Can you tell me where my parcel is right now?",
    "快递员说放驿站了，可我没收到取件码",
    "What is your return policy for opened items?",
    "如果退货，运费谁出？",
    "How long does the refund take after you receive the return?",
    "发票可以开公司抬头吗？",
    "Is it possible to change the delivery address now?",
    "会员积分能抵扣运费吗？",
    "Do you ship to Hong Kong?",
]


async def lookup_logistics(ctx: ToolContext, order_id: str) -> dict[str, Any]:
    """Full logistics trace of an order (long)."""
    events = [
        f"2025-11-0{d % 9 + 1} {h:02d}:15 包裹已到达【{city}转运中心】，正在发往下一站"
        f" / arrived at {city} hub"
        for d, (h, city) in enumerate(
            zip(range(6, 22), ["杭州", "上海", "南京", "合肥", "武汉", "郑州"] * 3, strict=False)
        )
    ]
    return {
        "order_id": order_id,
        "status": "in_transit",
        "events": events,
        "pinned": {f"order {order_id}": "in transit, SF1234567890"},
    }


def scripted(request: ChatRequest) -> ChatResponse | str:
    if request.messages[0].content == INSTRUCTIONS:
        return "客户询问订单物流、退货运费、退款时效和发票等问题；已查询物流，包裹在途。" * 2
    last = request.messages[-1]
    turn = sum(1 for m in request.messages if m.role == "user")
    if last.role == "user" and request.tools and turn % 4 == 1:
        return ChatResponse(
            tool_calls=(ToolCall(id=f"call_{turn}", name="lookup_logistics", arguments={"order_id": ORDER}),)
        )
    if last.role == "tool":
        return (
            "您的包裹正在运输中，最新位置见上方记录，预计两天内送达。"
            "Your parcel is in transit and should arrive within two days."
        )
    return (
        "好的，关于这个问题：我们支持七天无理由退货，退款会在收到退货后三个工作日内原路返回。"
        + " Thanks for asking!"
    )


def verbatim(rows: list[Message]) -> list[ChatMessage]:
    """History as a bot without context management sends it: every message as stored."""
    out = []
    for row in rows:
        if row.role == "tool":
            out.append(
                ChatMessage(
                    role="tool", content=row.content, tool_name=row.tool_name, tool_call_id=row.tool_call_id
                )
            )
        else:
            calls = tuple(ToolCall.model_validate(c) for c in row.tool_calls or ())
            out.append(
                ChatMessage(
                    role="user" if row.role == "user" else "assistant", content=row.content, tool_calls=calls
                )
            )
    return out


def prefix_share(current: list[int], previous: list[int]) -> float:
    shared = 0
    for a, b in zip(current, previous, strict=False):
        if a != b:
            break
        shared += 1
    return shared / len(current)


def report(name: str, prompts: list[str], facts: list[str]) -> dict[str, float]:
    tokens = [qwen_encode(p) for p in prompts]
    sizes = [len(t) for t in tokens]
    reuse = [prefix_share(tokens[i], tokens[i - 1]) for i in range(1, len(tokens))]
    kept = all(fact in prompts[-1] for fact in facts)
    row = {
        "mean": statistics.fmean(sizes),
        "max": max(sizes),
        "reuse": statistics.fmean(reuse),
        "facts": 100.0 if kept else 0.0,
    }
    kept_text = "100%" if kept else "LOST"
    print(f"{name:<22} {row['mean']:>8.0f} {row['max']:>8d} {row['reuse']:>11.1%} {kept_text:>8}")
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--history-turns", type=int, default=6)
    parser.add_argument("--num-ctx", type=int, default=8192)
    args = parser.parse_args()

    registry = ToolRegistry()
    registry.tool(lookup_logistics)
    tools: tuple[ToolSpec, ...] = registry.specs()
    budget = ContextBudget(
        num_ctx=args.num_ctx, history_turns=args.history_turns, block_turns=args.history_turns
    )
    model = FunctionModel(scripted)
    key = ConversationKey(channel="web", chat_id="bench-context")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        await upgrade_async(url)
        async with Database(url=url) as db, MemoryStore() as store:
            conversations = ConversationStore(db=db)
            engine = Engine(
                conversations=conversations,
                store=store,
                model=model,
                tools=registry,
                system_prompt=SYSTEM,
                context=ContextBuilder(counter=qwen_token_counter, budget=budget),
                summarizer=Summarizer(
                    model=model,
                    conversations=conversations,
                    counter=qwen_token_counter,
                    prompt_limit=budget.prompt_limit,
                ),
            )
            for n in range(1, args.turns + 1):
                text = QUESTIONS[(n - 1) % len(QUESTIONS)]
                if n == 1:
                    text = f"你好，我的订单号是{ORDER}，手机{PHONE}，邮箱 {EMAIL}。{text}"
                message = InboundMessage(
                    key=key, user_id="bench", message_id=str(n), text=text, language="zh"
                )
                await engine.handle(message)
                await engine.wait_idle()
            conversation = await conversations.get(key)
            assert conversation is not None and conversation.id is not None
            rows = await conversations.messages(conversation.id)

    # kefu: the first request of each turn, as the engine sent it.
    first_requests = [
        r for r in model.requests if r.messages[0].content != INSTRUCTIONS and r.messages[-1].role == "user"
    ]
    kefu = [render_chatml(r.messages, r.tools) for r in first_requests]

    # Baselines replay the same transcript: full history, and the last N turns (the seed's sliding window).
    turns = split_turns(rows)
    full, naive = [], []
    for i, turn in enumerate(turns):
        user = ChatMessage.user(turn[0].content)
        before = [m for t in turns[:i] for m in t]
        full.append(render_chatml([ChatMessage.system(SYSTEM), *verbatim(before), user], tools))
        window = [m for t in turns[max(0, i - args.history_turns) : i] for m in t]
        naive.append(render_chatml([ChatMessage.system(SYSTEM), *verbatim(window), user], tools))

    facts = [ORDER, PHONE, EMAIL]
    print(f"{args.turns}-turn conversation, history_turns={args.history_turns}, num_ctx={args.num_ctx}")
    print(f"{'strategy':<22} {'mean tok':>8} {'max tok':>8} {'prefix reuse':>11} {'pinned':>8}")
    base = report("full history", full, facts)
    report("sliding window (6)", naive, facts)
    ours = report("kefu", kefu, facts)
    print(f"kefu mean tokens = {ours['mean'] / base['mean']:.1%} of full history (target <= 35%)")
    print(
        f"kefu prefix reuse = {ours['reuse']:.1%} (target >= 80%); pinned facts kept = {ours['facts']:.0f}%"
    )


if __name__ == "__main__":
    asyncio.run(main())
