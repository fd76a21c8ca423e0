"""Support tickets the model may open for the customer (exactly once per request)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.functional_validators import AfterValidator

from core.faq.normalize import normalize_question
from core.handoff import idempotency_key, open_ticket
from tools.context import ToolContext
from tools.registry import ToolRegistry

__all__ = ["create_ticket", "register"]


def _clean(value: str) -> str:
    # The model's text is untrusted: drop control characters and collapse whitespace.
    cleaned = "".join(ch if ch.isprintable() or ch in "\n" else " " for ch in value)
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise ValueError("must not be blank")
    return cleaned


Summary = Annotated[
    str,
    Field(min_length=5, max_length=1000, description="What the customer needs, in one or two sentences"),
    AfterValidator(_clean),
]
Category = Literal["order", "delivery", "refund", "product", "account", "complaint", "general"]
Priority = Literal["low", "normal", "high", "urgent"]
Contact = Annotated[
    str | None,
    Field(
        max_length=200,
        description="Phone number or e-mail the customer gave for the reply, if any",
    ),
]


async def create_ticket(
    ctx: ToolContext,
    summary: Summary,
    category: Annotated[Category, Field(description="The kind of problem")] = "general",
    priority: Annotated[Priority, Field(description="How urgent it is for the customer")] = "normal",
    contact: Contact = None,
) -> dict[str, Any]:
    """Open a support ticket so the support team follows up on the customer's problem; returns its number.
    为客户创建售后/投诉工单，由人工客服跟进，返回工单号。"""
    if contact is not None:
        contact = " ".join(contact.split()) or None
    # A platform retry or a re-processed message asks again with the same message id: the same key
    # finds the first ticket. The summary is normalised so a re-run that only changes punctuation or
    # case does too.
    key = idempotency_key("ticket", str(ctx.key), ctx.message_id, normalize_question(summary))
    ticket = await open_ticket(
        ctx.db,
        idempotency_key=key,
        summary=summary,
        category=category,
        priority=priority,
        contact=contact,
        conversation_id=ctx.conversation_id,
        channel=ctx.key.channel,
        user_id=ctx.user_id,
    )
    return {
        "ticket_id": ticket.id,
        "status": ticket.status,
        "already_existed": not ticket.created,
        "pinned": {"ticket": f"#{ticket.id} ({category}, {ticket.status})"},
    }


def register(registry: ToolRegistry) -> None:
    registry.tool(create_ticket, timeout=10.0)
