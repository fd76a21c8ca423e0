"""Hand the conversation to a person: the bot stops answering until the conversation is released."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from core.conversations import ConversationStore
from core.handoff import idempotency_key
from core.handoff import request_human as pause_for_human
from tools.context import ToolContext
from tools.registry import ToolRegistry

__all__ = ["register", "request_human"]


async def request_human(
    ctx: ToolContext,
    reason: Annotated[
        str,
        Field(min_length=2, max_length=500, description="Why a person is needed, in one sentence"),
    ],
) -> dict[str, Any]:
    """Transfer the customer to a human agent when they ask for a person or the problem needs one.
    客户要求人工或问题需要人工处理时，转接人工客服。"""
    reason = " ".join(reason.split())
    ticket = await pause_for_human(
        ConversationStore(db=ctx.db),
        conversation_id=ctx.conversation_id,
        reason=reason,
        idempotency_key=idempotency_key("handoff", str(ctx.key), ctx.message_id),
    )
    return {
        "status": "waiting_for_agent",
        "ticket_id": ticket.id,
        "message": "A human agent has been asked to take over. Tell the customer briefly that a "
        "person will reply here soon (service hours 9:00-21:00), and do not answer further questions.",
        "pinned": {"handoff": f"requested: {reason[:80]}"},
    }


def register(registry: ToolRegistry) -> None:
    registry.tool(request_human, timeout=10.0)
